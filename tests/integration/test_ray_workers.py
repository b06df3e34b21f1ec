"""A Ray worker group of Megatron ranks (local Ray cluster, gloo): the way the trainer drives the actor."""
import math

import pytest

from megatron_minio3.workers.group import RankWorker, WorkerGroup


class GPTRankWorker(RankWorker):
    def train_gpt(self, steps: int):
        from tests.integration.scripts.gpt_train import train

        losses, grad_norms = train(self.ctx, steps)
        return {"tp_rank": self.ctx.tp_rank, "losses": losses, "grad_norms": grad_norms}


def test_tp2_group_trains_like_torchrun(ray_cluster):
    group = WorkerGroup(GPTRankWorker, 2, num_cpus_per_worker=1)
    try:
        ranks = group.call("init_parallel", tp=2, pp=1, seed=7)
        assert [r["tp_rank"] for r in ranks] == [0, 1] and all(r["dp_rank"] == 0 for r in ranks)
        results = group.call("train_gpt", 4)
    finally:
        group.shutdown()
    losses0, losses1 = results[0]["losses"], results[1]["losses"]
    assert losses0 == losses1, "TP ranks must see the same loss"
    assert abs(losses0[0] - math.log(128)) < 0.2 and all(b < a for a, b in zip(losses0, losses0[1:])), losses0
    assert results[0]["grad_norms"] == pytest.approx(results[1]["grad_norms"], rel=1e-6)


def test_group_rejects_bad_arguments(ray_cluster):
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        WorkerGroup(GPTRankWorker, 0)
    group = WorkerGroup(GPTRankWorker, 1)
    try:
        with pytest.raises(ValueError, match="need arguments for 1 ranks, got 2"):
            group.call_per_rank("init_parallel", [(), ()])
    finally:
        group.shutdown()
