"""THD packing: variable-length multimodal sequences laid end to end in one [T] token stream.

Inputs are token-aligned (`PackingItem`: entry i belongs to token i). The packed micro-batch is label-aligned:
position t holds token t of the stream and everything needed to score the *next* token of the same sequence
(`labels_T[t]`, `loss_mask_T[t]`, `token_values_T[...][t]` all describe token t + 1). The last real token of a
sequence and all padding have no label (label 0, mask 0).

Each sequence occupies a slot padded to a multiple of `pad_multiple` (TP, or 2 * CP * TP with context
parallelism); `cu_seqlens_padded` holds the slot boundaries, so the stream length is a multiple too. Padding
sits after the real tokens of its slot, so under causal attention no real token ever sees it.
Images stay aligned with their sequences: `pixel_values` rows and `image_grid_thw` rows of the packed batch
are the concatenation of the items' own, in slot order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_minio3.algorithms.policy_loss import LossCounts, count_loss_tokens_and_seqs


@dataclass
class PackingItem:
    """One trajectory, token-aligned: entry i of every per-token tensor belongs to token i."""

    token_ids: Tensor  # [L] int64
    loss_mask: Tensor  # [L] 0/1: 1 on tokens the model generated and should learn from
    position_ids: Tensor  # [3, L] int64 mrope (t, h, w) positions
    pixel_values: Tensor | None = None  # [P, D] rows of this trajectory's images, in image order
    image_grid_thw: Tensor | None = None  # [num_images, 3]; sum of t*h*w over images == P
    token_values: dict[str, Tensor] = field(default_factory=dict)  # [L] per-token floats (old_logprobs, ...)

    def __post_init__(self) -> None:
        length = self.token_ids.shape[0] if self.token_ids.dim() == 1 else -1
        if length < 1:
            raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(self.token_ids.shape)}")
        if self.loss_mask.shape != (length,):
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} must be shaped like token_ids ({length},)")
        if not ((self.loss_mask == 0) | (self.loss_mask == 1)).all():
            raise ValueError("loss_mask must contain only 0 and 1")
        if self.position_ids.shape != (3, length):
            raise ValueError(f"position_ids {tuple(self.position_ids.shape)} must be (3, {length}) mrope positions")
        for name, values in self.token_values.items():
            if values.shape != (length,):
                raise ValueError(f"token_values[{name!r}] {tuple(values.shape)} must be ({length},)")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if self.image_grid_thw is not None:
            if self.image_grid_thw.dim() != 2 or self.image_grid_thw.shape[1] != 3:
                raise ValueError(f"image_grid_thw must be [num_images, 3], got {tuple(self.image_grid_thw.shape)}")
            num_rows = int(self.image_grid_thw.prod(dim=1).sum())
            if self.pixel_values.dim() != 2 or self.pixel_values.shape[0] != num_rows:
                raise ValueError(
                    f"pixel_values {tuple(self.pixel_values.shape)} must have sum(t*h*w) = {num_rows} rows"
                )

    @property
    def length(self) -> int:
        return self.token_ids.shape[0]

    def check_image_tokens(self, image_token_id: int, spatial_merge_size: int) -> None:
        """Raises ValueError unless the image placeholders in token_ids match the images' merged patches."""
        num_placeholders = int((self.token_ids == image_token_id).sum())
        expected = 0
        if self.image_grid_thw is not None:
            expected = int(self.image_grid_thw.prod(dim=1).sum()) // (spatial_merge_size**2)
        if num_placeholders != expected:
            raise ValueError(
                f"sequence has {num_placeholders} image placeholder tokens but its images need {expected} "
                f"(sum(t*h*w) / {spatial_merge_size}^2)"
            )


@dataclass
class PackedMicroBatch:
    """Label-aligned THD micro-batch (see the module docstring). T is a multiple of the padding multiple."""

    input_ids_T: Tensor  # [T] int64
    position_ids_3T: Tensor  # [3, T] int64
    labels_T: Tensor  # [T] int64: token t + 1 of the same sequence, 0 where there is none
    loss_mask_T: Tensor  # [T] float32: 1 where labels_T is a generated token to learn from
    seq_ids_T: Tensor  # [T] int64: slot index (0..S-1) of every position, padding included
    cu_seqlens_padded: Tensor  # [S + 1] int32 slot boundaries
    seq_lens: Tensor  # [S] int32 real lengths
    sample_indices: list[int]  # index of each slot's sequence in the caller's list
    pixel_values: Tensor | None  # [P, D] or None when no sequence has images
    image_grid_thw: Tensor | None  # [num_images, 3]
    token_values_T: dict[str, Tensor]  # label-aligned per-token values, 0 where there is no label

    @property
    def num_tokens(self) -> int:
        return self.input_ids_T.shape[0]

    @property
    def num_real_tokens(self) -> int:
        return int(self.seq_lens.sum())

    @property
    def max_seqlen_padded(self) -> int:
        return int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())

    def loss_counts(self) -> LossCounts:
        return count_loss_tokens_and_seqs(self.loss_mask_T, self.seq_ids_T)

    def loss_tokens_per_sequence(self) -> Tensor:
        """[T] float64: the number of loss tokens of each position's sequence (n_s of the seq-mean loss modes)."""
        per_slot_S = torch.bincount(self.seq_ids_T, weights=self.loss_mask_T.double(), minlength=len(self.seq_lens))
        return per_slot_S[self.seq_ids_T]

    def attention_mask(self) -> Tensor:
        """Block-diagonal causal mask [1, 1, T, T] for megatron's local attention (True = masked out)."""
        return block_causal_mask(self.cu_seqlens_padded)

    def unpack(self, values_T: Tensor) -> list[Tensor]:
        """Label-aligned [T, ...] values (e.g. log-probs) back to token-aligned [L, ...] per slot.

        Entry i of slot s is the value computed at position start_s + i - 1 (the prediction of token i);
        entry 0 (the first token has no prediction) is 0.
        """
        if values_T.shape[0] != self.num_tokens:
            raise ValueError(f"values have {values_T.shape[0]} positions, the micro-batch {self.num_tokens}")
        starts = self.cu_seqlens_padded[:-1].tolist()
        out = []
        for start, length in zip(starts, self.seq_lens.tolist()):
            token_aligned = torch.zeros((length, *values_T.shape[1:]), dtype=values_T.dtype, device=values_T.device)
            token_aligned[1:] = values_T[start : start + length - 1]
            out.append(token_aligned)
        return out


