"""Process groups (TP x PP x CP x DP on NCCL or gloo) and the CPU compatibility layer for megatron-core."""
from megatron_minio3.parallel.cpu_compat import activate_cpu_compat, is_cpu_compat_active
from megatron_minio3.parallel.state import (
    ParallelContext,
    destroy_parallel,
    free_port,
    init_parallel,
    validate_parallel_sizes,
)

__all__ = [
    "ParallelContext",
    "activate_cpu_compat",
    "destroy_parallel",
    "free_port",
    "init_parallel",
    "is_cpu_compat_active",
    "validate_parallel_sizes",
]
