"""Finding the processes a test started, however deep: the test puts TEST_MARK=<marker> in the environment of the
process it starts, and every descendant inherits it (read back from /proc/PID/environ, the environment a process
started with). Independent of the trainer's own watchdog, which marks its runs with a variable of its own."""
from __future__ import annotations

import os
import signal
import time
import uuid

MARK_ENV = "TEST_MARK"


def new_marker() -> dict[str, str]:
    """Environment variables to add to a process started by a test."""
    return {MARK_ENV: uuid.uuid4().hex}


def marked_processes(env: dict[str, str], exclude: tuple[int, ...] = ()) -> dict[int, str]:
    """{pid: command line} of the live processes (zombies left out) that carry the marker of `env`."""
    needle = f"{MARK_ENV}={env[MARK_ENV]}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
    return found


def wait_for_process(env: dict[str, str], prefix: str, timeout: float, alive=lambda: True) -> int:
    """The pid of the first marked process whose command line starts with `prefix` (e.g. "ray::ActorWorker")."""
    deadline = time.monotonic() + timeout
    while True:
        for pid, command in marked_processes(env).items():
            if command.startswith(prefix):
                return pid
        assert alive(), f"the run ended before a {prefix} process appeared"
        assert time.monotonic() < deadline, f"no {prefix} process within {timeout} s"
        time.sleep(0.2)


def wait_until_gone(env: dict[str, str], timeout: float, exclude: tuple[int, ...] = ()) -> dict[int, str]:
    """Waits until no marked process is left (or `timeout`); returns those left."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(env, exclude)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def kill_marked(env: dict[str, str]) -> None:
    """Clean-up after a failed test: SIGKILL every marked process left."""
    for pid in marked_processes(env):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
