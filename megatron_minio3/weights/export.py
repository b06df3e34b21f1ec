"""Live Megatron model (any TP/PP, vision tower included) -> full HF-named tensors, one bucket at a time.

Every rank of the actor calls :meth:`WeightExporter.buckets` together (it is a sequence of collectives) and
every rank receives every bucket: the pipeline stage that owns a bucket's tensors all-gathers each of them
over its tensor-parallel group, straight into the bucket's flat buffer, then broadcasts the buffer over the
pipeline group. All ranks holding the buckets is what colocated engines need (each rank feeds the engine
that shares its device); a separate engine is fed from one rank (see weights/sync.py).

Names, fusing and splitting come from the conversion rules (convert/qwen2_5_vl.py): rank r's shard of a
Megatron tensor is ``layout.from_parts(chunk r of each HF part)``, so ``layout.to_parts(shard)`` is chunk r of
every HF part, and the full HF part is those chunks concatenated along the rule's ``tp_dim`` in rank order.
Shards are cast to the export dtype before they travel.

Buckets never split a *reload group*: the HF tensors a vLLM engine loads into one module (q/k/v weights and
biases into ``qkv_proj``, gate/up into ``gate_up_proj``, a weight and its bias). vLLM's in-place reload
re-creates a module from the tensors of one reload call and leaves whatever that call did not bring
uninitialised, so a module's tensors must arrive together. Buckets also never span pipeline stages.

Memory per rank: one bucket buffer (the size of the largest bucket, reused by every bucket of an export, so
its pages are faulted in once per sync rather than once per bucket), plus while a tensor is gathered its cast
shard (only when the dtype changes) and, for tensors split along a dimension other than 0, one gather buffer
of the largest such tensor (reused too). A reload group larger than the bucket size is a bucket of its own.

Views (``buckets(views=True)``, for an engine in this process): a tensor this rank holds whole (TP=1, or not
split over TP) in the export dtype is handed out as a view of the live parameter, no copy, wherever the layout
allows (plain tensors, [gate; up] halves, the reshaped patch embedding); re-laid-out parts (the interleaved
QKV) are fresh tensors, and only TP-gathered tensors use the bucket buffer. The engine copies what it loads,
so the views must not outlive the bucket (they alias the parameters the optimizer updates).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_minio3.convert.megatron_checkpoint import global_named_parameters
from megatron_minio3.convert.megatron_to_hf import copy_non_weight_files
from megatron_minio3.convert.qwen2_5_vl import HfNaming, ParamRule, checkpoint_rules, parameter_rule
from megatron_minio3.convert.safetensors_io import StreamingSafetensorsWriter, TensorSpec, atomic_directory
from megatron_minio3.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from megatron_minio3.weights.bucket import Bucket, TensorEntry, bucket_views

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# HF projection modules that vLLM fuses into one module (its `packed_modules_mapping` for Qwen2 models).
FUSED_MODULES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def reload_group(hf_name: str) -> str:
    """The engine module an HF tensor is loaded into: its parent module, fused projections merged."""
    module = hf_name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{FUSED_MODULES.get(leaf, leaf)}"


@dataclass(frozen=True)
class BucketPlan:
    stage: int  # the pipeline stage that owns every tensor of the bucket
    rules: tuple[ParamRule, ...]  # its Megatron tensors, in order
    entries: tuple[TensorEntry, ...]  # their HF tensors, in the same order
    numel: int


def plan_buckets(
    owned_rules: Sequence[tuple[ParamRule, int]], bucket_bytes: int, element_size: int
) -> list[BucketPlan]:
    """Pack (rule, owning stage) pairs, in the given order, into buckets of at most ``bucket_bytes``.

    Whole reload groups only, one stage per bucket; a group larger than ``bucket_bytes`` gets a bucket alone.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be at least 1 byte, got {bucket_bytes}")
    groups: dict[tuple[int, str], list[ParamRule]] = {}
    for rule, stage in owned_rules:
        groups.setdefault((stage, reload_group(rule.hf_names[0])), []).append(rule)
    plans: list[BucketPlan] = []
    current: list[ParamRule] = []
    current_stage, current_numel = -1, 0

    def close() -> None:
        entries, offset = [], 0
        for rule in current:
            for name, shape in zip(rule.hf_names, rule.hf_shapes()):
                entries.append(TensorEntry(name, shape, offset))
                offset += math.prod(shape)
        plans.append(BucketPlan(current_stage, tuple(current), tuple(entries), offset))

    for (stage, _), rules in groups.items():
        numel = sum(math.prod(rule.megatron_shape) for rule in rules)
        if current and (stage != current_stage or (current_numel + numel) * element_size > bucket_bytes):
            close()
            current, current_numel = [], 0
        current += rules
        current_stage = stage
        current_numel += numel
    if current:
        close()
    return plans


def shard_shape(rule: ParamRule, tp_size: int) -> tuple[int, ...]:
    """Shape of one tensor-parallel rank's shard of a Megatron tensor."""
    shape = list(rule.megatron_shape)
    if rule.tp_dim is not None:
        shape[rule.tp_dim] //= tp_size
    return tuple(shape)


