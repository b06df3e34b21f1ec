"""Time full GRPO updates of the Megatron actor on packed multimodal micro-batches: tokens/s, model TFLOP/s per GPU,
MFU and peak memory; the varlen (THD) against the [T, T] masked attention path; bf16 against fp32 log-probs.

    python tools/bench/actor_step.py --shape demo --compare-attention                  # CPU, the demo model
    python tools/bench/actor_step.py --shape 7b --layers 12 --seq-len 8192 --micro-batches 2 --recompute full
    torchrun --nproc_per_node 2 tools/bench/actor_step.py --shape 7b --layers 8 --tp 2 ...
    python tools/bench/actor_step.py --fit-layers 120 --shape 7b --seq-len 8192 --recompute none   # planner only
    python tools/bench/actor_step.py --parity [--parity-size mid]                       # bf16 vs fp32 vs HF

The model is built directly with megatron's random initialisation (no checkpoint file): `--shape demo` is the
architecture configs/demo_cpu.yaml trains (tools/make_tiny_checkpoint.py --size tiny: hidden 256, 2 layers, the
generated BPE vocabulary); `--shape 7b` has Qwen2.5-VL-7B's widths (hidden 3584, FFN 18944, 28 heads, 4 KV heads,
vocabulary 152064; vision tower hidden 1280, FFN 3420, 16 heads, full-attention blocks 7/15/23/31) with `--layers`
decoder layers and `--vision-depth` vision blocks. Every micro-batch packs `--seqs-per-micro-batch` trajectories
of different lengths into exactly `--seq-len` tokens; each trajectory is a prompt, then `--images-per-seq`
square images of `--image-size` pixels (<|vision_start|>, (size/28)^2 <|image_pad|> tokens, <|vision_end|>), each
followed by a generated turn (in the loss). Every DP rank gets `--micro-batches` of them (same layout, its own
random contents). Old log-probs come from one forward pass before timing; then `--warmup` and `--steps`
MegatronActor.update calls (forward + backward + optimizer step) are timed, synchronised on CUDA.

Figures (medians over the timed steps):
    tokens/s          = global tokens per step (dp x micro-batches x seq_len) / step time
    model TFLOP/s/GPU = model FLOPs per step / step time / world size / 1e12
    MFU               = model TFLOP/s per GPU / --peak-tflops (default 989 on CUDA: H100/H200 dense bf16;
                        on CPU only when --peak-tflops is given)
    model FLOPs per micro-batch = sum_i L_i * model_flops_per_token(d, L_i, image_fraction=f_i, patches_per_image=p)
    (trainer/planner.py: 6 * (layers * P_layer + vocab * hidden) + 12 * layers * hidden * L_i / 2 per token, plus
    f_i * (merge^2 * (6 * P_tower + 12 * hv * vision context) + 6 * P_merger) for the vision tower; forward +
    backward, recompute not counted), L_i the trajectory's tokens, f_i its image-token share, p the patches of an
    image. Peak memory: torch.cuda.max_memory_allocated over the timed steps (max over ranks) next to the
    planner's train-phase estimate for the same shape (launch_plan.build_launch_plan, its recompute mode); on CPU
    the process's peak RSS.

--compare-attention alternates updates with ForwardOptions.use_thd=True (varlen: PackedAttention per slot, no
T x T mask) and use_thd=False (the old [1, 1, T, T] block-causal mask path) on the same model and micro-batches,
A B A B ..., the same number of steps each, and prints both medians and masked / varlen.
--parity writes a generated checkpoint (make_tiny_checkpoint; --parity-size tiny or mid) and reports max/mean
|log-prob differences| of the packed training path in bf16 vs fp32, and on the HF parity sample (two synthetic
images) Megatron fp32/bf16 and transformers bf16 against transformers fp32 (eager).
--json OUT writes everything measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minio3.trainer.launch_plan import GiB, ModelDims, read_model_dims  # noqa: E402
from megatron_minio3.trainer.planner import H100_BF16_PEAK_FLOPS, model_flops_per_token  # noqa: E402

SHAPES = ("demo", "7b")
RECOMPUTE = ("none", "selective", "full")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
PATCH_SIZE, MERGE_SIZE = 14, 2
# Qwen2.5-VL's special tokens sit right after its 151643 BPE tokens, in tiny_checkpoint.SPECIAL_TOKENS' order.
QWEN2_5_VL_FIRST_SPECIAL_ID = 151643
QWEN2_5_VL_7B_VOCAB = 152064
FLOPS_FORMULA = ("model FLOPs per micro-batch = sum_i L_i * model_flops_per_token(d, L_i, f_i, p) = sum_i L_i * "
                 "[6*(layers*P_layer + vocab*hidden) + 12*layers*hidden*L_i/2 + f_i*(merge^2*(6*P_tower + "
                 "12*hv*vision_context) + 6*P_merger)] (fwd+bwd, recompute not counted; trainer/planner.py)")
# --parity-size: architecture overrides of make_tiny_checkpoint's "tiny" size
PARITY_SIZES = {
    "tiny": {},
    "mid": dict(num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=2, intermediate_size=2816,
                mrope_section=(16, 24, 24), vision_depth=4, vision_hidden_size=256, vision_num_heads=4,
                vision_intermediate_size=512, fullatt_block_indexes=(1, 3)),
}


# ---------------------------------------------------------------------------------------------------- pure parts
def shape_hf_config(shape: str, layers: int | None = None, vision_depth: int | None = None) -> dict[str, Any]:
    """config.json (released layout) of a bench shape. demo: make_tiny_checkpoint's "tiny" architecture and its
    generated vocabulary (what configs/demo_cpu.yaml trains); 7b: Qwen2.5-VL-7B's widths and vocabulary with
    `layers` decoder layers (default 28) and `vision_depth` vision blocks (default 32; full-attention blocks every
    8th, 7/15/23/31, those below the depth, else the last block)."""
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import (
        SIZES,
        SPECIAL_TOKENS,
        TinyArch,
        build_tokenizer,
        hf_config_dict,
        validate_arch,
    )

    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {SHAPES}, got {shape!r}")
    for name, value in (("--layers", layers), ("--vision-depth", vision_depth)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if shape == "demo":
        arch = SIZES["tiny"]
        bpe = build_tokenizer(arch.num_merges)
        token_ids = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
        vocab_size = -(-bpe.get_vocab_size() // 128) * 128  # as make_tiny_checkpoint rounds it
    else:
        arch = TinyArch(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                        mrope_section=(16, 24, 24), vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
                        vision_intermediate_size=3420, fullatt_block_indexes=(7, 15, 23, 31),
                        max_position_embeddings=128000)
        token_ids = {t: QWEN2_5_VL_FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}
        vocab_size = QWEN2_5_VL_7B_VOCAB
    if layers is not None:
        arch = replace(arch, num_layers=layers)
    if vision_depth is not None:
        full = tuple(i for i in arch.fullatt_block_indexes if i < vision_depth) or (vision_depth - 1,)
        arch = replace(arch, vision_depth=vision_depth, fullatt_block_indexes=full)
    validate_arch(arch)
    config = hf_config_dict(arch, vocab_size, token_ids)
    config["torch_dtype"] = "bfloat16"
    return config


def image_grid(image_size: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a square image of image_size pixels per side (a multiple of patch * merge = 28)."""
    unit = PATCH_SIZE * MERGE_SIZE
    if image_size < unit or image_size % unit:
        raise ValueError(f"--image-size must be a positive multiple of {unit} pixels (patch {PATCH_SIZE} x merge "
                         f"{MERGE_SIZE}), got {image_size}")
    side = image_size // PATCH_SIZE
    return 1, side, side


