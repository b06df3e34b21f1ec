"""Parity probe, the parts without an engine: metrics, warnings, actor inputs from a probe sequence."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image

from megatron_minio3.weights.probe import (
    ParityProbe,
    ProbePrompt,
    ProbeSequence,
    central_crop,
    cut_at_placeholder,
    parity_metrics,
)

IMAGE_PAD = 443  # the tiny checkpoint's <|image_pad|>


def sequence(uid="s", rollout=(-1.0, -2.0, -0.5)) -> ProbeSequence:
    # 3 prompt tokens, 2 generated, 1 appended, 1 generated
    return ProbeSequence(
        uid=uid, token_ids=(1, 2, 3, 10, 11, 4, 12), images=(), image_grid_thw=(),
        generated_spans=((3, 5), (6, 7)), rollout_logprobs=tuple(rollout),
    )


def test_metrics_compare_only_generated_tokens():
    seq = sequence()
    assert seq.generated_positions == [3, 4, 6]
    train = torch.tensor([0.0, 9.0, 9.0, -1.1, -1.8, 9.0, -0.5])
    metrics = parity_metrics([seq], [train])
    assert metrics["probe/mean_abs_logprob_diff"] == pytest.approx(0.1)
    assert metrics["probe/max_abs_logprob_diff"] == pytest.approx(0.2)
    assert metrics["probe/exp_mean_abs_logprob_diff"] == pytest.approx(math.exp(0.1))
    assert metrics["probe/num_tokens"] == 3.0


def test_metrics_errors_name_the_sequence():
    with pytest.raises(ValueError, match="probe s: log-probs of shape \\(6,\\), expected \\(7,\\)"):
        parity_metrics([sequence()], [torch.zeros(6)])
    with pytest.raises(ValueError, match="1 probe sequences but 2 log-prob tensors"):
        parity_metrics([sequence()], [torch.zeros(7)] * 2)
    empty = ProbeSequence("e", (1, 2), (), (), ((2, 2), (2, 2)), ())
    with pytest.raises(ValueError, match="generated no token"):
        parity_metrics([empty], [torch.zeros(2)])


def test_report_warns_above_the_threshold(caplog):
    image = Image.new("RGB", (56, 56))
    probe = ParityProbe([ProbePrompt("p", "q", (image,))], max_tokens=4, warn_mean_abs_diff=0.05)
    close = torch.tensor([0.0, 0, 0, -1.0, -2.0, 0, -0.5])
    with caplog.at_level(logging.WARNING, logger="megatron_minio3.weights.probe"):
        probe.report([sequence()], [close])
        assert not caplog.records
        probe.report([sequence()], [close + 0.1])
    assert "log-prob mismatch: mean |diff| 0.1 > 0.05" in caplog.text


def test_probe_arguments_are_checked():
    image = Image.new("RGB", (56, 56))
    with pytest.raises(ValueError, match="at least one"):
        ParityProbe([], max_tokens=4, warn_mean_abs_diff=0.05)
    with pytest.raises(ValueError, match="probe prompt p has no image"):
        ParityProbe([ProbePrompt("p", "q", ())], max_tokens=4, warn_mean_abs_diff=0.05)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        ParityProbe([ProbePrompt("p", "q", (image,))], max_tokens=0, warn_mean_abs_diff=0.05)


def test_cut_and_crop():
    assert cut_at_placeholder([5, 6, IMAGE_PAD, 7], (IMAGE_PAD, 444)) == 2
    assert cut_at_placeholder([5, 6], (IMAGE_PAD, 444)) == 2
    assert central_crop(Image.new("RGB", (200, 100))).size == (100, 50)
    assert central_crop(Image.new("RGB", (1, 1))).size == (1, 1)


def test_packing_items_from_a_probe_sequence(tiny_hf_dir):
    from transformers import AutoImageProcessor

    images = (Image.new("RGB", (56, 56), (200, 0, 0)), Image.new("RGB", (56, 112), (0, 0, 200)))
    # 4 and 8 merged image tokens (grids 1x4x4 and 1x8x4, merge 2)
    tokens = (1, 2, *[IMAGE_PAD] * 4, 3, 10, 11, 4, *[IMAGE_PAD] * 8, 5, 12)
    seq = ProbeSequence("s", tokens, images, ((1, 4, 4), (1, 8, 4)), ((7, 9), (19, 20)), (-1.0, -2.0, -3.0))
    processor = AutoImageProcessor.from_pretrained(tiny_hf_dir)
    (item,) = ParityProbe.packing_items([seq], processor, image_token_id=IMAGE_PAD, spatial_merge_size=2)
    assert item.token_ids.tolist() == list(tokens)
    assert item.loss_mask.nonzero().flatten().tolist() == [7, 8, 19]
    assert item.image_grid_thw.tolist() == [[1, 4, 4], [1, 8, 4]]
    assert item.pixel_values.shape[0] == 16 + 32
    item.check_image_tokens(IMAGE_PAD, 2)
    assert item.position_ids[:, 2:6].tolist() == [[2] * 4, [2, 2, 3, 3], [2, 3, 2, 3]]
    wrong = ProbeSequence("w", tokens, images, ((1, 4, 4), (1, 4, 8)), ((7, 9),), (-1.0, -2.0))
    with pytest.raises(ValueError, match="probe w: the image processor makes grids"):
        ParityProbe.packing_items([wrong], processor, image_token_id=IMAGE_PAD, spatial_merge_size=2)
