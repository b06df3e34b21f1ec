"""Answer-span extraction and the Mini-o3 format rule."""
from __future__ import annotations

import pytest

from megatron_minio3.rewards.extract import (
    answer_spans,
    final_answer,
    first_answer,
    is_well_formatted,
    judge_prediction,
)

THINK = "<think>the sign is small; zoom</think>"
GROUND = '<grounding>{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "source": "original_image"}</grounding>'


@pytest.mark.parametrize(
    "text, spans",
    [
        ("no tags at all", []),
        ("", []),
        ("<answer>B</answer>", ["B"]),
        ("<answer>  (B) red \n</answer>", ["(B) red"]),
        ("<answer>A</answer> then <answer>C</answer>", ["A", "C"]),
        ("<answer>line one\nline two</answer>", ["line one\nline two"]),
        ("<answer><answer>B</answer></answer>", ["B"]),  # nested: innermost text
        ("<answer>x <answer>B</answer> y</answer>", ["B"]),
        ("<answer></answer>", [""]),
        ("<answer>unclosed", []),
        ("</answer>B<answer>", []),
        ("<ANSWER>B</ANSWER>", []),  # tags are case-sensitive, as the model is trained to write them
        ("<answer>红色的车 🚗</answer>", ["红色的车 🚗"]),
    ],
)
def test_answer_spans(text: str, spans: list[str]) -> None:
    assert answer_spans(text) == spans


def test_first_answer_looks_at_all_turns_in_order() -> None:
    assert first_answer([]) is None
    assert first_answer(["<think>a</think>" + GROUND, "<answer>x</answer><answer>y</answer>"]) == "x"
    assert first_answer(["<answer>early</answer>" + GROUND, "<answer>late</answer>"]) == "early"
    assert first_answer(["no answer", "still none"]) is None


def test_final_answer_is_the_last_span_of_the_final_turn() -> None:
    assert final_answer([]) is None
    assert final_answer(["<answer>early</answer>", "<answer>x</answer> and <answer>y</answer>"]) == "y"
    assert final_answer(["<answer>early</answer>", "no answer in the last turn"]) is None
    assert final_answer([""]) is None


@pytest.mark.parametrize(
    "turns",
    [
        [f"{THINK}<answer>B</answer>"],
        [f"\n{THINK} so I answer <answer>B</answer>\n"],
        [f"{THINK} look closer {GROUND}", f"{THINK}{GROUND}", f"{THINK}<answer>红色</answer>"],
        ["<think></think><answer></answer>"],
    ],
)
def test_well_formatted(turns: list[str]) -> None:
    assert is_well_formatted(turns)


@pytest.mark.parametrize(
    "turns",
    [
        [],
        [""],
        ["<answer>B</answer>"],  # no think
        [f"<answer>B</answer>{THINK}"],  # wrong order
        [f"{THINK}<answer>B</answer> trailing words"],
        [f"{THINK}<answer>A</answer><answer>B</answer>"],  # two answers
        [f"{THINK}{THINK}<answer>B</answer>"],  # two thinks
        [f"{THINK}{GROUND}<answer>B</answer>"],  # tool call in the final turn
        [f"{THINK}<answer>B</answer>", f"{THINK}<answer>B</answer>"],  # non-final turn without a tool call
        [f"{THINK}{GROUND}<answer>B</answer>", f"{THINK}<answer>B</answer>"],  # answer in a tool turn
        [f"{GROUND}", f"{THINK}<answer>B</answer>"],  # tool turn without think
        [f"{THINK}<grounding>unclosed", f"{THINK}<answer>B</answer>"],
        [f"{THINK}<answer><answer>B</answer></answer>"],  # nested
    ],
)
def test_badly_formatted(turns: list[str]) -> None:
    assert not is_well_formatted(turns)


# reward.judge.answer_extraction, by hand from the seed's rules (verl/utils/reward_score/general_qa_tool.py of
# Mini-o3/Mini-o3): the response is the turns joined by one space.
TOOL_TURN = "<think>a</think><grounding>{}</grounding>"
TWO_ANSWERS = ["<think>a</think><answer> A </answer>", "<think>b</think><answer>B</answer>"]


@pytest.mark.parametrize(
    "turns, strict, split, strict_v2",
    [
        ([TOOL_TURN, "<think>b</think><answer>(B) red</answer>"], "(B) red", "(B) red", "(B) red"),
        # strict: the first span; split: after the last <answer>; strict_v2: first <answer> to the final </answer>
        (TWO_ANSWERS, "A", "B", "A </answer> <think>b</think><answer>B"),
        (["<think>b</think>the car is red"], None, "<think>b</think>the car is red", None),  # no tag
        (["<think>b</think><answer>red</answer> I am sure."], "red", "red", None),  # not at the end
        (["<answer>red</answer>\n"], "red", "red", "red"),  # $ also matches before one final newline
        (["<think>b</think><answer>red"], None, "red", None),  # unclosed
        (["<answer><answer>B</answer></answer>"], "B", "B", "<answer>B</answer>"),  # the seed's strict: "<answer>B"
        (["<answer></answer>"], "", "", ""),  # empty: nothing to judge
    ],
)
def test_judge_prediction_modes(turns: list[str], strict, split, strict_v2) -> None:
    assert judge_prediction(turns, "strict") == strict
    assert judge_prediction(turns, "split") == split
    assert judge_prediction(turns, "strict_v2") == strict_v2
    assert judge_prediction(turns, "none") == " ".join(turns).strip()


def test_judge_prediction_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'loose'"):
        judge_prediction(["<answer>B</answer>"], "loose")