def tokens_per_image(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // MERGE_SIZE**2


def sequence_lengths(seq_len: int, num_seqs: int, multiple: int = 1) -> list[int]:
    """Lengths of the num_seqs trajectories of one micro-batch: proportional to n, n + 1, ..., 2n - 1 for n =
    num_seqs (different lengths exercise the varlen path; the longest is under twice the shortest), each a
    multiple of `multiple` (the packing's padding multiple, so no slot needs padding), summing to exactly seq_len
    (the last one takes the rounding)."""
    if num_seqs < 1:
        raise ValueError(f"--seqs-per-micro-batch must be >= 1, got {num_seqs}")
    if multiple < 1 or seq_len % multiple:
        raise ValueError(f"--seq-len {seq_len} must be a multiple of the padding multiple {multiple} (tp, or "
                         f"2 * cp * tp with context parallel)")
    weights = [num_seqs + i for i in range(num_seqs)]
    units = seq_len // multiple
    if units < num_seqs:
        raise ValueError(f"--seq-len {seq_len} cannot hold {num_seqs} sequences of at least {multiple} tokens")
    counts = [max(1, units * w // sum(weights)) for w in weights[:-1]]
    counts.append(units - sum(counts))
    if counts[-1] < 1:
        raise ValueError(f"--seq-len {seq_len} is too short for {num_seqs} sequences")
    return [c * multiple for c in counts]


def text_segments(length: int, images: int, image_tokens: int) -> list[int]:
    """Text tokens before the first image (the prompt) and after each image (a generated turn), for a trajectory
    of `length` tokens with `images` images of image_tokens <|image_pad|> tokens each (+ vision start/end): the
    text splits evenly, the last turn takes the remainder. At least 2 tokens per segment (a turn needs a label)."""
    text = length - images * (image_tokens + 2)
    if text < 2 * (images + 1):
        raise ValueError(f"a trajectory of {length} tokens cannot hold {images} images of {image_tokens} tokens "
                         f"plus text: raise --seq-len or lower --seqs-per-micro-batch, --images-per-seq or "
                         f"--image-size")
    base = text // (images + 1)
    return [base] * images + [text - base * images]


@dataclass(frozen=True)
class SequenceShape:
    """What the FLOPs of one packed trajectory depend on."""

    length: int  # tokens
    image_tokens: int  # <|image_pad|> tokens (merged patches)
    patches_per_image: int  # t * h * w of one image (0 without images)

    @property
    def image_fraction(self) -> float:
        return self.image_tokens / self.length


def micro_batch_model_flops(d: ModelDims, sequences: list[SequenceShape]) -> float:
    """sum_i L_i * model_flops_per_token(d, L_i, image_fraction=f_i, patches_per_image=p_i): forward + backward
    model FLOPs of one packed micro-batch (causal attention within each sequence; recompute not counted)."""
    return sum(s.length * model_flops_per_token(d, s.length, image_fraction=s.image_fraction,
                                                patches_per_image=s.patches_per_image) for s in sequences)


def throughput(step_seconds: float, tokens_per_step: int, flops_per_step: float, world_size: int,
               peak_tflops: float | None) -> dict[str, float | None]:
    """tokens/s = tokens / t; model TFLOP/s per GPU = FLOPs / t / world / 1e12; MFU = that / peak (None without a
    peak)."""
    if not step_seconds > 0:
        raise ValueError(f"step time must be > 0, got {step_seconds}")
    tflops = flops_per_step / step_seconds / world_size / 1e12
    return {"tokens_per_s": tokens_per_step / step_seconds, "tokens_per_s_per_gpu": tokens_per_step / step_seconds
            / world_size, "model_tflops_per_gpu": tflops, "mfu": None if peak_tflops is None else tflops / peak_tflops}


def planner_config(*, tp: int, pp: int, cp: int, dp: int, dtype: str, seq_len: int, gpu_memory_gb: float):
    """The config the planner estimates this bench's shape with: the layout, the actor dtype, micro-batches of
    seq_len tokens, no reference model, rollout engines elsewhere (the actor GPU holds the actor alone)."""
    from megatron_minio3.config import load_config
    from megatron_minio3.config.schema import ClusterConfig, ParallelConfig

    cfg = load_config(None, [f"actor.dtype={DTYPES[dtype]}"])
    cfg.ref.enabled = "false"
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, cp=cp, dp=dp)
    world = tp * pp * cp * dp
    cfg.cluster = ClusterConfig(num_nodes=1, gpus_per_node=world + 1, gpu_memory_gb=gpu_memory_gb)
    cfg.actor.packing.max_tokens_per_microbatch = seq_len
    cfg.rollout.max_total_tokens = seq_len
    cfg.trainer.rollout_placement = "separate"
    cfg.trainer.num_rollout_workers = 1
    return cfg


def planner_train_estimate(hf_config: dict[str, Any], *, tp: int = 1, pp: int = 1, cp: int = 1, dp: int = 1,
                           dtype: str = "bf16", seq_len: int, recompute: str, image_fraction: float,
                           gpu_memory_gb: float = 80.0) -> dict[str, Any]:
    """The launch plan's train-phase memory of one actor GPU (the worst pipeline stage) for this shape, bytes by
    component, with and without its fixed CUDA context + NCCL allowance (max_memory_allocated does not see it)."""
    from megatron_minio3.trainer.launch_plan import CUDA_OVERHEAD_BYTES, build_launch_plan

    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute must be one of {RECOMPUTE}, got {recompute!r}")
    cfg = planner_config(tp=tp, pp=pp, cp=cp, dp=dp, dtype=dtype, seq_len=seq_len, gpu_memory_gb=gpu_memory_gb)
    plan = build_launch_plan(cfg, hf_config, image_fraction, recompute=recompute)
    train = plan.phase("train")
    return {"total_bytes": train.total, "without_cuda_context_bytes": train.total - CUDA_OVERHEAD_BYTES,
            "components": {k: v for k, v in train.components.items() if v}, "where": train.where}


def fit_layers(shape: str, budget_bytes: int, *, seq_len: int, recompute: str, image_fraction: float,
               dtype: str = "bf16", vision_depth: int | None = None, max_layers: int = 28, tp: int = 1,
               pp: int = 1, cp: int = 1, dp: int = 1) -> tuple[int, int]:
    """(layers, estimate bytes): the most decoder layers (1..max_layers) whose planner train-phase estimate fits
    budget_bytes; (0, estimate of one layer) when not even one does."""
    best, estimate = 0, 0
    for layers in range(1, max_layers + 1):
        hf_config = shape_hf_config(shape, layers, vision_depth)
        total = planner_train_estimate(hf_config, tp=tp, pp=pp, cp=cp, dp=dp, dtype=dtype, seq_len=seq_len,
                                       recompute=recompute, image_fraction=image_fraction)["total_bytes"]
        if total > budget_bytes:
            return best, estimate or total
        best, estimate = layers, total
    return best, estimate


def batch_image_fraction(seq_len: int, num_seqs: int, images_per_seq: int, image_size: int, multiple: int = 1
                         ) -> float:
    """Image tokens / tokens of one micro-batch of this bench's layout."""
    n = tokens_per_image(image_grid(image_size)) if images_per_seq else 0
    lengths = sequence_lengths(seq_len, num_seqs, multiple)
    for length in lengths:
        text_segments(length, images_per_seq, n)
    return len(lengths) * images_per_seq * n / seq_len


# ---------------------------------------------------------------------------------------------------- torch parts
def make_micro_batches(model_cfg, args: argparse.Namespace, dp_rank: int, multiple: int):
    """This DP rank's packed micro-batches and, per micro-batch, the SequenceShape of every trajectory."""
    import torch

    from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
    from megatron_minio3.packing import PackingItem, pack_sequences

    vision = model_cfg.vision
    grid = image_grid(args.image_size)
    n = tokens_per_image(grid) if args.images_per_seq else 0
    patches = grid[0] * grid[1] * grid[2]
    patch_dim = vision.patch_input_size
    first_special = min(model_cfg.image_token_id, model_cfg.vision_start_token_id, model_cfg.vision_end_token_id)
    text_vocab = min(first_special, model_cfg.text.vocab_size)
    micro_batches, shapes = [], []
    for m in range(args.micro_batches):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + dp_rank * 1009 + m)
        items, mb_shapes = [], []
        for index, length in enumerate(sequence_lengths(args.seq_len, args.seqs_per_micro_batch, multiple)):
            segments = text_segments(length, args.images_per_seq, n)
            pieces, mask = [], []
            for turn, count in enumerate(segments):
                if turn > 0:  # an image observation before every turn but the prompt
                    image = torch.full((n + 2,), model_cfg.image_token_id)
                    image[0], image[-1] = model_cfg.vision_start_token_id, model_cfg.vision_end_token_id
                    pieces.append(image)
                    mask.append(torch.zeros(n + 2, dtype=torch.long))
                pieces.append(torch.randint(0, text_vocab, (count,), generator=generator))
                mask.append(torch.full((count,), 0 if turn == 0 else 1, dtype=torch.long))
            token_ids = torch.cat(pieces)
            grid_thw = torch.tensor([grid] * args.images_per_seq, dtype=torch.long) if args.images_per_seq else None
            positions, _ = sequence_position_ids(token_ids, grid_thw, image_token_id=model_cfg.image_token_id,
                                                 spatial_merge_size=vision.spatial_merge_size)
            advantage = (1.0 if index % 2 == 0 else -1.0) * (0.5 + index / args.seqs_per_micro_batch)
            items.append(PackingItem(
                token_ids=token_ids, loss_mask=torch.cat(mask), position_ids=positions,
                pixel_values=(torch.randn(args.images_per_seq * patches, patch_dim, generator=generator)
                              if args.images_per_seq else None),
                image_grid_thw=grid_thw,
                token_values={"old_logprobs": torch.full((length,), -8.0),
                              "advantages": torch.full((length,), advantage)},
            ))
            items[-1].check_image_tokens(model_cfg.image_token_id, vision.spatial_merge_size)
            mb_shapes.append(SequenceShape(length, args.images_per_seq * n, patches if args.images_per_seq else 0))
        micro_batches.append(pack_sequences(items, list(range(len(items))), multiple))
        shapes.append(mb_shapes)
    return micro_batches, shapes


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def run_updates(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the model and the actor, times the updates (both attention paths with --compare-attention)."""
    import torch

    from megatron_minio3.algorithms.policy_loss import LossCounts
    from megatron_minio3.config.algorithm import AlgorithmConfig
    from megatron_minio3.config.schema import ActorConfig, OptimConfig
    from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config
    from megatron_minio3.models.qwen2_5_vl.layer_spec import resolve_use_te
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, build_model
    from megatron_minio3.packing import padding_multiple
    from megatron_minio3.parallel import init_parallel
    from megatron_minio3.workers.actor.actor import MegatronActor

    on_gpu = torch.cuda.is_available()
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (H100_BF16_PEAK_FLOPS / 1e12 if on_gpu
                                                                         else None)
    hf_config = shape_hf_config(args.shape, args.layers, args.vision_depth)
    d = read_model_dims(hf_config)
    model_cfg = parse_hf_config(hf_config, where=f"--shape {args.shape}")
    ctx = init_parallel(tp=args.tp, pp=args.pp, cp=args.cp, seed=args.seed)
    if args.compare_attention and args.cp > 1:
        raise ValueError("--compare-attention needs --cp 1: the masked path has no context parallelism")
    multiple = padding_multiple(args.tp, args.cp)
    result: dict[str, Any] = {
        "shape": args.shape, "layers": d.num_layers, "vision_depth": d.vision_depth, "dtype": args.dtype,
        "recompute": args.recompute, "seq_len": args.seq_len, "micro_batches": args.micro_batches,
        "seqs_per_micro_batch": args.seqs_per_micro_batch, "images_per_seq": args.images_per_seq,
        "image_size": args.image_size, "tp": ctx.tp_size, "pp": ctx.pp_size, "cp": ctx.cp_size, "dp": ctx.dp_size,
        "world_size": ctx.world_size, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "flops_formula": FLOPS_FORMULA,
        "peak_tflops": peak_tflops,
    }
    use_te = False if args.compare_attention else resolve_use_te(None)
    result["use_te"] = use_te
    options = ModelOptions(
        params_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, use_te=use_te,
        recompute_activations=args.recompute != "none",
        recompute_granularity="full" if args.recompute == "none" else args.recompute)
    start = time.perf_counter()
    model = build_model(model_cfg, options)
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    steps_total = args.warmup + args.steps
    actor = MegatronActor(model, ActorConfig(dtype=DTYPES[args.dtype], optim=OptimConfig(lr=1e-6, clip_grad=1.0)),
                          AlgorithmConfig(), total_optimizer_steps=2 * steps_total + 1)
    result["build_seconds"] = time.perf_counter() - start
    result["parameters_this_rank"] = sum(p.numel() for p in actor.module.parameters())

    micro_batches, shapes = make_micro_batches(model_cfg, args, ctx.dp_rank, multiple)
    flops_per_dp_share = sum(micro_batch_model_flops(d, s) for s in shapes)
    flops_per_step = flops_per_dp_share * ctx.dp_size  # every DP rank's share has the same layout
    tokens_per_step = ctx.dp_size * args.micro_batches * args.seq_len
    image_fraction = sum(s.image_tokens for mb in shapes for s in mb) / (args.micro_batches * args.seq_len)
    local = [mb.loss_counts() for mb in micro_batches]
    counts = LossCounts(num_tokens=ctx.dp_size * sum(c.num_tokens for c in local),
                        num_seqs=ctx.dp_size * sum(c.num_seqs for c in local))
    result.update(tokens_per_step=tokens_per_step, model_flops_per_step=flops_per_step,
                  image_token_fraction=image_fraction,
                  model_flops_per_token=flops_per_step / tokens_per_step)

    scores = actor.compute_logprobs(micro_batches)  # old log-probs, as the recipe recomputes them
    if scores is not None:
        for mb, score in zip(micro_batches, scores):
            mb.token_values_T["old_logprobs"] = score.logprobs_T

    arms = [("varlen", True)] + ([("masked", False)] if args.compare_attention else [])
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    peaks: dict[str, int] = {name: 0 for name, _ in arms}
    last: dict[str, dict] = {}

    def one_update(name: str, use_thd: bool, timed: bool) -> None:
        actor.options = replace(actor.options, use_thd=use_thd)
        _sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        update = actor.update(micro_batches, counts)
        _sync()
        elapsed = time.perf_counter() - begin
        if on_gpu:
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
        if timed:
            times[name].append(elapsed)
        last[name] = {"grad_norm": update.grad_norm, **update.metrics}
        if ctx.rank == 0:
            print(f"  {'step' if timed else 'warmup'} {name}: {elapsed:.3f} s, grad_norm {update.grad_norm:.4g}"
                  + (f", loss {update.metrics['loss']:.4g}" if "loss" in update.metrics else ""), flush=True)

    for _ in range(args.warmup):
        for name, use_thd in arms:
            one_update(name, use_thd, timed=False)
    for _ in range(args.steps):
        for name, use_thd in arms:  # A B A B ...: both arms see the same machine state
            one_update(name, use_thd, timed=True)

    result["arms"] = {}
    for name, _ in arms:
        step = statistics.median(times[name])
        entry = {"step_seconds": times[name], "median_step_seconds": step, "mean_step_seconds":
                 statistics.fmean(times[name]), "min_step_seconds": min(times[name]), "last_update": last[name],
                 **throughput(step, tokens_per_step, flops_per_step, ctx.world_size, peak_tflops)}
        if on_gpu:
            entry["peak_memory_allocated_bytes"] = int(_max_over_ranks(peaks[name]))
        result["arms"][name] = entry
    if args.compare_attention:
        result["masked_over_varlen"] = (result["arms"]["masked"]["median_step_seconds"]
                                        / result["arms"]["varlen"]["median_step_seconds"])
    if on_gpu:
        result["peak_memory_reserved_bytes"] = int(_max_over_ranks(torch.cuda.max_memory_reserved()))
        result["gpu_total_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        result["peak_rss_bytes"] = int(_max_over_ranks(_peak_rss_bytes()))
    memory_gb = result.get("gpu_total_memory_bytes", 80 * GiB) / GiB
    result["planner_estimate"] = planner_train_estimate(
        hf_config, tp=ctx.tp_size, pp=ctx.pp_size, cp=ctx.cp_size, dp=ctx.dp_size, dtype=args.dtype,
        seq_len=args.seq_len, recompute=args.recompute, image_fraction=image_fraction, gpu_memory_gb=memory_gb)
    return result


def format_updates(r: dict[str, Any]) -> str:
    lines = [f"actor_step: --shape {r['shape']} ({r['layers']} layers, vision depth {r['vision_depth']}), "
             f"{r['dtype']}, recompute {r['recompute']}, tp{r['tp']} pp{r['pp']} cp{r['cp']} dp{r['dp']} on "
             f"{r['device']} (torch {r['torch']}, {r['threads']} threads{', TE' if r['use_te'] else ''})",
             f"  batch: {r['micro_batches']} micro-batch(es) x {r['seq_len']} tokens per DP rank, "
             f"{r['seqs_per_micro_batch']} trajectories each, {r['images_per_seq']} image(s) of {r['image_size']} px "
             f"per trajectory; image tokens {r['image_token_fraction']:.1%}; {r['tokens_per_step']} tokens per step",
             f"  {r['model_flops_per_token'] / 1e9:.3f} GFLOP per token; {r['flops_formula']}"]
    for name, a in r["arms"].items():
        mfu = "" if a["mfu"] is None else f", MFU {a['mfu']:.1%}"
        peak = ("" if "peak_memory_allocated_bytes" not in a
                else f", peak allocated {a['peak_memory_allocated_bytes'] / GiB:.2f} GiB")
        lines.append(f"  {name:<7} median {a['median_step_seconds']:.3f} s/step (best {a['min_step_seconds']:.3f}) "
                     f"over {len(a['step_seconds'])} steps: {a['tokens_per_s']:.0f} tokens/s, "
                     f"{a['model_tflops_per_gpu']:.3f} model TFLOP/s per GPU{mfu}{peak}")
    if "masked_over_varlen" in r:
        best = r["arms"]["masked"]["min_step_seconds"] / r["arms"]["varlen"]["min_step_seconds"]
        lines.append(f"  masked / varlen step time: {r['masked_over_varlen']:.2f} (medians; best steps {best:.2f})")
    est = r["planner_estimate"]
    if "peak_rss_bytes" in r:
        lines.append(f"  peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB (process); planner train estimate "
                     f"{est['without_cuda_context_bytes'] / GiB:.2f} GiB without its CUDA allowance")
    else:
        lines.append(f"  peak reserved {r['peak_memory_reserved_bytes'] / GiB:.2f} GiB; planner train estimate "
                     f"{est['total_bytes'] / GiB:.2f} GiB ({est['without_cuda_context_bytes'] / GiB:.2f} without its "
                     f"CUDA context allowance): " + ", ".join(f"{k} {v / GiB:.2f}"
                                                              for k, v in est["components"].items()))
    return "\n".join(lines)


def _label_positions(mb) -> "Any":
    """[T] bool: positions that have a label (every token of a slot but its last real one)."""
    import torch

    has_label = torch.zeros(mb.num_tokens, dtype=torch.bool)
    for start, length in zip(mb.cu_seqlens_padded[:-1].tolist(), mb.seq_lens.tolist()):
        has_label[start:start + length - 1] = True
    return has_label


def _diff(reference, candidate) -> dict[str, float]:
    delta = (reference.double() - candidate.double()).abs()
    return {"max_abs_diff": float(delta.max()), "mean_abs_diff": float(delta.mean()), "num_tokens": delta.numel()}


def _token_logprobs(logits_BSV, input_ids_BS, valid_BS):
    """log p(next token) at every valid position that has a valid next token, float32 log-softmax."""
    import torch

    logprobs = torch.log_softmax(logits_BSV[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, input_ids_BS[:, 1:, None].to(logprobs.device))[..., 0]
    keep = (valid_BS[:, :-1] & valid_BS[:, 1:]).to(picked.device)
    return picked[keep].cpu()


def run_parity(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 vs fp32 log-probs of one generated checkpoint: the packed training path (forward_logprobs), and the HF
    parity sample against transformers (fp32 eager as the reference)."""
    import tempfile

    import torch

    from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
    from megatron_minio3.models.qwen2_5_vl.forward import forward_logits
    from megatron_minio3.models.qwen2_5_vl.layer_spec import resolve_use_te
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions
    from megatron_minio3.models.qwen2_5_vl.parity import (
        DEFAULT_PROMPT,
        build_parity_inputs,
        hf_reference_logits,
        synthetic_images,
    )
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint
    from megatron_minio3.packing import padding_multiple
    from megatron_minio3.parallel import init_parallel
    from megatron_minio3.workers.actor.actor import build_model_from_hf
    from megatron_minio3.workers.actor.step import ForwardOptions, forward_logprobs

    on_gpu = torch.cuda.is_available()
    result: dict[str, Any] = {"parity_size": args.parity_size, "device": torch.cuda.get_device_name() if on_gpu
                              else "cpu", "torch": torch.__version__}
    init_parallel(1, 1, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", "tiny", seed=args.seed, **PARITY_SIZES[args.parity_size])
        model_cfg = load_hf_config(ckpt)
        result["architecture"] = json.loads((Path(ckpt) / "tiny_checkpoint.json").read_text())["arch"]
        use_te = resolve_use_te(None)
        models = {name: build_model_from_hf(ckpt, ModelOptions(params_dtype=dtype, use_te=use_te))
                  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        device = next(models["fp32"].parameters()).device
        micro_batches, _ = make_micro_batches(model_cfg, args, 0, padding_multiple(1))
        options = ForwardOptions(temperature=1.0, vocab_size=model_cfg.text.vocab_size, device=device)
        scores = {name: forward_logprobs(model, micro_batches, options) for name, model in models.items()}
        keep = [_label_positions(mb) for mb in micro_batches]
        packed = {name: torch.cat([s.logprobs_T[k] for s, k in zip(scores[name], keep)]) for name in scores}
        result["packed_bf16_vs_fp32"] = _diff(packed["fp32"], packed["bf16"])
        result["packed_fp32_mean_logprob"] = float(packed["fp32"].mean())
        try:  # the HF side depends on the installed transformers: report, never fail the other half
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

            processor = AutoProcessor.from_pretrained(ckpt)
            inputs = build_parity_inputs(processor, model_cfg, [(synthetic_images(args.seed), DEFAULT_PROMPT)])
            ids, valid = inputs.megatron.input_ids, inputs.valid_mask
            reference = _token_logprobs(hf_reference_logits(ckpt, inputs.hf), ids, valid)
            hf_bf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                                         attn_implementation="sdpa").eval()
            with torch.no_grad():
                hf_logits = hf_bf16.to(device)(**{k: v.to(device) if hasattr(v, "to") else v
                                                  for k, v in inputs.hf.items()}).logits
            result["hf_sample_tokens"] = int(valid.sum())
            result["hf_bf16_vs_hf_fp32"] = _diff(reference, _token_logprobs(hf_logits, ids, valid))
            for name, model in models.items():
                logits = forward_logits(model, [inputs.megatron.to(device)])[0]
                result[f"megatron_{name}_vs_hf_fp32"] = _diff(reference, _token_logprobs(logits, ids, valid))
        except Exception as err:  # noqa: BLE001 - recorded in the result
            result["hf_error"] = f"{type(err).__name__}: {err}"
    return result


def format_parity(r: dict[str, Any]) -> str:
    a = r["architecture"]
    lines = [f"parity ({r['parity_size']}: hidden {a['hidden_size']}, {a['num_layers']} layers, vision depth "
             f"{a['vision_depth']}) on {r['device']}: |log-prob difference| max / mean over label tokens"]
    for key in ("packed_bf16_vs_fp32", "hf_bf16_vs_hf_fp32", "megatron_fp32_vs_hf_fp32", "megatron_bf16_vs_hf_fp32"):
        if key in r:
            v = r[key]
            lines.append(f"  {key:<26} {v['max_abs_diff']:.3e} / {v['mean_abs_diff']:.3e} ({v['num_tokens']} tokens)")
    if "hf_error" in r:
        lines.append(f"  HF comparison failed: {r['hf_error']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 2 / 28)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: the shape's, 2 / 32)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens of one packed micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per DP rank and update")
    parser.add_argument("--seqs-per-micro-batch", type=int, default=4)
    parser.add_argument("--images-per-seq", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels per side of each (square) image, a multiple of 28 (default: 168 demo, 448 7b)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed updates (per arm with --compare-attention)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (per arm)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-GPU peak for MFU (default on CUDA: 989, H100/H200 dense bf16; on CPU: no MFU)")
    parser.add_argument("--compare-attention", action="store_true",
                        help="alternate varlen (use_thd) and masked updates, report masked / varlen")
    parser.add_argument("--parity", action="store_true", help="bf16 vs fp32 (vs transformers) log-probs instead")
    parser.add_argument("--parity-size", choices=tuple(PARITY_SIZES), default="tiny")
    parser.add_argument("--fit-layers", type=float, default=None, metavar="GIB",
                        help="only print the most layers (0 if none) whose planner train estimate fits GIB "
                             "for this shape (no model is built)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 keeps a shared CPU's timings steadier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 168 if args.shape == "demo" else 448
    for name in ("seq_len", "micro_batches", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.images_per_seq < 0:
        raise SystemExit("error: --warmup and --images-per-seq must be >= 0")
    return args


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fit_layers is not None:
        dtype = args.dtype or "bf16"
        multiple = args.tp if args.cp == 1 else 2 * args.cp * args.tp
        fraction = batch_image_fraction(args.seq_len, args.seqs_per_micro_batch, args.images_per_seq,
                                        args.image_size, multiple)
        layers, estimate = fit_layers(args.shape, int(args.fit_layers * GiB), seq_len=args.seq_len,
                                      recompute=args.recompute, image_fraction=fraction, dtype=dtype,
                                      vision_depth=args.vision_depth, tp=args.tp, pp=args.pp, cp=args.cp)
        result = {"layers": layers, "estimate_gib": estimate / GiB, "budget_gib": args.fit_layers,
                  "seq_len": args.seq_len, "recompute": args.recompute, "image_token_fraction": fraction}
        print(json.dumps(result))
        _write_json(args.json, result)
        return 0

    import torch

    from megatron_minio3.parallel import destroy_parallel

    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run_parity(args) if args.parity else run_updates(args)
        status = 0
    except torch.cuda.OutOfMemoryError as err:
        result = {"error": f"CUDA out of memory: {str(err).splitlines()[0]}", "oom": True,
                  "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated()}
        status = 3
    except Exception as err:  # noqa: BLE001 - the JSON says what failed (gpu_check.sh goes on with other parts)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        status = 1
    result["args"] = vars(args)
    if rank == 0:
        if "error" in result:
            print(f"actor_step failed: {result['error']}\n{result.get('traceback', '')}", file=sys.stderr)
        else:
            print(format_parity(result) if args.parity else format_updates(result), flush=True)
        _write_json(args.json, result)
    destroy_parallel()
    return status


if __name__ == "__main__":
    sys.exit(main())
