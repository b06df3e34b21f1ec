"""GRPO end to end on CPU: the tiny checkpoint (fp32) through real vLLM CPU, real Megatron (gloo) and a real
local Ray cluster. Training runs go through the command line's entry point (`trainer.grpo.main`) in this
process, sharing one Ray cluster; the config-error test runs the command line itself.

The checkpoint has random weights, so every turn is constrained by a regex to think, then zoom or answer a
letter (rollout.guided_regex): the multiple-choice verifier then gives rewards with spread in most groups.
"""
from __future__ import annotations

import json
import math
import re
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

TOOL_REGEX = (
    r"<think>[a-z ]{1,6}</think>("
    r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "original_image"\}</grounding>'
    r"|<answer>\([A-D]\)</answer>)"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visual_search")
    spec = VisualSearchSpec(width=448, height=336, num_distractors=12)
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
        ("weights.bucket_mb=1024", "weights.bucket_mb (1024) must not exceed rollout.weight_bucket_mb"),
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
    (tmp_path / "checkpoints" / "step_00000004" / STATE_FILE).write_text("{}")
    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", overrides(tiny_hf_dir, dataset, tmp_path))
    assert prepare(cfg).resume_from == tmp_path / "checkpoints" / "step_00000004"
    cfg.trainer.resume = False
    with pytest.raises(ValueError, match="trainer.resume is false but .* holds checkpoints"):
        prepare(cfg)


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
}
ENGINES = {"single": 1, "tp2": 2, "dp2": 2, "pp2": 2, "tp2-engine-tp2": 1}


def two_steps_then_resume(tiny_hf_dir, dataset, out: Path, capsys, layout: str, resume_layout: str) -> None:
    """2 GRPO steps at `layout` with the actor's state offloaded between phases, then a third step resumed from the
    checkpoint at `resume_layout` (state kept resident): real rollouts on every engine, rewards, updates and a
    sync into every engine each step, checked by the probe on every engine; the resumed run continues the
    optimizer, the prompts and the engines' weights exactly."""
    engines = ENGINES
    # actor params, grads and Adam state parked on host while the engines generate (host-to-host here)
    first = {"trainer.total_steps": 2, "actor.offload_to_host_between_phases": True, **LAYOUTS[layout]}
    train(overrides(tiny_hf_dir, dataset, out, **first), capsys)
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
    stdout = train(overrides(tiny_hf_dir, dataset, out, **extra), capsys)
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} (step 2" in stdout
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
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


def test_hybrid_dp2_two_steps_then_resume_on_one_rank(ray_cluster, tiny_hf_dir, dataset, tmp_path, capsys):
    """Two actor ranks, each with its own engine (rollout data parallelism 2); resumed by a single rank."""
    two_steps_then_resume(tiny_hf_dir, dataset, tmp_path / "run", capsys, "dp2", "single")


@pytest.mark.slow
@pytest.mark.parametrize("layout, resume_layout", [("tp2", "pp2"), ("pp2", "tp2-engine-tp2"), ("tp2-engine-tp2", "dp2")])
def test_hybrid_layouts_two_steps_then_resume(ray_cluster, tiny_hf_dir, dataset, tmp_path, capsys, layout,
                                              resume_layout):
    """The other actor layouts, each rank with its engine, and one engine spanning two ranks (vLLM TP2)."""
    two_steps_then_resume(tiny_hf_dir, dataset, tmp_path / "run", capsys, layout, resume_layout)
