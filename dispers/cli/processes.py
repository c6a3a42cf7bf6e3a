"""`dispers up / ps / down`: every actor of a local cluster as its own `dispers serve` process.

`up` starts one process per roster entry with its own log file (`<cluster>/logs/<name>.log`),
waits until each answers the Health RPC over the cluster's (mutual TLS) channels, and records
what it started in `<cluster>/run/processes.json`: each process's PID and its start identity
(the kernel's start time of that PID), so `down` stops exactly those and never a process that
took over a PID after ours ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.protocol.health import HealthInfo

log = logging.getLogger(__name__)

STATE_FILE = Path("run") / "processes.json"
LOG_DIR = Path("logs")


@dataclass(frozen=True)
class Started:
    """One process `up` started."""

    name: str
    role: str
    pid: int
    start_id: str  # what the kernel says about when this PID started: tells our process from a reuse
    log: str


def process_start_id(pid: int) -> str | None:
    """An identity of the running process `pid` that a later process reusing the PID does not
    share (its start time), or None if no such process runs (a zombie counts as gone)."""
    if pid <= 0:
        return None
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return None
        # Fields after the command name (which may hold spaces), from its closing parenthesis.
        fields = text[text.rfind(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            return None
        return f"proc:{fields[19]}"  # field 22 of stat: start time in clock ticks after boot
    try:  # no /proc (macOS, BSD): ps gives the start time
        out = subprocess.run(
            ["ps", "-o", "lstart=,stat=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return None
    if not out or out.split()[-1].startswith("Z"):
        return None
    return "ps:" + " ".join(out.split()[:-1])


def is_ours(record: Started) -> bool:
    """Whether the process `up` recorded still runs (the same process, not a reused PID)."""
    return process_start_id(record.pid) == record.start_id


def cluster_dir(config: ClusterConfig) -> Path:
    """The directory of the cluster's config file."""
    if config.path is None:
        raise DispersError(ErrorCode.CONFIG, "the cluster config has no file")
    return Path(config.path).resolve().parent


def read_state(directory: Path) -> list[Started]:
    """What `up` recorded for the cluster in `directory` (empty if it never ran or `down` ran)."""
    path = directory / STATE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [Started(**p) for p in data["processes"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DispersError(ErrorCode.CONFIG, f"{path} is not a process record of `dispers up`") from None


def _write_state(directory: Path, started: Sequence[Started]) -> None:
    path = directory / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"processes": [asdict(s) for s in started]}, indent=2) + "\n")
    tmp.replace(path)


def _reap(pid: int) -> None:
    """Collect a child's exit status if it is ours (in-process callers such as tests)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def check_health(config: ClusterConfig, name: str, timeout_s: float = 2.0) -> HealthInfo:
    """Ask actor `name` who serves on its endpoint, as the cluster's first querier (its certificate)."""
    from dispers.transport.grpc_client import HealthClient, client_for

    me = config.roster.by_role(Role.QUERIER)[0].name
    with client_for(config, me, name, HealthClient) as client:
        return client.check(timeout_s)


def _serve_command(config: ClusterConfig, name: str, role: str) -> list[str]:
    assert config.path is not None
    return [sys.executable, "-m", "dispers.cli.main", "serve", role,
            "--config", str(Path(config.path).resolve()), "--name", name]  # fmt: skip


def up(
    config: ClusterConfig,
    *,
    ready_timeout_s: float = 60.0,
    on_ready: Callable[[str], None] | None = None,
) -> list[Started]:
    """Start every actor of the cluster as its own process and wait until each answers Health.

    Refused if processes recorded by an earlier `up` still run. If any actor does not become
    healthy in time, every process started here is stopped again and nothing stays recorded.
    """
    directory = cluster_dir(config)
    running = [s for s in read_state(directory) if is_ours(s)]
    if running:
        raise DispersError(
            ErrorCode.FAILED_PRECONDITION,
            f"the cluster in {directory} is already up ({len(running)} processes): "
            "`dispers ps` shows them, `dispers down` stops them",
        )
    logs = directory / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started: list[Started] = []
    try:
        for entry in config.roster:
            log_path = logs / f"{entry.name}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    _serve_command(config, entry.name, entry.role.value),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # outlives this command; Ctrl-C in its terminal spares it
                )
            start_id = process_start_id(proc.pid) or ""
            started.append(Started(entry.name, entry.role.value, proc.pid, start_id, str(log_path)))
            proc.returncode = 0  # not waited for here: `down` stops it (and Popen must not warn)
            _write_state(directory, started)  # at once: an interrupted `up` can still be downed
        _wait_healthy(config, started, ready_timeout_s, on_ready)
    except BaseException:
        stop(started)
        (directory / STATE_FILE).unlink(missing_ok=True)
        raise
    return started


