"""GRPO end to end on CPU: the tiny checkpoint (fp32) through real vLLM CPU, real Megatron (gloo) and a real
local Ray cluster. Training runs go through the command line's entry point (`trainer.grpo.main`) in this
process, sharing one Ray cluster; the config-error test runs the command line itself.

The checkpoint has random weights, so every turn is constrained by a regex to think, then zoom or answer a
letter (rollout.guided_regex): the multiple-choice verifier then gives rewards with spread in most groups.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_minio3.config import load_config
from megatron_minio3.data.minio3_json import read_minio3_json
from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.trainer.checkpoint import STATE_FILE, CheckpointManager
from megatron_minio3.trainer.logging import read_metrics
from megatron_minio3.trainer.sampler import PromptSampler
from tests.distributed import REPO_ROOT
from tests.processes import (alive_of, kill_marked, marked_processes, marked_tree, new_marker, wait_for_process,
                             wait_until_gone)

TOOL_REGEX = (
    r"<think>[a-z ]{1,6}</think>("
    r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "original_image"\}</grounding>'
    r"|<answer>\([A-D]\)</answer>)"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visual_search")
    spec = VisualSearchSpec(width=448, height=336, num_distractors=12, question_kinds=("mc",))  # the regex answers letters
    return write_visual_search_dataset(root, 12, seed=3, spec=spec)


def overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    settings = {
        "model": str(model),
        "data.train_files": f"[{data}]",
        "rollout.n": 4,
        "rollout.max_turns": 2,
        "rollout.max_tokens_per_turn": 96,
        "rollout.max_total_tokens": 2048,
        "rollout.context_reserve_tokens": 128,
        "rollout.kv_cache_memory_mb": 256,
        "rollout.guided_regex": f"'{TOOL_REGEX}'",
        "actor.packing.max_tokens_per_microbatch": 2048,
        "actor.optim.lr": 1e-3,  # large, so that one step moves the tiny model's log-probs visibly
        "actor.ppo_mini_batch_size": 1,
        "reward.verifiers": "{synthetic_visual_search: mc}",
        "trainer.output_dir": str(out),
        "trainer.train_batch_size": 2,
        "trainer.max_generation_rounds": 4,
        "trainer.save_every": 1,
        "weights.probe_num_prompts": 1,
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def run_grpo(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_minio3.trainer.grpo", "--config", "configs/tiny_cpu.yaml", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_config_error_stops_the_command_line_before_any_worker(tiny_hf_dir, dataset, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    result = run_grpo([*overrides(tiny_hf_dir, dataset, out), "rollout.nn=3"], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unknown config key 'rollout.nn'; did you mean 'rollout.n'" in result.stderr
    assert "starting" not in result.stdout and not out.exists()
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "bad, message",
    [
        ("actor.ppo_mini_batch_size=4", "must be a multiple of actor.ppo_mini_batch_size"),
        ("rollout.tensor_parallel_size=3", "rollout.tensor_parallel_size (3) must divide the actor's 1 ranks"),
        (("trainer.rollout_placement=separate", "actor.offload_to_host_between_phases=true"),
         "actor.offload_to_host_between_phases frees memory for engines that share the actor's devices"),
        ("actor.packing.max_tokens_per_microbatch=1024", "must hold the longest trajectory"),
        ("data.train_files=[/nonexistent/train.json]", "dataset file not found"),
        ("rollout.temperature=0", "rollout.temperature must be > 0 for training"),
        ("reward.verifiers={synthetic_visual_search: nope}", "is not a verifier"),
        ("trainer.eval_every=2", "trainer.eval_every is set but data.val_files is empty"),
        ("trainer.eval_before_train=true", "trainer.eval_before_train is set but data.val_files is empty"),
        ("weights.bucket_mb=1024", "weights.bucket_mb (1024) must not exceed rollout.weight_bucket_mb"),
        # the layout against the model, on any machine (the launch plan's structure checks)
        ("parallel.tp=3", "parallel.tp=3 does not divide the model's num_attention_heads=4"),
        ("parallel.pp=3", "parallel.pp=3 does not divide num_hidden_layers=2"),
        (("parallel.tp=2", "rollout.tensor_parallel_size=4"), "rollout.tensor_parallel_size (4) must divide the "
                                                              "actor's 2 ranks"),
        # the batch against the rollout handles: 4 engines for 2 prompts per round
        ("parallel.dp=4", "trainer.train_batch_size=2 prompts per generation round cannot feed the run's 4 rollout "
                          "handles (hybrid placement: parallel tp 1 x pp 1 x cp 1 x dp 4 ranks"),
        ("trainer.resume=step_00000007", "trainer.resume=step_00000007: "),
    ],
)
def test_config_mistakes_raise_before_ray_starts(tiny_hf_dir, dataset, tmp_path, bad, message):
    import ray

    from megatron_minio3.trainer.grpo import prepare

    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(load_config(REPO_ROOT / "configs/tiny_cpu.yaml",
                            [*overrides(tiny_hf_dir, dataset, tmp_path), *([bad] if isinstance(bad, str) else bad)]))
    assert not ray.is_initialized()


def test_finished_checkpoints_are_never_overwritten(tiny_hf_dir, dataset, tmp_path):
    from megatron_minio3.trainer.grpo import prepare

    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / STATE_FILE).write_text('{"step": 4}')  # no checksums: not verified
    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", overrides(tiny_hf_dir, dataset, tmp_path))
    assert prepare(cfg).resume_from == tmp_path / "checkpoints" / "step_00000004"
    cfg.trainer.resume = False
    with pytest.raises(ValueError, match="trainer.resume is false but .* holds checkpoints"):
        prepare(cfg)


def test_a_cluster_without_the_cpus_for_the_layout_is_refused_before_any_worker(ray_cluster, tiny_hf_dir, dataset,
                                                                               tmp_path, capsys):
    """Three actor ranks ask Ray for three CPUs; the cluster (the fixture's, as one joined through RAY_ADDRESS)
    has two. Before: Ray waited for them forever. Now: exit 2 with the numbers, no actor started."""
    import ray

    from megatron_minio3.trainer.grpo import main

    settings = {"parallel.dp": 3, "trainer.train_batch_size": 3}
    started = time.monotonic()
    code = main(["--config", str(REPO_ROOT / "configs/tiny_cpu.yaml"), *overrides(tiny_hf_dir, dataset, tmp_path,
                                                                                   **settings)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "error: the run needs 3 CPUs (parallel: 3 actor ranks (tp 1 x pp 1 x cp 1 x dp 3), one each) but the " \
           "Ray cluster has 2 CPUs" in err
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)] and time.monotonic() - started < 60


def probe_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("probe/mean_abs_logprob_diff") is not None]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def train(args: list[str], capsys) -> str:
    """`python -m megatron_minio3.trainer.grpo --config configs/tiny_cpu.yaml ARGS` in this process; its stdout."""
    from megatron_minio3.trainer.grpo import main

    code = main(["--config", str(REPO_ROOT / "configs/tiny_cpu.yaml"), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    return captured.out


LAYOUTS = {  # hybrid placement: one vLLM engine in every actor rank (rollout.tensor_parallel_size = 1) ...
    "single": {},
    "tp2": {"parallel.tp": 2},
    "dp2": {"parallel.dp": 2},
    "pp2": {"parallel.pp": 2},
    "tp2-engine-tp2": {"parallel.tp": 2, "rollout.tensor_parallel_size": 2},  # ... or one engine over both ranks
    "cp2": {"parallel.cp": 2},  # context parallel: every sequence split over the two ranks
}
ENGINES = {"single": 1, "tp2": 2, "dp2": 2, "pp2": 2, "tp2-engine-tp2": 1, "cp2": 2}


def two_steps_then_resume(tiny_hf_dir, dataset, out: Path, capsys, layout: str, resume_layout: str,
                          **first_extra) -> None:
    """2 GRPO steps at `layout` with the actor's state offloaded between phases, then a third step resumed from the
    checkpoint at `resume_layout` (state kept resident): real rollouts on every engine, rewards, updates and a
    sync into every engine each step, checked by the probe on every engine; the resumed run continues the
    optimizer, the prompts and the engines' weights exactly."""
    engines = ENGINES
    # actor params, grads and Adam state parked on host while the engines generate (host-to-host here)
    # TensorBoard beside the console and metrics.jsonl; the trajectories of step 2 dumped by every rollout handle
    first = {"trainer.total_steps": 2, "actor.offload_to_host_between_phases": True, **LAYOUTS[layout],
             "trainer.loggers": "[console,jsonl,tensorboard]", "trainer.dump_rollouts_every": 2, **first_extra}
    train(overrides(tiny_hf_dir, dataset, out, **first), capsys)
    check_rollout_dump(out / "rollouts", engines[layout])
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        # real rollouts on every engine, rewards and updates happened in both steps
        assert record["rollout/num_trajectories"] >= 8 and record["rollout/num_turns_mean"] >= 1
        for handle in range(engines[layout]):
            assert record[f"rollout/handle_{handle}/num_trajectories"] >= 4, (handle, record)
        assert record["sampling/num_kept_groups"] >= 1 and record["actor/num_updates"] >= 1
        assert math.isfinite(record["actor/loss"]) and record["actor/grad_norm"] > 0
        assert record["weights/sync_s"] > 0 and record["weights/num_buckets"] >= 1
        assert record["memory/train_peak_rss_gb"] > 0.1 and record["memory/rollout_peak_rss_gb"] > 0.1
    assert steps[1]["actor/optimizer_steps"] == steps[0]["actor/num_updates"] + steps[1]["actor/num_updates"]

    # The probe (greedy, unconstrained) before step 1 and after each sync, on every engine: the engines'
    # log-probs equal the actor's (fp32), and they moved away from the initial ones: the actor changed and
    # every engine followed.
    baseline, after_1, after_2 = probe_records(records)
    assert baseline.get("event") == "probe" and baseline["step"] == 0
    for probe in (baseline, after_1, after_2):
        assert probe["probe/num_engines"] == engines[layout]
        for engine in range(engines[layout]):
            assert probe[f"probe/engine_{engine}/mean_abs_logprob_diff"] <= 1e-5, (engine, probe)
        assert probe["probe/num_tokens"] >= 2 * engines[layout]
    moved = abs(after_2["probe/rollout_logprob_mean"] - baseline["probe/rollout_logprob_mean"])
    assert moved > 100 * after_2["probe/mean_abs_logprob_diff"], (moved, after_2)

    manager = CheckpointManager(out / "checkpoints")
    assert [step for step, _ in manager.complete()] == [1, 2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    state_1, state_2 = (manager.read_state(path) for _, path in manager.complete())
    assert state_2["actor_fingerprint"][0]["param_sum"] != state_1["actor_fingerprint"][0]["param_sum"]
    assert state_2["num_optimizer_steps"] == steps[1]["actor/optimizer_steps"]

    # Resume at another layout: one more step. The checkpoint's model, optimizer and scheduler come back, the
    # engines get the trained weights, the prompts continue. This step also turns on the KL term (a reference
    # model built from the HF checkpoint, parked on host between uses) and the entropy bonus.
    extra = {"trainer.total_steps": 3, "algorithm.kl_coef": 0.05, "algorithm.entropy_coef": 0.01,
             **LAYOUTS[resume_layout]}
    stdout = train(overrides(tiny_hf_dir, dataset, out, **extra, **{"trainer.loggers": "[console,jsonl,tensorboard]"}),
                   capsys)
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} (step 2" in stdout
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # TensorBoard's own reader: the step series of both runs, continued after the resume
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["reward/mean"]] == [1, 2, 3]
    assert [value for _, value in scalars["reward/mean"]] == pytest.approx([r["reward/mean"] for r in steps])
    for key in ("actor/loss", "rollout/num_turns_mean", "timing/step_s", "probe/mean_abs_logprob_diff"):
        assert [step for step, _ in scalars[key]] == [1, 2, 3], key
    sources = {k.split("/")[1] for k in steps[0] if k.startswith("reward/") and k.count("/") == 2}
    for source in sources:  # the rollout's shape per data source, beside its reward
        for name in ("num_turns_mean", "num_tool_calls_mean", "num_tool_errors_mean", "exceed_rate", "void_rate",
                     "generated_tokens_mean"):
            assert f"rollout/{source}/{name}" in scalars, (source, name)
    resumed_probe = [r for r in records if r.get("event") == "probe"][-1]
    assert resumed_probe["step"] == 2 and resumed_probe["probe/num_engines"] == engines[resume_layout]
    # the same weights in the engines as after step 2: the same greedy probe, scored the same
    assert resumed_probe["probe/rollout_logprob_mean"] == pytest.approx(after_2["probe/rollout_logprob_mean"], abs=1e-5)
    assert resumed_probe["probe/mean_abs_logprob_diff"] <= 1e-5
    assert steps[2]["actor/optimizer_steps"] == state_2["num_optimizer_steps"] + steps[2]["actor/num_updates"]
    assert steps[2]["actor/kl"] > 0 and steps[2]["timing/ref_logprobs_s"] > 0  # trained policy vs the initial one
    assert "actor/kl" not in steps[1]

    state_3 = manager.read_state(out / "checkpoints" / "step_00000003")
    assert state_3["actor_fingerprint"][0]["optimizer_steps"] == steps[2]["actor/optimizer_steps"]
    cfg = load_config(out / "checkpoints" / "step_00000003" / "config.yaml")
    sampler = PromptSampler(read_minio3_json(dataset), cfg.trainer.seed)
    for record in steps:  # prompts handed out over the three steps, as one uninterrupted run would
        sampler.next(int(record["sampling/num_rounds"]) * cfg.trainer.train_batch_size)
    assert state_3["sampler"] == sampler.state_dict()
    assert json.loads((out / "checkpoints" / "step_00000003" / STATE_FILE).read_text())["step"] == 3


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files under log_dir, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in series.items()}


