"""Nothing a run starts outlives its driver: a watchdog process that ends the run's processes when the driver is gone.

The trainer starts a `Reaper` before it starts Ray. The reaper puts a fresh run id into the driver's environment
(RUN_ID_ENV), so every process started from then on inherits it: Ray's GCS and raylet, its dashboard, log monitor,
runtime-env and dashboard agents, the worker processes, and what they start in turn (vLLM engines, checkpoint
writers). It then spawns the watchdog (`python -m megatron_minio3.trainer.reaper DRIVER_PID RUN_ID`) in a session
of its own (a Ctrl-C in the terminal does not reach it), holding the read end of a pipe whose write end only the
driver holds, and a pidfd of the driver.

The watchdog wakes when the pipe closes or the driver exits. The driver closes the pipe in `Reaper.close` (after
`ray.shutdown()`, on a normal exit, an error or Ctrl-C) and waits for the sweep; if the driver dies any other way,
SIGKILL included, the kernel closes its end. The run's processes are those whose environment carries the run id
(read from /proc/PID/environ: the environment a process started with) and all their descendants; while the driver
lives, the watchdog records them (pid and start time) every SCAN_S seconds, because a process may overwrite its
environment area (Ray's agents do, through setproctitle) and loses its marked parent when that is killed first.
The sweep sends SIGTERM to all of them, waits up to `grace_s` for them to exit, then SIGKILLs whatever is left,
scanning again until none is left or `REAP_DEADLINE_S` has passed.
Limits: Linux only (/proc); a process that overwrote its environment and was started less than SCAN_S before the
driver died, after its parent was re-parented, or on another node, is not found; a SIGKILL of the watchdog itself
disarms it.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid

RUN_ID_ENV = "MINIO3_RUN_ID"
GRACE_S = 3.0  # SIGTERM, then this long before SIGKILL
REAP_DEADLINE_S = 30.0
SCAN_S = 1.0  # how often the watchdog records the run's processes while the driver lives


def _process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time in clock ticks)} of the live processes (zombies left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if len(fields) > 19 and fields[0] not in (b"Z", b"X"):
            table[int(entry)] = (int(fields[1]), int(fields[19]))  # stat fields 4 (ppid) and 22 (starttime)
    return table


def _carries(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return marker in handle.read().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return False


def run_processes(run_id: str, *, exclude: tuple[int, ...] = (), known: dict[int, int] | None = None) -> list[int]:
    """Pids of the run's live processes (zombies left out): those whose starting environment holds
    RUN_ID_ENV=run_id, every descendant of those, and the still-living members of `known` ({pid: start time},
    from earlier scans). Descendants count because a process may overwrite its starting environment: Ray's
    DashboardAgent and RuntimeEnvAgent set their title with setproctitle, which zeroes the whole argv and
    environment area, so /proc/PID/environ no longer names the run. Found while their parent (the raylet) lives,
    they stay known after it dies and they are re-parented."""
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    table = _process_table()
    found = {pid for pid in table if _carries(pid, marker)}
    found |= {pid for pid, started in (known or {}).items() if table.get(pid, (0, None))[1] == started}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    if known is not None:
        known.update({pid: table[pid][1] for pid in found})
    return sorted(pid for pid in found if pid not in exclude)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def sweep(run_id: str, *, grace_s: float = GRACE_S, deadline_s: float = REAP_DEADLINE_S,
          exclude: tuple[int, ...] = (), known: dict[int, int] | None = None) -> list[int]:
    """End every process of the run: SIGTERM, `grace_s` to exit, then SIGKILL until none is left (new ones
    included) or `deadline_s` has passed. `known` ({pid: start time}) adds the processes seen in earlier scans.
    Returns the pids still alive at the deadline (normally none)."""
    exclude = (*exclude, os.getpid())
    known = {} if known is None else known
    started = time.monotonic()
    pids = run_processes(run_id, exclude=exclude, known=known)
    _signal_all(pids, signal.SIGTERM)
    while pids and time.monotonic() - started < grace_s:
        time.sleep(0.1)
        pids = run_processes(run_id, exclude=exclude, known=known)
    while pids and time.monotonic() - started < deadline_s:
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
        pids = run_processes(run_id, exclude=exclude, known=known)
    return pids


def _wait_for_driver(driver_pid: int, run_id: str, known: dict[int, int]) -> None:
    """Block until stdin (the driver's pipe) reaches end of file or the driver exits; meanwhile scan the run's
    processes every SCAN_S seconds into `known`, so that those whose environment no longer names the run are
    still found once their marked parent is gone."""
    watched = [sys.stdin.fileno()]
    try:
        watched.append(os.pidfd_open(driver_pid))
    except (AttributeError, OSError):  # no pidfd (old kernel): watch the parent pid instead
        pass
    while True:
        ready, _, _ = select.select(watched, [], [], SCAN_S)
        if watched[0] in ready and not os.read(watched[0], 4096):
            return
        if len(watched) > 1 and watched[1] in ready:
            return
        if os.getppid() != driver_pid:
            return
        run_processes(run_id, exclude=(driver_pid, os.getpid()), known=known)


class Reaper:
    """Driver side: start the watchdog (and set the run id) before starting the processes it must end."""

    def __init__(self, grace_s: float = GRACE_S):
        self.run_id = uuid.uuid4().hex
        child_env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "megatron_minio3.trainer.reaper", str(os.getpid()), self.run_id, str(grace_s)],
            stdin=subprocess.PIPE, env=child_env, start_new_session=True,
        )
        os.environ[RUN_ID_ENV] = self.run_id

    def close(self, timeout_s: float = REAP_DEADLINE_S + 10) -> None:
        """Sweep now (after the orderly shutdown) and wait for it; the run id leaves the environment."""
        if os.environ.get(RUN_ID_ENV) == self.run_id:
            del os.environ[RUN_ID_ENV]
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def _main(argv: list[str]) -> int:
    driver_pid, run_id, grace_s = int(argv[0]), argv[1], float(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, int] = {}
    _wait_for_driver(driver_pid, run_id, known)
    sweep(run_id, grace_s=grace_s, exclude=(driver_pid,), known=known)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
