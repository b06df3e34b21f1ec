"""Translate the seed's `python3 -m verl.trainer.main_ppo key=value ...` command into our YAML config.

    python tools/from_verl.py run_minio3.sh -o minio3.yaml [--base configs/qwen2_5_vl_7b_grpo.yaml]
        [--env BASE_IMAGE_DIR=/data] [--model /ckpt/Mini-o3-7B-SFT] [--train-size N] [--set key=value ...]
    python tools/from_verl.py -o minio3.yaml -- actor_rollout_ref.rollout.n=16 data.train_batch_size=256 ...

Every flag ends in one of three states, each printed on one line: mapped (verl flag -> our key = value),
implied (what we always do, or a flag without effect in this command, with the reason) or unmapped (no
counterpart, with the reason, grouped). Nothing is dropped silently; an unknown flag is reported as unmapped.
The YAML holds `defaults: <base>` plus only the keys whose value differs from the base, each with the flag that
set it, and it is loaded and validated with `load_config` before it is written. docs/from_verl.md has the table
of the seed command's flags and the verl semantics each mapping assumes (read from public copies of the seed's
verl fork: trainer/ppo/ray_trainer.py, workers/fsdp_workers.py, the multi-turn vLLM rollout, the reward scorers).

Imports only the config package (and the standard library and yaml): no torch, no worker code.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_minio3.config.data import DEFAULT_OBSERVATION_TEMPLATE
from megatron_minio3.config.loader import ConfigError, _build, load_config, parse_override, to_dict
from megatron_minio3.config.schema import Config
from megatron_minio3.config.shell_words import ShellSyntaxError, fenced_blocks, parse_script

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = REPO_ROOT / "configs" / "qwen2_5_vl_7b_grpo.yaml"

# The seed's data variables and where its layout puts each file under $BASE_IMAGE_DIR (docs: the recipe appendix).
SEED_DATA_FILES = {
    "VISUALPROBE_TRAIN_DATA": "VisualProbe_train/train.json",
    "DEEPEYES_TRAIN_4K_DATA": "DeepEyes_train_4K/train.json",
    "VSTAR_BENCH_VAL_DATA": "Vstar_Bench/val.json",
    "VISUALPROBE_EASY_VAL_DATA": "VisualProbe_Easy/val.json",
    "VISUALPROBE_MEDIUM_VAL_DATA": "VisualProbe_Medium/val.json",
    "VISUALPROBE_HARD_VAL_DATA": "VisualProbe_Hard/val.json",
}

MAPPED, IMPLIED, UNMAPPED = "mapped", "implied", "unmapped"

# Unmapped groups, in the order the report prints them.
G_MICRO = "micro-batch sizes of forward passes (ours: token budgets; no effect on the results)"
G_MEMORY = "memory placement (FSDP / vLLM; ours is planned for our Megatron layout by the launch plan)"
G_VLLM = "vLLM engine settings we do not expose"
G_TEXT = "prompt text kept in the seed's code"
G_NONE = "no counterpart"
G_UNKNOWN = "not known to this translator"
GROUPS = (G_MICRO, G_MEMORY, G_VLLM, G_TEXT, G_NONE, G_UNKNOWN)


class TranslationError(ValueError):
    """The command cannot be translated as given; the message names the flag, variable or line at fault."""


@dataclass
class Flag:
    key: str  # dotted verl key, without Hydra's + / ++ prefix
    text: str  # the value as the shell delivered it
    value: Any  # parsed as Hydra would

    @property
    def arg(self) -> str:
        return f"{self.key}={self.text}"


@dataclass
class Outcome:
    arg: str  # the verl argument as given (or "env NAME" for an environment variable)
    status: str  # MAPPED, IMPLIED or UNMAPPED
    settings: dict[str, Any] = field(default_factory=dict)  # our dotted key -> value
    reason: str = ""
    group: str = ""  # unmapped only


@dataclass
class Translation:
    base: Path
    outcomes: list[Outcome]  # one per verl argument, in the command's order
    environment: list[Outcome]  # keys set from the command's environment (BASE_IMAGE_DIR)
    derived: list[Outcome]  # keys set from several flags together (parallel.dp)
    overrides: list[Outcome]  # --model, --set
    notes: list[str]
    tree: dict  # the whole config as plain data
    changed: dict  # only the keys that differ from the base (nested)
    sources: dict[str, str]  # our dotted key -> what set it

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)


# ------------------------------------------------------------------------------------------------- values

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """A Hydra override value: bool (true/false, any case), null, int, float, [list], {map}, 'quoted' or "quoted"
    string, else the plain string."""
    value = text.strip()
    if not value:
        return ""
    if value[0] in "[{":
        close = "]" if value[0] == "[" else "}"
        if value[-1] != close:
            raise ValueError(f"{value!r}: {value[0]} without its closing {close}")
        items = _split_top_level(value[1:-1])
        if value[0] == "[":
            return [parse_value(item) for item in items]
        out = {}
        for item in items:
            key, sep, rest = item.partition(":")
            if not sep:
                raise ValueError(f"{value!r}: the item {item.strip()!r} is not key: value")
            out[parse_value(key)] = parse_value(rest)
        return out
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~"):
        return None
    if _INT_RE.match(value):
        return int(value)
    if _FLOAT_RE.match(value) or lowered in ("inf", "+inf", "-inf", "nan"):
        return float(value)
    return value


def _split_top_level(text: str) -> list[str]:
    items, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def _check(flag: Flag, ok: bool, expects: str) -> None:
    if not ok:
        raise TranslationError(f"{flag.arg}: expects {expects}")


def as_bool(flag: Flag) -> bool:
    _check(flag, isinstance(flag.value, bool), "true or false")
    return flag.value


def as_int(flag: Flag) -> int:
    _check(flag, isinstance(flag.value, int) and not isinstance(flag.value, bool), "an integer")
    return flag.value


def as_float(flag: Flag) -> float:
    _check(flag, isinstance(flag.value, (int, float)) and not isinstance(flag.value, bool), "a number")
    return float(flag.value)


def as_str(flag: Flag) -> str:
    _check(flag, isinstance(flag.value, (str, int, float)) and not isinstance(flag.value, bool), "a string")
    return str(flag.value)


def as_str_list(flag: Flag) -> list[str]:
    value = flag.value if isinstance(flag.value, list) else [flag.value]
    _check(flag, all(isinstance(v, str) and v for v in value), "a file name or a [list] of them")
    return value


# -------------------------------------------------------------------------------------------------- rules


@dataclass
class Context:
    flags: dict[str, Flag]
    base: Config
    train_size: int | None

    def get(self, key: str, default: Any = None) -> Any:
        flag = self.flags.get(key)
        return default if flag is None else flag.value


Rule = Callable[[Flag, Context], Outcome]


def mapped(flag: Flag, settings: dict[str, Any], reason: str = "") -> Outcome:
    return Outcome(flag.arg, MAPPED, settings, reason)


def implied(flag: Flag, reason: str) -> Outcome:
    return Outcome(flag.arg, IMPLIED, {}, reason)


def unmapped(flag: Flag, group: str, reason: str) -> Outcome:
    return Outcome(flag.arg, UNMAPPED, {}, reason, group)


def direct(key: str, convert: Callable[[Flag], Any], reason: str = "") -> Rule:
    return lambda flag, ctx: mapped(flag, {key: convert(flag)}, reason)


def _same(value: Any, wanted: Any) -> bool:
    """Hydra-value equality: strings case-insensitive, numbers by value, booleans and null only as themselves."""
    if isinstance(wanted, bool) or wanted is None or isinstance(value, bool) or value is None:
        return value is wanted
    if isinstance(wanted, str):
        return isinstance(value, str) and value.lower() == wanted.lower()
    return isinstance(value, (int, float)) and value == wanted


def implied_when(expected: Any, reason: str, otherwise: str, group: str = G_NONE) -> Rule:
    """Implied when the value is `expected` (or one of a tuple of values), else unmapped with `otherwise`."""
    wanted = expected if isinstance(expected, tuple) else (expected,)

    def rule(flag: Flag, ctx: Context) -> Outcome:
        if any(_same(flag.value, w) for w in wanted):
            return implied(flag, reason)
        return unmapped(flag, group, otherwise)

    return rule


def always(group: str, reason: str) -> Rule:
    return lambda flag, ctx: unmapped(flag, group, reason)


def _freq(flag: Flag) -> int:
    value = as_int(flag)
    return 0 if value <= 0 else value  # verl: -1 (or 0) = never


def _files(flag: Flag) -> list[str]:
    return as_str_list(flag)


def _max_images(flag: Flag, section: str) -> Outcome:
    value = flag.value
    if isinstance(value, str):
        try:
            value = parse_value(value)
        except ValueError:
            pass
    if isinstance(value, dict) and set(value) == {"image"} and isinstance(value["image"], int):
        return mapped(flag, {f"{section}.max_images": value["image"]},
                      "images in a trajectory, the prompt's own included; a tool call with the limit reached is "
                      "`exceed` (the seed checks the same count before each crop)")
    if isinstance(value, dict) and set(value) <= {"image", "video"} and "video" in value:
        return unmapped(flag, G_NONE, "videos: our rollout takes images only")
    raise TranslationError(f"{flag.arg}: expects {{image: N}}")


def _kl_coef(flag: Flag, ctx: Context) -> Outcome:  # actor.use_kl_loss
    if not as_bool(flag):
        return mapped(flag, {"algorithm.kl_coef": 0.0},
                      "no KL term in the loss; with ref.enabled=auto no reference model is built")
    coef = float(ctx.get("actor_rollout_ref.actor.kl_loss_coef", 0.001))
    return mapped(flag, {"algorithm.kl_coef": coef},
                  "the KL term of the loss, weighted by actor.kl_loss_coef (the seed's token-mean over the "
                  "micro-batch; ours is aggregated like the policy loss, algorithm.loss_agg_mode)")


def _kl_loss_coef(flag: Flag, ctx: Context) -> Outcome:
    coef = as_float(flag)
    if not ctx.get("actor_rollout_ref.actor.use_kl_loss", False):
        return implied(flag, "unused while use_kl_loss=False (ours: algorithm.kl_coef = 0)")
    return mapped(flag, {"algorithm.kl_coef": coef}, "the KL loss weight (use_kl_loss=True)")


_KL_ESTIMATORS = {"low_var_kl": "k3", "kl": "k1", "mse": "mse"}


def _kl_type(flag: Flag, ctx: Context) -> Outcome:
    name = as_str(flag)
    if name not in _KL_ESTIMATORS:
        return unmapped(flag, G_NONE, f"KL estimator {name!r}: ours are k1 (kl), k3 (low_var_kl) and mse")
    unused = "" if ctx.get("actor_rollout_ref.actor.use_kl_loss", False) else "; unused while algorithm.kl_coef = 0"
    return mapped(flag, {"algorithm.kl_estimator": _KL_ESTIMATORS[name]},
                  f"{name} = {_KL_ESTIMATORS[name]} (verl clamps low_var_kl to [-10, 10], ours clamps the log-ratio "
                  f"to +-20){unused}")


def _clip(which: str) -> Rule:
    def rule(flag: Flag, ctx: Context) -> Outcome:
        return mapped(flag, {f"algorithm.clip_ratio_{which}": as_float(flag)},
                      "the ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high], as ours")
    return rule


def _clip_both(flag: Flag, ctx: Context) -> Outcome:
    value = as_float(flag)
    settings = {f"algorithm.clip_ratio_{w}": value for w in ("low", "high")
                if f"actor_rollout_ref.actor.clip_ratio_{w}" not in ctx.flags}
    if not settings:
        return implied(flag, "superseded by clip_ratio_low and clip_ratio_high (verl uses those when set)")
    return mapped(flag, settings, "the symmetric clip range, where clip_ratio_low / _high are not given")


_VERIFIERS = {"general_qa_tool": "judge", "general_qa_tool_mc": "mc"}


def _hybrid(ctx: Context) -> bool:
    return bool(ctx.get("reward_model.use_hybrid_reward_manager", False))


def _scorer(gpt: bool) -> Rule:
    """data.general_qa_reward_fn (gpt=False) and data.gpt_general_qa_reward_fn (gpt=True)."""

    def rule(flag: Flag, ctx: Context) -> Outcome:
        name = as_str(flag)
        if gpt != _hybrid(ctx):
            other = "data.gpt_general_qa_reward_fn" if not gpt else "data.general_qa_reward_fn"
            return implied(flag, f"unused: with reward_model.use_hybrid_reward_manager={_hybrid(ctx)} every sample is "
                                 f"scored by {other}")
        if name not in _VERIFIERS:
            return unmapped(flag, G_NONE, f"scorer {name!r}: ours are the judge (general_qa_tool) and mc "
                                          "(general_qa_tool_mc) verifiers")
        verifier = _VERIFIERS[name]
        settings: dict[str, Any] = {"reward.default_verifier": verifier, "reward.verifiers": {}}
        what = ("an LLM judge of the answer against the ground truth, replying 'Score: 0/1'" if verifier == "judge"
                else "rule-based multiple choice on the last <answer> of the final turn")
        if verifier == "judge":
            settings.update({"reward.judge.provider": "azure", "reward.judge.api_key_env": "API_KEY"})
            what += ("; the seed's judge is an Azure OpenAI deployment reached through API_KEY, END_POINT and "
                     "API_VERSION (reward.judge.azure reads the last two)")
        return mapped(flag, settings, f"every data_source is scored by this one scorer: {what}")

    return rule


def _hybrid_rule(flag: Flag, ctx: Context) -> Outcome:
    which = "data.gpt_general_qa_reward_fn" if as_bool(flag) else "data.general_qa_reward_fn"
    return implied(flag, f"selects the scorer of every sample: {which} (mapped there to reward.default_verifier)")


_EXTRACTIONS = ("strict", "split", "strict_v2")


def _gpt_extract(flag: Flag, ctx: Context) -> Outcome:
    tags = ctx.get("data.extract_answer_tags", "split")
    if not as_bool(flag):
        return mapped(flag, {"reward.judge.answer_extraction": "none"}, "the judge sees the whole response")
    if tags not in _EXTRACTIONS:
        return unmapped(flag, G_NONE, f"answer extraction {tags!r}: ours are {', '.join(_EXTRACTIONS)} and none")
    return mapped(flag, {"reward.judge.answer_extraction": tags},
                  f"the judge sees what data.extract_answer_tags extracts ({tags}; the seed's default: split)")


def _answer_tags(flag: Flag, ctx: Context) -> Outcome:
    if not ctx.get("data.gpt_extract_answer", False):
        return implied(flag, "unused while data.gpt_extract_answer=False")
    if as_str(flag) not in _EXTRACTIONS:
        return unmapped(flag, G_NONE, f"{flag.value!r}: ours are {', '.join(_EXTRACTIONS)} and none")
    what = {"strict": "the first <answer>(.*?)</answer> span over all turns; none: score 0 without a judge call",
            "split": "the text after the last <answer> up to the next </answer>",
            "strict_v2": "a <answer>...</answer> that ends the response; none: score 0 without a judge call"}
    return mapped(flag, {"reward.judge.answer_extraction": flag.value}, what[flag.value])


def _tool_penalty(flag: Flag, ctx: Context) -> Outcome:
    if as_float(flag) == 0:
        return mapped(flag, {"reward.tool_call_penalty": 0.0}, "off in both")
    return mapped(flag, {"reward.tool_terms": "original", "reward.tool_call_penalty": as_float(flag)},
                  "the seed's formula: the accuracy term times (1 - penalty) when the response called the tool")


def _tool_bonus(flag: Flag, ctx: Context) -> Outcome:
    if as_float(flag) == 0:
        return mapped(flag, {"reward.tool_use_bonus": 0.0}, "off in both")
    return mapped(flag, {"reward.tool_terms": "original", "reward.tool_use_bonus": as_float(flag)},
                  "the seed's formula: added to every response that called the tool")


def _rejection(flag: Flag, ctx: Context) -> Outcome:
    if as_bool(flag):
        return mapped(flag, {"algorithm.dynamic_sampling": True, "algorithm.dynamic_sampling_min_std": 1e-4},
                      "groups whose rewards have std < 1e-4, or with a judge failure, are dropped and generation "
                      "continues until train_batch_size groups are kept (the seed stops with an error after "
                      "algorithm.max_num_gen_batches batches, ours trains on what it has after "
                      "trainer.max_generation_rounds)")
    return mapped(flag, {"algorithm.dynamic_sampling": False}, "every group is trained on")


def _multiplier(flag: Flag, ctx: Context) -> Outcome:
    value = as_float(flag)
    if not ctx.get("trainer.rejection_sample", False):
        return implied(flag, "unused while trainer.rejection_sample=False")
    return mapped(flag, {"trainer.prompts_per_round_multiplier": value},
                  "a generation round draws int(train_batch_size x multiplier) prompts")


def _loggers(flag: Flag, ctx: Context) -> Outcome:
    names = flag.value if isinstance(flag.value, list) else [flag.value]
    _check(flag, all(isinstance(n, str) for n in names), "a [list] of logger names")
    ours = [n for n in names if n in ("console", "wandb", "tensorboard")]
    dropped = [n for n in names if n not in ours]
    reason = "the metric sinks, as listed"
    if dropped:
        reason += f"; {', '.join(dropped)} dropped (ours: console, jsonl, tensorboard, wandb)"
    if "jsonl" not in ours:
        reason += " (add jsonl to keep <output_dir>/metrics.jsonl for tools/plot_run.py)"
    return mapped(flag, {"trainer.loggers": ours}, reason)


def _eval_every(ctx: Context) -> int:
    flag = ctx.flags.get("trainer.test_freq")
    return _freq(flag) if flag is not None else ctx.base.trainer.eval_every


def _val_generations(flag: Flag, ctx: Context) -> Outcome:
    count = max(0, as_int(flag))
    if count and not (_eval_every(ctx) or _before_train(ctx)):
        return unmapped(flag, G_NONE, "no evaluation during training (trainer.test_freq): nothing to sample")
    return mapped(flag, {"trainer.log_val_generations": count},
                  "this many validation generations (a fixed sample) go to the loggers as text; the seed writes "
                  "them to a wandb table only, ours also to <output_dir>/generations.jsonl and TensorBoard")


def _before_train(ctx: Context) -> bool:
    """The seed validates the starting model when val_before_train (default true) and test_freq != -1."""
    flag = ctx.flags.get("trainer.test_freq")
    return bool(ctx.get("trainer.val_before_train", True)) and flag is not None and flag.value != -1


def _test_freq(flag: Flag, ctx: Context) -> Outcome:
    return mapped(flag, {"trainer.eval_every": _freq(flag), "trainer.eval_before_train": _before_train(ctx)},
                  "evaluate every N steps and after the last (-1: never); test_freq != -1 also validates the starting "
                  "model (with val_before_train, true by default)")


def _val_before(flag: Flag, ctx: Context) -> Outcome:
    if "trainer.test_freq" not in ctx.flags:
        return mapped(flag, {"trainer.eval_before_train": as_bool(flag)}, "validate the starting model")
    return mapped(flag, {"trainer.eval_before_train": _before_train(ctx)},
                  "validate the starting model (the seed: only with test_freq != -1)")


def _val_n(flag: Flag, ctx: Context) -> Outcome:
    if ctx.get("actor_rollout_ref.rollout.val_do_sample", False) is False:
        return implied(flag, "unused: val_do_sample=False decodes greedily, one sample (mapped there)")
    return mapped(flag, {"eval.k": as_int(flag)}, "samples per question for Avg@k")


def _val_do_sample(flag: Flag, ctx: Context) -> Outcome:
    if not as_bool(flag):
        return mapped(flag, {"eval.k": 1}, "greedy validation: our eval.k=1 decodes greedily")
    temperature = float(ctx.get("actor_rollout_ref.rollout.temperature", 1.0))
    top_p = float(ctx.get("actor_rollout_ref.rollout.top_p", 1.0))
    return mapped(flag, {"eval.temperature": temperature, "eval.top_p": top_p},
                  "validation samples with the rollout's temperature and top_p (k = val_n)")


def _total_steps(flag: Flag, ctx: Context) -> Outcome:  # trainer.total_epochs
    epochs = as_int(flag)
    explicit = ctx.get("trainer.total_training_steps")
    if explicit is not None:
        return implied(flag, "superseded by trainer.total_training_steps (verl uses that when set)")
    batch = int(ctx.get("data.train_batch_size", ctx.base.trainer.train_batch_size))
    if ctx.get("trainer.rejection_sample", False):
        batch = int(batch * float(ctx.get("trainer.rejection_sample_multiplier", 1)))
    size, where = ctx.train_size, "--train-size"
    if size is None:
        files = ctx.flags.get("data.train_files")
        if files is None:
            return unmapped(flag, G_NONE, "needs the training set size: no data.train_files; pass --train-size N "
                                          "(prompts) or --set trainer.total_steps=N")
        try:
            size = sum(_count_rows(Path(f)) for f in _files(files))
        except ValueError as err:
            return unmapped(flag, G_NONE, f"needs the training set size and {err}: pass --train-size N (prompts) "
                                          "or --set trainer.total_steps=N")
        where = "rows of data.train_files"
    per_epoch = size // batch
    if per_epoch == 0:
        raise TranslationError(f"{flag.arg}: the training set has {size} prompts ({where}), fewer than one batch of "
                               f"{batch}: the seed's dataloader (drop_last) would have no batch")
    steps = per_epoch * epochs
    return mapped(flag, {"trainer.total_steps": steps},
                  f"{epochs} epochs x floor({size} prompts ({where}) / {batch} per batch) = {steps}, the seed's "
                  "total_training_steps (it counts generation batches; its loop stops after total_training_steps - 1 "
                  "updates, or earlier when dynamic sampling uses several batches per step; rows it filters as longer "
                  "than data.max_prompt_length are counted here)")


def _count_rows(path: Path) -> int:
    """Rows of a Mini-o3 JSON file (a JSON list)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not on this machine") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a JSON list of rows")
    return len(rows)


