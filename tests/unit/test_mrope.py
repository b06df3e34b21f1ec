"""Our mrope position ids equal transformers' Qwen2.5-VL get_rope_index on multi-image, multi-turn inputs."""
from __future__ import annotations

import pytest
import torch

from megatron_minio3.models.qwen2_5_vl.mrope import get_rope_index, image_num_tokens, sequence_position_ids

IMAGE = 151655
MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    """transformers' Qwen2_5_VLModel on the meta device: only its get_rope_index is used (the reference)."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=152064,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64),
    )
    with torch.device("meta"):
        return Qwen2_5_VLModel(config)


def reference(hf_model, input_ids, grid, attention_mask=None):
    token_types = (input_ids == IMAGE).int()
    return hf_model.get_rope_index(input_ids, token_types, image_grid_thw=grid, attention_mask=attention_mask)


def text(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def image(grid: tuple[int, int, int]) -> list[int]:
    return [151652] + [IMAGE] * image_num_tokens(grid, MERGE) + [151653]


def multi_turn_sequence(grids: list[tuple[int, int, int]]) -> list[int]:
    """System/user turn with the original image, assistant turns asking for crops, observation turns with crops."""
    ids = text(7) + image(grids[0]) + text(12, 2000)
    for turn, grid in enumerate(grids[1:]):
        ids += text(9, 3000 + 100 * turn)  # assistant reasoning + grounding call
        ids += text(5, 4000) + image(grid) + text(6, 5000)  # observation turn with the crop
    return ids + text(4, 6000)


@pytest.mark.parametrize(
    "grids",
    [
        [(1, 8, 12)],
        [(1, 8, 12), (1, 4, 4), (1, 16, 6)],  # original + two crops of other aspect ratios
        [(1, 2, 2), (1, 2, 2), (1, 2, 2), (1, 30, 2)],  # tiny crops and an extreme aspect ratio
        [(2, 4, 6), (1, 6, 4)],  # a two-frame grid (t > 1) then an image
    ],
)
def test_single_sequence_matches_transformers(hf_model, grids):
    input_ids = torch.tensor([multi_turn_sequence(grids)])
    grid = torch.tensor(grids)
    expected_positions, expected_deltas = reference(hf_model, input_ids, grid)
    positions, deltas = get_rope_index(input_ids, grid, image_token_id=IMAGE, spatial_merge_size=MERGE)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(deltas, expected_deltas)


def test_image_first_last_and_adjacent_to_text(hf_model):
    grids = [(1, 4, 6), (1, 6, 4)]
    ids = [IMAGE] * image_num_tokens(grids[0], MERGE) + text(3) + [IMAGE] * image_num_tokens(grids[1], MERGE)
    input_ids, grid = torch.tensor([ids]), torch.tensor(grids)
    expected, expected_deltas = reference(hf_model, input_ids, grid)
    positions, deltas = get_rope_index(input_ids, grid, image_token_id=IMAGE, spatial_merge_size=MERGE)
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_transformers(hf_model, padding_side):
    rows = [
        (multi_turn_sequence([(1, 8, 12), (1, 4, 4)]), [(1, 8, 12), (1, 4, 4)]),
        (text(20), []),  # a text-only row between image rows
        (multi_turn_sequence([(1, 6, 10)]), [(1, 6, 10)]),
    ]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, (ids, _) in enumerate(rows):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        mask[row, span] = 1
    grid = torch.tensor([g for _, grids in rows for g in grids])
    expected, expected_deltas = reference(hf_model, input_ids, grid, mask)
    positions, deltas = get_rope_index(
        input_ids, grid, image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask_BS=mask
    )
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas)


def test_positions_follow_the_documented_rule():
    """Image (t, h, w) = (2, 4, 6) after 3 text tokens: base 3, rows/cols offset from it, text resumes at 3 + 3."""
    grid = (2, 4, 6)
    ids = torch.tensor(text(3) + [IMAGE] * image_num_tokens(grid, MERGE) + text(2))
    positions, next_position = sequence_position_ids(
        ids, torch.tensor([grid]), image_token_id=IMAGE, spatial_merge_size=MERGE
    )
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3
    image_part = positions[:, 3:-2].reshape(3, 2, 2, 3)  # (axis, frame, row, col)
    assert image_part[0].flatten().tolist() == [3] * 6 + [4] * 6
    assert image_part[1, 1].tolist() == [[3, 3, 3], [4, 4, 4]]
    assert image_part[2, 0].tolist() == [[3, 4, 5], [3, 4, 5]]
    assert positions[:, -2:].tolist() == [[6, 7]] * 3
    assert next_position == 8


def test_start_position_offsets_a_continuation():
    ids = torch.tensor(text(2) + [IMAGE] * 4 + text(1))
    grid = torch.tensor([[1, 4, 4]])
    base, _ = sequence_position_ids(ids, grid, image_token_id=IMAGE, spatial_merge_size=MERGE)
    shifted, next_position = sequence_position_ids(
        ids, grid, image_token_id=IMAGE, spatial_merge_size=MERGE, start_position=10
    )
    assert torch.equal(shifted, base + 10) and next_position == int(base.max()) + 11


def test_mismatched_images_are_value_errors():
    grid = torch.tensor([[1, 4, 4]])
    four = [IMAGE] * 4
    with pytest.raises(ValueError, match="4 image token.*left in a row but image_grid_thw has no more images"):
        get_rope_index(torch.tensor([text(2) + four + text(1) + four]), grid, image_token_id=IMAGE,
                       spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="lists 2 image.*contains 1"):
        sequence_position_ids(torch.tensor(text(2) + four), torch.tensor([[1, 4, 4], [1, 4, 4]]),
                              image_token_id=IMAGE, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="needs 4 consecutive image tokens from index 2, found 3"):
        sequence_position_ids(torch.tensor(text(2) + [IMAGE] * 3 + text(1)), grid, image_token_id=IMAGE,
                              spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="lists only 1 image"):
        sequence_position_ids(torch.tensor(four + text(1) + four), grid, image_token_id=IMAGE,
                              spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="multiples of the spatial merge size"):
        sequence_position_ids(torch.tensor([IMAGE] * 3), torch.tensor([[1, 3, 4]]), image_token_id=IMAGE,
                              spatial_merge_size=MERGE)
