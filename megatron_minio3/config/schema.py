"""The root configuration tree. Each package owns its section's dataclass (config/<section>.py);
this file owns the sections that belong to the trainer itself and the root that ties them together."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.reward import RewardConfig
from megatron_minio3.config.rollout import EvalConfig, RolloutConfig
from megatron_minio3.config.weights import WeightsConfig


@dataclass
class ParallelConfig:
    """Megatron layout of the actor/reference ranks: world = tp * pp * cp * dp."""

    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: each sequence split over cp ranks (parallel/context_parallel.py; local layer spec)
    dp: int = 1
    # torch.distributed backend: NCCL with CUDA, gloo without (not configurable)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ClusterConfig:
    """The machines a GPU run is planned for. Checked before launch (GPU count, placement, memory per GPU per
    phase, see trainer/launch_plan.py); `python -m megatron_minio3.trainer.grpo --dry-run` prints the plan.
    On a machine without CUDA (tests, the CPU demo) the run is single-host and these are not used."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # per GPU; the plan refuses a layout whose peak phase does not fit

    def validate(self) -> None:
        for name in ("num_nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"cluster.gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"actor.optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"actor.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"actor.optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_schedule == "constant" and self.min_lr != 0:
            raise ValueError(f"actor.optim.min_lr ({self.min_lr}) only applies to actor.optim.lr_schedule=cosine")


# decoder submodules megatron's selective recompute can rerun on the layer specs we build (core attention, the
# SwiGLU MLP, the norms)
SELECTIVE_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
DEFAULT_SELECTIVE_RECOMPUTE = ["core_attn", "mlp"]


@dataclass
class ActorConfig:
    """The Megatron policy being trained."""

    load: str = ""  # Megatron checkpoint to start from; empty = convert `model` (HF) on the fly
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    optim: OptimConfig = field(default_factory=OptimConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    ppo_mini_batch_size: int = 32  # prompts per optimizer step (each with rollout.n samples)
    ppo_epochs: int = 1
    freeze_vision_tower: bool = False
    freeze_merger: bool = False
    freeze_language_model: bool = False
    recompute_activations: bool = False
    # full: every decoder layer keeps only its input and reruns whole in the backward pass; selective: only the
    # decoder submodules in recompute_modules rerun (megatron's selective recompute). Vision blocks rerun whole
    # under either. Read only when recompute_activations is true.
    recompute_granularity: Literal["full", "selective"] = "full"
    recompute_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SELECTIVE_RECOMPUTE))
    offload_to_host_between_phases: bool = False  # colocated rollout: free device memory while vLLM runs

    def validate(self) -> None:
        if self.ppo_mini_batch_size < 1 or self.ppo_epochs < 1:
            raise ValueError(
                f"actor.ppo_mini_batch_size and actor.ppo_epochs must be >= 1, got "
                f"{self.ppo_mini_batch_size} and {self.ppo_epochs}"
            )
        unknown = set(self.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES)
        if unknown or not self.recompute_modules:
            raise ValueError(f"actor.recompute_modules must be a non-empty subset of {list(SELECTIVE_RECOMPUTE_MODULES)}"
                             f", got {self.recompute_modules}")
        if self.recompute_granularity == "full" and self.recompute_modules != DEFAULT_SELECTIVE_RECOMPUTE:
            raise ValueError(f"actor.recompute_modules={self.recompute_modules} only applies with "
                             f"actor.recompute_granularity=selective (full reruns whole layers)")
        if self.recompute_granularity != "full" and not self.recompute_activations:
            raise ValueError(f"actor.recompute_granularity={self.recompute_granularity} only applies with "
                             f"actor.recompute_activations=true")
        if self.freeze_vision_tower and self.freeze_merger and self.freeze_language_model:
            raise ValueError("actor.freeze_vision_tower, freeze_merger and freeze_language_model are all true: "
                             "nothing would be trained")


@dataclass
class RefConfig:
    """The frozen reference policy (built from the same checkpoint); only needed when a KL term is on."""

    enabled: Literal["auto", "true", "false"] = "auto"  # auto: on when algorithm.kl_coef > 0
    offload_to_host: bool = True