def _wait_healthy(
    config: ClusterConfig,
    started: Sequence[Started],
    timeout_s: float,
    on_ready: Callable[[str], None] | None,
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(started)
    while pending:
        for record in list(pending):
            if not is_ours(record):
                _reap(record.pid)
                raise DispersError(
                    ErrorCode.UNAVAILABLE, f"{record.name} exited while starting (see {record.log})"
                )
            try:
                info = check_health(config, record.name, timeout_s=1.0)
            except DispersError:
                continue
            if info.name != record.name or not info.serving:
                raise DispersError(
                    ErrorCode.UNAVAILABLE,
                    f"{record.name}'s endpoint is answered by {info.name!r} (a port of another cluster?)",
                )
            pending.remove(record)
            if on_ready is not None:
                on_ready(record.name)
        if pending and time.monotonic() > deadline:
            names = ", ".join(r.name for r in pending)
            raise DispersError(
                ErrorCode.UNAVAILABLE,
                f"not healthy within {timeout_s:.0f} s: {names} (see {Path(pending[0].log).parent})",
            )
        if pending:
            time.sleep(0.1)


def stop(records: Sequence[Started], *, grace_s: float = 10.0) -> tuple[list[Started], list[Started]]:
    """SIGTERM each recorded process that is still ours, SIGKILL it after `grace_s`.

    Returns (stopped, skipped): skipped are PIDs that no longer belong to the process recorded
    (it ended and the PID was reused, or it is gone): those are never signalled.
    """
    stopped: list[Started] = []
    skipped: list[Started] = []
    for record in records:
        if is_ours(record):
            try:
                os.kill(record.pid, signal.SIGTERM)
                stopped.append(record)
            except ProcessLookupError:
                skipped.append(record)
        else:
            _reap(record.pid)
            skipped.append(record)
    deadline = time.monotonic() + grace_s
    for record in stopped:
        while is_ours(record) and time.monotonic() < deadline:
            _reap(record.pid)
            time.sleep(0.05)
        if is_ours(record):
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killed", record.name, record.pid, grace_s)
            os.kill(record.pid, signal.SIGKILL)
            while process_start_id(record.pid) is not None and time.monotonic() < deadline + 5:
                _reap(record.pid)
                time.sleep(0.05)
        _reap(record.pid)
    return stopped, skipped


def down(config: ClusterConfig, *, grace_s: float = 10.0) -> tuple[list[Started], list[Started]]:
    """Stop what `up` recorded for this cluster and forget it; see `stop`."""
    directory = cluster_dir(config)
    records = read_state(directory)
    result = stop(records, grace_s=grace_s)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return result


@dataclass(frozen=True)
class ActorStatus:
    """One line of `dispers ps`."""

    name: str
    role: str
    endpoint: str
    pid: int | None
    process: str  # running, exited, not started
    health: str  # healthy, or why not
    log: str | None  # the log file `up` gave it


def status(config: ClusterConfig) -> list[ActorStatus]:
    """Each roster actor: the process `up` recorded for it and whether it answers Health."""
    records = {r.name: r for r in read_state(cluster_dir(config))}
    out = []
    for entry in config.roster:
        record = records.get(entry.name)
        if record is None:
            process = "not started"
        elif is_ours(record):
            process = "running"
        else:
            _reap(record.pid)
            process = "exited"
        try:
            info = check_health(config, entry.name)
            health = "healthy" if info.serving and info.name == entry.name else f"answered as {info.name}"
        except DispersError as exc:
            health = "unreachable" if exc.code is ErrorCode.UNAVAILABLE else exc.code.value.lower()
        pid = record.pid if record is not None else None
        log_path = record.log if record is not None else None
        out.append(ActorStatus(entry.name, entry.role.value, entry.endpoint, pid, process, health, log_path))
    return out