def local_shards(
    named_params: Iterable[tuple[str, torch.Tensor]], cfg: Qwen2_5_VLConfig, naming: HfNaming, tp_size: int
) -> dict[str, torch.Tensor]:
    """{canonical name: parameter} of this rank, after checking every shard has its rule's shape."""
    local = {}
    for name, param in named_params:
        rule = parameter_rule(name, cfg, naming)
        expected = shard_shape(rule, tp_size)
        if tuple(param.shape) != expected:
            raise ValueError(
                f"Megatron tensor '{name}' has shape {tuple(param.shape)} on this rank, expected {expected} "
                f"(full {rule.megatron_shape} over tp={tp_size})"
            )
        local[name] = param
    return local


def assign_stages(
    stage_names: Sequence[Sequence[str]], cfg: Qwen2_5_VLConfig, naming: HfNaming
) -> list[tuple[ParamRule, int]]:
    """(rule, owning pipeline stage) of every exported tensor, stage by stage, in rule order within a stage,
    from the canonical parameter names of each stage."""
    owner: dict[str, int] = {}
    for stage, names in enumerate(stage_names):
        for name in names:
            if name in owner and parameter_rule(name, cfg, naming).exported:
                raise ValueError(f"Megatron tensor '{name}' is on pipeline stages {owner[name]} and {stage}")
            owner.setdefault(name, stage)
    owned = []
    for rule in checkpoint_rules(cfg, naming):
        if rule.megatron_name not in owner:
            raise ValueError(f"Megatron tensor '{rule.megatron_name}' is on no pipeline stage of the model")
        owned.append((rule, owner[rule.megatron_name]))
    return sorted(owned, key=lambda pair: pair[1])  # stable: rule order within a stage