def _resume(flag: Flag, ctx: Context) -> Outcome:
    value = as_str(flag)
    if value == "auto":
        return mapped(flag, {"trainer.resume": True}, "continue from the latest checkpoint, if any")
    if value == "disable":
        return mapped(flag, {"trainer.resume": False}, "start over")
    match = re.search(r"global_step_(\d+)", value)
    if match:
        return mapped(flag, {"trainer.resume": int(match.group(1))}, "that step's checkpoint (ours, in output_dir)")
    raise TranslationError(f"{flag.arg}: expects auto, disable or a path ending in global_step_N")


def _keep_last(flag: Flag, ctx: Context) -> Outcome:
    return mapped(flag, {"trainer.keep_last_checkpoints": 1 if as_bool(flag) else 0},
                  "true keeps only the newest checkpoint; false keeps all")


def _obs_template(flag: Flag, ctx: Context) -> Outcome:
    if as_str(flag) == "v2":
        return mapped(flag, {"data.observation_template": DEFAULT_OBSERVATION_TEMPLATE},
                      "our default observation turn is the v2 one the released checkpoints were trained with "
                      "(its first sentence word for word, \"the the\" included; the rest in substance)")
    return unmapped(flag, G_TEXT, f"observation wording {flag.value!r} lives in the seed's code: write it into "
                                  "data.observation_template")


