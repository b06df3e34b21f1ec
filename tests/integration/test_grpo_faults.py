"""Faults in the middle of a GRPO run (`make test-slow`): a rollout worker killed while it generates (hybrid: an actor
rank holding the engine; separate: a RolloutWorker), an actor rank killed while it trains, the judge down for longer
than its retries, and a full disk during a checkpoint save. Each ends the command line with a clear message and
status 1, leaves the last complete checkpoint intact (every file matching its recorded checksum) and no process
of the run behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_minio3.trainer.checkpoint import CheckpointManager
from tests.distributed import REPO_ROOT
from tests.integration.test_grpo_cpu import dataset, overrides  # noqa: F401 (dataset is a fixture)
from tests.integration.test_judge_fake import Reply, fake_judge  # noqa: F401 (fake_judge is a fixture)
from tests.processes import kill_marked, new_marker, wait_for_process, wait_until_gone

pytestmark = pytest.mark.slow

GRPO = [sys.executable, "-u", "-m", "megatron_minio3.trainer.grpo", "--config", "configs/tiny_cpu.yaml"]


class Run:
    """The command line in a subprocess, its output in a log file, every process it starts marked."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] = (), env: dict[str, str] | None = None):
        self.log = log
        self.marker = new_marker()
        with log.open("w") as handle:
            self.process = subprocess.Popen([*prefix, *GRPO, *args], cwd=REPO_ROOT, stdout=handle,
                                            stderr=subprocess.STDOUT, text=True,
                                            env={**os.environ, **(env or {}), **self.marker})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, condition, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.alive(), f"the run ended before {what}:\n{self.text()[-6000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.text()[-6000:]}"
            time.sleep(0.2)

    def kill(self, prefix: str) -> int:
        """SIGKILL the first process of the run whose command line starts with `prefix`; its pid."""
        pid = wait_for_process(self.marker, prefix, timeout=60, alive=self.alive)
        os.kill(pid, signal.SIGKILL)
        return pid

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """The exit status and output; no process of the run may outlive the command line."""
        try:
            code = self.process.wait(timeout=timeout)
            left = wait_until_gone(self.marker, timeout=30)
            assert left == {}, left
        finally:
            self.process.kill()
            kill_marked(self.marker)
        return code, self.text()


def assert_ends_with_the_last_checkpoint(text: str, message: str, checkpoints: Path, step: int) -> None:
    """The error line, then the latest complete checkpoint, which verifies; no unfinished save left behind."""
    latest = checkpoints / f"step_{step:08d}"
    assert f"error: {message}" in text, text[-6000:]
    assert f"latest complete checkpoint: {latest}" in text, text[-6000:]
    assert "Traceback" not in text.split("error: ")[-1]
    assert CheckpointManager(checkpoints).select(True) == latest  # every file as recorded at save
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("placement, victim", [("hybrid", "ray::ActorWorker"), ("separate", "ray::RolloutWorker")])
def test_a_rollout_worker_killed_while_it_generates(tiny_hf_dir, dataset, tmp_path, placement, victim):  # noqa: F811
    out = tmp_path / "run"
    run = Run(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": 3,
                                                       "trainer.rollout_placement": placement}), tmp_path / "run.log")
    run.wait_for(lambda: (out / "checkpoints" / "step_00000001").exists(), "the step-1 checkpoint")
    run.wait_for(lambda: "step 2: generation round 1" in run.text(), "step 2's generation")
    pid = run.kill(victim)
    code, text = run.finish()
    assert code == 1, text[-6000:]
    assert_ends_with_the_last_checkpoint(text, "a worker process died during rollout.generate_round",
                                         out / "checkpoints", 1)
    assert f"pid: {pid}" in text.split("error: ")[-1]


def test_an_actor_rank_killed_while_it_trains(tiny_hf_dir, dataset, tmp_path):  # noqa: F811
    """Two data-parallel ranks: the survivor waits in a gradient all-reduce for the dead one; the run stops
    without waiting for it."""
    out = tmp_path / "run"
    run = Run(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": 3, "parallel.dp": 2}),
              tmp_path / "run.log")
    run.wait_for(lambda: (out / "checkpoints" / "step_00000001").exists(), "the step-1 checkpoint")
    run.wait_for(lambda: re.search(r"step 2: \d+ sequences in", run.text()) is not None, "step 2's update")
    time.sleep(1.0)  # inside the update: packing, old log-probs, the optimizer steps
    run.kill("ray::ActorWorker")
    code, text = run.finish()
    assert code == 1, text[-6000:]
    assert_ends_with_the_last_checkpoint(text, "a worker process died during actor.train", out / "checkpoints", 1)


