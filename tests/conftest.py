"""Suite-wide settings: no per-example deadline (CI machines are loaded and noisy); a local Ray."""

from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("dispers", deadline=None, print_blob=True)
settings.load_profile("dispers")


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local Ray with 2 CPUs for one test, shut down after it (skipped without the ray extra)."""
    pytest.importorskip("ray")
    import ray

    # Ray waits 30 s for its control server's port by default: too short on a loaded machine.
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "180")
    # Its raylet gets a fixed 30 s to register, which a machine shared with other test suites
    # sometimes misses: try three times, and only then give up on Ray itself (not on dispers).
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # Ray raises bare Exception / RuntimeError on a slow start
            ray.shutdown()
            if attempt == 2:
                pytest.skip(f"a local Ray did not start on this machine: {str(exc)[:120]}")
    try:
        yield
    finally:
        ray.shutdown()
