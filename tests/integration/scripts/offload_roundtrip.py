"""torchrun worker: the actor's params, grads and optimizer state to host memory and back (CPU/gloo, host-to-host).

Usage: torchrun --nproc_per_node N offload_roundtrip.py --hf-dir DIR --out-dir OUT [--tp T] [--pp P]
       [--dtypes float32,bfloat16] [--bucket-bytes B]

Per dtype, two actors from the same checkpoint take the same first optimizer step (so Adam state exists).
Actor A's every param, main_grad and optimizer tensor is cloned, then A is offloaded (grads + optimizer first,
then params: the trainer's order) and reloaded twice while this process's resident memory is tracked
(VmHWM reset before each phase; run with a fixed MALLOC_MMAP_THRESHOLD_ so freed tensors leave the resident
set). Every tensor must come back bit-identical; then A and B (no round trip) take a second step, whose
loss, grad norm and params must agree bit for bit. A ReferencePolicy parked in host memory must give the
same log-probs as one that is not. Each rank writes OUT/rank{R}.json.

bf16 on CPU: megatron's Float16OptimizerWithFloat16Params (fp32 main params) accepts only tensors whose
``type()`` names CUDA; building the actor under :class:`CudaTypeNames` lets it wrap CPU bf16 params.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ActorConfig, OptimConfig
from megatron_minio3.packing import pack_mini_batch
from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.workers.actor.actor import MegatronActor, ReferencePolicy
from megatron_minio3.workers.actor.offload import (
    ActorStateOffloader,
    grad_tensors,
    optimizer_tensors,
    param_tensors,
    unique_storages,
)
from megatron_minio3.workers.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from tests.integration.scripts.actor_step import SMALL_BUDGET, make_items


class CudaTypeNames(TorchFunctionMode):
    """``tensor.type()`` names a CPU tensor as if it were on CUDA (``torch.cuda.BFloat16Tensor``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextmanager
def megatron_accepts_cpu_half_params(dtype: str):
    if dtype == "float32":
        yield
        return
    with CudaTypeNames():
        yield


def build_actor(hf_dir: str, dtype: str, bucket_bytes: int) -> MegatronActor:
    actor_cfg = ActorConfig(dtype=dtype, optim=OptimConfig(lr=1e-3, clip_grad=1.0))
    algorithm = AlgorithmConfig(clip_ratio_low=0.2, clip_ratio_high=0.3, entropy_coef=0.01)
    with megatron_accepts_cpu_half_params(dtype):
        actor = MegatronActor.from_hf(hf_dir, actor_cfg, algorithm, total_optimizer_steps=4)
    actor.host_offloader = ActorStateOffloader(actor.model, actor.optimizer, bucket_bytes=bucket_bytes)
    return actor


def state_tensors(actor: MegatronActor) -> list[torch.Tensor]:
    """Every tensor the round trip must restore: params, grads (main_grad), optimizer state and main params."""
    return param_tensors(actor.model) + grad_tensors(actor.model, actor.optimizer) + optimizer_tensors(actor.optimizer)


def phase(run):
    """(run(), resident bytes before, resident bytes after, peak resident bytes while it ran)."""
    gc.collect()
    assert reset_peak_resident(), "this kernel does not let VmHWM be reset"
    before = resident_bytes()
    result = run()
    return result, before, resident_bytes(), peak_resident_bytes()


def round_trip(actor: MegatronActor) -> dict:
    """Offload (grads + optimizer, then params) and reload, with resident memory and timings."""
    def offload():
        stats = actor.offload_to_host(params=False)
        stats.update(actor.offload_to_host(grads=False, optimizer=False))
        return stats

    moved, before, offloaded, peak_offload = phase(offload)
    freed = [t for t in state_tensors(actor) if t.untyped_storage().nbytes() != 0]
    back, _, reloaded, peak_reload = phase(actor.reload_to_device)
    return {
        "rss_before": before,
        "rss_offloaded": offloaded,
        "peak_offload": peak_offload,
        "rss_reloaded": reloaded,
        "peak_reload": peak_reload,
        "num_not_freed": len(freed),
        "offload_bytes": {name: s.num_bytes for name, s in moved.items()},
        "offload_buckets": {name: s.num_buckets for name, s in moved.items()},
        "offload_seconds": sum(s.seconds for s in moved.values()),
        "reload_seconds": sum(s.seconds for s in back.values()),
        "host_bytes": sum(o.host_bytes for o in actor.host_offloader.offloaders.values()),
    }


def check_dtype(args, dtype: str, shard, loss_counts) -> dict:
    actor, twin = (build_actor(args.hf_dir, dtype, args.bucket_bytes) for _ in range(2))
    first = [actor.update(shard, loss_counts), twin.update(shard, loss_counts)]
    assert first[0].grad_norm == first[1].grad_norm, "two identical actors disagree before any round trip"

    tensors = state_tensors(actor)
    snapshot = [t.detach().clone() for t in tensors]
    params_after_first = [p.detach().clone() for p in actor.module.parameters()]
    storages = unique_storages(tensors, "cpu")
    opt_state = [v for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
                 for s in o.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert opt_state, "Adam state exists after the first step"
    result = {
        "dtype": dtype,
        "param_dtypes": sorted({str(p.dtype) for p in actor.module.parameters()}),
        "num_tensors": len(tensors),
        "num_storages": len(storages),
        "state_bytes": sum(s.nbytes() for _, s in storages),
        "largest_storage_bytes": max(s.nbytes() for _, s in storages),
        "num_optimizer_state_tensors": len(opt_state),
        "num_main_params": sum(len(g) for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
                               for g in getattr(o, "fp32_from_float16_groups", [])),
        "cycles": [],
    }
    for _ in range(2):  # the second cycle reuses the host buffers
        cycle = round_trip(actor)
        cycle["num_changed"] = sum(not torch.equal(t, s) for t, s in zip(tensors, snapshot))
        result["cycles"].append(cycle)

    second = [actor.update(shard, loss_counts), twin.update(shard, loss_counts)]
    result["second_step_metrics"] = [second[0].metrics, second[1].metrics]
    result["second_step_grad_norms"] = [second[0].grad_norm, second[1].grad_norm]
    result["second_step_params_differ"] = sum(
        not torch.equal(a, b) for a, b in zip(actor.module.parameters(), twin.module.parameters())
    )
    result["second_step_params_changed"] = sum(
        not torch.equal(a, s) for a, s in zip(actor.module.parameters(), params_after_first)
    )
    result["num_params"] = len(params_after_first)
    twin_tensors = state_tensors(twin)
    assert len(twin_tensors) == len(tensors)
    result["second_step_state_differ"] = sum(not torch.equal(a, b) for a, b in zip(tensors, twin_tensors))
    return result


def check_reference(args, shard) -> dict:
    parked = ReferencePolicy.from_hf(args.hf_dir, "float32", offload_to_host=True)
    resident = ReferencePolicy.from_hf(args.hf_dir, "float32", offload_to_host=False)
    parked_sizes = [p.untyped_storage().nbytes() for p in parked.model.parameters()]
    scores = [parked.compute_logprobs(shard), parked.compute_logprobs(shard), resident.compute_logprobs(shard)]
    result = {"ref_parked_nonzero_storages": sum(size != 0 for size in parked_sizes),
              "ref_parked_after_use_nonzero": sum(p.untyped_storage().nbytes() != 0 for p in parked.model.parameters())}
    if scores[2] is not None:
        result["ref_logprobs_equal"] = all(
            torch.equal(a.logprobs_T, c.logprobs_T) and torch.equal(b.logprobs_T, c.logprobs_T)
            for a, b, c in zip(*scores)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--bucket-bytes", type=int, default=1 << 20)
    args = parser.parse_args()

    ctx = init_parallel(tp=args.tp, pp=args.pp, seed=5)
    items = make_items(args.hf_dir)
    packed = pack_mini_batch(
        items, PackingConfig(max_tokens_per_microbatch=SMALL_BUDGET), dp_size=ctx.dp_size, tp_size=ctx.tp_size
    )
    shard = packed.micro_batches[ctx.dp_rank]
    result = {"rank": ctx.rank, "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size,
              "bucket_bytes": args.bucket_bytes, "last_stage": ctx.is_last_stage}
    result["dtypes"] = [check_dtype(args, dtype, shard, packed.loss_counts) for dtype in args.dtypes.split(",")]
    result.update(check_reference(args, shard))
    with open(os.path.join(args.out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