def _min_lr(flag: Flag, ctx: Context) -> Outcome:
    if flag.value is None:
        return implied(flag, "null: no floor")
    lr = float(ctx.get("actor_rollout_ref.actor.optim.lr", ctx.base.actor.optim.lr))
    return mapped(flag, {"actor.optim.min_lr": as_float(flag) * lr}, "min_lr_ratio x lr (cosine schedule)")


def _schedule(flag: Flag, ctx: Context) -> Outcome:
    name = as_str(flag)
    if name not in ("constant", "cosine"):
        return unmapped(flag, G_NONE, f"schedule {name!r}: ours are constant and cosine")
    return mapped(flag, {"actor.optim.lr_schedule": name}, "the lr schedule after warmup")


def _seed_loss(ctx: Context) -> tuple[dict[str, Any], str] | str:
    """The seed's mini-batch loss from its micro-batching and loss_agg_mode: (settings, reason), or why there is
    no counterpart. verl divides each micro-batch's aggregated loss by the number of micro-batches
    (ppo_mini_batch_size / ppo_micro_batch_size_per_gpu) and FSDP averages over ranks: with one sequence per
    micro-batch and its default token-mean, that is the mean over every sequence of its token-mean, sequences
    without loss tokens (over-turn masked) counting 0 in the mean."""
    agg = ctx.get("actor_rollout_ref.actor.loss_agg_mode",
                  ctx.get("actor_rollout_ref.actor.policy_loss.loss_agg_mode", "token-mean"))
    micro = ctx.get("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")
    if ctx.get("actor_rollout_ref.actor.use_dynamic_bsz", False):
        return ("with use_dynamic_bsz the seed weights each token-budget micro-batch's loss by its sequence count: "
                "the result depends on the split, which ours never does")
    if agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        return f"loss aggregation {agg!r}: ours are token-mean, seq-mean-token-mean and seq-mean-token-sum"
    if agg == "token-mean" and micro != 1:
        return (f"token-mean within micro-batches of {micro} sequences, then the mean over micro-batches: depends on "
                "the split, which ours never does (token-mean over the mini-batch, or seq-mean-token-mean)")
    ours = "seq-mean-token-sum" if agg == "seq-mean-token-sum" else "seq-mean-token-mean"
    return ({"algorithm.loss_agg_mode": ours, "algorithm.seq_mean_denominator": "all"},
            f"the seed's loss: {agg} over each micro-batch of {micro} sequence(s), divided by the number of "
            "micro-batches and averaged over ranks = the mean over every sequence of the mini-batch, over-turn-"
            "masked ones included as 0")


