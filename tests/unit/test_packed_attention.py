"""Varlen (packed) attention equals the masked reference; context-parallel shard layout and image assignment."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_minio3.models.qwen2_5_vl.attention import _sdpa, varlen_causal_attention
from megatron_minio3.packing.thd import block_causal_mask
from megatron_minio3.parallel.context_parallel import assign_images, chunk_owner, shard_indices


def masked_reference(q_TND, k_TGD, v_TGD, cu_seqlens, scale):
    """Plain softmax attention over the whole stream with the [T, T] block-causal mask (the old path)."""
    heads, groups = q_TND.shape[1], k_TGD.shape[1]
    k = k_TGD.repeat_interleave(heads // groups, dim=1)
    v = v_TGD.repeat_interleave(heads // groups, dim=1)
    scores_NTT = torch.einsum("tnd,snd->nts", q_TND, k) * scale
    scores_NTT = scores_NTT.masked_fill(block_causal_mask(cu_seqlens)[0], float("-inf"))
    return torch.einsum("nts,snd->tnd", scores_NTT.softmax(-1), v)


@pytest.mark.parametrize("lengths,heads,groups", [([5, 1, 12, 7], 4, 2), ([16], 2, 2), ([3, 9], 6, 1)])
def test_varlen_attention_equals_the_masked_reference_with_gradients(lengths, heads, groups):
    torch.manual_seed(0)
    T, D = sum(lengths), 8
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(T, heads, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, groups, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, groups, D, dtype=torch.float64, requires_grad=True)
    scale = 1 / math.sqrt(D)
    out = varlen_causal_attention(q, k, v, cu, scale)
    ref = masked_reference(q, k, v, cu, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_query_chunk_sees_keys_up_to_its_own_position():
    """Bottom-right causal: chunk queries at positions 4..7 over keys 0..7 equal rows 4..7 of full causal."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(8, 2, 4, dtype=torch.float64) for _ in range(3))
    full = _sdpa(q, k, v, 0.5, query_offset=0)
    torch.testing.assert_close(_sdpa(q[4:], k, v, 0.5, query_offset=4), full[4:], rtol=0, atol=1e-12)
    torch.testing.assert_close(_sdpa(q[2:4], k[:4], v[:4], 0.5, query_offset=2), full[2:4], rtol=0, atol=1e-12)


def test_shard_indices_cover_every_token_once_and_balance_causal_work():
    cu = torch.tensor([0, 8, 24, 32], dtype=torch.int32)  # slots of 8, 16, 8 tokens at cp 2 (chunks 2, 4, 2)
    shards = [shard_indices(cu, 2, rank) for rank in range(2)]
    assert shards[0].tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 30, 31]
    assert sorted(torch.cat(shards).tolist()) == list(range(32))
    # causal work of a query = its position in the slot + 1: both ranks get the same total
    starts = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    work = [int((index - starts[index] + 1).sum()) for index in shards]
    assert work[0] == work[1]
    assert chunk_owner(0, 2) == (0, 0) and chunk_owner(3, 2) == (0, 1) and chunk_owner(2, 2) == (1, 1)


def test_shard_indices_refuse_a_slot_not_divisible_by_two_cp():
    with pytest.raises(ValueError, match="slot 1 has 6 tokens, not a multiple of 2 \\* cp = 4"):
        shard_indices(torch.tensor([0, 8, 14], dtype=torch.int32), 2, 0)


def test_images_go_to_one_rank_each_and_loads_stay_within_the_largest_image():
    patches = [64, 16, 16, 32, 4, 100]
    owner = assign_images(patches, 3)
    loads = [sum(p for p, r in zip(patches, owner) if r == rank) for rank in range(3)]
    assert sorted(set(owner)) == [0, 1, 2]
    assert max(loads) - min(loads) <= max(patches)
    assert assign_images([], 2) == [] and assign_images([5], 4) == [0]
