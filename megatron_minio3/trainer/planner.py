"""The parallelism planner: every TP x PP x CP x DP layout of a GPU count, its per-GPU memory by phase and
component under each activation-recompute mode, an estimated training-step time, and the layouts that fit ranked
fastest first (tools/plan_parallelism.py prints it; docs/scaling.md has the formulas and the recommendations).

Memory comes from the launch plan (trainer/launch_plan.py: the same estimate the trainer's `--dry-run` checks),
evaluated for each layout on a config that differs from the base one only in `parallel`, `cluster`, the
sequence length (actor.packing.max_tokens_per_microbatch = rollout.max_total_tokens = seq_len), the rollout
placement (hybrid when colocated, else separate) and the rollout TP. Context parallel divides the tokens (and
the images) of a micro-batch over cp ranks, and the distributed optimizer shards over dp * cp. Context parallel
runs on the local layer spec only (not with Transformer Engine) and has not been measured on a GPU: cp > 1 rows
are ranked like the others and carry that caveat. The "selective" mode reruns the base config's
actor.recompute_modules (default core_attn and mlp).

Step time (an ESTIMATE, for ranking layouts against each other, not a prediction to the second):
    t_step = (m + pp - 1) * t_microbatch * (1 + tp_comm_penalty * (tp - 1)) * (1 + cp_comm_penalty * (cp - 1))
    m = ceil(global_batch / dp)                                          micro-batches per DP replica
    t_microbatch = (seq_len / cp) * max over stages of F_stage / (peak_flops * mfu)
    F_stage = (decoder_dense + decoder_attention) / pp * recompute factor / tp
              + [first stage] vision * recompute factor / tp
              + [last stage] lm_head / tp
with the per-token FLOPs of model_flops_per_token's parts. The vision tower's weights are replicated over TP,
but each image of a micro-batch is encoded on one rank of the tp * cp ranks that share it (ImageSharding in
parallel/context_parallel.py), so its FLOPs divide by tp as the decoder's do (the even share: whole images are
assigned, so the busiest rank may encode up to one image more). (m + pp - 1) * t is 1F1B's schedule: m * t of work
plus the pipeline bubble (pp - 1) / m. Recompute factors (hardware FLOPs beyond the model's forward + backward,
which is 3 forwards): "none" 1; "selective" adds one forward of each recomputed decoder module (core_attn:
decoder_attention / 3; mlp: decoder_mlp / 3; layernorm: no matmul FLOPs) and every vision block's forward (the
tower reruns whole under either granularity); "full" adds every decoder layer's and vision block's forward
(x 4/3). The TP and CP penalties are ASSUMPTIONS (flags): communication that the matmuls do not hide, growing
linearly with the group size; DP gradient reduction and PP sends are taken as overlapped, the optimizer step and
the log-prob passes are left out, and so are the image features' all-gather over tp * cp and the all-reduce of the
vision tower's gradients over TP once per optimizer step (fp32, 4 bytes x vision parameters: 2.7 GB for the
released models' 0.68B), which no other communication term here models either.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_minio3.config.schema import (
    DEFAULT_SELECTIVE_RECOMPUTE,
    ActorConfig,
    ClusterConfig,
    Config,
    ParallelConfig,
)
from megatron_minio3.trainer.launch_plan import (
    LOGITS_COMPONENT,
    GiB,
    RECOMPUTE_MODES,
    ModelDims,
    ParamCounts,
    PhaseMemory,
    _place,
    _structure_problems,
    build_launch_plan,
    count_parameters,
    image_token_bound,
    read_model_dims,
)

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H100 / H200 SXM, FLOP/s
COLOCATED_DEFAULTS = ("actor.offload_to_host_between_phases=true", "rollout.enable_sleep_mode=true")
CP_CAVEAT = "cp: local spec (no TE); not yet measured on GPU"


@dataclass(frozen=True)
class FlopsPerToken:
    """Model FLOPs (forward + backward, no recompute) of one token, by part."""

    decoder_dense: float  # every decoder layer's matmuls: 6 x layer parameters
    decoder_attention: float  # QK^T and AV of every layer
    lm_head: float  # the output projection (6 x vocab x hidden, tied or not)
    vision: float  # vision tower + merger, averaged over all tokens (image_fraction of them are image tokens)
    decoder_mlp: float = 0.0  # the MLPs' part of decoder_dense (6 x num_layers x 3hf): in it, not added to total

    @property
    def total(self) -> float:
        return self.decoder_dense + self.decoder_attention + self.lm_head + self.vision


def flops_per_token_parts(d: ModelDims, seq_len: float, *, image_fraction: float = 0.0,
                          patches_per_image: float = 0.0, causal: bool = True) -> FlopsPerToken:
    """FLOPs of one token of a sequence of seq_len tokens, forward + backward (backward = 2 x forward), by part.

    Decoder matmuls: 6 * num_layers * P_layer (P_layer: one layer's parameters; its norm weights and biases, under
    0.1%, are counted as if they were matmul weights). Attention: QK^T and AV cost 2 * 2 * hidden * context per
    token and layer forward (hidden = heads * head_dim; GQA shares k and v, not the FLOPs), so 12 * num_layers *
    hidden * context forward + backward; the context averages seq_len / 2 over a causal sequence (causal=False:
    seq_len). lm_head: 6 * vocab * hidden. Embedding lookups: none.
    Vision, per image token: spatial_merge^2 patches, each through the tower, 6 * P_tower (patch embedding and
    blocks) + 12 * hv * (window blocks * min(window patches, patches_per_image) + full-attention blocks *
    patches_per_image), window patches = (window_size / patch_size)^2 (bidirectional: no causal half); then the
    merger, 6 * P_merger per image token. Per average token: image_fraction * that. decoder_mlp: the MLPs' part
    of the decoder matmuls, 6 * num_layers * 3 * hidden * intermediate (gate, up, down), i.e. decoder_dense times
    the MLP's share of a layer's parameters, 3hf / (attention projections + 3hf + 2h norm weights).
    patches_per_image: patches of one image (t * h * w of its grid, before merging); for images of different
    sizes pass sum(p^2) / sum(p), which makes the full-attention term exact. Required when image_fraction > 0."""
    if not seq_len > 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if not 0 <= image_fraction <= 1:
        raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
    if image_fraction > 0 and not patches_per_image > 0:
        raise ValueError(f"patches_per_image must be > 0 when image_fraction > 0 (got {patches_per_image}): the "
                         "full-attention vision blocks attend over a whole image")
    c = count_parameters(d)
    context = seq_len / 2 if causal else seq_len
    window_patches = min((d.vision_window_size / d.patch_size) ** 2, patches_per_image)
    window_blocks = d.vision_depth - d.vision_num_full_attention_blocks
    vision_context = window_blocks * window_patches + d.vision_num_full_attention_blocks * patches_per_image
    per_patch = 6 * c.vision_tower + 12 * d.vision_hidden_size * vision_context
    per_image_token = d.spatial_merge_size**2 * per_patch + 6 * c.merger
    return FlopsPerToken(
        decoder_dense=6 * d.num_layers * c.per_layer,
        decoder_attention=12 * d.num_layers * d.hidden_size * context,
        lm_head=6 * d.vocab_size * d.hidden_size,
        vision=image_fraction * per_image_token if image_fraction else 0.0,
        decoder_mlp=6 * d.num_layers * 3 * d.hidden_size * d.intermediate_size,
    )


def model_flops_per_token(d: ModelDims, seq_len: float, *, image_fraction: float = 0.0,
                          patches_per_image: float = 0.0, causal: bool = True) -> float:
    """Model FLOPs (forward + backward, recompute not counted: the MFU numerator) of one token of a sequence of
    seq_len tokens: flops_per_token_parts(...).total, i.e.
        6 * (num_layers * P_layer + vocab * hidden) + 12 * num_layers * hidden * seq_len / 2 (causal)
        + image_fraction * (merge^2 * (6 * P_tower + 12 * hv * vision context) + 6 * P_merger).
    A packed micro-batch of sequences i (lengths L_i, image shares f_i): sum_i L_i * model_flops_per_token(d, L_i,
    image_fraction=f_i, patches_per_image=p_i). d: read_model_dims(config.json as a dict)."""
    return flops_per_token_parts(d, seq_len, image_fraction=image_fraction, patches_per_image=patches_per_image,
                                 causal=causal).total


def recompute_factors(parts: FlopsPerToken, mode: str,
                      modules: tuple[str, ...] | list[str] = tuple(DEFAULT_SELECTIVE_RECOMPUTE)
                      ) -> tuple[float, float]:
    """(decoder layers, vision tower) hardware FLOPs / model FLOPs under a recompute mode (model FLOPs are 3
    forwards, so one more forward of a part adds a third of its FLOPs):
      "none"       (1, 1);
      "selective"  decoder (D + A + [core_attn] A/3 + [mlp] M/3) / (D + A), D = decoder_dense, A =
                   decoder_attention, M = decoder_mlp ("layernorm" reruns the norms: no matmul FLOPs); vision 4/3,
                   the tower's blocks rerun whole under either granularity;
      "full"       (4/3, 4/3): every decoder layer's and vision block's forward again.
    modules: the selective mode's actor.recompute_modules. The lm_head is never recomputed."""
    if mode == "none":
        return 1.0, 1.0
    if mode == "selective":
        unknown = set(modules) - {"core_attn", "mlp", "layernorm"}
        if unknown or not modules:
            raise ValueError(f"recompute modules must be a non-empty subset of ['core_attn', 'mlp', 'layernorm'], "
                             f"got {list(modules)}")
        decoder = parts.decoder_dense + parts.decoder_attention
        rerun = (parts.decoder_attention if "core_attn" in modules else 0) + (
            parts.decoder_mlp if "mlp" in modules else 0)
        return (decoder + rerun / 3) / decoder, 4 / 3
    if mode == "full":
        return 4 / 3, 4 / 3
    raise ValueError(f"recompute mode must be one of {RECOMPUTE_MODES}, got {mode!r}")