def check_rollout_dump(root: Path, num_handles: int) -> None:
    """trainer.dump_rollouts_every=2: step 2's trajectories, one file per rollout handle, each line with its reward
    and advantage (advantages of a group sum to zero), crops on disk; step 1 not dumped."""
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    files = sorted((root / "step_00000002").glob("trajectories_handle*.jsonl"))
    assert [f.name for f in files] == [f"trajectories_handle{h}.jsonl" for h in range(num_handles)]
    for file in files:
        records = [json.loads(line) for line in file.read_text().splitlines()]
        assert records and all(r["step"] == 2 and {"score", "accuracy", "advantage", "kept", "round"} <= set(r)
                               for r in records)
        groups: dict[tuple, list[float]] = {}
        for record in records:
            groups.setdefault((record["round"], record["uid"]), []).append(record["advantage"])
            for image in record["images"]:
                assert (file.parent / image["model_file"]).is_file() and len(image["raw_size"]) == 2
                if image["origin"] == "crop":  # named by handle and round: no later round overwrites them
                    assert f"/h{file.stem[-1]}r{record['round']}_s{record['sample_index']}_obs" in image["raw_file"]
        assert all(abs(sum(values)) < 1e-6 for values in groups.values()), groups


def test_hybrid_dp2_two_steps_then_resume_on_one_rank(ray_cluster, tiny_hf_dir, dataset, tmp_path, capsys):
    """Two actor ranks, each with its own engine (rollout data parallelism 2); resumed by a single rank. The first
    run overlaps generation rounds (each handle starts the next round early and drops it when the batch is full):
    the prompts handed out still follow the rounds asked for (checked against the sampler at the end)."""
    two_steps_then_resume(tiny_hf_dir, dataset, tmp_path / "run", capsys, "dp2", "single",
                          **{"trainer.overlap_rounds": True})


