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
from tests.processes import kill_marked, marked_processes, new_marker, wait_until_gone

# A driver that starts a reaper, then a child ignoring SIGTERM (as Ray's agents do) that starts a grandchild
# in a new session (as Ray's raylet starts workers), then prints READY and waits.
DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_minio3.trainer.reaper import Reaper
    reaper = Reaper(grace_s=0.5)
    stubborn = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); " \\
               "time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", stubborn])
    print("READY", flush=True)
    if sys.argv[1] == "close":
        time.sleep(1)
        reaper.close()
        print("CLOSED", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("ending", ["SIGKILL", "close"])
def test_the_driver_s_processes_end_with_it(ending):
    marker = new_marker()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ending], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **marker})
    try:
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
        assert wait_until_gone(marker, timeout=10, exclude=(driver.pid,)) == {}
    finally:
        kill_marked(marker)
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