def test_the_judge_down_beyond_its_retries_stops_the_run(tiny_hf_dir, dataset, tmp_path, fake_judge):  # noqa: F811
    """The judge answers step 1, then only 503s: every sample of step 2 fails to score after its retries, in every
    generation round (samples without an answer are scored 0 without it). Before, the step trained on nothing,
    saved, and the run went on spending steps without updates."""

    def grade(index: int, body: dict, user: str) -> Reply:
        reference = user.split("Reference answer: ", 1)[1].split("\n", 1)[0].strip("() ")
        prediction = user.split("Model prediction: ", 1)[1].split("\n", 1)[0].strip("() ")
        return Reply.chat(f"Score: {int(reference == prediction)}")

    fake_judge.reset(grade)
    judged = dataset.with_name("judged.json")  # beside the images; every row asks for the judge
    judged.write_text(json.dumps([{**row, "verifier": "judge"} for row in json.loads(dataset.read_text())]))
    out = tmp_path / "run"
    judge = {"reward.judge.base_url": fake_judge.base_url, "reward.judge.api_key_env": "''",
             "reward.judge.max_retries": 1, "reward.judge.timeout_s": 2, "reward.judge.backoff_initial_s": 0.01,
             "reward.judge.cache_size": 0,  # every sample asks the judge (cached verdicts would still score some)
             "trainer.total_steps": 3}
    run = Run(overrides(tiny_hf_dir, judged, out, **judge), tmp_path / "run.log")
    run.wait_for(lambda: (out / "checkpoints" / "step_00000001").exists(), "the step-1 checkpoint")
    fake_judge.script = lambda index, body, user: Reply(503, '{"error": "overloaded"}')
    code, text = run.finish()
    assert code == 1, text[-6000:]
    assert fake_judge.num_requests > 16  # step 1's samples, then step 2's, each tried twice
    assert_ends_with_the_last_checkpoint(text, "step 2: all ", out / "checkpoints", 1)
    assert re.search(r"error: step 2: all \d+ answered samples of \d+ generation round\(s\) failed to score, "
                     r"first: judge: failed after 2 attempts, last error: HTTP 503", text), text[-3000:]


def _namespace_prefix() -> list[str] | None:
    """A command prefix that runs a process in a mount namespace of its own, where it may mount a tmpfs (root:
    `unshare --mount`; otherwise a user namespace mapping us to root), or None where neither is allowed."""
    candidates = [["unshare", "--mount"]] if os.geteuid() == 0 else []
    candidates.append(["unshare", "--user", "--map-root-user", "--mount"])
    with tempfile.TemporaryDirectory() as probe:
        for prefix in candidates:
            try:
                result = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
                                        capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if result.returncode == 0:
                return prefix
    return None


# In the namespace: mount a small tmpfs on $1, run the rest, copy what it holds to $2 (the tmpfs is gone with the
# namespace), exit with the run's status.
ON_SMALL_TMPFS = ('mnt=$1; copy=$2; size=$3; shift 3; mount -t tmpfs -o size="$size" minio3-test "$mnt" || exit 97; '
                  '"$@"; rc=$?; cp -a "$mnt/." "$copy/"; exit $rc')


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tiny_hf_dir, dataset, tmp_path):  # noqa: F811
    """trainer.output_dir on a 40 MB tmpfs: the step-1 checkpoint (27 MB: model and Adam state in fp32) fits, the
    step-2 save runs out of space in a rank's optimizer shard."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no mount namespace here (unshare --mount needs root or user namespaces) to mount a small tmpfs")
    out, copy = tmp_path / "run", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    run = Run(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": 3}), tmp_path / "run.log",
              prefix=[*prefix, "sh", "-c", ON_SMALL_TMPFS, "sh", str(out), str(copy), "40m"])
    code, text = run.finish(timeout=900)
    assert code == 1, text[-6000:]
    assert_ends_with_the_last_checkpoint(
        text.replace(str(out), str(copy)), f"saving the checkpoint of step 2 under {copy / 'checkpoints'} failed: ",
        copy / "checkpoints", 1)
    # torch's writer reports the short write as an internal error; the free space says what happened
    assert re.search(r"MB free on the file system of .*, less than the [\d.]+ MB of the latest checkpoint: the disk "
                     r"is full", text.split("error: ")[-1]), text[-3000:]
    shutil.rmtree(copy)
