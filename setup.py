"""Package metadata. Dependencies are pinned per profile in requirements/ and installed by `make setup`."""
from setuptools import find_packages, setup

setup(
    name="megatron_minio3",
    version="0.1.0",
    description="Megatron-core GRPO for Qwen2.5-VL multi-turn visual search (the Mini-o3 recipe)",
    packages=find_packages(include=["megatron_minio3", "megatron_minio3.*"]),
    python_requires=">=3.10",
)