def _micro_loss(flag: Flag, ctx: Context) -> Outcome:  # actor.ppo_micro_batch_size_per_gpu
    as_int(flag)
    found = _seed_loss(ctx)
    if isinstance(found, str):
        return unmapped(flag, G_NONE, found)
    return mapped(flag, *found)


def _loss_agg(flag: Flag, ctx: Context) -> Outcome:
    as_str(flag)
    found = _seed_loss(ctx)
    if isinstance(found, str):
        return unmapped(flag, G_NONE, found)
    return mapped(flag, found[0], found[1] + " (with ppo_micro_batch_size_per_gpu)")


def _seq_parallel(flag: Flag, ctx: Context) -> Outcome:
    if as_int(flag) == 1:
        return implied(flag, "no sequence parallelism")
    return mapped(flag, {"parallel.cp": as_int(flag)},
                  "verl's Ulysses sequence parallelism splits each sequence over that many ranks; ours is context "
                  "parallelism (load-balanced chunks, keys/values gathered, each image encoded once)")


def _max_gen_batches(flag: Flag, ctx: Context) -> Outcome:
    value = as_int(flag)
    if value <= 0:
        return unmapped(flag, G_NONE, "no cap on generation rounds; ours always has one "
                                      "(trainer.max_generation_rounds)")
    return mapped(flag, {"trainer.max_generation_rounds": value},
                  "the dynamic-sampling cap on generation rounds per step: at the cap the seed stops with an error, "
                  "ours trains on the groups it has (with a warning)")


_MICRO = always(G_MICRO, "sequences per log-prob forward pass on a GPU; ours packs sequences into micro-batches of "
                         "actor.packing.max_tokens_per_microbatch tokens")
_FSDP_OFFLOAD = always(G_MEMORY, "FSDP offload of its fully sharded state; our actor.offload_to_host_between_phases "
                                 "(params, grads and Adam state of the TP-sharded actor together) is kept from the "
                                 "base, where the launch plan needs it")