def recompute_overrides(mode: str, actor: ActorConfig) -> list[str]:
    """The dotted config overrides that set `mode` on top of a config whose actor section is `actor` (the result
    passes ActorConfig.validate): "none" recompute_activations=false, "full" recompute_activations=true
    recompute_granularity=full, "selective" recompute_activations=true recompute_granularity=selective, plus
    recompute_modules=[...] when actor's are not the default (selective reruns them). recompute_modules goes back
    to its default where "none" or "full" would otherwise keep a non-default list that only selective accepts."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode must be one of {RECOMPUTE_MODES}, got {mode!r}")
    out = [f"actor.recompute_activations={str(mode != 'none').lower()}"]
    if mode != "none" or actor.recompute_granularity != "full":
        out.append(f"actor.recompute_granularity={'selective' if mode == 'selective' else 'full'}")
    if list(actor.recompute_modules) != DEFAULT_SELECTIVE_RECOMPUTE:
        modules = actor.recompute_modules if mode == "selective" else DEFAULT_SELECTIVE_RECOMPUTE
        out.append(f"actor.recompute_modules=[{','.join(modules)}]")
    return out


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp} pp{self.pp} cp{self.cp} dp{self.dp}"


def candidate_layouts(num_gpus: int) -> list[Layout]:
    """Every (tp, pp, cp, dp) with tp * pp * cp * dp == num_gpus, in (tp, pp, cp) order."""
    divisors = [n for n in range(1, num_gpus + 1) if num_gpus % n == 0]
    return [Layout(tp, pp, cp, num_gpus // (tp * pp * cp)) for tp in divisors for pp in divisors for cp in divisors
            if num_gpus % (tp * pp * cp) == 0]


@dataclass(frozen=True)
class StepTimeModel:
    """The assumptions of the step-time estimate (see the module docstring)."""

    peak_flops: float = H100_BF16_PEAK_FLOPS
    mfu: float = 0.4  # the fraction of peak the matmuls reach at tp = pp = cp = 1
    global_batch: int = 512  # micro-batches of seq_len tokens per optimizer step, over all DP replicas
    tp_comm_penalty: float = 0.05  # per TP rank beyond the first
    cp_comm_penalty: float = 0.05  # per CP rank beyond the first

    def validate(self) -> None:
        if not self.peak_flops > 0:
            raise ValueError(f"peak_flops (--peak-flops) must be > 0, got {self.peak_flops}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu (--mfu) must be in (0, 1], got {self.mfu}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch (--global-batch) must be >= 1, got {self.global_batch}")
        if self.tp_comm_penalty < 0 or self.cp_comm_penalty < 0:
            raise ValueError(f"tp_comm_penalty and cp_comm_penalty must be >= 0, got {self.tp_comm_penalty} and "
                             f"{self.cp_comm_penalty}")


def step_seconds(parts: FlopsPerToken, layout: Layout, mode: str, seq_len: int, model: StepTimeModel,
                 modules: tuple[str, ...] | list[str] = tuple(DEFAULT_SELECTIVE_RECOMPUTE)) -> float:
    """Estimated time of one optimizer step (forward + backward of model.global_batch micro-batches of seq_len
    tokens) on `layout`; the formula is the module docstring's. modules: the selective mode's recompute_modules."""
    decoder_factor, vision_factor = recompute_factors(parts, mode, modules)
    decoder = (parts.decoder_dense + parts.decoder_attention) * decoder_factor / layout.pp / layout.tp
    first = decoder + parts.vision * vision_factor / layout.tp + (parts.lm_head / layout.tp if layout.pp == 1 else 0)
    last = decoder + parts.lm_head / layout.tp
    per_microbatch = seq_len / layout.cp * max(first, last) / (model.peak_flops * model.mfu)
    microbatches = math.ceil(model.global_batch / layout.dp)
    return ((microbatches + layout.pp - 1) * per_microbatch * (1 + model.tp_comm_penalty * (layout.tp - 1))
            * (1 + model.cp_comm_penalty * (layout.cp - 1)))


@dataclass(frozen=True)
class PlannerSettings:
    num_gpus: int
    gpu_memory_gb: float  # per GPU, read as GiB like cluster.gpu_memory_gb
    seq_len: int  # tokens of one packed micro-batch (and of one sequence, for attention FLOPs and the KV check)
    colocated: bool = False  # vLLM engines in the actor GPUs (hybrid placement), else on other GPUs
    gpus_per_node: int = 8
    headroom: float = 0.1  # a layout fits when its peak phase <= (1 - headroom) * gpu memory
    rollout_tp: int = 0  # colocated engines' TP; 0: the smallest whose KV cache holds one seq_len sequence
    image_fraction: float | None = None  # image tokens / tokens; None: the launch plan's bound from the config
    image_pixels: int | None = None  # pixels of one image for vision attention FLOPs; None: data.max_pixels
    time: StepTimeModel = field(default_factory=StepTimeModel)

    def validate(self) -> None:
        for name, flag in (("num_gpus", "--gpus"), ("seq_len", "--seq-len"), ("gpus_per_node", "--gpus-per-node")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({flag}) must be >= 1, got {getattr(self, name)}")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ValueError(f"num_gpus (--gpus) {self.num_gpus} spans nodes of gpus_per_node (--gpus-per-node) "
                             f"{self.gpus_per_node} GPUs but is not divisible by it: use whole nodes")
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"gpu_memory_gb (--gpu-mem) must be > 0, got {self.gpu_memory_gb}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom (--headroom) must be in [0, 1), got {self.headroom}")
        if self.rollout_tp < 0:
            raise ValueError(f"rollout_tp (--rollout-tp) must be >= 0 (0: automatic), got {self.rollout_tp}")
        if self.image_fraction is not None and not 0 <= self.image_fraction <= 1:
            raise ValueError(f"image_fraction (--image-fraction) must be in [0, 1], got {self.image_fraction}")
        if self.image_pixels is not None and self.image_pixels < 1:
            raise ValueError(f"image_pixels (--image-pixels) must be >= 1, got {self.image_pixels}")
        self.time.validate()

    @property
    def budget_bytes(self) -> int:
        return int((1 - self.headroom) * self.gpu_memory_gb * GiB)


@dataclass
class LayoutEstimate:
    layout: Layout
    phases: dict[str, list[PhaseMemory]]  # per recompute mode: rollout, train, sync (the worst stage of each)
    train_components: dict[str, dict[str, int]]  # per mode: train components, the larger of first and last stage
    step_seconds: dict[str, float]  # per mode
    problems: list[str]  # reasons it cannot run whatever the memory
    unsupported: str = ""  # why the trainer's config refuses it ("" when it accepts it)
    caveat: str = ""  # what is not yet established for it, although the config accepts it (CP_CAVEAT for cp > 1)

    def peak(self, mode: str) -> int:
        return max(m.total for m in self.phases[mode])

    def phase_total(self, mode: str, phase: str) -> int:
        return next(m.total for m in self.phases[mode] if m.phase == phase)

    def fastest_fitting_mode(self, budget_bytes: int) -> str | None:
        """The recompute mode with the shortest step whose peak phase fits, None when none fits or it cannot run."""
        fitting = [m for m in RECOMPUTE_MODES if self.peak(m) <= budget_bytes]
        return None if self.problems or not fitting else min(fitting, key=lambda m: (self.step_seconds[m],
                                                                                     self.peak(m)))


@dataclass(frozen=True)
class RankedLayout:
    estimate: LayoutEstimate
    recompute: str
    step_seconds: float
    peak_bytes: int

    @property
    def caveat(self) -> str:
        """What to know before putting this row in a config ("" when nothing): the config's refusal, or what is
        not yet established for it (CP_CAVEAT)."""
        parts = [self.estimate.unsupported.split(" (")[0]] if self.estimate.unsupported else []
        return "; ".join(parts + ([self.estimate.caveat] if self.estimate.caveat else []))


@dataclass
class ParallelismPlan:
    settings: PlannerSettings
    dims: ModelDims
    params: ParamCounts
    flops: FlopsPerToken
    image_fraction: float
    patches_per_image: int
    rollout_tp: int | None  # colocated only
    kv_cache_tokens_per_engine: int | None  # colocated only
    recompute_modules: tuple[str, ...]  # what the "selective" mode reruns (the base config's)
    base_actor: ActorConfig  # the base config's actor section (for the recommendation's recompute overrides)
    estimates: list[LayoutEstimate]
    left_out: dict[str, list[str]]  # layout -> why it does not split the model or stays in no node

    def ranked(self) -> list[RankedLayout]:
        """The layouts that fit, each with its fastest fitting recompute mode, fastest first (then smaller peak)."""
        rows = []
        for e in self.estimates:
            mode = e.fastest_fitting_mode(self.settings.budget_bytes)
            if mode is not None:
                rows.append(RankedLayout(e, mode, e.step_seconds[mode], e.peak(mode)))
        return sorted(rows, key=lambda r: (r.step_seconds, r.peak_bytes, str(r.estimate.layout)))

    def recommended(self, max_cp: int | None = None) -> RankedLayout | None:
        """The fastest layout and mode that fit and that the config accepts (cp > 1 rows included, with their
        caveat); max_cp: only layouts with cp <= max_cp (max_cp=1: the fastest without context parallel)."""
        return next((r for r in self.ranked() if not r.estimate.unsupported
                     and (max_cp is None or r.estimate.layout.cp <= max_cp)), None)


def _layout_config(base: Config, s: PlannerSettings, layout: Layout, rollout_tp: int) -> Config:
    """The base config with this layout on s.num_gpus GPUs, the micro-batch and sequence length s.seq_len, the
    rollout placement and TP (not validated here: _unsupported asks ParallelConfig.validate)."""
    cfg = copy.deepcopy(base)
    cfg.parallel = ParallelConfig(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp)
    per_node = min(s.gpus_per_node, s.num_gpus)
    engine_gpus = 0 if s.colocated else rollout_tp  # separate engines: one worker after the actor ranks
    cfg.cluster = ClusterConfig(num_nodes=math.ceil((s.num_gpus + engine_gpus) / per_node), gpus_per_node=per_node,
                                gpu_memory_gb=s.gpu_memory_gb)
    cfg.actor.packing.max_tokens_per_microbatch = s.seq_len
    cfg.rollout.max_total_tokens = s.seq_len
    cfg.rollout.tensor_parallel_size = rollout_tp
    cfg.trainer.rollout_placement = "hybrid" if s.colocated else "separate"
    cfg.trainer.num_rollout_workers = 1
    return cfg


def _split_problems(cfg: Config, d: ModelDims) -> list[str]:
    """Why this layout does not split the model (heads, KV heads, vocab, FFN over tp; layers over pp), the rollout
    TP, or the nodes (a TP group or an engine across nodes): the launch plan's own checks."""
    return _structure_problems(cfg, d) + _place(cfg)[3]


