"""The run's watchdog (trainer/reaper.py): what a driver started ends with it, however the driver ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from megatron_minio3.trainer.reaper import run_processes
from tests.distributed import REPO_ROOT
from tests.processes import MARK_ENV, kill_marked, marked_processes, new_marker, wait_until_gone

# A driver that starts a reaper, then a child ignoring SIGTERM (as Ray's agents do) that starts a grandchild
# in a new session (as Ray's raylet starts workers), and a short-lived child that starts a process which zeroes its
# own environment area (as setproctitle does in Ray's agents) and ignores SIGTERM, then exits after a few seconds so
# that the zeroed one is re-parented (as Ray's agents are when the raylet dies first) and only the watchdog's
# earlier scans know it. The driver prints READY once that child has exited, then waits.
CLOBBER = textwrap.dedent("""
    import ctypes, os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    env_start, env_end = int(fields[47]), int(fields[48])  # stat fields 50 and 51
    ctypes.memset(env_start, 0, env_end - env_start)
    print("CLOBBERED", os.getpid(), flush=True)
    time.sleep(600)
""")
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    zeroed = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    print(zeroed.stdout.readline().strip(), flush=True)
    time.sleep(3)  # the watchdog scans every second meanwhile
""")
DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_minio3.trainer.reaper import Reaper
    reaper = Reaper(grace_s=0.5)
    stubborn = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); " \\
               "time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", stubborn])
    subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[3]], check=True)
    print("READY", flush=True)
    if sys.argv[1] == "close":
        time.sleep(1)
        reaper.close()
        print("CLOSED", flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.mark.parametrize("ending", ["SIGKILL", "close"])
def test_the_driver_s_processes_end_with_it(ending):
    marker = new_marker()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ending, PARENT, CLOBBER], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **marker})
    zeroed = None
    try:
        clobbered = driver.stdout.readline().split()
        assert clobbered[0] == "CLOBBERED", clobbered
        zeroed = int(clobbered[1])
        assert f"{MARK_ENV}={marker[MARK_ENV]}" not in open(f"/proc/{zeroed}/environ").read()  # invisible to markers
        assert driver.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 20
        while len(marked_processes(marker)) < 4:  # driver, reaper, child, grandchild
            assert time.monotonic() < deadline, marked_processes(marker)
            time.sleep(0.1)
        if ending == "SIGKILL":
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        else:
            assert driver.stdout.readline().strip() == "CLOSED"  # close() returns once the sweep is done
            assert marked_processes(marker, exclude=(driver.pid,)) == {}
            assert not _alive(zeroed)
        assert wait_until_gone(marker, timeout=10, exclude=(driver.pid,)) == {}
        deadline = time.monotonic() + 10
        while _alive(zeroed):
            assert time.monotonic() < deadline, f"the process with a zeroed environment ({zeroed}) is still alive"
            time.sleep(0.1)
    finally:
        kill_marked(marker)
        if zeroed is not None and _alive(zeroed):
            os.kill(zeroed, signal.SIGKILL)
        driver.kill()
        driver.wait()


def test_run_processes_finds_only_the_run_s_live_processes():
    run_id = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "MINIO3_RUN_ID": run_id})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "MINIO3_RUN_ID": run_id + "0"})
    try:
        deadline = time.monotonic() + 10
        while run_processes(run_id) != [child.pid]:
            assert time.monotonic() < deadline, run_processes(run_id)
            time.sleep(0.05)
        child.kill()
        child.wait()
        assert run_processes(run_id) == []
    finally:
        child.kill()
        other.kill()
        child.wait()
        other.wait()
