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


def _start_times() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of the live processes (zombies left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in (b"Z", b"X"):
                table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def marked_tree(env: dict[str, str]) -> dict[int, int]:
    """{pid: start time} of the marked processes and all their descendants: a process that overwrites its
    environment area (Ray's agents, through setproctitle) no longer shows the marker but is still a child."""
    table = _start_times()
    found = set(marked_processes(env)) & set(table)
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return {pid: table[pid][1] for pid in found}


def alive_of(snapshot: dict[int, int], exclude: tuple[int, ...] = ()) -> dict[int, str]:
    """{pid: command line} of the processes of a `marked_tree` snapshot still alive (same pid and start time)."""
    table = _start_times()
    left = {}
    for pid, started in snapshot.items():
        if pid not in exclude and table.get(pid, (0, None))[1] == started:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    left[pid] = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
    return left
