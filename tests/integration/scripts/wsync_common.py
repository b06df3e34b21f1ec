"""Settings shared by the weight-sync test workers (wsync_actor.py, wsync_engine.py, wsync_colocated.py,
wsync_complete.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.rollout import RolloutConfig
from megatron_minio3.models.qwen2_5_vl.parity import synthetic_images
from megatron_minio3.weights.probe import ParityProbe, ProbePrompt

ENGINE_CFG = RolloutConfig(
    dtype="float32",
    kv_cache_memory_mb=256,
    enforce_eager=True,
    max_total_tokens=4096,
    context_reserve_tokens=64,
    max_num_seqs=8,
    max_images=4,
    seed=0,
)
# Short system prompt and small images keep the probe sequences a few hundred tokens long.
DATA_CFG = DataConfig(system_prompt="", min_pixels=3136, max_pixels=40_000)
PROBE_MAX_TOKENS = 12


def probe_prompts() -> list[ProbePrompt]:
    """Two fixed pairs: two images of different shapes, and one image (each then gets a crop observation)."""
    first, second = synthetic_images(seed=3)
    return [
        ProbePrompt("two_images", "<image> <image> Which picture has more red, and where?", (first, second)),
        ProbePrompt("one_image", "What is in the middle of this picture?", (second,)),
    ]


def make_probe() -> ParityProbe:
    return ParityProbe(probe_prompts(), max_tokens=PROBE_MAX_TOKENS, warn_mean_abs_diff=1e-3)


def wait_for_file(path: Path, timeout_s: float) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.2)
    return path


def in_process_args() -> argparse.Namespace:
    """--hf-dir, --out-dir, --bucket-bytes: the scripts that sync into an engine in their own process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--bucket-bytes", type=int, required=True)
    return parser.parse_args()


def perturb(model, seed: int = 0, scale: float = 0.02) -> None:
    """Every parameter element moves (so a sync that left a tensor out shows)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def policy_and_exporter(hf_dir: str, bucket_bytes: int):
    """A one-rank fp32 policy from the HF checkpoint and its weight exporter: (policy, naming, exporter)."""
    import torch

    from megatron_minio3.convert.qwen2_5_vl import detect_naming
    from megatron_minio3.convert.safetensors_io import SafetensorsReader
    from megatron_minio3.parallel import init_parallel
    from megatron_minio3.weights.export import WeightExporter
    from megatron_minio3.workers.actor.actor import ReferencePolicy

    init_parallel(tp=1, pp=1, seed=5)
    policy = ReferencePolicy.from_hf(hf_dir, "float32", temperature=1.0, offload_to_host=False)
    with SafetensorsReader(hf_dir) as reader:
        naming = detect_naming(reader.names(), where=hf_dir)
    return policy, naming, WeightExporter(policy.model, naming, bucket_bytes=bucket_bytes, dtype=torch.float32)