def resume_target(resume: bool | int | str) -> int | None:
    """`trainer.resume` as a step to resume from: None for the latest checkpoint (true, "latest"), -1 for none
    (false), else the step named by an int (2) or a checkpoint name ("step_00000002")."""
    if resume is True or resume == "latest":
        return None
    if resume is False:
        return -1
    if isinstance(resume, int) and resume >= 1:
        return resume
    match = re.match(r"^step_(\d{8})$", resume) if isinstance(resume, str) else None
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(f"trainer.resume must be true (the latest checkpoint), false (start over), a step >= 1 or a "
                     f"checkpoint name like step_00000002; got {resume!r}")


@dataclass
class StageConfig:
    """One stage of a progressive schedule (Vision-R1's PTST, e.g. 4K tokens x 16 samples, then 8K x 8, then
    16K x 4): from step `from_step` on, these replace rollout.n and rollout.max_tokens_per_turn (0 keeps the
    rollout section's value) until the next stage starts."""

    from_step: int = 1
    n: int = 0
    max_tokens_per_turn: int = 0


@dataclass(frozen=True)
class Stage:
    """What trainer.stages make of one step: the stage's index (0 = before the first stage, or no stages) and
    the group size and per-turn token limit in force."""

    index: int
    n: int
    max_tokens_per_turn: int


