"""Rule-based verifiers (pure functions) and the verifier registry.

Each verifier maps one sample to a `Verdict`: a score, an accuracy flag, named metrics, or an explicit
failure (a ground truth it cannot read, a math-verify timeout, a judge that never answered).
Rule-based verifiers read the last answer span of the final turn; the judge reads the first answer
span over all turns (both as Mini-o3 does).
"""
from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from megatron_minio3.config.reward import IoUConfig, RewardConfig
from megatron_minio3.rewards.extract import final_answer
from megatron_minio3.rewards.types import RewardInput, Verdict

# ---------------------------------------------------------------------------------------------- mc

_OPTION_LETTER_RE = re.compile(r"\(([A-Z])\)|([A-Z])(?:\.|$)")


def option_letter(ground_truth: str) -> str | None:
    """The option letter of a multiple-choice ground truth written "B", "(B)", "(B) text" or "B. text"."""
    match = _OPTION_LETTER_RE.match(unicodedata.normalize("NFKC", ground_truth).strip())
    if match is None:
        return None
    return match.group(1) or match.group(2)


def verify_mc(prediction: str | None, ground_truth: str) -> Verdict:
    """Mini-o3 multiple choice: correct if the answer equals the ground truth, or is the right letter
    as "B", or starts with "(B)" or "B.". Letters are case-sensitive; fullwidth forms are folded (NFKC).
    """
    truth = unicodedata.normalize("NFKC", ground_truth).strip()
    if not truth:
        return Verdict.failure("mc: empty ground truth")
    if prediction is None:
        return Verdict(score=0.0, accuracy=0.0, metrics={"has_answer": 0.0})
    answer = unicodedata.normalize("NFKC", prediction).strip()
    letter = option_letter(truth)
    correct = answer == truth or (
        letter is not None and (answer == letter or answer.startswith(f"({letter})") or answer.startswith(f"{letter}."))
    )
    value = 1.0 if correct else 0.0
    return Verdict(score=value, accuracy=value, metrics={"has_answer": 1.0})


# ------------------------------------------------------------------------------------------- exact

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
# A number (optional sign when it starts a word, thousands separators, decimals) or a run of letters/digits.
_TOKEN_RE = re.compile(r"(?:(?<![^\s(\[])[-+])?\d+(?:,\d{3})*(?:\.\d+)?|[^\W_]+")


def _canonical_number(token: str) -> str:
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return token
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _is_determiner(tokens: list[str], index: int) -> bool:
    """Whether the article at `index` stands before a word it determines, and so can be dropped.

    The last token is never dropped (a ground truth "A" or "the" must not normalise to nothing), and "a"
    before a single letter is a letter itself ("a b c"); "the"/"an" before anything else are determiners.
    """
    if index + 1 >= len(tokens):
        return False
    following = tokens[index + 1]
    return tokens[index] != "a" or len(following) > 1 or following.isdigit()


def normalize_answer(text: str) -> str:
    """Free-form answer normalisation: NFKC, lower case, punctuation dropped, articles dropped where they
    precede a word ("the red car" -> "red car", but "A" -> "a", "vitamin A" -> "vitamin a"), whitespace
    collapsed, number words zero..twenty as digits, numbers canonical ("1,000.50" -> "1000.5")."""
    words = _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).casefold())
    tokens = []
    for index, token in enumerate(words):
        if token[0].isdigit() or token[0] in "+-":
            tokens.append(_canonical_number(token.lstrip("+")))
        elif token not in _ARTICLES or not _is_determiner(words, index):
            tokens.append(_NUMBER_WORDS.get(token, token))
    return " ".join(tokens)


def verify_exact(prediction: str | None, ground_truth: str) -> Verdict:
    """Correct when the normalised answer equals the normalised ground truth."""
    truth = normalize_answer(ground_truth)
    if not truth:
        return Verdict.failure(f"exact: ground truth {ground_truth!r} is empty after normalisation")
    if prediction is None:
        return Verdict(score=0.0, accuracy=0.0, metrics={"has_answer": 0.0})
    value = 1.0 if normalize_answer(prediction) == truth else 0.0
    return Verdict(score=value, accuracy=value, metrics={"has_answer": 1.0})


# -------------------------------------------------------------------------------------------- math

MATH_TIMEOUT_S = 5


def _parse_math(text: str, timeout_s: int | None) -> list:
    """math-verify parse; a bare answer is tried as inline LaTeX first, then as plain text."""
    from math_verify import parse

    if "$" not in text and "\\boxed" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout_s, raise_on_error=True)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout_s, raise_on_error=True)