@pytest.mark.slow
@pytest.mark.parametrize("layout, resume_layout", [("tp2", "pp2"), ("pp2", "tp2-engine-tp2"), ("tp2-engine-tp2", "dp2"),
                                                   ("cp2", "single")])
def test_hybrid_layouts_two_steps_then_resume(ray_cluster, tiny_hf_dir, dataset, tmp_path, capsys, layout,
                                              resume_layout):
    """The other actor layouts, each rank with its engine, and one engine spanning two ranks (vLLM TP2), which
    overlaps generation rounds (its follower rank follows the step's whole generation)."""
    overlap = {"trainer.overlap_rounds": True} if layout == "tp2-engine-tp2" else {}
    two_steps_then_resume(tiny_hf_dir, dataset, tmp_path / "run", capsys, layout, resume_layout, **overlap)


# Metrics that measure the machine, not the run: they cannot repeat.
VOLATILE = re.compile(r"^(time$|timing/|memory/|rollout/engine/)|_s$|_per_s$|^rollout/wall_s$|^weights/sync_gb_per_s$")


def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(ray_cluster, tiny_hf_dir, dataset, tmp_path, capsys):
    """Run A trains 2 steps; run B resumes from A's step-1 checkpoint and trains step 2. Every request samples from
    a seed of its own (rollout.seed, step, round, prompt, sample, turn), the actor draws no random number and the
    checkpoint restores the model, Adam and the schedule bit for bit, so B's step 2 equals A's: the same samples,
    rewards, dynamic-sampling rounds, losses, gradient norms and weights (fp32 on CPU). Then a damaged shard of
    B's last checkpoint stops the command line before any worker, naming the file and the checkpoint before it."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    # a progressive schedule (trainer.stages, Vision-R1's PTST): step 2 samples 3 per prompt with shorter turns;
    # the resumed run picks up the stage of its step. Run A dumps its rollouts.
    settings = {"trainer.total_steps": 2, "trainer.max_generation_rounds": 2,
                "trainer.stages": "[{from_step: 2, n: 3, max_tokens_per_turn: 80}]"}
    stdout = train(overrides(tiny_hf_dir, dataset, run_a, **settings, **{"trainer.dump_rollouts_every": 1}), capsys)
    assert "step 1: schedule stage 0 of 1 (trainer.stages): rollout.n 4, max_tokens_per_turn 96" in stdout
    assert "step 2: schedule stage 1 of 1 (trainer.stages): rollout.n 3, max_tokens_per_turn 80" in stdout
    for record in (r for r in read_metrics(run_a / "metrics.jsonl") if "event" not in r):
        n = 4 if record["step"] == 1 else 3
        assert record["schedule/n"] == n and record["schedule/stage"] == record["step"] - 1
        assert record["rollout/num_trajectories"] == n * record["sampling/num_groups"]
        turns = [turn["num_generated_tokens"] for line in
                 (run_a / "rollouts" / f"step_{record['step']:08d}" / "trajectories_handle0.jsonl").read_text().splitlines()
                 for turn in json.loads(line)["turns"]]
        assert max(turns) <= (96 if n == 4 else 80), turns
    (run_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_a / "checkpoints" / "step_00000001", run_b / "checkpoints" / "step_00000001")
    shutil.copy(run_a / "metrics.jsonl", run_b / "metrics.jsonl")
    stdout = train(overrides(tiny_hf_dir, dataset, run_b, **settings), capsys)
    assert f"resumed from {run_b / 'checkpoints' / 'step_00000001'} (step 1" in stdout

    step_a, step_b = ([r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 2 and "event" not in r][0]
                      for run in (run_a, run_b))
    stable = sorted(key for key in step_a if not VOLATILE.search(key))
    for key in ("reward/mean", "rollout/generated_tokens_mean", "rollout/num_turns_mean", "sampling/num_rounds",
                "sampling/num_kept_groups", "actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/entropy",
                "actor/rollout_logprob_diff", "actor/optimizer_steps", "probe/rollout_logprob_mean"):
        assert key in stable, key
    assert sorted(key for key in step_b if not VOLATILE.search(key)) == stable
    assert {k: step_b[k] for k in stable} == {k: step_a[k] for k in stable}
    state_a, state_b = (CheckpointManager.read_state(run / "checkpoints" / "step_00000002") for run in (run_a, run_b))
    assert state_b["actor_fingerprint"] == state_a["actor_fingerprint"]
    assert state_b["sampler"] == state_a["sampler"]
    # the probe at the start of B (the checkpoint's weights in a fresh engine) equals A's after step 1
    probe_a = [r for r in read_metrics(run_a / "metrics.jsonl") if r["step"] == 1 and "event" not in r][0]
    probe_b = [r for r in read_metrics(run_b / "metrics.jsonl") if r.get("event") == "probe"][-1]
    assert probe_b["probe/rollout_logprob_mean"] == probe_a["probe/rollout_logprob_mean"]

    shard = max((run_b / "checkpoints" / "step_00000002").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-1000])
    started = time.monotonic()
    result = run_grpo([*overrides(tiny_hf_dir, dataset, run_b), "trainer.total_steps=3"], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {run_b / 'checkpoints' / 'step_00000002'} is damaged: {shard}: ")
    assert "(truncated or replaced); the previous complete checkpoint is " \
           f"{run_b / 'checkpoints' / 'step_00000001'}: resume from it with trainer.resume=1" in last
    assert "Traceback" not in result.stderr and "starting" not in result.stdout
    assert time.monotonic() - started < 60


def test_a_killed_driver_leaves_no_process_behind(tiny_hf_dir, dataset, tmp_path):
    """SIGKILL of the command line once its actor rank runs: its watchdog (trainer/reaper.py) ends what it started
    (Ray's GCS, raylet, agents and workers, the engine). Before it, Ray's DashboardAgent and RuntimeEnvAgent
    stayed (about 200 MB; they ignore SIGTERM); CI once saw them stay because setproctitle had zeroed the run id in
    their environment area: the tree of the run is recorded before the kill and checked too."""
    marker, tree = new_marker(), {}
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        driver = subprocess.Popen(
            [sys.executable, "-u", "-m", "megatron_minio3.trainer.grpo", "--config", "configs/tiny_cpu.yaml",
             *overrides(tiny_hf_dir, dataset, tmp_path / "run")],
            cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **marker})
    try:
        wait_for_process(marker, "ray::ActorWorker", timeout=300, alive=lambda: driver.poll() is None)
        time.sleep(2)  # the worker is building its model and engine
        assert len(marked_processes(marker)) >= 6  # driver, GCS, raylet, agents, worker, ...
        tree = marked_tree(marker)  # with Ray's agents, whose environment area setproctitle zeroes
        assert any(command.startswith("ray::DashboardAgent") for command in alive_of(tree).values()), alive_of(tree)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        left = wait_until_gone(marker, timeout=60)
        assert left == {}, left
        deadline = time.monotonic() + 10
        while alive_of(tree, exclude=(driver.pid,)) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert alive_of(tree, exclude=(driver.pid,)) == {}, (alive_of(tree), log.read_text()[-3000:])
        print(f"every process of the run gone {time.monotonic() - killed:.1f} s after the driver's SIGKILL")
    finally:
        kill_marked(marker)
        for pid in alive_of(tree):
            os.kill(pid, signal.SIGKILL)