@dataclass
class TrainerConfig:
    project: str = "megatron_minio3"  # the wandb project (with "wandb" in trainer.loggers)
    experiment: str = "grpo"  # the wandb run name (with "wandb" in trainer.loggers)
    output_dir: str = "outputs/grpo"
    total_steps: int = 100
    train_batch_size: int = 256  # valid prompts per step (after dynamic sampling)
    save_every: int = 50  # checkpoint every N steps and after the last step; 0 = no checkpoints
    eval_every: int = 0  # 0: no evaluation during training
    eval_before_train: bool = False  # evaluate the starting model before step 1 (logged at step 0)
    # true: continue from the latest complete checkpoint in output_dir; false: start over (refused when
    # checkpoints exist); a step (2) or a checkpoint name (step_00000002): continue from that checkpoint
    resume: bool | int | str = True
    keep_last_checkpoints: int = 0  # prune older complete checkpoints beyond this many; 0 keeps all
    seed: int = 1
    # A progressive schedule of the group size and the per-turn token limit (StageConfig; [] = rollout.n and
    # rollout.max_tokens_per_turn throughout). Stages start at increasing steps; the switch is printed and every
    # step logs schedule/stage, schedule/n and schedule/max_tokens_per_turn.
    stages: list[StageConfig] = field(default_factory=list)
    # console, jsonl (<output_dir>/metrics.jsonl), tensorboard (<output_dir>/tensorboard), wandb
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    wandb_mode: Literal["online", "offline"] = "online"  # offline: under <output_dir>/wandb, `wandb sync` later
    # Every N steps, each rollout handle writes the step's trajectories (every generation round, kept or not, with
    # score, accuracy, advantage) and their crops to <output_dir>/rollouts/step_N (tools/view_trajectories.py
    # shows them); 0: never. The seed's trainer.log_training_rollouts_freq.
    dump_rollouts_every: int = 0
    # With evaluation (eval_every): this many of its generations (a fixed sample) go to the loggers as text
    log_val_generations: int = 0
    # Dynamic sampling (algorithm.dynamic_sampling; the seed's trainer.rejection_sample): generation rounds run until
    # train_batch_size groups with a learning signal are kept. After max_generation_rounds rounds the step trains on
    # the groups it has and logs a warning naming this key (the seed stops with an error after
    # algorithm.max_num_gen_batches, 256 by default).
    max_generation_rounds: int = 16
    # A round draws int(train_batch_size * prompts_per_round_multiplier) prompts (the seed's
    # trainer.rejection_sample_multiplier); groups beyond a full batch are discarded.
    prompts_per_round_multiplier: float = 1.0
    # Over-provisioning (dynamic sampling): once overlap_rounds_at of a round's trajectories have ended, every
    # rollout handle starts the next round's prompts (the sampler's next ones, with that round's seeds) while the
    # stragglers finish; the engines run the current round's turns first (priority scheduling). The controller
    # still takes rounds in order: a round started early is used as the next round if one is needed and dropped
    # (its requests aborted, the sampler not advanced) if the batch is full, so the kept groups are the same as
    # without overlap.
    overlap_rounds: bool = False
    overlap_rounds_at: float = 0.5
    # hybrid: the vLLM engines live in the actor's process (one actor rank; the CPU default);
    # separate: num_rollout_workers Ray actors hold the engines and receive weights over a broadcast group.
    rollout_placement: Literal["hybrid", "separate"] = "hybrid"
    num_rollout_workers: int = 1

    @property
    def prompts_per_round(self) -> int:
        """Prompts one generation round draws (the seed: int(train_batch_size * rejection_sample_multiplier))."""
        return int(self.train_batch_size * self.prompts_per_round_multiplier)

    def stage_at(self, step: int, n: int, max_tokens_per_turn: int) -> Stage:
        """The schedule at `step` (1-based): `n` and `max_tokens_per_turn` are the rollout section's values."""
        index, stage = 0, None
        for position, candidate in enumerate(self.stages, start=1):
            if candidate.from_step <= step:
                index, stage = position, candidate
        if stage is None:
            return Stage(0, n, max_tokens_per_turn)
        return Stage(index, stage.n or n, stage.max_tokens_per_turn or max_tokens_per_turn)

    def validate(self) -> None:
        if self.total_steps < 1 or self.train_batch_size < 1:
            raise ValueError(
                f"trainer.total_steps and trainer.train_batch_size must be >= 1, got "
                f"{self.total_steps} and {self.train_batch_size}"
            )
        for name in ("save_every", "keep_last_checkpoints", "eval_every", "dump_rollouts_every", "log_val_generations"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_generation_rounds", "num_rollout_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.overlap_rounds_at <= 1.0:
            raise ValueError(f"trainer.overlap_rounds_at is the share of a round's trajectories that have ended when "
                             f"the next round starts, in (0, 1]; got {self.overlap_rounds_at}")
        if not self.prompts_per_round_multiplier > 0 or self.prompts_per_round < 1:
            raise ValueError(f"trainer.prompts_per_round_multiplier must make at least one prompt per generation round "
                             f"(int(train_batch_size {self.train_batch_size} * multiplier) >= 1), got "
                             f"{self.prompts_per_round_multiplier}")
        resume_target(self.resume)  # ValueError naming the forms it takes
        unknown = sorted(set(self.loggers) - {"console", "jsonl", "tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"trainer.loggers: unknown logger(s) {unknown}; choose from console, jsonl, tensorboard, "
                             "wandb")
        for index, stage in enumerate(self.stages):
            if stage.from_step < 1 or stage.n < 0 or stage.max_tokens_per_turn < 0:
                raise ValueError(f"trainer.stages[{index}]: from_step must be >= 1 and n, max_tokens_per_turn >= 0 "
                                 f"(0 keeps the rollout section's value), got {stage}")
            if index and stage.from_step <= self.stages[index - 1].from_step:
                raise ValueError(f"trainer.stages: from_step must increase, got {[s.from_step for s in self.stages]}")
        if self.log_val_generations and not (self.eval_every or self.eval_before_train):
            raise ValueError("trainer.log_val_generations samples the evaluation's generations: set trainer.eval_every "
                             "or trainer.eval_before_train too (or log_val_generations=0)")


@dataclass
class SftConfig:
    """Supervised fine-tuning (trainer/sft.py, the recipe's cold start). The model, optimizer (actor.optim: the
    recipe uses lr 1e-5, cosine, warmup_ratio 0.1), packing, freezing (the recipe freezes the vision tower and
    the merger), dtype, layout, templates (data.*), output_dir, seed, checkpoints and loggers come from the
    shared sections."""

    train_files: list[str] = field(default_factory=list)  # sharegpt .json/.jsonl or .parquet conversations
    image_dir: str = ""  # relative image paths resolve here ("" = each file's folder)
    num_epochs: int = 3
    batch_size: int = 32  # conversations per optimizer step
    max_length: int = 32768  # a conversation longer than this (tokens, images included) is left out and counted
    on_bad_row: Literal["raise", "skip"] = "raise"  # skip: bad rows are left out and counted
    export_hf: bool = True  # at the end, write the model as an HF checkpoint to <trainer.output_dir>/hf

    def validate(self) -> None:
        for name in ("num_epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Config:
    """Everything a run needs, validated before any process starts."""

    model: str = ""  # HF Qwen2.5-VL checkpoint directory (weights, tokenizer, processor)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    def validate(self) -> None:
        """Checks that span sections (each section's own `validate` runs first, from the loader)."""
        if self.trainer.train_batch_size % self.actor.ppo_mini_batch_size:
            raise ValueError(
                f"trainer.train_batch_size ({self.trainer.train_batch_size}) must be a multiple of "
                f"actor.ppo_mini_batch_size ({self.actor.ppo_mini_batch_size})"
            )
        if self.rollout.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.rollout.n}")
        if self.rollout.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for training (sampling), got {self.rollout.temperature}"
                             " (evaluation samples at eval.temperature)")
        if self.weights.bucket_mb > self.rollout.weight_bucket_mb:
            raise ValueError(
                f"weights.bucket_mb ({self.weights.bucket_mb}) must not exceed rollout.weight_bucket_mb "
                f"({self.rollout.weight_bucket_mb}): the engine would split a bucket between reload calls"
            )
        smallest_n = min([self.rollout.n] + [stage.n for stage in self.trainer.stages if stage.n])
        if self.actor.ppo_mini_batch_size * smallest_n < self.parallel.dp:
            raise ValueError(
                f"actor.ppo_mini_batch_size * rollout.n = {self.actor.ppo_mini_batch_size * smallest_n} sequences "
                f"{'(in the trainer.stages stage with the smallest n) ' if smallest_n != self.rollout.n else ''}"
                f"cannot feed parallel.dp = {self.parallel.dp} ranks"
            )
        for index, stage in enumerate(self.trainer.stages):
            if stage.max_tokens_per_turn >= self.rollout.max_total_tokens:
                raise ValueError(f"trainer.stages[{index}].max_tokens_per_turn ({stage.max_tokens_per_turn}) must be "
                                 f"below rollout.max_total_tokens ({self.rollout.max_total_tokens}), the whole budget")
        if self.ref.enabled == "true" and self.algorithm.kl_coef <= 0:
            raise ValueError("ref.enabled=true but algorithm.kl_coef is 0: the reference model would only be used by "
                             "the KL term; set algorithm.kl_coef > 0 or ref.enabled=auto")
        if self.ref.enabled == "false" and self.algorithm.kl_coef > 0:
            raise ValueError(f"algorithm.kl_coef={self.algorithm.kl_coef} needs the reference model: set "
                             "ref.enabled=auto (or true)")
        if not self.algorithm.dynamic_sampling:
            defaults = TrainerConfig()
            for name in ("max_generation_rounds", "prompts_per_round_multiplier", "overlap_rounds",
                         "overlap_rounds_at"):
                if getattr(self.trainer, name) != getattr(defaults, name):
                    raise ValueError(f"trainer.{name} applies to dynamic sampling (algorithm.dynamic_sampling=true); "
                                     "without it a step makes one generation round of train_batch_size prompts")
        if self.trainer.rollout_placement == "hybrid" and self.trainer.num_rollout_workers != 1:
            raise ValueError("trainer.num_rollout_workers applies to trainer.rollout_placement=separate; with hybrid "
                             "the engines live in the actor ranks (rollout data parallelism = ranks / "
                             "rollout.tensor_parallel_size)")

    @property
    def use_reference_model(self) -> bool:
        if self.ref.enabled == "auto":
            return self.algorithm.kl_coef > 0
        return self.ref.enabled == "true"
