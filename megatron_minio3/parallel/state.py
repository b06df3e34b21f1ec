"""Process groups for Megatron ranks: torch.distributed + megatron parallel_state + model-parallel RNG.

Works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment), under a Ray actor that
sets the same variables, or as a single process (a world of one on a free loopback port).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_minio3.parallel.context_parallel import forget_context_parallel_groups, init_context_parallel_groups
from megatron_minio3.parallel.cpu_compat import activate_cpu_compat, cuda_available


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    backend: str
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_parallel_sizes(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """Returns the data-parallel size, or raises ValueError naming the sizes that do not fit."""
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if value < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {value}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}"
        )
    return world_size // model_parallel


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    cp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelContext:
    """Initialise torch.distributed (if needed), megatron parallel_state and the model-parallel RNG.

    backend defaults to nccl with CUDA and gloo without; on CPU the compatibility layer is activated.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    on_gpu = cuda_available()
    if not on_gpu:
        activate_cpu_compat()
    backend = backend or ("nccl" if on_gpu else "gloo")

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if on_gpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))

    world_size = dist.get_world_size()
    dp = validate_parallel_sizes(world_size, tp, pp, cp)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    # Context parallelism is ours (parallel.context_parallel): megatron sees cp folded into data parallelism, so
    # its DDP and distributed optimizer reduce and shard over dp * cp and none of its TE-only CP paths run.
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=not on_gpu,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not on_gpu, force_reset_rng=True
    )
    init_context_parallel_groups(cp)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    folded_dp_rank = mpu.get_data_parallel_rank()  # = dp_rank * cp + cp_rank
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_size=tp,
        pp_size=pp,
        cp_size=cp,
        dp_size=dp,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        cp_rank=folded_dp_rank % cp,
        dp_rank=folded_dp_rank // cp,
        backend=backend,
        device=device,
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    forget_context_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
