"""Rule-based verifiers: mc, exact, math, iou (and the IoU threshold schedule)."""
from __future__ import annotations

import pytest

from megatron_minio3.config.reward import IoUConfig
from megatron_minio3.rewards.verifiers import (
    box_iou,
    iou_threshold,
    normalize_answer,
    option_letter,
    parse_box,
    verify_exact,
    verify_iou,
    verify_math,
    verify_mc,
)

# ------------------------------------------------------------------------------------------------ mc


@pytest.mark.parametrize(
    "prediction",
    ["B", "(B)", "(B) the red car", "B.", "B. the red car", "  B  ", "（B）", "Ｂ"],
)
def test_mc_accepts_the_right_letter_forms(prediction: str) -> None:
    verdict = verify_mc(prediction, "B")
    assert (verdict.score, verdict.accuracy, verdict.failed) == (1.0, 1.0, False)


@pytest.mark.parametrize(
    "prediction",
    ["A", "(A)", "A. the blue car", "Blue", "B)", "B: red", "b", "(b)", "the answer is B", "", "BB"],
)
def test_mc_rejects_other_answers(prediction: str) -> None:
    verdict = verify_mc(prediction, "B")
    assert (verdict.score, verdict.failed) == (0.0, False)


@pytest.mark.parametrize("truth", ["B", "(B)", "(B) the red car", "B. the red car"])
def test_mc_reads_the_letter_from_any_ground_truth_form(truth: str) -> None:
    assert option_letter(truth) == "B"
    assert verify_mc("B", truth).score == 1.0
    assert verify_mc("(B) red", truth).score == 1.0
    assert verify_mc("(C)", truth).score == 0.0


def test_mc_free_text_ground_truth_needs_equality() -> None:
    assert option_letter("yes") is None
    assert verify_mc("yes", "yes").score == 1.0
    assert verify_mc("Yes", "yes").score == 0.0
    assert verify_mc("红色", " 红色 ").score == 1.0


def test_mc_no_answer_and_empty_truth() -> None:
    verdict = verify_mc(None, "B")
    assert (verdict.score, verdict.failed, verdict.metrics["has_answer"]) == (0.0, False, 0.0)
    failed = verify_mc("B", "   ")
    assert failed.failed and "empty ground truth" in failed.error


# --------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Red Car.", "red car"),
        ("  a   red\tcar!! ", "red car"),
        ("An apple", "apple"),
        ("1,000", "1000"),
        ("2.50", "2.5"),
        ("3.0 meters", "3 meters"),
        ("two", "2"),
        ("Twenty-one", "20 1"),
        ("-3 degrees", "-3 degrees"),
        ("covid-19", "covid 19"),
        ("Café", "café"),
        ("红色。", "红色"),
        ("ＡＢＣ", "abc"),
        ("", ""),
        ("?!", ""),
        # single letters and answers that are only articles survive (an article is dropped only before a word)
        ("A", "a"),
        ("(A)", "a"),
        ("a.", "a"),
        ("The A", "a"),
        ("Vitamin A", "vitamin a"),
        ("Option B", "option b"),
        ("a b c", "a b c"),
        ("the", "the"),
        ("An", "an"),
        ("A cat", "cat"),
        ("the 3 apples", "3 apples"),
    ],
)
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    "prediction, truth, correct",
    [
        ("The red car", "red car", True),
        ("RED CAR.", "red car", True),
        ("1000", "1,000", True),
        ("two", "2", True),
        ("2.0", "2", True),
        ("red", "red car", False),
        ("-3", "3", False),
        ("红色", "红色。", True),
        ("", "red", False),
        ("A", "A", True),
        ("(A)", "A", True),
        ("a", "A", True),
        ("B", "A", False),
        ("Option B", "Option A", False),
        ("vitamin C", "Vitamin A", False),
        ("The", "the", True),
        ("a cat", "The cat", True),
    ],
)
def test_exact(prediction: str, truth: str, correct: bool) -> None:
    verdict = verify_exact(prediction, truth)
    assert not verdict.failed
    assert verdict.score == (1.0 if correct else 0.0)


def test_exact_no_answer_and_unusable_truth() -> None:
    assert verify_exact(None, "red").metrics["has_answer"] == 0.0
    for truth in ["", "  ", "?!", "..."]:
        verdict = verify_exact("the", truth)
        assert verdict.failed and "empty after normalisation" in verdict.error


