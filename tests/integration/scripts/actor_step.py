"""torchrun worker: the Megatron actor on packed multimodal trajectories (tiny Qwen2.5-VL, CPU/gloo, fp32).

Usage: torchrun --nproc_per_node N actor_step.py --hf-dir DIR --out-dir OUT --tp T --pp P --cp C [--grads] [--update]

Always: log-probs of every trajectory from packed micro-batches (this rank's data-parallel share), and the
same trajectories one at a time; the last-stage TP-rank-0 ranks save them (token-aligned, by trajectory).
--grads: for every agg_mode, the gradients (after megatron's DP all-reduce) of the GRPO loss of the whole
  mini-batch, packed into micro-batches under two budgets (at DP1: one big micro-batch vs many; at DP>1: one
  budget); rank 0 saves them with the loss (needs pp = 1; at tp > 1 only the vision tower's, which is replicated
  over TP). With --cp 2 every sequence is split over two ranks; at tp or cp > 1 each image is encoded on one rank
  of the TP x CP group, and each rank counts the images its vision tower encodes.
--update: one optimizer step (KL and entropy terms on) with old log-probs recomputed by the same weights and
  reference log-probs from a ReferencePolicy built from the same checkpoint; saves its metrics.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch

from megatron_minio3.algorithms import compute_grpo_advantages
from megatron_minio3.config.algorithm import LOSS_AGG_MODES, AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ActorConfig, OptimConfig
from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
from megatron_minio3.packing import PackingItem, pack_mini_batch, pack_sequences, padding_multiple
from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.workers.actor.actor import MegatronActor, ReferencePolicy
from megatron_minio3.workers.actor.step import forward_backward_policy_loss

NUM_GROUPS, GROUP_SIZE = 3, 4
BIG_BUDGET, SMALL_BUDGET = 4096, 160


def make_items(hf_dir: str) -> list[PackingItem]:
    """Trajectories of different lengths; some with one image, some with two turns (the second image an
    observation between two answers); one exceeded (fully masked)."""
    cfg = load_hf_config(hf_dir)
    merge = cfg.vision.spatial_merge_size
    patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size**2
    generator = torch.Generator().manual_seed(1234)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.25])
    group_ids = torch.arange(NUM_GROUPS).repeat_interleave(GROUP_SIZE)
    advantages = compute_grpo_advantages(rewards, group_ids)
    items = []
    for index in range(NUM_GROUPS * GROUP_SIZE):
        grids = [[1, 4, 4], [1, 2, 6]][: index % 3]
        prompt = torch.randint(0, 400, (int(torch.randint(3, 12, (1,), generator=generator)),), generator=generator)
        response = torch.randint(0, 400, (int(torch.randint(4, 70, (1,), generator=generator)),), generator=generator)
        image_tokens = [torch.full((t * h * w // merge**2,), cfg.image_token_id) for t, h, w in grids]
        if len(grids) == 2:  # two turns: the second image is an observation between two answers (mask 0)
            half = response.numel() // 2
            observation = torch.cat([prompt[:2], image_tokens[1]])
            token_ids = torch.cat([prompt[:2], image_tokens[0], prompt[2:], response[:half], observation,
                                   response[half:]])
            loss_mask = torch.cat([torch.zeros(token_ids.numel() - response.numel() - observation.numel()),
                                   torch.ones(half), torch.zeros(observation.numel()),
                                   torch.ones(response.numel() - half)])
        else:
            token_ids = torch.cat([prompt[:2], *image_tokens, prompt[2:], response])
            loss_mask = torch.cat([torch.zeros(token_ids.numel() - response.numel()), torch.ones(response.numel())])
        if index == 5:
            loss_mask.zero_()  # exceeded: out of the loss, still in its group's statistics
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        positions, _ = sequence_position_ids(
            token_ids, grid_thw if grids else None, image_token_id=cfg.image_token_id, spatial_merge_size=merge
        )
        num_rows = int(grid_thw.prod(dim=1).sum())
        items.append(
            PackingItem(
                token_ids=token_ids,
                loss_mask=loss_mask.long(),
                position_ids=positions,
                pixel_values=torch.randn(num_rows, patch_dim, generator=generator) if grids else None,
                image_grid_thw=grid_thw if grids else None,
                token_values={
                    # behaviour log-probs of an older policy: fixed per token, independent of the packing
                    "old_logprobs": -4.0 - 2.0 * torch.rand(token_ids.numel(), generator=generator),
                    "advantages": torch.full((token_ids.numel(),), float(advantages[index])),
                },
            )
        )
    return items


def count_encoded_images(model) -> list[int]:
    """A one-element list counting the images this rank's vision tower encodes (rows of image_grid_thw)."""
    count = [0]
    if model.vision_model is not None:
        model.vision_model.register_forward_hook(lambda module, args, out: count.__setitem__(0, count[0] + len(args[1])))
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--grads", action="store_true")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()

    ctx = init_parallel(tp=args.tp, pp=args.pp, cp=args.cp, seed=5)
    algorithm = AlgorithmConfig(clip_ratio_low=0.2, clip_ratio_high=0.3)
    update_algorithm = replace(algorithm, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
    actor_cfg = ActorConfig(dtype="float32", optim=OptimConfig(lr=1e-4, clip_grad=1.0))
    actor = MegatronActor.from_hf(args.hf_dir, actor_cfg, update_algorithm, total_optimizer_steps=4)
    items = make_items(args.hf_dir)
    writer = ctx.is_last_stage and ctx.tp_rank == 0 and ctx.cp_rank == 0
    result: dict = {"rank": ctx.rank, "dp_rank": ctx.dp_rank, "dp_size": ctx.dp_size, "cp_size": ctx.cp_size}
    images_encoded = count_encoded_images(actor.module)

    packed = pack_mini_batch(
        items, PackingConfig(max_tokens_per_microbatch=SMALL_BUDGET), dp_size=ctx.dp_size, tp_size=ctx.tp_size,
        cp_size=ctx.cp_size,
    )
    shard = packed.micro_batches[ctx.dp_rank]
    result["num_micro_batches"] = len(shard)
    scores = actor.compute_logprobs(shard)
    result["images_in_share"] = sum(0 if mb.image_grid_thw is None else len(mb.image_grid_thw) for mb in shard)
    result["images_encoded_by_this_rank"] = images_encoded[0]
    singles = [
        pack_sequences([items[i]], [i], padding_multiple(ctx.tp_size, ctx.cp_size))
        for mb in shard for i in mb.sample_indices
    ]
    single_scores = actor.compute_logprobs(singles)
    if writer:
        packed_logprobs = {}
        for mb, score in zip(shard, scores):
            packed_logprobs.update(zip(mb.sample_indices, mb.unpack(score.logprobs_T)))
        single_logprobs = {mb.sample_indices[0]: mb.unpack(s.logprobs_T)[0] for mb, s in zip(singles, single_scores)}
        torch.save({"packed": packed_logprobs, "single": single_logprobs},
                   os.path.join(args.out_dir, f"logprobs_dp{ctx.dp_rank}.pt"))
        result["packed_vs_single_max_abs_diff"] = max(
            (packed_logprobs[i] - single_logprobs[i]).abs().max().item() for i in packed_logprobs
        )

    if args.grads:
        assert ctx.pp_size == 1, "--grads compares whole gradients: pp = 1 (at tp > 1 the vision tower's only)"
        budgets = [BIG_BUDGET, SMALL_BUDGET] if ctx.dp_size * ctx.cp_size == 1 else [SMALL_BUDGET]
        grads, losses, counts = {}, {}, {}
        for agg_mode in LOSS_AGG_MODES:
            for budget in budgets:
                split = pack_mini_batch(
                    items, PackingConfig(max_tokens_per_microbatch=budget), dp_size=ctx.dp_size, tp_size=1,
                    cp_size=ctx.cp_size,
                )
                actor.model.zero_grad_buffer()
                metrics = forward_backward_policy_loss(
                    actor.model, split.micro_batches[ctx.dp_rank], split.loss_counts,
                    replace(algorithm, loss_agg_mode=agg_mode), actor.options,
                )
                key = f"{agg_mode}/dp{ctx.dp_size}{'' if ctx.cp_size == 1 else f'cp{ctx.cp_size}'}/budget{budget}"
                grads[key] = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters()
                              if ctx.tp_size == 1 or n.startswith("vision_model.")}  # replicated over TP
                losses[key] = metrics["loss"]
                counts[key] = len(split.micro_batches[ctx.dp_rank])
        if ctx.rank == 0:
            torch.save(grads, os.path.join(args.out_dir, "grads.pt"))
        result.update(losses=losses, micro_batches_per_split=counts)

    if args.update:
        # old log-probs recomputed by the same weights, as the recipe does before the first mini-batch
        reference = ReferencePolicy.from_hf(args.hf_dir, "float32")
        ref_scores = reference.compute_logprobs(shard)
        if scores is not None:  # only last-stage ranks compute the loss (and have the scores)
            for mb, score, ref_score in zip(shard, scores, ref_scores):
                mb.token_values_T["old_logprobs"] = score.logprobs_T
                mb.token_values_T["ref_logprobs"] = ref_score.logprobs_T
        update = actor.update(shard, packed.loss_counts)
        result.update(update_metrics=update.metrics, grad_norm=update.grad_norm, lr=update.lr)
        after = actor.compute_logprobs(shard)
        if writer:
            result["logprob_change_after_update"] = max(
                (a.logprobs_T - s.logprobs_T).abs().max().item() for a, s in zip(after, scores)
            )

    with open(os.path.join(args.out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