def _choose_rollout_tp(base: Config, s: PlannerSettings, hf_config: dict[str, Any], d: ModelDims) -> tuple[int, int]:
    """(rollout TP, KV cache tokens per engine): s.rollout_tp, or the smallest TP that splits the heads, stays in a
    node, divides the GPUs and whose engine's KV cache holds one seq_len sequence (the largest such TP if none
    does: the plan then reports it)."""
    probe = Layout(1, 1, 1, s.num_gpus)
    if s.rollout_tp:
        candidates = [s.rollout_tp]
    else:
        candidates = [r for r in range(1, min(s.gpus_per_node, s.num_gpus) + 1)
                      if not _split_problems(_layout_config(base, s, probe, r), d)]
    kv_tokens = 0
    for r in candidates:
        plan = build_launch_plan(_layout_config(base, s, probe, r), hf_config, s.image_fraction)
        kv_tokens = plan.kv_cache_tokens_per_engine
        if kv_tokens >= s.seq_len:
            return r, kv_tokens
    return candidates[-1], kv_tokens


def _unsupported(layout: Layout) -> str:
    """Why the config refuses this layout: ParallelConfig.validate's message, "" when it accepts it (it accepts every
    layout of sizes >= 1, cp > 1 included; context parallel's caveat is CP_CAVEAT, not a refusal)."""
    try:
        ParallelConfig(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp).validate()
    except ValueError as err:
        return str(err)
    return ""


