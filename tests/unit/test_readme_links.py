"""The READMEs link only to files of the repository, so every link works in a fresh clone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "readme", sorted(p.relative_to(ROOT) for p in ROOT.glob("**/README.md") if ".venv" not in p.parts)
)
def test_every_relative_link_is_a_file_of_the_repository(readme: Path) -> None:
    text = (ROOT / readme).read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        path = ((ROOT / readme).parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{readme}: {target} leaves the repository"
        assert path.exists(), f"{readme}: {target} does not exist"
