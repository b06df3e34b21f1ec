"""The pre-launch plan (`--dry-run`): where every actor rank and rollout engine runs, and an estimate of the
memory one GPU needs in each phase of a GRPO step, checked against `cluster` before any process starts.

Pure Python: reads the config tree and the checkpoint's HF config.json, nothing else. Every number is an
ESTIMATE from the formulas in the docstrings below (allocator fragmentation, NCCL buffers beyond the fixed
overhead and peaks inside kernels are not modelled): it catches layouts that cannot work, not a tight fit.
Memory is counted in GiB (2**30 bytes); cluster.gpu_memory_gb is read as GiB (an "80 GB" H100 has 80 GiB).

Rank order is megatron.core.parallel_state's default "tp-cp-ep-dp-pp" (ep = 1 here): TP innermost, then CP,
then DP, then PP, i.e. rank = tp + TP * (cp + CP * (dp + DP * pp)). Actor ranks fill the nodes in rank order.
Phases of one actor GPU: "rollout" (vLLM generates), "train" (log-probs, forward/backward, optimizer step),
"sync" (weights exported in buckets into the engines); "engine GPU" for separate rollout workers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_minio3.config.schema import Config

GiB = 2**30
CUDA_OVERHEAD_BYTES = 2 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers: once per GPU process
ENGINE_ACTIVATION_RESERVE_BYTES = 4 * GiB  # vLLM's profiled forward peak (vision encoder included) + CUDA graphs
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RECOMPUTE_MODES = ("none", "selective", "full")
LOGPROB_VOCAB_CHUNK = 4096  # = parallel.vocab_parallel.DEFAULT_VOCAB_CHUNK_SIZE (not imported: this module is torch-free)
LOGITS_COMPONENT = "logits + grad + log-prob chunks"  # activation recompute of the decoder (megatron's granularity)
RANK_ORDER = "tp-cp-dp-pp"  # innermost first: megatron's default order without expert parallelism


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a Qwen2.5-VL checkpoint that sizes depend on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    checkpoint_dtype: str = "bfloat16"
    vision_window_size: int = 112  # pixels per side of a window-attention block's window
    vision_num_full_attention_blocks: int = 4  # blocks that attend over the whole image (fullatt_block_indexes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_model_dims(hf_config: dict[str, Any]) -> ModelDims:
    """The sizes that matter, from the checkpoint's config.json as the model reads it (parse_hf_config: both
    config.json layouts, the architecture checked); only the checkpoint dtype is read here."""
    from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config

    cfg = parse_hf_config(hf_config)
    text, vision = cfg.text, cfg.vision
    dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype")
                or (hf_config.get("text_config") or {}).get("torch_dtype") or "bfloat16")
    return ModelDims(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_layers=text.num_layers,
        num_attention_heads=text.num_attention_heads, num_kv_heads=text.num_kv_heads,
        intermediate_size=text.intermediate_size, tie_word_embeddings=text.tie_word_embeddings,
        vision_depth=vision.depth, vision_hidden_size=vision.hidden_size,
        vision_intermediate_size=vision.intermediate_size, vision_out_hidden_size=vision.out_hidden_size,
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size, in_channels=vision.in_channels,
        checkpoint_dtype=dtype if dtype in DTYPE_BYTES else "bfloat16", vision_window_size=vision.window_size,
        vision_num_full_attention_blocks=len(vision.fullatt_block_indexes))


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # vocab x hidden
    per_layer: int  # one decoder layer
    num_layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    vision_tower: int  # patch embedding + blocks
    merger: int

    @property
    def language_model(self) -> int:
        return self.embedding + self.num_layers * self.per_layer + self.final_norm + self.lm_head

    @property
    def vision(self) -> int:
        return self.vision_tower + self.merger

    @property
    def total(self) -> int:
        return self.language_model + self.vision


def count_parameters(d: ModelDims) -> ParamCounts:
    """Qwen2 decoder layer: q/k/v projections with bias (GQA: k and v have num_kv_heads * head_dim outputs), o
    without bias, gated SiLU MLP (gate, up, down) without bias, two RMSNorm weights. Vision: a bias-free Conv3d
    patch embedding (in_channels * temporal_patch * patch^2 -> hidden); blocks of qkv and proj (biased), a gated
    SiLU MLP with biases and two RMSNorms; merger: RMSNorm(hidden), Linear(m*hidden, m*hidden) and
    Linear(m*hidden, out_hidden), both biased, m = spatial_merge_size^2."""
    h, q_out, kv_out = d.hidden_size, d.num_attention_heads * d.head_dim, d.num_kv_heads * d.head_dim
    attention = (h * q_out + q_out) + 2 * (h * kv_out + kv_out) + q_out * h
    hv, fv, merged = d.vision_hidden_size, d.vision_intermediate_size, d.vision_hidden_size * d.spatial_merge_size**2
    block = (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * fv + fv) + (fv * hv + hv) + 2 * hv
    patch_embed = d.in_channels * d.temporal_patch_size * d.patch_size**2 * hv
    return ParamCounts(
        embedding=d.vocab_size * h, per_layer=attention + 3 * h * d.intermediate_size + 2 * h,
        num_layers=d.num_layers, final_norm=h, lm_head=0 if d.tie_word_embeddings else d.vocab_size * h,
        vision_tower=patch_embed + d.vision_depth * block,
        merger=hv + merged * merged + merged + merged * d.vision_out_hidden_size + d.vision_out_hidden_size,
    )


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    node: int
    local_gpu: int
    tp: int
    cp: int
    dp: int
    pp: int
    engine: int | None  # hybrid: the engine this rank's process hosts a shard of
    leads_engine: bool  # first rank of its engine group (the one that drives the engine)


@dataclass(frozen=True)
class EnginePlacement:
    index: int
    node: int
    local_gpus: tuple[int, ...]  # the GPUs of its node it runs on
    ranks: tuple[int, ...]  # hybrid: the actor ranks whose processes host it; separate: ()


@dataclass
class PhaseMemory:
    phase: str
    where: str  # which GPU: the worst pipeline stage
    components: dict[str, int]  # bytes

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclass
class LaunchPlan:
    layout: str
    placement: str
    rollout_tp: int
    ranks: list[RankPlacement]
    engines: list[EnginePlacement]
    gpus_needed: int
    nodes_needed: int
    gpus_available: int
    gpu_memory_bytes: int
    bundles: list[list[str]]  # per node: what each of its GPUs runs
    params: ParamCounts
    phases: list[PhaseMemory]
    kv_bytes_per_token_per_gpu: int
    kv_cache_tokens_per_engine: int
    max_length_sequences_per_engine: int
    problems: list[str] = field(default_factory=list)  # each one a reason the launch would fail
    notes: list[str] = field(default_factory=list)
    stage_phases: list[list[PhaseMemory]] = field(default_factory=list)  # first and last stage (phases: the worst)

    @property
    def ranks_per_node(self) -> dict[int, list[int]]:
        return {n: [r.rank for r in self.ranks if r.node == n] for n in sorted({r.node for r in self.ranks})}

    @property
    def engines_per_node(self) -> dict[int, list[int]]:
        return {n: [e.index for e in self.engines if e.node == n] for n in sorted({e.node for e in self.engines})}

    def phase(self, name: str) -> PhaseMemory:
        return next(m for m in self.phases if m.phase == name)


def _divisors_of_all(*values: int) -> list[int]:
    return [n for n in range(1, min(values) + 1) if all(v % n == 0 for v in values)]


def layout_problems(cfg: Config, d: ModelDims) -> list[str]:
    """Sizes that do not split, on any machine: Megatron TP/PP over the model, vLLM TP over the heads, engines over
    the ranks. (The launch plan adds the node checks.)"""
    p, R, problems = cfg.parallel, cfg.rollout.tensor_parallel_size, []
    splits = {"num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_kv_heads,
              "vocab_size": d.vocab_size, "intermediate_size": d.intermediate_size}
    for name, value in splits.items():
        if value % p.tp:
            problems.append(f"parallel.tp={p.tp} does not divide the model's {name}={value} (Megatron splits it "
                            f"over TP); tp values that split this model: {_divisors_of_all(*splits.values())}")
    if d.num_layers % p.pp:
        problems.append(f"parallel.pp={p.pp} does not divide num_hidden_layers={d.num_layers}; pp values that "
                        f"split the layers evenly: {_divisors_of_all(d.num_layers)}")
    if d.num_attention_heads % R or (d.num_kv_heads % R and R % d.num_kv_heads):
        problems.append(f"rollout.tensor_parallel_size={R} must divide num_attention_heads={d.num_attention_heads} "
                        f"and divide or be a multiple of num_key_value_heads={d.num_kv_heads} (vLLM)")
    if cfg.trainer.rollout_placement == "hybrid" and p.world_size % R:
        problems.append(f"hybrid placement: the {p.world_size} actor ranks (parallel: tp {p.tp} x pp {p.pp} x cp "
                        f"{p.cp} x dp {p.dp}) do not split into engines of rollout.tensor_parallel_size={R} ranks; "
                        f"choose a rollout.tensor_parallel_size that divides {p.world_size}")
    return problems


def check_layout(cfg: Config, hf_config: dict[str, Any]) -> None:
    """ValueError, one line naming the keys and numbers, when the parallel layout does not split the model."""
    problems = layout_problems(cfg, read_model_dims(hf_config))
    if problems:
        raise ValueError("; ".join(problems))


def _structure_problems(cfg: Config, d: ModelDims) -> list[str]:
    """layout_problems, and engines that must fit in a node."""
    problems = layout_problems(cfg, d)
    R = cfg.rollout.tensor_parallel_size
    if R > cfg.cluster.gpus_per_node:
        problems.append(f"rollout.tensor_parallel_size={R} exceeds cluster.gpus_per_node={cfg.cluster.gpus_per_node}"
                        ": an engine must run inside one node")
    return problems


def _place(cfg: Config) -> tuple[list[RankPlacement], list[EnginePlacement], int, list[str]]:
    """Ranks in RANK_ORDER on consecutive GPUs; hybrid engines on R consecutive ranks; separate engines packed after
    the actor ranks, each on R GPUs of one node. Returns ranks, engines, GPUs used and groups that straddle nodes."""
    p, R, per_node = cfg.parallel, cfg.rollout.tensor_parallel_size, cfg.cluster.gpus_per_node
    hybrid = cfg.trainer.rollout_placement == "hybrid"
    ranks = [RankPlacement(rank=r, node=r // per_node, local_gpu=r % per_node, tp=r % p.tp, cp=(r // p.tp) % p.cp,
                           dp=(r // (p.tp * p.cp)) % p.dp, pp=r // (p.tp * p.cp * p.dp),
                           engine=r // R if hybrid else None, leads_engine=hybrid and r % R == 0)
             for r in range(p.world_size)]
    problems, engines, gpus_used = [], [], p.world_size
    for first in range(0, p.world_size, p.tp):
        nodes = sorted({x.node for x in ranks[first:first + p.tp]})
        if len(nodes) > 1:
            problems.append(f"the TP group of ranks {first}..{first + p.tp - 1} straddles nodes {nodes}: "
                            f"parallel.tp={p.tp} must divide cluster.gpus_per_node={per_node}")
            break
    if hybrid:
        for index, first in enumerate(range(0, p.world_size, R)):
            group = ranks[first:first + R]
            nodes = sorted({x.node for x in group})
            if len(nodes) > 1 and not any("engine" in x for x in problems):
                problems.append(f"engine {index} (ranks {first}..{first + R - 1}) straddles nodes {nodes}: "
                                f"rollout.tensor_parallel_size={R} must divide cluster.gpus_per_node={per_node}")
            engines.append(EnginePlacement(index, nodes[0], tuple(x.local_gpu for x in group),
                                           tuple(x.rank for x in group)))
        return ranks, engines, gpus_used, problems
    for index in range(cfg.trainer.num_rollout_workers):
        if R <= per_node < gpus_used % per_node + R:
            gpus_used += per_node - gpus_used % per_node  # start on the next node: an engine never straddles
        local = gpus_used % per_node
        engines.append(EnginePlacement(index, gpus_used // per_node, tuple(range(local, local + R)), ()))
        gpus_used += R
    return ranks, engines, gpus_used, problems


def image_token_bound(cfg: Config, d: ModelDims) -> float:
    """Upper bound of the image-token share of a micro-batch: every trajectory of rollout.max_total_tokens tokens
    carries rollout.max_images images of data.max_pixels pixels, each (patch * merge)^2 pixels per token."""
    per_image = math.ceil(cfg.data.max_pixels / (d.patch_size * d.spatial_merge_size) ** 2)
    return min(1.0, cfg.rollout.max_images * per_image / cfg.rollout.max_total_tokens)


def recompute_mode(cfg: Config) -> str:
    """The config's activation recompute as a RECOMPUTE_MODES name: "none" (actor.recompute_activations false),
    else actor.recompute_granularity ("full" or "selective", the latter rerunning actor.recompute_modules)."""
    return cfg.actor.recompute_granularity if cfg.actor.recompute_activations else "none"


def _recompute_label(cfg: Config, recompute: str | None) -> str:
    mode = recompute_mode(cfg) if recompute is None else recompute
    return f"selective ({', '.join(cfg.actor.recompute_modules)})" if mode == "selective" else mode


def _train_activations(cfg: Config, d: ModelDims, stage: int, image_fraction: float,
                       recompute: str | None = None) -> dict[str, int]:
    """Activations a 1F1B pipeline stage holds at its backward peak, bytes (actor dtype dt), for micro-batches of
    s = packing.max_tokens_per_microbatch / cp tokens per rank (context parallel splits every sequence over the
    cp ranks). recompute: "none", "selective" or "full"; None = the config's (recompute_mode).

    Per decoder layer and token, "none" (local layer spec, sequence-parallel TP, flash/varlen attention so no s^2
    term, no dropout): the inputs of both norms (2h), the norm outputs that q/k/v and fc1 take as input (2h), q
    (h), k and v (2*kv_heads*head_dim), o_proj's input (h), fc1's (gate, up) output (2f) and the SiLU*up product
    that fc2 takes (f): 6h + 2*kv_heads*head_dim + 3f elements, divided by tp, plus the attention's fp32 softmax
    log-sum-exp, 4 bytes per head, heads/tp; with cp > 1 also the keys and values of the other cp - 1 ranks
    (PackedAttention all-gathers them and keeps them for its backward): 2*kv_heads*head_dim*(cp - 1) elements /
    tp. (Korthikanti et al.'s 34*s*h/tp bytes is the GPT case with a 4h GELU MLP and dropout; Qwen2.5-VL's wide
    SwiGLU gives ~44-45*s*h/tp.)
    "selective" (megatron's selective recompute of cfg.actor.recompute_modules) drops, per module:
      core_attn  the log-sum-exp and the gathered keys/values (the checkpoint keeps core attention's inputs q, k, v
                 and o_proj keeps its output; with flash attention there is no s^2 softmax to drop);
      mlp        fc1's output (2f) and fc2's input (f): the checkpoint of the whole MLP keeps only its input, the
                 pre-MLP norm's output, which fc1 kept anyway;
      layernorm  the two norm outputs (2h): megatron's CheckpointWithoutOutput frees each norm's output once
                 q/k/v (fc1) has used it and recomputes it from the norm's input, which it keeps. This assumes the
                 local spec's separate norms: under Transformer Engine the norms are fused into linear_qkv/fc1
                 (input_layernorm and pre_mlp_layernorm are IdentityOp) and megatron recomputes nothing there.
    "full": the layer input (h/tp elements) per layer plus one layer's "none" set. Stage i of pp keeps pp - i
    micro-batches in flight. Vision tower (first stage): 8*hv + 3*fv elements per patch and block, 4 patches per
    image token, image_fraction of the tokens, divided by tp as well: the weights are replicated over TP, but each
    image of a micro-batch is encoded on one rank of the tp * cp ranks that share it (parallel/context_parallel.py
    ImageSharding), so a rank's tower holds 4 * image_fraction * s / tp patches (s is already / cp): the even share
    (whole images are assigned, largest first onto the least loaded rank, so the busiest rank holds at most one
    image more than that, which is not modelled); under "full" and
    "selective" alike (the model passes recompute_activations to the tower, whose blocks rerun whole under either
    granularity) each block keeps its input plus one block's full set; a frozen tower holds one block at a time.
    Last stage: the logits (actor dtype) that the log-prob function keeps for its backward, their gradient, and its
    two float32 [s, chunk] buffers (parallel/vocab_parallel.py: the vocabulary is processed in chunks of
    LOGPROB_VOCAB_CHUNK columns): 2 * s * vocab/tp * dt + 8 * s * min(chunk, vocab/tp)."""
    p, dt = cfg.parallel, DTYPE_BYTES[cfg.actor.dtype]
    mode = recompute_mode(cfg) if recompute is None else recompute
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    s, in_flight, layers = cfg.actor.packing.max_tokens_per_microbatch / p.cp, p.pp - stage, d.num_layers / p.pp
    h, f, kv = d.hidden_size, d.intermediate_size, d.num_kv_heads * d.head_dim
    dropped = {  # bytes per token and layer (before / tp) that each selective module frees
        "core_attn": 4 * d.num_attention_heads + dt * 2 * kv * (p.cp - 1),
        "mlp": dt * 3 * f,
        "layernorm": dt * 2 * h,
    }
    per_token_layer = (dt * (6 * h + 2 * kv + 3 * f) + dropped["core_attn"]) / p.tp
    if mode == "none":
        decoder = in_flight * layers * s * per_token_layer
    elif mode == "selective":
        modules = set(cfg.actor.recompute_modules)
        if not modules or modules - set(dropped):
            raise ValueError(f"actor.recompute_modules must be a non-empty subset of {list(dropped)}, got "
                             f"{cfg.actor.recompute_modules}")
        decoder = in_flight * layers * s * (per_token_layer - sum(dropped[m] for m in modules) / p.tp)
    else:
        decoder = in_flight * layers * s * dt * h / p.tp + s * per_token_layer
    out = {"activations (decoder)": int(decoder)}
    if stage == 0:
        patches = 4 * image_fraction * s / p.tp  # each image encoded on one rank of the tp * cp group
        per_block = patches * dt * (8 * d.vision_hidden_size + 3 * d.vision_intermediate_size)
        if cfg.actor.freeze_vision_tower:
            vision = per_block
        elif mode in ("full", "selective"):
            vision = in_flight * d.vision_depth * patches * dt * d.vision_hidden_size + per_block
        else:
            vision = in_flight * d.vision_depth * per_block
        out["activations (vision tower)"] = int(vision)
    if stage == p.pp - 1:
        vocab_slice = math.ceil(d.vocab_size / p.tp)
        out[LOGITS_COMPONENT] = int(2 * s * vocab_slice * dt + 8 * s * min(LOGPROB_VOCAB_CHUNK, vocab_slice))
    return out


def _stage_params(cfg: Config, c: ParamCounts, stage: int) -> tuple[int, int]:
    """(parameters, trainable parameters) on one rank of `stage`: decoder layers / (tp*pp); the embedding / tp on
    the first stage; lm_head / tp (the embedding's copy when tied and pp > 1) and the final norm on the last;
    the whole vision tower and merger on the first stage (replicated over TP)."""
    a, p = cfg.actor, cfg.parallel
    lm = c.num_layers / p.pp * c.per_layer / p.tp + (c.embedding / p.tp if stage == 0 else 0)
    if stage == p.pp - 1:
        lm += (c.lm_head or (c.embedding if p.pp > 1 else 0)) / p.tp + c.final_norm
    tower, merger = (c.vision_tower, c.merger) if stage == 0 else (0, 0)
    trainable = ((0 if a.freeze_language_model else lm) + (0 if a.freeze_vision_tower else tower)
                 + (0 if a.freeze_merger else merger))
    return int(lm + tower + merger), int(trainable)


def _actor_gpu_phases(cfg: Config, d: ModelDims, c: ParamCounts, stage: int, engine_weights: int, engine_kv: int,
                      engine_reserve: int, image_fraction: float, recompute: str | None = None) -> list[PhaseMemory]:
    """One actor GPU of `stage`, bytes per component. State: params in actor.dtype; grads fp32 (megatron DDP,
    grad_reduce_in_fp32); optimizer = fp32 main params + Adam m and v (12 bytes/param; 8 in fp32) sharded over
    dp*cp (distributed optimizer). actor.offload_to_host_between_phases moves the state off the GPU outside
    "train" (params come back for "sync"). rollout.enable_sleep_mode frees engine weights and KV cache outside
    "rollout" (the weights come back for "sync"). The reference model (actor dtype) is on the GPU during "train"
    when used (resident, or brought in for its log-prob pass), and in every phase unless ref.offload_to_host.
    recompute: as _train_activations."""
    a, hybrid = cfg.actor, cfg.trainer.rollout_placement == "hybrid"
    params, trainable = _stage_params(cfg, c, stage)
    grads = trainable * 4
    optimizer = trainable * (8 if a.dtype == "float32" else 12) // (cfg.parallel.dp * cfg.parallel.cp)
    state = {"actor params": params * DTYPE_BYTES[a.dtype], "actor grads (fp32)": grads,
             "actor optimizer (dp*cp shard)": optimizer}
    ref = params * DTYPE_BYTES[a.dtype] if cfg.use_reference_model else 0
    ref_resident = 0 if cfg.ref.offload_to_host else ref
    engine_resident = hybrid and not cfg.rollout.enable_sleep_mode
    offload = a.offload_to_host_between_phases
    rollout = ({"engine weights": engine_weights, "engine KV cache": engine_kv,
                "engine activations (reserve)": engine_reserve} if hybrid else {})
    rollout |= {"actor state (not offloaded)": 0 if offload else sum(state.values()),
                "reference model (resident)": ref_resident}
    train = {**state, **_train_activations(cfg, d, stage, image_fraction, recompute), "reference model": ref,
             "engine weights + KV (no sleep mode)": engine_weights + engine_kv if engine_resident else 0}
    sync = {"actor params": state["actor params"], "actor grads + optimizer (not offloaded)": 0 if offload
            else grads + optimizer, "engine weights": engine_weights if hybrid else 0,
            "engine KV cache (no sleep mode)": engine_kv if engine_resident else 0,
            "2 weight buckets": 2 * cfg.weights.bucket_mb * 2**20, "reference model (resident)": ref_resident}
    cuda, where = {"CUDA context + NCCL": CUDA_OVERHEAD_BYTES}, f"actor GPU, pipeline stage {stage}"
    return [PhaseMemory(name, where, parts | cuda) for name, parts in (("rollout", rollout), ("train", train),
                                                                        ("sync", sync))]


_ADVICE = (  # (component whose presence a setting removes, the setting)
    ("actor state (not offloaded)", "actor.offload_to_host_between_phases=true"),
    ("actor grads + optimizer (not offloaded)", "actor.offload_to_host_between_phases=true"),
    ("engine weights + KV (no sleep mode)", "rollout.enable_sleep_mode=true"),
    ("engine KV cache (no sleep mode)", "rollout.enable_sleep_mode=true"),
    ("reference model (resident)", "ref.offload_to_host=true"),
)


def _memory_problem(m: PhaseMemory, cfg: Config) -> str:
    advice = list(dict.fromkeys(setting for part, setting in _ADVICE if m.components.get(part)))
    if m.phase == "train":
        advice += {"none": ["actor.recompute_activations=true"], "full": [],
                   "selective": ["actor.recompute_granularity=full"]}[recompute_mode(cfg)]
        budget = cfg.actor.packing.max_tokens_per_microbatch
        advice.append(f"a smaller actor.packing.max_tokens_per_microbatch (now {budget}; it must hold "
                      f"rollout.max_total_tokens={cfg.rollout.max_total_tokens})")
    if m.phase in ("rollout", "engine GPU"):
        advice.append(f"a lower rollout.gpu_memory_utilization (now {cfg.rollout.gpu_memory_utilization})")
    advice.append("more parallel.tp or parallel.pp (fewer parameters per GPU), more parallel.dp (a smaller "
                  "optimizer shard)")
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in m.components.items() if v)
    return (f"phase '{m.phase}' needs about {m.total / GiB:.1f} GiB on the {m.where} but cluster.gpu_memory_gb is "
            f"{cfg.cluster.gpu_memory_gb:g}: {parts} (GiB); could help: " + "; ".join(advice))


def build_launch_plan(cfg: Config, hf_config: dict[str, Any], image_token_fraction: float | None = None,
                      recompute: str | None = None) -> LaunchPlan:
    """Placement, parameter counts, per-phase memory and KV cache of `cfg` on `cfg.cluster`. Reasons the launch
    would fail are collected in `plan.problems` (check_launch_plan raises them). image_token_fraction: the share
    of a micro-batch's tokens that are image tokens (default: the config's upper bound, image_token_bound).
    recompute: "none", "selective" or "full" for the train phase's activations (default: the config's).
    Engine: all parameters in rollout.dtype / R per GPU; vLLM claims gpu_memory_utilization x GPU memory for
    weights + activations + KV, so KV = that - weights - ENGINE_ACTIVATION_RESERVE_BYTES; KV bytes per token per
    GPU = 2 * layers * kv_heads * head_dim * dtype bytes / min(R, kv_heads)."""
    d = read_model_dims(hf_config)
    c = count_parameters(d)
    p, r, cl, hybrid = cfg.parallel, cfg.rollout, cfg.cluster, cfg.trainer.rollout_placement == "hybrid"
    R, gpu_bytes = r.tensor_parallel_size, int(cl.gpu_memory_gb * GiB)
    problems = _structure_problems(cfg, d)
    ranks, engines, gpus_needed, straddling = _place(cfg)
    problems += straddling
    nodes_needed = max([x.node for x in ranks] + [e.node for e in engines]) + 1
    if gpus_needed > cl.num_gpus or nodes_needed > cl.num_nodes:
        engine_gpus = ("hybrid placement: engines share their GPUs" if hybrid else f"separate placement: + "
                       f"trainer.num_rollout_workers {cfg.trainer.num_rollout_workers} x rollout.tensor_parallel_size "
                       f"{R} engine GPUs")
        problems.append(
            f"the run needs {gpus_needed} GPUs on {nodes_needed} node(s) (parallel: tp {p.tp} x pp {p.pp} x cp {p.cp}"
            f" x dp {p.dp} = {p.world_size} actor ranks, {engine_gpus}) but the cluster gives cluster.num_nodes="
            f"{cl.num_nodes} x cluster.gpus_per_node={cl.gpus_per_node} = {cl.num_gpus}; set cluster.num_nodes="
            f"{nodes_needed} or shrink the parallel layout")
    dtype_bytes = DTYPE_BYTES[r.dtype if r.dtype in DTYPE_BYTES else d.checkpoint_dtype]
    engine_weights, engine_budget = c.total * dtype_bytes // R, int(r.gpu_memory_utilization * gpu_bytes)
    if r.kv_cache_memory_mb > 0:  # an explicit KV cache size: vLLM then ignores gpu_memory_utilization
        engine_kv = r.kv_cache_memory_mb << 20
        kv_source = f"rollout.kv_cache_memory_mb={r.kv_cache_memory_mb}"
    else:
        engine_kv = max(0, engine_budget - engine_weights - ENGINE_ACTIVATION_RESERVE_BYTES)
        kv_source = (f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} x {cl.gpu_memory_gb:g} GiB = "
                     f"{engine_budget / GiB:.1f} GiB minus engine weights {engine_weights / GiB:.1f} GiB minus "
                     f"{ENGINE_ACTIVATION_RESERVE_BYTES / GiB:.0f} GiB activations")
    kv_per_token = 2 * d.num_layers * d.num_kv_heads * d.head_dim * dtype_bytes // min(R, d.num_kv_heads)
    kv_tokens = engine_kv // kv_per_token
    if kv_tokens < r.max_total_tokens:
        problems.append(
            f"the KV cache holds {kv_tokens} tokens per engine, less than one rollout.max_total_tokens="
            f"{r.max_total_tokens} sequence: {kv_source}; raise it or rollout.tensor_parallel_size")
    # rollout.num_engines engines per rollout process share its GPUs: each holds its weights, KV and reserve
    n = r.num_engines
    engine_weights, engine_kv, engine_reserve = n * engine_weights, n * engine_kv, n * ENGINE_ACTIVATION_RESERVE_BYTES
    fraction = image_token_bound(cfg, d) if image_token_fraction is None else image_token_fraction
    source = "the bound from data.max_pixels and rollout.max_images" if image_token_fraction is None else "given"
    per_stage = [_actor_gpu_phases(cfg, d, c, s, engine_weights, engine_kv, engine_reserve, fraction, recompute)
                 for s in sorted({0, p.pp - 1})]
    phases = [max(candidates, key=lambda m: m.total) for candidates in zip(*per_stage)]
    if not hybrid:
        phases.append(PhaseMemory("engine GPU", "rollout worker GPU", {
            "engine weights": engine_weights, "engine KV cache": engine_kv,
            "engine activations (reserve)": engine_reserve,
            "2 weight buckets": 2 * cfg.weights.bucket_mb * 2**20, "CUDA context + NCCL": CUDA_OVERHEAD_BYTES}))
    problems += [_memory_problem(m, cfg) for m in phases if m.total > gpu_bytes]
    bundles: list[list[str]] = [[] for _ in range(nodes_needed)]
    for x in ranks:
        engine = f", engine {x.engine}{' (lead)' if x.leads_engine else ''}" if hybrid else ""
        bundles[x.node].append(f"GPU {x.local_gpu}: actor rank {x.rank} (tp{x.tp} cp{x.cp} dp{x.dp} pp{x.pp}){engine}")
    for e in [] if hybrid else engines:
        bundles[e.node] += [f"GPU {g}: engine {e.index} (shard {i} of {R})" for i, g in enumerate(e.local_gpus)]
    return LaunchPlan(
        layout=f"tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {p.dp} = {p.world_size} actor ranks (order {RANK_ORDER})",
        placement=cfg.trainer.rollout_placement, rollout_tp=R, ranks=ranks, engines=engines, gpus_needed=gpus_needed,
        nodes_needed=nodes_needed, gpus_available=cl.num_gpus, gpu_memory_bytes=gpu_bytes, bundles=bundles, params=c,
        phases=phases, kv_bytes_per_token_per_gpu=kv_per_token, kv_cache_tokens_per_engine=kv_tokens,
        max_length_sequences_per_engine=kv_tokens // r.max_total_tokens, problems=problems, stage_phases=per_stage,
        notes=[f"activation recompute: {_recompute_label(cfg, recompute)}",
               f"vision activations assume image tokens are {fraction:.0%} of a micro-batch ({source})",
               f"constants: CUDA context + NCCL {CUDA_OVERHEAD_BYTES / GiB:g} GiB per GPU, vLLM activation reserve "
               f"{ENGINE_ACTIVATION_RESERVE_BYTES / GiB:g} GiB per engine GPU"])


def check_launch_plan(plan: LaunchPlan) -> None:
    """ValueError listing every problem of the plan (GPU count, placement, divisibility, KV cache, memory)."""
    if plan.problems:
        raise ValueError(f"launch plan rejected ({len(plan.problems)} problem(s)):\n- " + "\n- ".join(plan.problems))


def format_launch_plan(plan: LaunchPlan) -> str:
    """A readable report: layout, placement per node, model size, memory per phase, KV cache, verdict."""
    c, engines_per_node, ranks_per_node = plan.params, plan.engines_per_node, plan.ranks_per_node
    lines = [f"launch plan (ESTIMATES; GiB = 2^30 bytes): {plan.layout}; rollout {plan.placement}, "
             f"{len(plan.engines)} engine(s) of TP {plan.rollout_tp}",
             f"GPUs: {plan.gpus_needed} needed on {plan.nodes_needed} node(s), {plan.gpus_available} available"]
    for node, bundle in enumerate(plan.bundles):
        lines.append(f"node {node}: actor ranks {ranks_per_node.get(node, '-')}, "
                     f"engines {engines_per_node.get(node, '-')}")
        lines += [f"    {b}" for b in bundle]
    lines.append(f"parameters: {c.total / 1e9:.2f}B (language model {c.language_model / 1e9:.2f}B, vision tower + "
                 f"merger {c.vision / 1e9:.3f}B)")
    for m in plan.phases:
        lines.append(f"phase {m.phase} ({m.where}): {m.total / GiB:.1f} GiB of {plan.gpu_memory_bytes / GiB:g}, "
                     f"headroom {(plan.gpu_memory_bytes - m.total) / GiB:.1f} GiB")
        lines += [f"    {k:<42} {v / GiB:6.1f}" for k, v in m.components.items() if v]
    lines.append(f"KV cache: {plan.kv_cache_tokens_per_engine} tokens per engine ({plan.kv_bytes_per_token_per_gpu} "
                 f"bytes per token per GPU) = {plan.max_length_sequences_per_engine} max-length sequence(s) at once")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("verdict: fits" if not plan.problems else
                 "verdict: REJECTED\n" + "\n".join(f"  - {x}" for x in plan.problems))
    return "\n".join(lines)


def load_hf_config_json(path_or_dir: str | Path) -> dict[str, Any]:
    """config.json itself, or the checkpoint directory holding it."""
    path = Path(path_or_dir)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: no HF config.json there (pass the checkpoint directory or the file)")
    with open(path) as f:
        return json.load(f)


def dry_run(cfg: Config, hf_config_path_or_dir: str | Path) -> str:
    """The report for the checkpoint at `hf_config_path_or_dir`. Does not raise on problems (the verdict lists
    them); a launcher refuses with check_launch_plan(build_launch_plan(cfg, load_hf_config_json(path)))."""
    return format_launch_plan(build_launch_plan(cfg, load_hf_config_json(hf_config_path_or_dir)))