RULES: dict[str, Rule] = {
    # algorithm
    "algorithm.adv_estimator": implied_when(
        "grpo", "GRPO: (r - mean_group) / (std_group + 1e-6) over the rollout.n samples of a prompt, the only "
                "estimator we implement", "we implement GRPO only"),
    "algorithm.norm_adv_by_std_in_grpo": direct("algorithm.norm_adv_by_std", as_bool, "divide by the group std"),
    "algorithm.gamma": implied_when(1.0, "no discounting: GRPO's outcome advantage covers every response token",
                                    "GRPO's outcome advantage has no discount"),
    "algorithm.lam": implied_when(1.0, "GAE lambda, unused by GRPO", "GAE lambda: no critic"),
    "algorithm.kl_ctrl.kl_coef": always(
        G_NONE, "a KL penalty subtracted from the reward; no effect in the seed: its in-reward penalty runs only "
                "with use_kl_loss=False, while it builds the reference policy only with use_kl_loss=True and "
                "kl_loss_coef > 0, so the penalty is 0 (our only KL is the loss term algorithm.kl_coef)"),
    "algorithm.kl_ctrl.type": always(G_NONE, "the in-reward KL controller (see algorithm.kl_ctrl.kl_coef)"),
    "algorithm.kl_penalty": always(G_NONE, "the in-reward KL estimator (see algorithm.kl_ctrl.kl_coef)"),
    "algorithm.max_num_gen_batches": _max_gen_batches,
    # data
    "data.train_files": direct("data.train_files", _files, "the Mini-o3 JSON training files"),
    "data.val_files": direct("data.val_files", _files, "the Mini-o3 JSON validation files"),
    "data.train_batch_size": direct(
        "trainer.train_batch_size", as_int,
        "prompts per training step, each with rollout.n samples; with rejection_sample these are the prompts "
        "whose groups survive dynamic sampling, as ours"),
    "data.max_prompt_length": direct(
        "rollout.max_prompt_tokens", as_int,
        "the seed leaves out prompts longer than this many tokens (its dataset filter); ours skips and counts them "
        "(rollout/skipped_prompt_too_long), image tokens included"),
    "data.max_response_length": direct(
        "rollout.max_tokens_per_turn", as_int,
        "the seed passes it to vLLM as max_tokens of every generate call, i.e. per turn; the whole trajectory is "
        "bounded by its rollout.max_total_response_length (default 32768: our rollout.max_total_tokens)"),
    "data.system_prompt": lambda flag, ctx: unmapped(
        flag, G_TEXT, f"names a system prompt in the seed's code (SYSTEM_PROMPT_MAP[{flag.value!r}]); ours is the "
                      "text itself, data.system_prompt (with data.user_template), kept from the base: write the "
                      "checkpoint's training prompt there (or name its file in data.template_files) to match it "
                      "exactly"),
    "data.image_key": implied_when("images", "our Mini-o3 JSON reader reads `images`",
                                   "our Mini-o3 JSON reader reads `images`"),
    "data.answer_key": implied_when("solution", "our Mini-o3 JSON reader reads `solution`",
                                    "our Mini-o3 JSON reader reads `solution`"),
    "data.prompt_key": implied_when("problem", "our Mini-o3 JSON reader reads `problem`",
                                    "our Mini-o3 JSON reader reads `problem`"),
    "data.mask_blank": implied_when(False, "off: no image tokens are hidden (we never hide them)",
                                    "hiding the tokens of a placeholder blank image: no counterpart"),
    "data.acc_reward_weight": direct("reward.accuracy_weight", as_float, "weight of the verifier's 0/1 accuracy"),
    "data.format_reward_weight": direct("reward.format_weight", as_float,
                                        "weight of the 0/1 multi-turn format check"),
    "data.tool_call_penalty": _tool_penalty,
    "data.use_tool_reward_weight": _tool_bonus,
    "data.general_qa_reward_fn": _scorer(gpt=False),
    "data.gpt_general_qa_reward_fn": _scorer(gpt=True),
    "data.gpt_extract_answer": _gpt_extract,
    "data.extract_answer_tags": _answer_tags,
    "data.return_raw_chat": implied_when(True, "the rollout applies the checkpoint's chat template to the raw "
                                               "messages itself (always)", "we always keep the raw chat"),
    "data.gpt_threads": direct(
        "reward.judge.max_concurrency", as_int,
        "judge requests in flight in one reward manager (the seed's thread pool); ours has one reward manager per "
        "rollout handle, so the endpoint may see this many times the number of handles"),
    "data.tool_call": implied_when("crop", "the crop (zoom) tool, our only tool", "our only tool is crop"),
    "data.use_tgt_size": implied_when(False, "off; images are resized only by data.min_pixels / max_pixels and the "
                                             "processor", "no counterpart"),
    "data.max_pixels": direct("data.max_pixels", as_int, "Mini-o3 resize of every image (prompt and crops)"),
    "data.min_pixels": direct("data.min_pixels", as_int, "Mini-o3 resize of every image (prompt and crops)"),
    "data.shuffle": implied_when(True, "prompts are drawn in a shuffled order each epoch",
                                 "our sampler always shuffles"),
    "data.seed": direct("trainer.seed", as_int, "seeds the order of the training prompts (ours also other draws)"),
    # reward model
    "reward_model.reward_manager": implied_when(
        ("naive_multithreads_tool", "naive_multithreads", "naive"),
        "our reward manager scores every sample concurrently (judge requests: reward.judge.max_concurrency; "
        "rule-based verifiers: reward.verifier_workers processes)", "a reward manager we do not have"),
    "reward_model.use_hybrid_reward_manager": _hybrid_rule,
    "reward_model.enable": implied_when(False, "no reward model; scores come from verifiers",
                                        "a learned reward model: no counterpart"),
    "reward_model.overlong_buffer_len": implied_when(0, "no overlong penalty", "no overlong penalty in our rewards"),
    # actor
    "actor_rollout_ref.model.path": direct("model", as_str, "the HF checkpoint the actor starts from"),
    "actor_rollout_ref.model.use_remove_padding": lambda flag, ctx: implied(
        flag, "we always pack sequences without padding (THD); it does not change the loss"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": direct(
        "actor.recompute_activations", as_bool, "full activation recompute in the backward pass"),
    "actor_rollout_ref.actor.strategy": always(G_NONE, "we train with Megatron (parallel.tp/pp/dp), not FSDP"),
    "actor_rollout_ref.actor.optim.lr": direct("actor.optim.lr", as_float),
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": direct("actor.optim.warmup_ratio", as_float,
                                                                  "warmup steps / total steps"),
    "actor_rollout_ref.actor.optim.warmup_style": _schedule,
    "actor_rollout_ref.actor.optim.min_lr_ratio": _min_lr,
    "actor_rollout_ref.actor.optim.weight_decay": direct("actor.optim.weight_decay", as_float, "AdamW weight decay"),
    "actor_rollout_ref.actor.grad_clip": direct("actor.optim.clip_grad", as_float, "global grad-norm clip"),
    "actor_rollout_ref.actor.ppo_mini_batch_size": direct(
        "actor.ppo_mini_batch_size", as_int,
        "prompts per optimizer step: verl multiplies by rollout.n and splits over its ranks, ours counts prompts "
        "too (train_batch_size / this = optimizer steps per training step)"),
    "actor_rollout_ref.actor.ppo_epochs": direct("actor.ppo_epochs", as_int, "passes over the step's batch"),
    "actor_rollout_ref.actor.shuffle": implied_when(False, "mini-batches in order", "we take mini-batches in order"),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": _micro_loss,
    "actor_rollout_ref.actor.ppo_micro_batch_size": always(
        G_NONE, "a global micro-batch size (deprecated in verl): give ppo_micro_batch_size_per_gpu"),
    "actor_rollout_ref.actor.use_dynamic_bsz": lambda flag, ctx: (
        implied(flag, "micro-batches of ppo_micro_batch_size_per_gpu sequences (mapped there to the loss "
                      "aggregation they make)") if flag.value is False
        else unmapped(flag, G_NONE, str(_seed_loss(ctx)))),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": always(
        G_MICRO, "verl's per-GPU micro-batch token budget; ours (actor.packing.max_tokens_per_microbatch) must hold a "
                 "whole trajectory and is kept from the base"),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": _seq_parallel,
    "actor_rollout_ref.actor.use_kl_loss": _kl_coef,
    "actor_rollout_ref.actor.kl_loss_coef": _kl_loss_coef,
    "actor_rollout_ref.actor.kl_loss_type": _kl_type,
    "actor_rollout_ref.actor.entropy_coeff": direct(
        "algorithm.entropy_coef", as_float, "loss -= coef x entropy, as verl's pg_loss - entropy_coeff x entropy"),
    "actor_rollout_ref.actor.clip_ratio": _clip_both,
    "actor_rollout_ref.actor.clip_ratio_low": _clip("low"),
    "actor_rollout_ref.actor.clip_ratio_high": _clip("high"),
    "actor_rollout_ref.actor.loss_agg_mode": _loss_agg,
    "actor_rollout_ref.actor.policy_loss.loss_agg_mode": _loss_agg,
    "actor_rollout_ref.actor.ignore_exceed": direct(
        "algorithm.ignore_exceed", as_bool,
        "over-turn masking: an exceeded trajectory gets loss mask 0 but counts in its group's mean/std"),
    "actor_rollout_ref.actor.use_multi_turn_response_mask": implied_when(
        True, "the loss mask is 1 exactly on generated tokens, never on injected observation/error turns (always)",
        "we never train on injected tokens"),
    "actor_rollout_ref.actor.fsdp_config.param_offload": _FSDP_OFFLOAD,
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": _FSDP_OFFLOAD,
    "actor_rollout_ref.ref.fsdp_config.param_offload": always(
        G_MEMORY, "FSDP CPU offload of the reference; ours (ref.offload_to_host) parks it on host between uses, and "
                  "with algorithm.kl_coef = 0 no reference model is built at all"),
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": _MICRO,
    "actor_rollout_ref.ref.log_prob_micro_batch_size": _MICRO,
    # rollout
    "actor_rollout_ref.rollout.name": implied_when(
        "vllm_multi_turn_tool_call", "our rollout is the vLLM multi-turn crop-tool agent loop",
        "our rollout is the vLLM multi-turn crop-tool agent loop"),
    "actor_rollout_ref.rollout.mode": implied_when(
        "async", "every trajectory is its own chain of async requests (always)",
        "our agent loop is always asynchronous; the results do not depend on it"),
    "actor_rollout_ref.rollout.n": direct("rollout.n", as_int, "samples per prompt (the GRPO group)"),
    "actor_rollout_ref.rollout.temperature": direct("rollout.temperature", as_float),
    "actor_rollout_ref.rollout.top_p": direct("rollout.top_p", as_float),
    "actor_rollout_ref.rollout.top_k": direct("rollout.top_k", as_int, "-1 = off in both"),
    "actor_rollout_ref.rollout.do_sample": implied_when(True, "training rollouts sample",
                                                        "training needs sampling (rollout.temperature > 0)"),
    "actor_rollout_ref.rollout.response_length": direct("rollout.max_tokens_per_turn", as_int,
                                                        "max_tokens of each generate call, i.e. per turn"),
    "actor_rollout_ref.rollout.max_total_response_length": direct(
        "rollout.max_total_tokens", as_int,
        "the whole context (prompt + every turn) and the engine's max_model_len; a turn that would leave less than "
        "2000 tokens is rolled back as exceed (ours: rollout.context_reserve_tokens)"),
    "actor_rollout_ref.rollout.stop": lambda flag, ctx: mapped(flag, {"rollout.stop": as_str_list(flag)}),
    "actor_rollout_ref.rollout.dtype": direct("rollout.dtype", as_str),
    "actor_rollout_ref.rollout.max_num_seqs": direct("rollout.max_num_seqs", as_int),
    "actor_rollout_ref.rollout.max_generation_round": direct(
        "rollout.max_turns", as_int, "turns (generate calls) per trajectory; a tool call in the last is exceed"),
    "actor_rollout_ref.rollout.val_max_generation_round": direct(
        "eval.max_turns", as_int, "the same limit for validation"),
    "actor_rollout_ref.rollout.limit_mm_per_prompt": lambda flag, ctx: _max_images(flag, "rollout"),
    "actor_rollout_ref.rollout.val_limit_mm_per_prompt": lambda flag, ctx: _max_images(flag, "eval"),
    "actor_rollout_ref.rollout.use_raw_image": implied_when(
        True, "crops are cut from the raw full-resolution image (always)", "we always crop the raw image"),
    "actor_rollout_ref.rollout.use_relative_coordinates": direct(
        "rollout.relative_coordinates", as_bool, "box values as fractions of the raw source image"),
    "actor_rollout_ref.rollout.multi_turn_prompt_type": _obs_template,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": direct("rollout.tensor_parallel_size", as_int,
                                                                   "GPUs per vLLM engine"),
    "actor_rollout_ref.rollout.gpu_memory_utilization": direct(
        "rollout.gpu_memory_utilization", as_float, "vLLM's fraction of GPU memory (weights + KV cache)"),
    "actor_rollout_ref.rollout.enforce_eager": direct("rollout.enforce_eager", as_bool, "no CUDA graphs when true"),
    "actor_rollout_ref.rollout.free_cache_engine": always(
        G_MEMORY, "no effect with rollout.mode=async (the seed's async engine sleeps while the actor trains); "
                  "ours: rollout.enable_sleep_mode, kept from the base"),
    "actor_rollout_ref.rollout.enable_chunked_prefill": always(
        G_VLLM, "a scheduling choice of the engine; ours keeps vLLM's default on GPUs (on CPU it is off)"),
    "actor_rollout_ref.rollout.max_num_batched_tokens": always(
        G_VLLM, "the engine's token budget per scheduler step; ours keeps vLLM's default (on CPU at least "
                "rollout.max_total_tokens)"),
    "actor_rollout_ref.rollout.vllm_infer_batch_size": always(
        G_VLLM, "requests the seed's synchronous rollout submits at once (unused with mode=async); our agent loop "
                "submits every trajectory and vLLM schedules them (rollout.max_num_seqs)"),
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": _MICRO,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size": _MICRO,
    "actor_rollout_ref.rollout.val_n": _val_n,
    "actor_rollout_ref.rollout.val_do_sample": _val_do_sample,
    # trainer
    "trainer.critic_warmup": implied_when(0, "GRPO has no critic; the actor is updated from the first step",
                                          "the seed skips actor updates during the first N steps"),
    "trainer.logger": _loggers,
    "trainer.project_name": direct("trainer.project", as_str, "the wandb project"),
    "trainer.experiment_name": direct("trainer.experiment", as_str, "the wandb run name"),
    "trainer.val_generations_to_log_to_wandb": _val_generations,
    "trainer.train_generations_to_log_to_wandb": implied_when(
        0, "off", "we log no table of training generations; trainer.dump_rollouts_every writes every trajectory of "
                  "the step (with crops, scores, advantages) to <output_dir>/rollouts for tools/view_trajectories.py"),
    "trainer.log_training_rollouts_freq": lambda flag, ctx: mapped(
        flag, {"trainer.dump_rollouts_every": _freq(flag)},
        "every N steps (-1: never) the step's training rollouts are kept: ours, every trajectory to "
        "<output_dir>/rollouts; the seed, a wandb table of train_generations_to_log_to_wandb of them"),
    "trainer.n_gpus_per_node": direct("cluster.gpus_per_node", as_int, "GPUs per node"),
    "trainer.nnodes": direct("cluster.num_nodes", as_int, "nodes"),
    "trainer.save_freq": lambda flag, ctx: mapped(
        flag, {"trainer.save_every": _freq(flag)}, "checkpoint every N steps and after the last (-1: never)"),
    "trainer.test_freq": _test_freq,
    "trainer.default_local_dir": direct(
        "trainer.output_dir", as_str, "where checkpoints go (ours: <output_dir>/checkpoints, next to the metrics)"),
    "trainer.default_hdfs_dir": implied_when(None, "no HDFS copy", "no HDFS copies"),
    "trainer.remove_previous_ckpt_in_save": _keep_last,
    "trainer.resume_mode": _resume,
    "trainer.total_epochs": _total_steps,
    "trainer.total_training_steps": lambda flag, ctx: (
        implied(flag, "null: derived from total_epochs") if flag.value is None
        else mapped(flag, {"trainer.total_steps": as_int(flag)}, "training steps")),
    "trainer.use_3drope": implied_when(True, "Qwen2.5-VL's 3D mrope positions (always)",
                                       "Qwen2.5-VL needs its mrope positions"),
    "trainer.rejection_sample": _rejection,
    "trainer.rejection_sample_multiplier": _multiplier,
    "trainer.val_before_train": _val_before,
    "trainer.val_only": lambda flag, ctx: (
        implied(flag, "false: train") if flag.value is False else unmapped(
            flag, G_NONE, "run `python -m megatron_minio3.trainer.eval --config <this YAML>` instead (Avg@k over "
                          "data.val_files with the eval.* settings)")),
}

