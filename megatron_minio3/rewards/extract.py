"""Pure text rules: answer-span extraction and the Mini-o3 format check."""
from __future__ import annotations

import re

_ANSWER_SPAN_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NON_FINAL_TURN_RE = re.compile(r"\s*<think>.*</think>.*<grounding>.*</grounding>\s*", re.DOTALL)
_FINAL_TURN_RE = re.compile(r"\s*<think>.*</think>.*<answer>.*</answer>\s*", re.DOTALL)
# The seed's strict_v2: the leftmost <answer> whose lazy span reaches a </answer> ending the text ($: at the end
# or before one final newline).
_ANSWER_AT_END_RE = re.compile(r"<answer>(.*?)</answer>$", re.DOTALL)


def answer_spans(text: str) -> list[str]:
    """Stripped contents of the non-overlapping `<answer>...</answer>` spans of `text`, in order.

    Spans are matched lazily (`<answer>(.*?)</answer>`, across lines). A span that opens another
    `<answer>` inside it (nested tags) keeps only the text after its last inner `<answer>`, so
    `<answer><answer>B</answer></answer>` yields `["B"]`.
    """
    return [match.group(1).rsplit("<answer>", 1)[-1].strip() for match in _ANSWER_SPAN_RE.finditer(text)]


def first_answer(turns: list[str]) -> str | None:
    """The first answer span over all turns in order (Mini-o3's judge input); None when there is none."""
    for turn in turns:
        spans = answer_spans(turn)
        if spans:
            return spans[0]
    return None


def judge_prediction(turns: list[str], mode: str) -> str | None:
    """The text the LLM judge compares with the reference (reward.judge.answer_extraction); None or "" = nothing
    to judge. The seed's modes work on the response, the turns joined by a space:

    - strict: the first answer span over all turns (`first_answer`, stripped, innermost when nested);
    - split: the text after the last `<answer>` up to the next `</answer>`, stripped (with neither tag, the
      whole response);
    - strict_v2: from the first `<answer>` to a `</answer>` that ends the response (spans and tags between
      them included), stripped; None when the response does not end with `</answer>`;
    - none: the whole response, stripped.
    """
    if mode == "strict":
        return first_answer(turns)
    response = " ".join(turns)
    if mode == "split":
        return response.split("<answer>")[-1].split("</answer>")[0].strip()
    if mode == "strict_v2":
        match = _ANSWER_AT_END_RE.search(response)
        return match.group(1).strip() if match else None
    if mode == "none":
        return response.strip()
    raise ValueError(f"unknown answer extraction {mode!r}")


def final_answer(turns: list[str]) -> str | None:
    """The last answer span of the final turn (Mini-o3's rule-based input); None when there is none."""
    if not turns:
        return None
    spans = answer_spans(turns[-1])
    return spans[-1] if spans else None


def _has_exactly_once(text: str, tag: str) -> bool:
    return text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1


def _has_none(text: str, tag: str) -> bool:
    return f"<{tag}>" not in text and f"</{tag}>" not in text


def is_well_formatted(turns: list[str]) -> bool:
    """Mini-o3 structure: every non-final turn is `<think>..</think>..<grounding>..</grounding>`, the
    final turn `<think>..</think>..<answer>..</answer>`; each tag pair exactly once, in that order,
    nothing after the closing tag but whitespace, and no answer in a tool turn nor tool call in the final one.
    """
    if not turns:
        return False
    for turn in turns[:-1]:
        if not (_has_exactly_once(turn, "think") and _has_exactly_once(turn, "grounding")):
            return False
        if not _has_none(turn, "answer"):
            return False
        if _NON_FINAL_TURN_RE.fullmatch(turn) is None:
            return False
    final = turns[-1]
    if not (_has_exactly_once(final, "think") and _has_exactly_once(final, "answer") and _has_none(final, "grounding")):
        return False
    return _FINAL_TURN_RE.fullmatch(final) is not None
