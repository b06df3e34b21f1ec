"""Nothing a run starts outlives its driver: a watchdog process that ends the run's processes when the driver is gone.

The trainer starts a `Reaper` before it starts Ray. The reaper puts a fresh run id into the driver's environment
(RUN_ID_ENV), so every process started from then on inherits it: Ray's GCS and raylet, its dashboard, log monitor,
runtime-env and dashboard agents, the worker processes, and what they start in turn (vLLM engines, checkpoint
writers). It then spawns the watchdog (`python -m megatron_minio3.trainer.reaper DRIVER_PID RUN_ID`) in a session
of its own (a Ctrl-C in the terminal does not reach it), holding the read end of a pipe whose write end only the
driver holds, and a pidfd of the driver.

The watchdog wakes when the pipe closes or the driver exits. The driver closes the pipe in `Reaper.close` (after
`ray.shutdown()`, on a normal exit, an error or Ctrl-C) and waits for the sweep; if the driver dies any other way,
SIGKILL included, the kernel closes its end. The sweep sends SIGTERM to every process whose environment carries
the run id (read from /proc/PID/environ: the environment a process started with), waits up to `grace_s` for them
to exit, then SIGKILLs whatever is left, scanning again until none is left or `REAP_DEADLINE_S` has passed.
Limits: Linux only (/proc); processes that start with an environment of their own (env -i) or run on other nodes
are not found; a SIGKILL of the watchdog itself disarms it.
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


def run_processes(run_id: str, *, exclude: tuple[int, ...] = ()) -> list[int]:
    """Pids of the live processes (zombies left out) whose starting environment holds RUN_ID_ENV=run_id."""
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def sweep(run_id: str, *, grace_s: float = GRACE_S, deadline_s: float = REAP_DEADLINE_S,
          exclude: tuple[int, ...] = ()) -> list[int]:
    """End every process of the run: SIGTERM, `grace_s` to exit, then SIGKILL until none is left (new ones
    included) or `deadline_s` has passed. Returns the pids still alive at the deadline (normally none)."""
    exclude = (*exclude, os.getpid())
    started = time.monotonic()
    pids = run_processes(run_id, exclude=exclude)
    _signal_all(pids, signal.SIGTERM)
    while pids and time.monotonic() - started < grace_s:
        time.sleep(0.1)
        pids = run_processes(run_id, exclude=exclude)
    while pids and time.monotonic() - started < deadline_s:
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
        pids = run_processes(run_id, exclude=exclude)
    return pids


def _wait_for_driver(driver_pid: int) -> None:
    """Block until stdin (the driver's pipe) reaches end of file or the driver exits."""
    watched = [sys.stdin.fileno()]
    try:
        watched.append(os.pidfd_open(driver_pid))
    except (AttributeError, OSError):  # no pidfd (old kernel): watch the parent pid instead
        pass
    while True:
        ready, _, _ = select.select(watched, [], [], 1.0)
        if watched[0] in ready and not os.read(watched[0], 4096):
            return
        if len(watched) > 1 and watched[1] in ready:
            return
        if os.getppid() != driver_pid:
            return


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
    _wait_for_driver(driver_pid)
    sweep(run_id, grace_s=grace_s, exclude=(driver_pid,))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