def assemble_hf_part(gathered_R: torch.Tensor, tp_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Full HF part from every rank's chunk of it (stacked along a new leading dimension, in rank order)."""
    return torch.cat(list(gathered_R.unbind(0)), dim=tp_dim, out=out)


def resolve_export_dtype(weights_dtype: str, rollout_dtype: str, hf_dir: str | Path) -> torch.dtype:
    """weights.dtype, else rollout.dtype, else the dtype recorded in the HF checkpoint's config.json."""
    for name in (weights_dtype, rollout_dtype):
        if name != "auto":
            if name not in DTYPES:
                raise ValueError(f"unknown export dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
            return DTYPES[name]
    config = json.loads(Path(hf_dir, "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype")
    if name not in DTYPES:
        raise ValueError(f"{hf_dir}/config.json records dtype {name!r}; set weights.dtype explicitly")
    return DTYPES[name]


class WeightExporter:
    """Streams this model's weights as full HF tensors (see the module docstring). One per actor model.

    model: this rank's Qwen2_5_VLModel (MegatronActor.module, not its DDP wrapper); naming: the HF tensor-name
    layout the engine loads (detect_naming of its checkpoint); dtype: the engine's dtype (resolve_export_dtype).
    """

    def __init__(self, model: torch.nn.Module, naming: HfNaming, *, bucket_bytes: int, dtype: torch.dtype):
        self.model = model
        self.cfg = model.model_cfg
        self.naming = naming
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.tp_size = mpu.get_tensor_model_parallel_world_size()
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.pp_group = mpu.get_pipeline_model_parallel_group()
        self.pp_rank = mpu.get_pipeline_model_parallel_rank()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)
        self.local = local_shards(global_named_parameters(model), self.cfg, naming, self.tp_size)
        self._plan: list[BucketPlan] | None = None
        self._gather_scratch: torch.Tensor | None = None  # row-parallel gather buffer, during an export only

    def plan(self) -> list[BucketPlan]:
        """The buckets, the same on every rank (collective over the pipeline group on the first call)."""
        if self._plan is None:
            stage_names: list[list[str] | None] = [None] * len(self.pp_ranks)
            dist.all_gather_object(stage_names, sorted(self.local), group=self.pp_group)
            owned = assign_stages(stage_names, self.cfg, self.naming)
            element_size = torch.empty((), dtype=self.dtype).element_size()
            self._plan = plan_buckets(owned, self.bucket_bytes, element_size)
        return self._plan

    def buckets(self, *, views: bool = False) -> Iterator[Bucket]:
        """Every bucket, in plan order, on every rank. Collective: all ranks iterate to the end together.

        A bucket's tensors are valid until the next bucket is requested: its buffer is reused for the next one.
        Consumers copy what they keep (engines load, broadcasts send, writers write before asking for more).
        views=True (the consumer is an engine in this process; see the module docstring): tensors held whole
        are views of the parameters and the bucket's `flat` holds only the TP-gathered ones. Ignored with more
        than one pipeline stage (the broadcast needs the flat buffer). The collectives are the same either way.
        """
        plans = self.plan()
        views = views and len(self.pp_ranks) == 1
        if views:
            plans_numel = [sum(self._gathered_numel(rule) for rule in plan.rules) for plan in plans]
        else:
            plans_numel = [plan.numel for plan in plans]
        buffer = torch.empty(max(plans_numel, default=0), dtype=self.dtype, device=self.device)
        try:
            for plan, numel in zip(plans, plans_numel):
                flat = buffer.narrow(0, 0, numel)
                if views:
                    yield Bucket(flat, plan.entries, self._views(flat, plan))
                    continue
                if plan.stage == self.pp_rank:
                    self._fill(flat, plan)
                if len(self.pp_ranks) > 1:
                    dist.broadcast(flat, src=self.pp_ranks[plan.stage], group=self.pp_group)
                yield Bucket(flat, plan.entries)
        finally:
            self._gather_scratch = None
            del buffer

    def _gathered_numel(self, rule: ParamRule) -> int:
        """Elements of a rule's HF tensors that travel through a TP all-gather (0 when this rank holds it whole)."""
        return 0 if rule.tp_dim is None or self.tp_size == 1 else math.prod(rule.megatron_shape)

    @torch.no_grad()
    def _views(self, flat: torch.Tensor, plan: BucketPlan) -> tuple[torch.Tensor, ...]:
        """The bucket's HF tensors in entry order: views of (or fresh parts made from) the parameters held
        whole, and the TP-gathered ones gathered into `flat`, laid end to end."""
        tensors: list[torch.Tensor] = []
        entries = iter(plan.entries)
        offset = 0
        for rule in plan.rules:
            rule_entries = [next(entries) for _ in rule.hf_names]
            if self._gathered_numel(rule) == 0:
                shard = self.local[rule.megatron_name].detach().to(self.dtype)
                tensors += [part.contiguous() for part in rule.layout.to_parts(shard)]
                continue
            outs = []
            for entry in rule_entries:
                outs.append(flat.narrow(0, offset, entry.numel).view(entry.shape))
                offset += entry.numel
            self._gather_into(rule, outs)
            tensors += outs
        return tuple(tensors)

    @torch.no_grad()  # not on the generator: its wrapper would enter and leave no-grad around every yield
    def _fill(self, flat: torch.Tensor, plan: BucketPlan) -> None:
        views = iter(bucket_views(flat, plan.entries))
        for rule in plan.rules:
            self._gather_into(rule, [view for _, view in (next(views) for _ in rule.hf_names)])

    def _gather_into(self, rule: ParamRule, outs: list[torch.Tensor]) -> None:
        param = self.local[rule.megatron_name].detach()
        if rule.tp_dim is None or self.tp_size == 1:
            for out, part in zip(outs, rule.layout.to_parts(param)):
                out.copy_(part)  # casts on the way: no cast copy of the whole tensor first
            return
        shard = param.to(self.dtype)
        for out, part in zip(outs, rule.layout.to_parts(shard)):
            if rule.tp_dim == 0:  # rank chunks are consecutive row blocks: gather in place
                dist.all_gather_into_tensor(out, part.contiguous(), group=self.tp_group)
            else:
                gathered = self._scratch(self.tp_size * part.numel()).view(self.tp_size * part.shape[0],
                                                                            *part.shape[1:])
                dist.all_gather_into_tensor(gathered, part.contiguous(), group=self.tp_group)
                assemble_hf_part(gathered.view(self.tp_size, *part.shape), rule.tp_dim, out=out)

    def _scratch(self, numel: int) -> torch.Tensor:
        """A gather buffer of at least `numel` elements, kept for the rest of the export (sized to the largest
        row-parallel part on first use, so it is allocated once per sync)."""
        if self._gather_scratch is None or self._gather_scratch.numel() < numel:
            largest = max(
                (math.prod(shape) for plan in self.plan() for rule in plan.rules
                 if rule.tp_dim not in (None, 0) for shape in rule.hf_shapes()),
                default=0,
            )
            self._gather_scratch = None
            self._gather_scratch = torch.empty(max(numel, largest), dtype=self.dtype, device=self.device)
        return self._gather_scratch.narrow(0, 0, numel)

    def tensor_specs(self) -> list[TensorSpec]:
        return [TensorSpec(e.name, e.shape, self.dtype) for plan in self.plan() for e in plan.entries]


def save_hf_checkpoint(
    exporter: WeightExporter,
    out_dir: str | Path,
    hf_config_dir: str | Path,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> None:
    """Write the exported weights as an HF checkpoint (non-weight files copied from ``hf_config_dir``).

    Collective over every rank of the actor; global rank 0 writes.
    """
    error: list[str | None] = [None]
    if dist.get_rank() == 0 and Path(out_dir).exists() and not overwrite:
        error[0] = f"{out_dir} already exists (pass overwrite=True to replace it)"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    if dist.get_rank() != 0:
        for _ in exporter.buckets():
            pass
        return
    with atomic_directory(out_dir, overwrite=overwrite) as tmp_dir:
        writer = StreamingSafetensorsWriter(tmp_dir, exporter.tensor_specs(), max_shard_bytes)
        for bucket in exporter.buckets():
            for name, tensor in bucket.named_tensors():
                writer.write(name, tensor)
            del bucket, tensor
        writer.close()
        copy_non_weight_files(Path(hf_config_dir), tmp_dir)
