"""A colocated weight sync loads every tensor into the vLLM engine, though vLLM warns about each reload call.

Usage: torchrun --nproc_per_node 1 wsync_complete.py --hf-dir DIR --out-dir OUT --bucket-bytes B

One process holds the Megatron policy (a world of one, CPU/gloo, fp32) and a vLLM CPU engine.
  1. Control: three reload calls straight into vLLM (bypassing VllmEngine), each of original checkpoint tensors:
     the vision tower's, the language model's, then all of them; the two vLLM warnings each call logs are kept.
  2. Every policy parameter is perturbed (every element changes), the engine's tensors are read, the weights
     are synced through InProcessTarget in buckets of B bytes (one reload call each) while vLLM's reload loggers
     are captured, and every tensor sent is recorded.
  3. The engine's tensors are read again. vLLM CPU keeps each linear weight in a prepacked GEMM kernel (the
     `weight` parameter is then empty): its value is read back from the kernel, as the kernel's product with
     the identity. Buffers are read too.
Writes OUT/result.json (names and counts; the test asserts on them).
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_minio3.parallel import destroy_parallel
from megatron_minio3.rollout.engine import VllmEngine
from megatron_minio3.weights.sync import InProcessTarget, sync_weights
from tests.integration.scripts.wsync_common import ENGINE_CFG, in_process_args, perturb, policy_and_exporter

RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace")
FAILED = "%s: Failed to load weights"
NOT_LOADED = "Following weights were not loaded from checkpoint: %s"
# HF projections vLLM fuses into one parameter, in the order it stacks them (its packed_modules_mapping)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def summary(self) -> dict:
        """The two per-call warnings (the module classes of the first, the parameter names of the second) and
        every other warning of the reload loggers."""
        out = {"failed_classes": [], "not_loaded": None, "other_warnings": []}
        for record in self.records:
            if record.msg == FAILED:
                out["failed_classes"].append(record.args[0])
            elif record.msg == NOT_LOADED:
                out["not_loaded"] = sorted(record.args[0])
            elif record.levelno >= logging.WARNING:
                out["other_warnings"].append(record.getMessage())
        self.records.clear()
        return out


class Recorder:
    """A sync target that keeps a copy of every tensor sent (what the engine must hold afterwards)."""

    accepts_views = True

    def __init__(self):
        self.sent: dict[str, torch.Tensor] = {}
        self.num_buckets = 0

    def begin(self, plan, dtype) -> None:
        pass

    def push(self, bucket) -> None:
        for name, tensor in bucket.named_tensors():
            if name in self.sent:
                raise AssertionError(f"{name} sent twice")
            self.sent[name] = tensor.detach().clone()
        self.num_buckets += 1


def vllm_name(hf_name: str) -> tuple[str, int]:
    """(vLLM parameter, position among the HF tensors stacked into it) of a checkpoint tensor (HF naming of
    transformers < 4.52: visual.*, model.*, lm_head.*, the one the tiny checkpoints use)."""
    if hf_name.startswith("visual."):
        name = hf_name
    elif hf_name.startswith("model.") or hf_name == "lm_head.weight":
        name = "language_model." + hf_name
    else:
        raise ValueError(f"unexpected checkpoint tensor name {hf_name}")
    parts, position = name.split("."), 0
    if len(parts) >= 2 and parts[-2] in FUSED:
        parts[-2], position = FUSED[parts[-2]]
    return ".".join(parts), position


def expected_engine_tensors(sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stacked: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for hf_name, tensor in sent.items():
        name, position = vllm_name(hf_name)
        stacked[name].append((position, tensor))
    return {name: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for name, parts in stacked.items()}


def engine_tensors(worker, input_sizes: dict[str, int]) -> dict:
    """Runs in the engine's worker: every parameter as stored, the weight each CPU GEMM kernel computes with
    (for the weights named in input_sizes), and every buffer."""
    model = worker.model_runner.get_model()
    stored, kernels = {}, {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                stored[full] = param.detach().clone()
                if name == "weight" and hasattr(module, "cpu_linear") and full in input_sizes:
                    eye = torch.eye(input_sizes[full], dtype=param.dtype)
                    kernels[full] = module.cpu_linear(eye, module.weight, None).t().contiguous()
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    return {"stored": stored, "kernels": kernels, "buffers": buffers}


def main() -> None:
    args = in_process_args()
    policy, _, exporter = policy_and_exporter(args.hf_dir, args.bucket_bytes)
    engine = VllmEngine(ENGINE_CFG, args.hf_dir)
    records = Records()
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for reload_logger in loggers:
        reload_logger.addHandler(records)

    # 1. vLLM's own reload calls, of the original tensors (the engine keeps the checkpoint's values)
    original = load_file(str(Path(args.hf_dir, "model.safetensors")))
    vision = [(n, t) for n, t in original.items() if n.startswith("visual.")]
    language = [(n, t) for n, t in original.items() if not n.startswith("visual.")]

    def direct_reload(items) -> dict:
        engine._call(lambda e: e.collective_rpc("reload_weights", kwargs={"weights_iterator": items}))
        return records.summary()

    control = {"vision": direct_reload(vision), "language": direct_reload(language),
               "whole": direct_reload(list(original.items()))}

    # 2. perturb, sync through VllmEngine
    expected_shapes = expected_engine_tensors(original)
    input_sizes = {name: t.shape[1] for name, t in expected_shapes.items() if t.dim() == 2}
    perturb(policy.model)
    before = engine._call(lambda e: e.collective_rpc(engine_tensors, args=(input_sizes,)))[0]
    filters_before = [list(reload_logger.filters) for reload_logger in loggers]
    recorder = Recorder()
    started = time.perf_counter()
    stats = sync_weights(exporter, [recorder, InProcessTarget(engine)])
    sync_seconds = time.perf_counter() - started
    sync_records = records.summary()
    filters_after = [list(reload_logger.filters) for reload_logger in loggers]
    after = engine._call(lambda e: e.collective_rpc(engine_tensors, args=(input_sizes,)))[0]

    # 3. compare, name by name
    expected = expected_engine_tensors(recorder.sent)
    values = {name: after["kernels"].get(name, tensor) for name, tensor in after["stored"].items()}
    old = {name: before["kernels"].get(name, tensor) for name, tensor in before["stored"].items()}
    common = sorted(set(values) & set(expected))
    result = {
        "checkpoint_tensors": sorted(original),
        "sent_tensors": sorted(recorder.sent),
        "num_buckets": recorder.num_buckets,
        "stats": {"num_buckets": stats.num_buckets, "num_tensors": stats.num_tensors, "seconds": sync_seconds},
        "engine_parameters": sorted(values),
        "expected_parameters": sorted(expected),
        "read_from_kernel": sorted(after["kernels"]),
        "empty_stored": sorted(name for name, t in after["stored"].items() if t.numel() == 0),
        "mismatched": [name for name in common
                       if values[name].shape != expected[name].shape or not torch.equal(values[name], expected[name])],
        "elements_left_at_old_value": {name: int((values[name] == old[name]).sum()) for name in common
                                       if values[name].shape == old[name].shape and (values[name] == old[name]).any()},
        "buffers": sorted(after["buffers"]),
        "buffers_changed": [name for name, buffer in after["buffers"].items()
                            if not torch.equal(buffer, before["buffers"][name])],
        "control": control,
        "sync_records": sync_records,
        "filters_unchanged": filters_before == filters_after,
    }
    Path(args.out_dir, "result.json").write_text(json.dumps(result, indent=1))
    for reload_logger in loggers:
        reload_logger.removeHandler(records)
    engine.shutdown()  # vLLM's shutdown also tears down torch.distributed's default group
    destroy_parallel()


if __name__ == "__main__":
    main()
