"""The checks that need resources, one function for every entry point, run before any worker starts.

Value checks live with the config classes (config/: `load_config` runs them); what they cannot see (files, the
checkpoint's tokenizer, environment variables, installed packages) is checked here, by `prelaunch(cfg, entry)`:

    check                                   grpo  sft  eval  reward_server
    model directory (HF config.json)         x     x    x
    tokenizer: Qwen2.5-VL's special tokens,  x     x    x
      every template filled and encoded
    data.train_files, their images           x
    data.val_files (with evaluation)         x          x
    sft.train_files                                x
    loggers' packages                        x     x
    reward verifiers (judge key, server)     x          x        x

Entry points: trainer/grpo.py (`prepare`, also for --dry-run), trainer/sft.py (`prepare_sft`), trainer/eval.py
(`main`), rewards/server.py (`main`). Each error is a ValueError naming the key, file or variable at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_minio3.config import Config

Entry = Literal["grpo", "sft", "eval", "reward_server"]
ENTRIES: tuple[str, ...] = ("grpo", "sft", "eval", "reward_server")


@dataclass
class Resources:
    """What the checks read and the entry point may use: the RL prompts (train, val) and the tokenizer."""

    train_prompts: list = field(default_factory=list)
    val_prompts: list = field(default_factory=list)
    tokenizer: Any = None


def check_model_dir(cfg: Config) -> None:
    if not cfg.model or not Path(cfg.model, "config.json").is_file():
        raise ValueError(f"model: {cfg.model!r} is not an HF Qwen2.5-VL checkpoint directory (no config.json)")


def check_tokenizer(cfg: Config) -> Any:
    """The checkpoint's tokenizer loads, has Qwen2.5-VL's special tokens, and every template encodes."""
    from transformers import AutoTokenizer

    from megatron_minio3.rollout.tokens import TurnTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, named with the directory
        raise ValueError(f"model: cannot load the tokenizer of {cfg.model}: {type(err).__name__}: {err}") from None
    turns = TurnTokenizer(tokenizer, cfg.data)  # ValueError naming a missing special token or a bad template
    turns.prompt_ids("<image>\nquestion", 1)
    turns.observation_ids(action=0, observation=1)
    turns.error_ids("an error")
    return tokenizer


def check_loggers(cfg: Config) -> None:
    """The packages trainer.loggers needs are importable."""
    for name in ("wandb", "tensorboard"):
        if name in cfg.trainer.loggers:
            try:
                __import__(name)
            except ImportError:
                raise ValueError(f"trainer.loggers: {name!r} needs the {name} package (pip install {name})") from None


def check_rewards(cfg: Config) -> None:
    """Every verifier can be built: names known, the judge's key and endpoint variables set, server URLs valid."""
    from megatron_minio3.rewards.manager import RewardManager

    RewardManager(cfg.reward)


def read_train_prompts(cfg: Config) -> list:
    from megatron_minio3.data.minio3_json import read_datasets

    if not cfg.data.train_files:
        raise ValueError("data.train_files: list the Mini-o3 JSON training files (data.train_files=[a.json])")
    prompts = read_datasets(cfg.data.train_files, cfg.data.image_dir, check_images=True)
    if not prompts:
        raise ValueError(f"data.train_files: {cfg.data.train_files} hold no prompt")
    return prompts


def read_val_prompts(cfg: Config, why: str) -> list:
    from megatron_minio3.data.minio3_json import read_datasets

    if not cfg.data.val_files:
        raise ValueError(f"{why} but data.val_files is empty: list the evaluation files")
    return read_datasets(cfg.data.val_files, cfg.data.image_dir, cfg.eval.max_prompts)


def check_sft_files(cfg: Config) -> None:
    if not cfg.sft.train_files:
        raise ValueError("sft.train_files: list the SFT conversation files (sharegpt .json/.jsonl or .parquet)")
    for file in cfg.sft.train_files:
        if not Path(file).is_file():
            raise ValueError(f"sft.train_files: {file} is not a file")


def prelaunch(cfg: Config, entry: Entry, *, tokenizer: bool = True) -> Resources:
    """Run `entry`'s resource checks (the table above); ValueError at the first problem. tokenizer=False leaves
    the tokenizer out (GRPO's --dry-run plans from the checkpoint's config.json alone)."""
    if entry not in ENTRIES:
        raise ValueError(f"prelaunch: unknown entry point {entry!r}; one of {ENTRIES}")
    resources = Resources()
    if entry in ("grpo", "sft", "eval"):
        check_model_dir(cfg)
    if entry == "grpo":
        resources.train_prompts = read_train_prompts(cfg)
        if cfg.trainer.eval_every or cfg.trainer.eval_before_train:
            key = "trainer.eval_every" if cfg.trainer.eval_every else "trainer.eval_before_train"
            resources.val_prompts = read_val_prompts(cfg, f"{key} is set")
    elif entry == "eval":
        resources.val_prompts = read_val_prompts(cfg, "an evaluation needs questions")
    elif entry == "sft":
        check_sft_files(cfg)
    if entry in ("grpo", "sft"):
        check_loggers(cfg)
    if entry in ("grpo", "eval", "reward_server"):
        check_rewards(cfg)
    if tokenizer and entry in ("grpo", "sft", "eval"):
        resources.tokenizer = check_tokenizer(cfg)
    return resources