# Seed behaviour that no flag of the command sets, so the translation cannot carry it (printed as notes).
SEED_DEFAULT_NOTES = (
    "the seed's AdamW uses weight_decay 0.01 (its code's default; not a flag of the command); the base keeps "
    "actor.optim.weight_decay={weight_decay}",
)


# ---------------------------------------------------------------------------------------------- the command


def read_command(text: str, env: Mapping[str, str], pinned: Mapping[str, str] = ()) -> tuple[list[str], dict]:
    """The arguments after `verl.trainer.main_ppo` in a shell script (or a Markdown file's fenced blocks), with
    every variable expanded, and the environment the command runs in (for BASE_IMAGE_DIR). `env` is the caller's
    environment, `pinned` the --env values, which win over assignments in the script."""
    pinned = dict(pinned or {})
    values = dict(env)
    used_defaults: dict[str, str] = {}

    def lookup(name: str) -> str | None:
        if name in pinned:
            return pinned[name]
        if name in values:
            return values[name]
        if name in SEED_DATA_FILES and lookup("BASE_IMAGE_DIR"):
            used_defaults[name] = f"{lookup('BASE_IMAGE_DIR').rstrip('/')}/{SEED_DATA_FILES[name]}"
            return used_defaults[name]
        return None

    def assign(name: str, value: str) -> None:
        values[name] = value

    try:
        commands = parse_script(text, lookup, assign)
    except ShellSyntaxError as err:
        raise TranslationError(str(err)) from None
    found = [(c, i) for c in commands for i in [_entry_index(c.texts)] if i is not None]
    if not found:
        raise TranslationError("no `python3 -m verl.trainer.main_ppo ...` command found")
    if len(found) > 1:
        raise TranslationError(f"{len(found)} verl.trainer.main_ppo commands (lines "
                               f"{', '.join(str(c.line) for c, _ in found)}): keep one")
    command, index = found[0]
    for word in command.words[index + 1:]:
        for name in word.unset:
            hint = (f", or BASE_IMAGE_DIR for the seed's layout ($BASE_IMAGE_DIR/{SEED_DATA_FILES[name]})"
                    if name in SEED_DATA_FILES else "")
            raise TranslationError(f"line {word.line}: {word.text}: ${name} is not set; export it or pass "
                                   f"--env {name}=...{hint}")
    environment = {**values, **command.assignments, **pinned}
    return [w.text for w in command.words[index + 1:]], {"environment": environment, "defaults": used_defaults}


def _entry_index(words: Sequence[str]) -> int | None:
    for i, word in enumerate(words):
        if word == "verl.trainer.main_ppo" and i > 0 and words[i - 1] == "-m":
            return i
        if word.endswith("verl/trainer/main_ppo.py") or word == "main_ppo.py":
            return i
    return None