def plan_parallelism(hf_config: dict[str, Any], settings: PlannerSettings, base: Config | None = None
                     ) -> ParallelismPlan:
    """Every layout of settings.num_gpus GPUs that splits the model, with memory per phase and recompute mode and
    step time per mode. base: the run's config (default: the config defaults, with actor state offloaded and
    engines asleep between phases when colocated); its actor.dtype, freezing, reference model, weights buckets,
    rollout memory settings and data.max_pixels / rollout.max_images (the image-token bound) are used."""
    from megatron_minio3.config import load_config

    settings.validate()
    d = read_model_dims(hf_config)
    if base is None:
        base = load_config(None, list(COLOCATED_DEFAULTS) if settings.colocated else [])
    s = settings
    rollout_tp, kv_tokens = _choose_rollout_tp(base, s, hf_config, d) if s.colocated else (1, None)
    probe_cfg = _layout_config(base, s, Layout(1, 1, 1, s.num_gpus), rollout_tp)
    fraction = image_token_bound(probe_cfg, d) if s.image_fraction is None else s.image_fraction
    pixels = base.data.max_pixels if s.image_pixels is None else s.image_pixels
    patches = math.ceil(pixels / d.patch_size**2)
    parts = flops_per_token_parts(d, s.seq_len, image_fraction=fraction, patches_per_image=patches)
    modules = tuple(base.actor.recompute_modules)
    estimates, left_out = [], {}
    for layout in candidate_layouts(s.num_gpus):
        cfg = _layout_config(base, s, layout, rollout_tp)
        reasons = _split_problems(cfg, d)
        if reasons:
            left_out[str(layout)] = reasons
            continue
        phases, components, seconds, problems = {}, {}, {}, []
        for mode in RECOMPUTE_MODES:
            plan = build_launch_plan(cfg, hf_config, fraction, recompute=mode)
            phases[mode] = [m for m in plan.phases if m.phase != "engine GPU"]  # separate engines: other GPUs
            train = [next(m for m in stage if m.phase == "train") for stage in plan.stage_phases]
            keys = dict.fromkeys(k for m in train for k in m.components)  # the last stage adds the logits
            components[mode] = {k: max(m.components.get(k, 0) for m in train) for k in keys}
            seconds[mode] = step_seconds(parts, layout, mode, s.seq_len, s.time, modules)
        if s.colocated and kv_tokens < s.seq_len:
            problems.append(f"the KV cache of an engine of rollout TP {rollout_tp} holds {kv_tokens} tokens, less than "
                            f"one sequence of {s.seq_len}")
        estimates.append(LayoutEstimate(layout, phases, components, seconds, problems, _unsupported(layout),
                                        CP_CAVEAT if layout.cp > 1 else ""))
    if not estimates:
        raise ValueError(f"no TP x PP x CP x DP layout of {s.num_gpus} GPUs splits this model: " + "; ".join(
            f"{layout}: {' / '.join(reasons)}" for layout, reasons in left_out.items()))
    return ParallelismPlan(s, d, count_parameters(d), parts, fraction, patches, rollout_tp if s.colocated else None,
                           kv_tokens, modules, copy.deepcopy(base.actor), estimates, left_out)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _mark(e: LayoutEstimate) -> str:
    if e.unsupported:
        return f" [{e.unsupported.split(' (')[0]}]"
    return f" [{e.caveat}]" if e.caveat else ""


