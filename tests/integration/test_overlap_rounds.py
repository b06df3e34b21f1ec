"""Over-provisioning (trainer.overlap_rounds) on real vLLM CPU: a step's dynamic-sampling rounds run with the next
round started early, on the rollout handle the trainer uses (RolloutRuntime) and the driver's own round loop
(step_plan.collect_rounds, placement.round_shares), against the same step run without overlap.

The tiny checkpoint has random weights, so turns are constrained to think, then zoom or answer a letter (as in
test_grpo_cpu.py); the multiple-choice verifier gives reward spread in most groups, and rounds of one prompt make a
step of several rounds.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_minio3.config import load_config
from megatron_minio3.data.minio3_json import read_minio3_json
from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.trainer.sampler import PromptSampler
from megatron_minio3.trainer.step_plan import collect_rounds
from megatron_minio3.workers.placement import round_shares
from megatron_minio3.workers.rollout_worker import RolloutRuntime
from tests.distributed import REPO_ROOT
from tests.integration.test_grpo_cpu import TOOL_REGEX


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visual_search")
    spec = VisualSearchSpec(width=448, height=336, num_distractors=12, question_kinds=("mc",))
    return write_visual_search_dataset(root, 12, seed=3, spec=spec)


def step_config(model: Path, data: Path, out: Path, overlap: bool):
    settings = {
        "model": str(model),
        "data.train_files": f"[{data}]",
        "rollout.n": 4,
        "rollout.max_turns": 3,
        "rollout.max_tokens_per_turn": 96,
        "rollout.max_total_tokens": 2048,
        "rollout.context_reserve_tokens": 128,
        "rollout.kv_cache_memory_mb": 128,
        "rollout.guided_regex": f"'{TOOL_REGEX}'",
        "reward.verifiers": "{synthetic_visual_search: mc}",
        "algorithm.dynamic_sampling": "true",
        "trainer.output_dir": str(out),
        "trainer.train_batch_size": 2,
        "trainer.prompts_per_round_multiplier": 0.5,  # rounds of 1 prompt
        "trainer.max_generation_rounds": 12,
        "trainer.overlap_rounds": str(overlap).lower(),
    }
    return load_config(REPO_ROOT / "configs/tiny_cpu.yaml", [f"{k}={v}" for k, v in settings.items()])


def run_step(cfg, prompts, step: int = 3):
    """One step's collection as the trainer makes it; returns what the actor would train on and what it cost."""
    runtime = RolloutRuntime(cfg, [], handle=0)
    try:
        sampler = PromptSampler(prompts, cfg.trainer.seed)
        summaries = []

        def generate_round(round_prompts, round_index, next_prompts):
            (share,) = round_shares(cfg.rollout.seed, round_prompts, step, round_index, next_prompts, 1)
            summaries.append(runtime.generate_round(*share))
            return [summaries[-1]]

        t = cfg.trainer
        collection = collect_rounds(generate_round, sampler, t.train_batch_size, t.max_generation_rounds,
                                    t.prompts_per_round, t.overlap_rounds, step)
        if t.overlap_rounds:
            runtime.end_generation()  # as the driver does after the step's last round
        keys = [group.key(i) for group in collection.kept for i in range(len(group.samples))]
        (sequences,) = runtime.take_training_shares([keys])
        busy = runtime.engines[0]._call(lambda engine: engine.has_unfinished_requests())
        return collection, sampler.state_dict(), sequences, summaries, busy
    finally:
        runtime.shutdown()


def test_overlapping_rounds_train_on_the_same_groups(tiny_hf_dir, dataset, tmp_path, caplog):
    """With overlap the next round starts while the current one finishes, yet the step keeps the same groups with
    the same tokens, the sampler ends where it did without overlap, and the round started early that was not needed
    is dropped with nothing left in the engine."""
    prompts = read_minio3_json(dataset)
    caplog.set_level(logging.INFO, logger="megatron_minio3.workers.rollout_worker")
    plain = run_step(step_config(tiny_hf_dir, dataset, tmp_path / "plain", overlap=False), prompts)
    assert not [r for r in caplog.records if r.name == "megatron_minio3.workers.rollout_worker"]
    overlapped = run_step(step_config(tiny_hf_dir, dataset, tmp_path / "overlap", overlap=True), prompts)
    (c0, sampler0, seqs0, rounds0, busy0), (c1, sampler1, seqs1, rounds1, busy1) = plain, overlapped

    assert 2 <= c0.num_rounds < c0.max_rounds and c0.full, "several rounds, and the batch full before the last"
    assert c1.num_rounds == c0.num_rounds and sampler1 == sampler0
    assert [g.uid for g in c1.kept] == [g.uid for g in c0.kept]
    assert [s.key for s in seqs1] == [s.key for s in seqs0]
    assert [s.token_ids for s in seqs1] == [s.token_ids for s in seqs0]
    assert [s.loss_mask for s in seqs1] == [s.loss_mask for s in seqs0]
    assert [s.advantage for s in seqs1] == [s.advantage for s in seqs0]
    for a, b in zip(seqs0, seqs1):  # CPU GEMMs round by batch shape, which overlap changes
        assert max((abs(x - y) for x, y in zip(a.rollout_logprobs, b.rollout_logprobs)), default=0.0) < 1e-4
    # every round after the first was started early and had run before it was asked for; none without overlap
    assert all(r.early_s == 0.0 for r in rounds0)
    assert rounds1[0].early_s == 0.0 and all(r.early_s > 0.0 for r in rounds1[1:])
    # the round started after the last one was dropped, and nothing of it is left running
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron_minio3.workers.rollout_worker"]
    assert sum("starts early" in m for m in messages) == c1.num_rounds, messages
    assert [m for m in messages if "was not needed: dropped" in m] == [
        m for m in messages if m.startswith(f"generation round {c1.num_rounds + 1}, started early, was not needed")]
    assert len([m for m in messages if "dropped" in m]) == 1
    assert not busy0 and not busy1