def verify_math(prediction: str | None, ground_truth: str) -> Verdict:
    """math-verify equivalence of the answer and the ground truth (numbers, LaTeX, sets, intervals...).

    An unparseable answer scores 0; an unparseable ground truth or a math-verify timeout is a failure.
    The timeout uses SIGALRM, so it applies only on the main thread (elsewhere there is none), and it cannot
    interrupt a long native computation; the RewardManager runs this in a worker process that it kills after
    `reward.verifier_timeout_s` (rewards/isolation.py), which bounds every case.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout_s = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _parse_math(ground_truth, timeout_s) if ground_truth.strip() else []
    except TimeoutException:
        return Verdict.failure(f"math: timed out parsing ground truth {ground_truth!r}")
    except Exception as exc:  # math-verify raises many types on bad input
        return Verdict.failure(f"math: cannot parse ground truth {ground_truth!r}: {exc}")
    if all(isinstance(item, str) for item in gold):  # only the raw-text fallback, no expression
        return Verdict.failure(f"math: cannot parse ground truth {ground_truth!r}")
    if prediction is None:
        return Verdict(score=0.0, accuracy=0.0, metrics={"has_answer": 0.0, "parsed": 0.0})
    try:
        pred = _parse_math(prediction, timeout_s)
    except TimeoutException:
        return Verdict.failure("math: timed out parsing the answer", {"has_answer": 1.0})
    except Exception:
        pred = []
    if not pred:
        return Verdict(score=0.0, accuracy=0.0, metrics={"has_answer": 1.0, "parsed": 0.0})
    try:
        equal = verify(gold, pred, timeout_seconds=timeout_s, raise_on_error=True)
    except TimeoutException:
        return Verdict.failure("math: timed out comparing the answer", {"has_answer": 1.0, "parsed": 1.0})
    except Exception:
        equal = False
    value = 1.0 if equal else 0.0
    return Verdict(score=value, accuracy=value, metrics={"has_answer": 1.0, "parsed": 1.0})


# --------------------------------------------------------------------------------------------- iou

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")

Box = tuple[float, float, float, float]


def parse_box(text: str) -> Box | None:
    """The first `[x0, y0, x1, y1]` list of four numbers in `text` (a JSON object around it is fine)."""
    match = _BOX_RE.search(text)
    if match is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in match.groups())
    return (x0, y0, x1, y1)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either has no area."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    if area_a <= 0.0 or area_b <= 0.0:
        return 0.0
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / (area_a + area_b - inter)


def iou_threshold(step: int, total_steps: int, cfg: IoUConfig) -> float:
    """The IoU threshold at training step `step` (0-based) of `total_steps`.

    "dynamic" is V-Triune's schedule: by default 0.85 while step/total_steps < 0.1, 0.95 while < 0.25,
    then 0.99.
    """
    if cfg.schedule == "fixed":
        return cfg.threshold
    progress = step / total_steps
    for boundary, threshold in zip(cfg.dynamic_boundaries, cfg.dynamic_thresholds[:-1], strict=True):
        if progress < boundary:
            return threshold
    return cfg.dynamic_thresholds[-1]


def verify_iou(prediction: str | None, ground_truth: str, threshold: float) -> Verdict:
    """Reward = IoU of the answered box with the ground-truth box when IoU >= threshold, else 0."""
    truth = parse_box(ground_truth)
    if truth is None or box_iou(truth, truth) == 0.0:
        return Verdict.failure(f"iou: ground truth {ground_truth!r} is not a box [x0, y0, x1, y1] with area")
    metrics = {"has_answer": 0.0, "has_box": 0.0, "iou": 0.0, "iou_threshold": threshold}
    if prediction is None:
        return Verdict(score=0.0, accuracy=0.0, metrics=metrics)
    metrics["has_answer"] = 1.0
    box = parse_box(prediction)
    if box is None or not all(math.isfinite(v) for v in box):
        return Verdict(score=0.0, accuracy=0.0, metrics=metrics)
    iou = box_iou(box, truth)
    metrics.update(has_box=1.0, iou=iou)
    hit = iou >= threshold
    return Verdict(score=iou if hit else 0.0, accuracy=1.0 if hit else 0.0, metrics=metrics)


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ScoringContext:
    """What a verifier may know beyond the sample: the training position and the reward config."""

    step: int
    total_steps: int
    cfg: RewardConfig


VerifierFn = Callable[[RewardInput, ScoringContext], "Verdict | Awaitable[Verdict]"]
VerifierFactory = Callable[[RewardConfig], VerifierFn]


def _mc(inp: RewardInput, ctx: ScoringContext) -> Verdict:
    return verify_mc(final_answer(inp.turns), inp.ground_truth)


def _exact(inp: RewardInput, ctx: ScoringContext) -> Verdict:
    return verify_exact(final_answer(inp.turns), inp.ground_truth)


def _math(inp: RewardInput, ctx: ScoringContext) -> Verdict:
    return verify_math(final_answer(inp.turns), inp.ground_truth)


def _iou(inp: RewardInput, ctx: ScoringContext) -> Verdict:
    threshold = iou_threshold(ctx.step, ctx.total_steps, ctx.cfg.iou)
    return verify_iou(final_answer(inp.turns), inp.ground_truth, threshold)


def _judge_factory(cfg: RewardConfig) -> VerifierFn:
    from megatron_minio3.rewards.judge import JudgeClient

    return JudgeClient(cfg.judge)


VERIFIER_FACTORIES: dict[str, VerifierFactory] = {
    "mc": lambda cfg: _mc,
    "exact": lambda cfg: _exact,
    "math": lambda cfg: _math,
    "iou": lambda cfg: _iou,
    "judge": _judge_factory,
}


def register_verifier(name: str, factory: VerifierFactory) -> None:
    """Add a verifier: `factory(cfg)` returns a function `(RewardInput, ScoringContext) -> Verdict`
    (or an awaitable of one). It is built once per RewardManager, when first needed."""
    if name in VERIFIER_FACTORIES:
        raise ValueError(f"verifier {name!r} is already registered")
    VERIFIER_FACTORIES[name] = factory