def expand_args(args: Sequence[str], lookup: Callable[[str], str | None]) -> list[str]:
    """Arguments given after `--` (already through the caller's shell): `$NAME` / `${NAME}` left in them (single
    quotes) are expanded like the shell would have; an unset one is an error."""
    out = []
    for arg in args:
        def value(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            found = lookup(name)
            if found is None:
                raise TranslationError(f"{arg}: ${name} is not set; export it or pass --env {name}=...")
            return found
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, arg))
    index = _entry_index(out)
    return out[index + 1:] if index is not None else out


def parse_flags(args: Sequence[str]) -> tuple[list[Flag], list[Outcome]]:
    """key=value arguments -> flags; Hydra options and deletions -> unmapped outcomes. A malformed argument (no
    `=`) or a key given twice is an error naming it."""
    flags: list[Flag] = []
    others: list[Outcome] = []
    seen: dict[str, str] = {}
    for arg in args:
        if arg.startswith("-"):
            others.append(Outcome(arg, UNMAPPED, {}, "a Hydra option, not an override (ours: --base selects the "
                                                     "base config)", G_NONE))
            continue
        if arg.startswith("~"):
            others.append(Outcome(arg, UNMAPPED, {}, "a Hydra deletion of a default: only values are translated",
                                  G_NONE))
            continue
        key, sep, text = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key or not all(part.isidentifier() for part in key.split(".")):
            raise TranslationError(f"{arg!r} is not a verl override of the form section.key=value")
        if key in seen:
            raise TranslationError(f"{key} is given twice ({seen[key]!r} and {arg!r}); keep one")
        seen[key] = arg
        try:
            value = parse_value(text)
        except ValueError as err:
            raise TranslationError(f"{arg}: {err}") from None
        flags.append(Flag(key, text, value))
    return flags, others


# -------------------------------------------------------------------------------------------- translation


def translate(args: Sequence[str], *, base: str | Path = DEFAULT_BASE, environment: Mapping[str, str] | None = None,
              data_defaults: Mapping[str, str] | None = None, model: str | None = None,
              train_size: int | None = None, sets: Sequence[str] = ()) -> Translation:
    """verl override arguments (after `verl.trainer.main_ppo`) -> our config, on top of `base`. `environment`
    holds BASE_IMAGE_DIR when known (data.image_dir); `data_defaults` the seed data variables that were filled
    from the seed's layout (reported as notes)."""
    environment = dict(environment or {})
    base = Path(base)
    try:
        base_cfg = load_config(base)
    except ConfigError as err:
        raise TranslationError(f"--base: {err}") from None
    flags, outcomes = parse_flags(args)
    notes: list[str] = []
    ctx = Context({f.key: f for f in flags}, base_cfg, train_size)
    results: list[Outcome] = []
    for flag in flags:
        rule = RULES.get(flag.key)
        if rule is None:
            results.append(unmapped(flag, G_UNKNOWN, "no rule for this flag: check what it does in the seed and set "
                                                     "the matching key with --set, if there is one"))
        else:
            results.append(rule(flag, ctx))
    results.extend(outcomes)
    for name, path in (data_defaults or {}).items():
        notes.append(f"${name} was not set: the seed's layout gives {path}")
    from_env: list[Outcome] = []
    image_dir = environment.get("BASE_IMAGE_DIR")
    if image_dir:
        from_env.append(Outcome("$BASE_IMAGE_DIR", MAPPED, {"data.image_dir": image_dir},
                                "the root the JSON image paths are relative to"))
    elif any(f.key in ("data.train_files", "data.val_files") for f in flags):
        notes.append("BASE_IMAGE_DIR is not set: image paths stay relative to each JSON file's folder "
                     "(data.image_dir=''); the seed reads them relative to $BASE_IMAGE_DIR (pass --env "
                     "BASE_IMAGE_DIR=...)")

    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for outcome in [*results, *from_env]:
        for key, value in outcome.settings.items():
            settings[key] = value
            sources[key] = outcome.arg
    overrides: list[Outcome] = []
    if model is not None:
        overrides.append(Outcome("--model", MAPPED, {"model": model}, "the local HF checkpoint directory"))
    for text in sets:
        try:
            key, value = parse_override(text)
        except ConfigError as err:
            raise TranslationError(f"--set {text}: {err}") from None
        overrides.append(Outcome(f"--set {text}", MAPPED, {key: value}))
    for outcome in overrides:
        for key, value in outcome.settings.items():
            settings[key] = value
            sources[key] = outcome.arg

    tree = to_dict(base_cfg)
    for key, value in settings.items():
        _set(tree, key, value)
    derived = _derive_layout(tree, sources)
    for outcome in derived:
        for key, value in outcome.settings.items():
            _set(tree, key, value)
            sources[key] = "derived"
    try:  # each value as its key's type (e.g. a --set float written 1e-5, which YAML reads as a string)
        tree = to_dict(_build(Config, tree, "", "the translated config"))
    except ConfigError as err:
        raise TranslationError(f"{err} (set by: {', '.join(sorted(set(sources.values())))})") from None
    _notes(tree, ctx, notes)
    changed = _diff(tree, to_dict(base_cfg))
    return Translation(base, results, from_env, derived, overrides, notes, tree, changed, sources)


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise TranslationError(f"internal: {dotted} is not a key of our config")
        node = node[part]
    if parts[-1] not in node:
        raise TranslationError(f"{dotted} is not a key of our config")
    node[parts[-1]] = copy.deepcopy(value)


def _derive_layout(tree: dict, sources: dict[str, str]) -> list[Outcome]:
    """The seed's FSDP actor and its vLLM engines span every GPU of the cluster: parallel.dp fills it."""
    if not any(sources.get(k) for k in ("cluster.num_nodes", "cluster.gpus_per_node")):
        return []
    if "parallel.dp" in sources or tree["trainer"]["rollout_placement"] != "hybrid":
        return []
    p, cl = tree["parallel"], tree["cluster"]
    gpus = cl["num_nodes"] * cl["gpus_per_node"]
    group = p["tp"] * p["pp"] * p["cp"]
    if gpus % group:
        raise TranslationError(f"the seed's {cl['num_nodes']} x {cl['gpus_per_node']} = {gpus} GPUs do not split into "
                               f"groups of parallel tp {p['tp']} x pp {p['pp']} x cp {p['cp']} = {group}: pass --set "
                               "parallel.tp=... (or parallel.dp=...)")
    dp = gpus // group
    return [Outcome("trainer.nnodes x trainer.n_gpus_per_node", MAPPED, {"parallel.dp": dp},
                    f"{gpus} GPUs / (tp {p['tp']} x pp {p['pp']} x cp {p['cp']}): the seed's FSDP actor and its "
                    "vLLM engines use every GPU; ours at the base's tp/pp (hybrid: an engine on every rank)")]


def _notes(tree: dict, ctx: Context, notes: list[str]) -> None:
    model = tree["model"]
    if model and not Path(model).is_dir():
        notes.append(f"model {model!r} is not a local directory: the trainer reads a local HF checkpoint; download "
                     "it and pass --model DIR")
    uses_judge = tree["reward"]["default_verifier"] == "judge" or "judge" in tree["reward"]["verifiers"].values()
    if uses_judge and tree["reward"]["judge"]["provider"] == "azure":
        notes.append("the judge is the seed's Azure OpenAI deployment: the trainer needs API_KEY, END_POINT and "
                     "API_VERSION in its environment (--set reward.judge.provider=openai for an OpenAI-compatible "
                     "endpoint instead)")
    if tree["trainer"]["eval_every"] and "actor_rollout_ref.rollout.val_n" not in ctx.flags \
            and "actor_rollout_ref.rollout.val_do_sample" not in ctx.flags:
        notes.append(f"the seed validates during training greedily with one sample (its defaults val_n=1, "
                     f"val_do_sample=False); ours runs eval.k={tree['eval']['k']} samples at eval.temperature="
                     f"{tree['eval']['temperature']} (add actor_rollout_ref.rollout.val_do_sample=False for greedy)")
    if "actor_rollout_ref.actor.optim.weight_decay" not in ctx.flags:
        for note in SEED_DEFAULT_NOTES:
            notes.append(note.format(weight_decay=tree["actor"]["optim"]["weight_decay"]))