def padding_multiple(tp_size: int, cp_size: int = 1) -> int:
    """Slot lengths must be multiples of TP (sequence parallel), and of 2 * CP * TP with context parallel."""
    if tp_size < 1 or cp_size < 1:
        raise ValueError(f"tp_size and cp_size must be >= 1, got {tp_size} and {cp_size}")
    return tp_size if cp_size == 1 else 2 * cp_size * tp_size


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def block_causal_mask(cu_seqlens_padded: Tensor) -> Tensor:
    """[1, 1, T, T] bool, True where query i may NOT attend key j: different slots, or j after i."""
    slot_lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).long()
    slot_T = torch.repeat_interleave(torch.arange(slot_lengths.numel()), slot_lengths)
    positions = torch.arange(slot_T.numel())
    blocked_TT = (slot_T[:, None] != slot_T[None, :]) | (positions[None, :] > positions[:, None])
    return blocked_TT[None, None]


def pack_sequences(
    items: list[PackingItem],
    sample_indices: list[int],
    pad_multiple: int,
    pad_token_id: int = 0,
) -> PackedMicroBatch:
    """Pack `items` (the caller's sequences `sample_indices`) into one label-aligned micro-batch."""
    if not items or len(items) != len(sample_indices):
        raise ValueError(f"need one sample index per item and at least one item, got {len(items)} and "
                         f"{len(sample_indices)}")
    value_names = set(items[0].token_values)
    for item in items:
        if set(item.token_values) != value_names:
            raise ValueError(f"all items need the same token_values, got {sorted(item.token_values)} and "
                             f"{sorted(value_names)}")
    lengths = [item.length for item in items]
    slot_lengths = [padded_length(n, pad_multiple) for n in lengths]
    cu_seqlens_padded = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seqlens_padded[1:] = torch.tensor(slot_lengths).cumsum(0)
    num_tokens = int(cu_seqlens_padded[-1])

    input_ids_T = torch.full((num_tokens,), pad_token_id, dtype=torch.long)
    position_ids_3T = torch.zeros((3, num_tokens), dtype=torch.long)
    labels_T = torch.zeros(num_tokens, dtype=torch.long)
    loss_mask_T = torch.zeros(num_tokens, dtype=torch.float32)
    seq_ids_T = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(slot_lengths))
    token_values_T = {
        name: torch.zeros(num_tokens, dtype=items[0].token_values[name].dtype) for name in sorted(value_names)
    }
    for item, start, length, slot_length in zip(items, cu_seqlens_padded.tolist(), lengths, slot_lengths):
        end = start + length
        input_ids_T[start:end] = item.token_ids
        position_ids_3T[:, start:end] = item.position_ids
        # padding continues the positions (it is never attended to by real tokens)
        position_ids_3T[:, end : start + slot_length] = (
            item.position_ids.max() + 1 + torch.arange(slot_length - length)
        )
        labels_T[start : end - 1] = item.token_ids[1:]
        loss_mask_T[start : end - 1] = item.loss_mask[1:].to(torch.float32)
        for name, values in item.token_values.items():
            token_values_T[name][start : end - 1] = values[1:]

    with_images = [item for item in items if item.pixel_values is not None]
    pixel_values = torch.cat([item.pixel_values for item in with_images]) if with_images else None
    image_grid_thw = torch.cat([item.image_grid_thw for item in with_images]) if with_images else None
    return PackedMicroBatch(
        input_ids_T=input_ids_T,
        position_ids_3T=position_ids_3T,
        labels_T=labels_T,
        loss_mask_T=loss_mask_T,
        seq_ids_T=seq_ids_T,
        cu_seqlens_padded=cu_seqlens_padded,
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        sample_indices=list(sample_indices),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        token_values_T=token_values_T,
    )