def format_plan(plan: ParallelismPlan) -> str:
    """The report: assumptions, one row per layout (memory by component and phase, step time per recompute mode),
    the layouts that fit ranked fastest first, and the recommendation for the configs."""
    s, f, modes = plan.settings, plan.flops, RECOMPUTE_MODES
    lines = [
        f"parallelism plan (ESTIMATES; GiB = 2^30 bytes): {s.num_gpus} GPUs of {s.gpu_memory_gb:g} GiB "
        f"({s.gpus_per_node} per node), micro-batches of {s.seq_len} tokens, "
        + (f"colocated vLLM engines of TP {plan.rollout_tp} (KV cache {plan.kv_cache_tokens_per_engine} tokens per "
           f"engine)" if s.colocated else "rollout engines on other GPUs"),
        f"model: {plan.params.total / 1e9:.2f}B parameters (vision tower + merger {plan.params.vision / 1e9:.3f}B); "
        f"image tokens {plan.image_fraction:.0%} of a micro-batch, {plan.patches_per_image} patches per image",
        f"FLOPs per token (fwd+bwd): {f.total / 1e9:.1f} G = decoder matmuls {f.decoder_dense / 1e9:.1f} + attention "
        f"{f.decoder_attention / 1e9:.1f} + lm_head {f.lm_head / 1e9:.1f} + vision {f.vision / 1e9:.1f}",
        f"step time: {s.time.global_batch} micro-batches per optimizer step, {s.time.peak_flops / 1e12:g} TFLOP/s peak "
        f"x MFU {s.time.mfu:g}, + pipeline bubble (pp-1)/m, x (1 + {s.time.tp_comm_penalty:g}*(tp-1)) x "
        f"(1 + {s.time.cp_comm_penalty:g}*(cp-1))",
        f"fits: peak phase <= {1 - s.headroom:.0%} of {s.gpu_memory_gb:g} GiB = {_gib(s.budget_bytes)} GiB; "
        f"recompute modes none / selective ({', '.join(plan.recompute_modules)}; vision blocks whole) / full "
        "(n / s / f)",
        "",
    ]
    engine = s.colocated
    header = (f"{'layout':<18}{'params':>7}{'grads':>7}{'optim':>7}  {'activations n/s/f':<19}{'logits':>7}"
              + (f"{'eng.w':>7}{'KV':>7}" if engine else "")
              + f"  {'train n/s/f':<19}{'rollout':>8}{'sync':>7}  {'step s n/s/f':<20} fits")
    lines += ["per GPU, GiB (components: the larger of the first and last pipeline stage, in the train phase; "
              "phases: the worst stage)", header]
    budget = s.budget_bytes
    for e in plan.estimates:
        full = e.train_components["full"]
        acts = "/".join(_gib(sum(v for k, v in e.train_components[m].items() if k.startswith("activations")))
                        for m in modes)
        rollout = next(m for m in e.phases["full"] if m.phase == "rollout").components
        train = "/".join(_gib(e.phase_total(m, "train")) for m in modes)
        times = "/".join(f"{e.step_seconds[m]:.0f}" for m in modes)
        fitting = [m[0] for m in modes if e.peak(m) <= budget]
        verdict = ("cannot run: " + "; ".join(e.problems) if e.problems
                   else ("/".join(fitting) if fitting else "no")) + _mark(e)
        lines.append(
            f"{str(e.layout):<18}{_gib(full['actor params']):>7}{_gib(full['actor grads (fp32)']):>7}"
            f"{_gib(full['actor optimizer (dp*cp shard)']):>7}  {acts:<19}"
            f"{_gib(full[LOGITS_COMPONENT]):>7}"
            + (f"{_gib(rollout.get('engine weights', 0)):>7}{_gib(rollout.get('engine KV cache', 0)):>7}"
               if engine else "")
            + f"  {train:<19}{_gib(e.phase_total('full', 'rollout')):>8}{_gib(e.phase_total('full', 'sync')):>7}"
              f"  {times:<20} {verdict}")
    for layout, reasons in plan.left_out.items():
        lines.append(f"{layout:<18}left out: " + " / ".join(r.split(";")[0].split(" (Megatron")[0] for r in reasons))
    ranked = plan.ranked()
    lines += ["", f"ranked: {len(ranked)} of {len(plan.estimates)} layouts fit, fastest first (each with its fastest "
              "recompute mode that fits)",
              f"{'#':>3}  {'layout':<18}{'recompute':<11}{'step s':>8}{'peak GiB':>10}  caveat"]
    for i, r in enumerate(ranked, start=1):
        lines.append(f"{i:>3}  {str(r.estimate.layout):<18}{r.recompute:<11}{r.step_seconds:>8.1f}"
                     f"{_gib(r.peak_bytes):>10}  {r.caveat}")
    best = plan.recommended()
    if best is None:
        lines.append("recommended: none fits; more GPUs, a shorter --seq-len or less --headroom")
        return "\n".join(lines)
    lines.append("recommended for the configs: " + _recommendation(plan, best))
    if best.estimate.layout.cp > 1:
        best_cp1 = plan.recommended(max_cp=1)
        lines.append("fastest with cp = 1: " + (_recommendation(plan, best_cp1) if best_cp1 else "none fits")
                     + (f"; the cp layout is {1 - best.step_seconds / best_cp1.step_seconds:.0%} faster"
                        if best_cp1 else ""))
    return "\n".join(lines)


def _recommendation(plan: ParallelismPlan, r: RankedLayout) -> str:
    """The config keys of a ranked row: parallel, the recompute overrides, the colocated engines' TP."""
    layout = r.estimate.layout
    return (f"parallel: {{tp: {layout.tp}, pp: {layout.pp}, cp: {layout.cp}, dp: {layout.dp}}}, "
            + " ".join(recompute_overrides(r.recompute, plan.base_actor))
            + (f", rollout.tensor_parallel_size={plan.rollout_tp}" if plan.settings.colocated else "")
            + f" (step ~{r.step_seconds:.1f} s, peak {_gib(r.peak_bytes)} GiB)"
            + (f" [{r.caveat}]" if r.caveat else ""))