# ---------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "prediction, truth",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\frac12", "1/2"),
        ("$\\frac{\\pi}{2}$", "\\pi/2"),
        ("x + 1", "1 + x"),
        ("\\boxed{5}", "5"),
        ("The answer is 5 apples", "5"),
        ("1,000", "1000"),
        ("\\sqrt{2}", "\\sqrt 2"),
    ],
)
def test_math_equivalent(prediction: str, truth: str) -> None:
    verdict = verify_math(prediction, truth)
    assert (verdict.score, verdict.accuracy, verdict.failed) == (1.0, 1.0, False)


@pytest.mark.parametrize("prediction", ["0.49", "\\frac{1}{3}", "x - 1"])
def test_math_different(prediction: str) -> None:
    verdict = verify_math(prediction, "\\frac{1}{2}")
    assert (verdict.score, verdict.failed, verdict.metrics["parsed"]) == (0.0, False, 1.0)


def test_math_unparseable_prediction_scores_zero() -> None:
    for prediction in ["", "no idea", "}}{{"]:
        verdict = verify_math(prediction, "3")
        assert (verdict.score, verdict.failed) == (0.0, False)
    assert verify_math(None, "3").metrics["has_answer"] == 0.0


def test_math_unparseable_truth_fails() -> None:
    for truth in ["", "   ", "}}{{"]:
        verdict = verify_math("3", truth)
        assert verdict.failed and "ground truth" in verdict.error


# ----------------------------------------------------------------------------------------------- iou


def test_box_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # no area
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted


@pytest.mark.parametrize(
    "text, box",
    [
        ("[1, 2, 3, 4]", (1.0, 2.0, 3.0, 4.0)),
        ('{"bbox_2d": [0.1, 0.25,0.5 , 0.75], "label": "car"}', (0.1, 0.25, 0.5, 0.75)),
        ("box [ -1.5, 2e1, .5, 40 ] then [9, 9, 9, 9]", (-1.5, 20.0, 0.5, 40.0)),
        ("[1, 2, 3]", None),
        ("no box", None),
        ("", None),
        ("[a, b, c, d]", None),
    ],
)
def test_parse_box(text: str, box: tuple | None) -> None:
    assert parse_box(text) == box


def test_fixed_threshold() -> None:
    cfg = IoUConfig(schedule="fixed", threshold=0.7)
    assert [iou_threshold(s, 100, cfg) for s in (0, 50, 99)] == [0.7, 0.7, 0.7]


def test_dynamic_threshold_follows_v_triune() -> None:
    cfg = IoUConfig(schedule="dynamic")
    steps = [0, 9, 10, 24, 25, 60, 99, 150]
    assert [iou_threshold(s, 100, cfg) for s in steps] == [0.85, 0.85, 0.95, 0.95, 0.99, 0.99, 0.99, 0.99]
    assert iou_threshold(0, 1, cfg) == 0.85


def test_verify_iou() -> None:
    truth = "[0, 0, 10, 10]"
    hit = verify_iou("<b>[0, 0, 10, 9]</b>", truth, threshold=0.85)
    assert hit.score == pytest.approx(0.9) and hit.accuracy == 1.0
    assert hit.metrics["iou"] == pytest.approx(0.9) and hit.metrics["iou_threshold"] == 0.85
    miss = verify_iou("[0, 0, 10, 9]", truth, threshold=0.95)
    assert (miss.score, miss.accuracy, miss.failed) == (0.0, 0.0, False)
    assert miss.metrics["iou"] == pytest.approx(0.9)
    assert verify_iou("[0, 0, 10, 10]", truth, threshold=0.99).score == 1.0
    no_box = verify_iou("somewhere top left", truth, threshold=0.5)
    assert (no_box.score, no_box.metrics["has_box"], no_box.metrics["has_answer"]) == (0.0, 0.0, 1.0)
    assert verify_iou(None, truth, threshold=0.5).metrics["has_answer"] == 0.0


@pytest.mark.parametrize("truth", ["", "car", "[1, 2, 3]", "[5, 5, 5, 9]"])
def test_verify_iou_unusable_truth_fails(truth: str) -> None:
    verdict = verify_iou("[0, 0, 1, 1]", truth, threshold=0.5)
    assert verdict.failed and "ground truth" in verdict.error