def _diff(tree: dict, base: dict) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and value and base[key]:
            sub = _diff(value, base[key])
            if sub:
                out[key] = sub
        elif value != base.get(key):
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- output


def _scalar(value: Any) -> str:
    """One line of YAML for a value (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True).strip()
    if text.endswith("..."):  # the document end marker of a scalar
        text = text[:-3].rstrip()
    return text


def render_yaml(translation: Translation, out_path: Path, source: str) -> str:
    """`defaults: <base>` and the changed keys, each commented with what set it."""
    base_ref = str(translation.base.resolve())
    try:  # relative when the two are close (configs/x.yaml next to configs/qwen2_5_vl_7b_grpo.yaml)
        relative = os.path.relpath(base_ref, out_path.resolve().parent)
        if Path(relative).parts.count("..") <= 2:
            base_ref = relative
    except ValueError:  # another drive
        pass
    lines = [f"# Translated from the seed's verl command ({source}) by tools/from_verl.py.",
             "# Only the keys that differ from the base are here, each with the flag that set it; the tool's report",
             "# and docs/from_verl.md give the semantics of every mapping.",
             f"defaults: {_scalar(base_ref)}"]

    def emit(node: dict, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value and dotted not in translation.sources:
                lines.append(" " * indent + f"{key}:")
                emit(value, dotted + ".", indent + 2)
            else:
                comment = translation.sources.get(dotted)
                lines.append(" " * indent + f"{key}: {_scalar(value)}" + (f"  # {comment}" if comment else ""))

    emit(translation.changed, "", 0)
    unmapped_lines = [o for o in translation.outcomes if o.status == UNMAPPED]
    if unmapped_lines:
        lines.append("# Not translated (no counterpart; see the report for the reasons):")
        lines.extend(f"#   {o.arg}" for o in unmapped_lines)
    return "\n".join(lines) + "\n"


def write_yaml(translation: Translation, out_path: str | Path, source: str) -> Config:
    """Writes the YAML (atomically) after loading and validating it with our loader; returns the config."""
    out_path = Path(out_path)
    text = render_yaml(translation, out_path, source)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".yaml", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            cfg = load_config(tmp)
        except ConfigError as err:
            raise TranslationError(f"the translated config does not pass our checks: {err}") from None
        if to_dict(cfg) != translation.tree:
            wrong = _diff(to_dict(cfg), translation.tree)
            raise TranslationError(f"internal: the written YAML reads back differently: {wrong}")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cfg


def _shown(value: Any) -> str:
    text = _scalar(value)
    return text if len(text) <= 90 else text[:87] + "..."


def format_report(translation: Translation, out_path: Path | None) -> str:
    lines = []
    done = [o for o in translation.outcomes if o.status != UNMAPPED]
    lines.append(f"mapped: {len(done)} flags ({translation.count(MAPPED)} to our keys, {translation.count(IMPLIED)} "
                 f"implied), unmapped: {translation.count(UNMAPPED)}, of {len(translation.outcomes)}")
    for outcome in done:
        if outcome.status == MAPPED:
            target = ", ".join(f"{k} = {_shown(v)}" for k, v in outcome.settings.items())
            lines.append(f"  {outcome.arg} -> {target}" + (f"  ({outcome.reason})" if outcome.reason else ""))
        else:
            lines.append(f"  {outcome.arg} -> implied: {outcome.reason}")
    for title, items in (("from the environment", translation.environment), ("derived", translation.derived),
                         ("overrides", translation.overrides)):
        if items:
            lines.append(f"{title}:")
            for outcome in items:
                target = ", ".join(f"{k} = {_shown(v)}" for k, v in outcome.settings.items())
                lines.append(f"  {outcome.arg} -> {target}" + (f"  ({outcome.reason})" if outcome.reason else ""))
    missing = [o for o in translation.outcomes if o.status == UNMAPPED]
    if missing:
        lines.append(f"unmapped: {len(missing)} flags")
        for group in GROUPS:
            members = [o for o in missing if o.group == group]
            if members:
                lines.append(f"  {group}:")
                lines.extend(f"    {o.arg}: {o.reason}" for o in members)
    if translation.notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in translation.notes)
    if out_path is not None:
        count = _count_leaves(translation.changed)
        lines.append(f"wrote {out_path} (defaults: {translation.base}; {count} keys differ from it)")
    return "\n".join(lines)


def _count_leaves(tree: dict) -> int:
    return sum(_count_leaves(v) if isinstance(v, dict) and v else 1 for v in tree.values())


def markdown_table(translation: Translation) -> str:
    """The mapping as a Markdown table (docs/from_verl.md)."""
    rows = ["| verl flag (seed value) | ours | semantics / reason |", "| --- | --- | --- |"]
    for outcome in translation.outcomes:
        if outcome.status == MAPPED:
            ours = "<br>".join(f"`{k} = {_shown(v)}`" for k, v in outcome.settings.items())
        elif outcome.status == IMPLIED:
            ours = "implied"
        else:
            ours = f"no counterpart ({outcome.group.split(' (')[0]})"
        reason = outcome.reason.replace("|", "\\|")
        rows.append(f"| `{outcome.arg.replace('|', chr(92) + '|')}` | {ours} | {reason} |")
    for outcome, what in [*((o, "environment") for o in translation.environment),
                          *((o, "derived") for o in translation.derived)]:
        ours = "<br>".join(f"`{k} = {_shown(v)}`" for k, v in outcome.settings.items())
        rows.append(f"| {outcome.arg} ({what}) | {ours} | {outcome.reason} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------- CLI


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise TranslationError(f"{option} {item!r}: expects NAME=VALUE")
        out[name] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verl_args: list[str] | None = None
    if "--" in args:
        split = args.index("--")
        args, verl_args = args[:split], args[split + 1:]
    parser = argparse.ArgumentParser(
        prog="from_verl.py", description=__doc__.split("\n\n")[0],
        epilog="Either SCRIPT (a shell script, or a Markdown file whose fenced blocks hold it) or -- followed by the "
               "verl arguments.")
    parser.add_argument("script", nargs="?", type=Path,
                        help="file holding the python3 -m verl.trainer.main_ppo command")
    parser.add_argument("-o", "--out", type=Path, default=Path("from_verl.yaml"), help="YAML to write")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="our config the translation starts from")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for the command (wins over the environment and the script's assignments)")
    parser.add_argument("--model", help="local HF checkpoint directory (replaces actor_rollout_ref.model.path)")
    parser.add_argument("--train-size", type=int, help="training prompts, when data.train_files are not readable here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="one of our keys, set after the translation")
    parser.add_argument("--markdown", action="store_true", help="also print the mapping as a Markdown table")
    options = parser.parse_args(args)
    try:
        pinned = _pairs(options.env, "--env")
        if (options.script is None) == (verl_args is None):
            raise TranslationError("give either a script file or -- followed by the verl arguments")
        if options.script is not None:
            try:
                text = options.script.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise TranslationError(f"{options.script}: cannot be read ({err})") from None
            if options.script.suffix.lower() in (".md", ".markdown"):
                text = "\n".join(fenced_blocks(text))
            verl_args, found = read_command(text, os.environ, pinned)
            source = str(options.script)
        else:
            environment = {**os.environ, **pinned}
            defaults: dict[str, str] = {}

            def lookup(name: str) -> str | None:
                if name in environment:
                    return environment[name]
                if name in SEED_DATA_FILES and environment.get("BASE_IMAGE_DIR"):
                    defaults[name] = f"{environment['BASE_IMAGE_DIR'].rstrip('/')}/{SEED_DATA_FILES[name]}"
                    return defaults[name]
                return None

            verl_args = expand_args(verl_args, lookup)
            found = {"environment": environment, "defaults": defaults}
            source = "command line"
        translation = translate(verl_args, base=options.base, environment=found["environment"],
                                data_defaults=found["defaults"], model=options.model, train_size=options.train_size,
                                sets=options.sets)
        write_yaml(translation, options.out, source)
    except TranslationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(translation, options.out))
    if options.markdown:
        print(markdown_table(translation))
    return 0
