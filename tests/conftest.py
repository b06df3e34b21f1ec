"""Shared fixtures: generated checkpoints and images (nothing is downloaded)."""
from __future__ import annotations

import os

import pytest

# vLLM engines run in-process in tests (in-place weight reload needs it), and stay small on 2 cores.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """The default tiny Qwen2.5-VL checkpoint (untied embeddings, 2 layers, head_dim 64), made once per session."""
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_tied(tmp_path_factory):
    """A second architecture: tied embeddings (like the 3B release), 3 layers, GQA 4:1, other mrope sections."""
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny_tied",
        size="tiny",
        seed=1,
        num_layers=3,
        num_heads=8,
        num_kv_heads=2,
        hidden_size=512,
        mrope_section=(16, 8, 8),
        tie_word_embeddings=True,
        vision_depth=3,
        fullatt_block_indexes=(0, 2),
    )


@pytest.fixture(scope="session")
def synthetic_images():
    """Two deterministic RGB images of different sizes (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    return [
        Image.fromarray(rng.randint(0, 255, (56, 84, 3), dtype=np.uint8)),
        Image.fromarray(rng.randint(0, 255, (112, 56, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session; the repo is importable in its workers.

    Ray waits a fixed 30 s for its raylet to register; on a loaded 2-core machine that can time out, so
    the start is tried twice.
    """
    import ray

    from tests.distributed import REPO_ROOT

    kwargs = dict(num_cpus=2, include_dashboard=False, log_to_driver=False,
                  runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        ray.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception on a start-up time-out
        if "timed out during startup" not in str(err):
            raise
        ray.shutdown()
        ray.init(**kwargs)
    yield ray
    ray.shutdown()
