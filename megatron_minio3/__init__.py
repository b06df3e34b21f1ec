"""megatron_minio3: Megatron-core GRPO for Qwen2.5-VL visual search (Mini-o3 recipe)."""
__version__ = "0.1.0"
