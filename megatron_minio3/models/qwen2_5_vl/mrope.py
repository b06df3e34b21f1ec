"""Qwen2.5-VL multimodal rotary position ids (3D: temporal, height, width), as pure functions.

Rules (identical to the reference ``get_rope_index`` for images):
* a text token gets the same value on all three axes, one more than the previous text token;
* an image occupies ``t * (h/m) * (w/m)`` consecutive ``<|image_pad|>`` tokens (m = spatial merge size),
  laid out frame by frame, row by row; with ``base`` = the position the next text token would have had,
  its token at (frame, row, col) gets (base + frame, base + row, base + col);
* after an image, text resumes at ``base + max(h/m, w/m)``.
Images are consumed in order from ``image_grid_thw`` across the whole batch (original image first, then
each crop, as they were inserted). Video tokens are not supported by this stack.
"""
from __future__ import annotations

import torch


def image_num_tokens(grid_thw: torch.Tensor | tuple[int, int, int], spatial_merge_size: int) -> int:
    """Number of LLM tokens (after the spatial merge) of one image with patch grid (t, h, w)."""
    t, h, w = (int(x) for x in grid_thw)
    return t * (h // spatial_merge_size) * (w // spatial_merge_size)


def sequence_position_ids(
    input_ids_S: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    start_position: int = 0,
) -> tuple[torch.Tensor, int]:
    """3D positions of one unpadded sequence.

    Returns (position_ids_3S, next_position): ``next_position`` is where a following text token would be
    placed (``max position + 1``), which is what incremental decoding continues from.
    ``image_grid_thw_N3`` must list exactly the images of this sequence, in order.
    """
    if input_ids_S.dim() != 1:
        raise ValueError(f"input_ids must be 1-D for one sequence, got shape {tuple(input_ids_S.shape)}")
    num_tokens = input_ids_S.shape[0]
    is_image_S = (input_ids_S == image_token_id).tolist()
    grids = [] if image_grid_thw_N3 is None else [tuple(int(x) for x in g) for g in image_grid_thw_N3.tolist()]

    chunks: list[torch.Tensor] = []
    position = start_position
    image_index = 0
    cursor = 0
    while cursor < num_tokens:
        if not is_image_S[cursor]:
            run_end = cursor
            while run_end < num_tokens and not is_image_S[run_end]:
                run_end += 1
            chunks.append(torch.arange(position, position + run_end - cursor).expand(3, -1))
            position += run_end - cursor
            cursor = run_end
            continue
        if image_index >= len(grids):
            raise ValueError(
                f"image token at index {cursor} but image_grid_thw lists only {len(grids)} image(s)"
            )
        t, h, w = grids[image_index]
        if h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(
                f"image_grid_thw[{image_index}] = {(t, h, w)}: h and w must be multiples of the spatial merge "
                f"size {spatial_merge_size}"
            )
        rows, cols = h // spatial_merge_size, w // spatial_merge_size
        length = t * rows * cols
        run = is_image_S[cursor : cursor + length]
        if len(run) < length or not all(run):
            num_consecutive = run.index(False) if False in run else len(run)
            raise ValueError(
                f"image {image_index} (grid_thw {(t, h, w)}) needs {length} consecutive image tokens from index "
                f"{cursor}, found {num_consecutive}"
            )
        frame_ids = torch.arange(t).view(t, 1, 1).expand(t, rows, cols)
        row_ids = torch.arange(rows).view(1, rows, 1).expand(t, rows, cols)
        col_ids = torch.arange(cols).view(1, 1, cols).expand(t, rows, cols)
        chunks.append(torch.stack([frame_ids, row_ids, col_ids]).reshape(3, length) + position)
        position += max(rows, cols)
        cursor += length
        image_index += 1
    if image_index != len(grids):
        raise ValueError(
            f"image_grid_thw lists {len(grids)} image(s) but the sequence contains {image_index}"
        )
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long), position
    position_ids_3S = torch.cat(chunks, dim=1).long()
    return position_ids_3S, int(position_ids_3S.max()) + 1


def get_rope_index(
    input_ids_BS: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched 3D position ids [3, B, S] and rope deltas [B, 1] (max position + 1 - number of tokens).

    Padding (attention_mask == 0, on either side) gets position 0 and is skipped when counting.
    ``image_grid_thw_N3`` lists the images of all rows, row by row, each row's in order.
    """
    if input_ids_BS.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids_BS.shape)}")
    if attention_mask_BS is not None and attention_mask_BS.shape != input_ids_BS.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask_BS.shape)} != input_ids shape {tuple(input_ids_BS.shape)}"
        )
    batch_size, seq_len = input_ids_BS.shape
    position_ids_3BS = torch.zeros(3, batch_size, seq_len, dtype=torch.long)
    deltas = []
    first_image = 0
    for row in range(batch_size):
        keep_S = (
            torch.ones(seq_len, dtype=torch.bool) if attention_mask_BS is None else attention_mask_BS[row].bool().cpu()
        )
        ids_S = input_ids_BS[row].cpu()[keep_S]
        num_images = int(_count_images(ids_S, image_grid_thw_N3, first_image, image_token_id, spatial_merge_size))
        grids = None if image_grid_thw_N3 is None else image_grid_thw_N3[first_image : first_image + num_images]
        positions_3S, next_position = sequence_position_ids(
            ids_S, grids, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size
        )
        position_ids_3BS[:, row, keep_S] = positions_3S
        deltas.append(next_position - ids_S.shape[0])
        first_image += num_images
    num_listed = 0 if image_grid_thw_N3 is None else image_grid_thw_N3.shape[0]
    if first_image != num_listed:
        raise ValueError(f"image_grid_thw lists {num_listed} image(s) but the batch contains {first_image}")
    return position_ids_3BS.to(input_ids_BS.device), torch.tensor(deltas, device=input_ids_BS.device).view(-1, 1)


def _count_images(
    ids_S: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    first_image: int,
    image_token_id: int,
    spatial_merge_size: int,
) -> int:
    """How many of the listed images (starting at first_image) this row's image tokens account for."""
    remaining = int((ids_S == image_token_id).sum())
    count = 0
    while remaining > 0:
        if image_grid_thw_N3 is None or first_image + count >= image_grid_thw_N3.shape[0]:
            raise ValueError(
                f"{remaining} image token(s) left in a row but image_grid_thw has no more images "
                f"(used {first_image + count})"
            )
        remaining -= image_num_tokens(image_grid_thw_N3[first_image + count], spatial_merge_size)
        count += 1
    if remaining < 0:
        raise ValueError("image tokens of a row do not add up to whole images of image_grid_thw")
    return count
