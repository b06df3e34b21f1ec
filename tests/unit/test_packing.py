import pytest
import torch

from megatron_minio3.algorithms.policy_loss import policy_loss
from megatron_minio3.config.algorithm import PackingConfig
from megatron_minio3.packing import (
    PackingItem,
    block_causal_mask,
    pack_mini_batch,
    pack_sequences,
    padding_multiple,
)

IMAGE_TOKEN = 99


def text_positions(length, offset=0):
    return (torch.arange(length) + offset).expand(3, length).clone()


def hand_items():
    first = PackingItem(
        token_ids=torch.tensor([11, 12, 13]),
        loss_mask=torch.tensor([0, 1, 1]),
        position_ids=text_positions(3),
        token_values={"old_logprobs": torch.tensor([0.0, -0.5, -0.25])},
    )
    # 2 image placeholders for one 1x4x2 image (8 patches / 2^2 after the merge)
    second = PackingItem(
        token_ids=torch.tensor([21, IMAGE_TOKEN, IMAGE_TOKEN, 22, 23]),
        loss_mask=torch.tensor([0, 0, 0, 1, 1]),
        position_ids=torch.tensor([[0, 1, 1, 3, 4], [0, 1, 1, 3, 4], [0, 1, 2, 3, 4]]),
        pixel_values=torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4),
        image_grid_thw=torch.tensor([[1, 4, 2]]),
        token_values={"old_logprobs": torch.tensor([0.0, 0.0, 0.0, -1.0, -2.0])},
    )
    return [first, second]


def test_pack_two_sequences_by_hand():
    packed = pack_sequences(hand_items(), [7, 3], pad_multiple=2, pad_token_id=0)
    # slots of 4 and 6 positions
    assert packed.cu_seqlens_padded.tolist() == [0, 4, 10]
    assert packed.cu_seqlens_padded.dtype == torch.int32
    assert packed.seq_lens.tolist() == [3, 5]
    assert packed.input_ids_T.tolist() == [11, 12, 13, 0, 21, 99, 99, 22, 23, 0]
    assert packed.labels_T.tolist() == [12, 13, 0, 0, 99, 99, 22, 23, 0, 0]
    assert packed.loss_mask_T.tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert packed.token_values_T["old_logprobs"].tolist() == [-0.5, -0.25, 0, 0, 0, 0, -1.0, -2.0, 0, 0]
    assert packed.seq_ids_T.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert packed.position_ids_3T[:, :4].tolist() == [[0, 1, 2, 3]] * 3
    assert packed.position_ids_3T[:, 4:].tolist() == [[0, 1, 1, 3, 4, 5], [0, 1, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert packed.sample_indices == [7, 3]
    assert torch.equal(packed.pixel_values, hand_items()[1].pixel_values)
    assert packed.image_grid_thw.tolist() == [[1, 4, 2]]
    assert (packed.num_tokens, packed.num_real_tokens, packed.max_seqlen_padded) == (10, 8, 6)
    counts = packed.loss_counts()
    assert (counts.num_tokens, counts.num_seqs) == (4, 2)


def test_images_stay_in_slot_order():
    def image_item(value, grid):
        num_rows = int(torch.tensor(grid).prod())
        return PackingItem(
            token_ids=torch.tensor([1] + [IMAGE_TOKEN] * (num_rows // 4) + [2]),
            loss_mask=torch.zeros(num_rows // 4 + 2, dtype=torch.long),
            position_ids=text_positions(num_rows // 4 + 2),
            pixel_values=torch.full((num_rows, 3), float(value)),
            image_grid_thw=torch.tensor([grid]),
        )

    text_only = PackingItem(torch.tensor([5, 6]), torch.tensor([0, 1]), text_positions(2))
    items = [image_item(1, [1, 2, 2]), text_only, image_item(2, [1, 4, 4])]
    packed = pack_sequences(items, [0, 1, 2], pad_multiple=1)
    assert packed.image_grid_thw.tolist() == [[1, 2, 2], [1, 4, 4]]
    assert packed.pixel_values[:, 0].tolist() == [1.0] * 4 + [2.0] * 16
    assert pack_sequences([text_only], [0], pad_multiple=1).pixel_values is None


def test_unpack_returns_token_aligned_values():
    items = hand_items()
    packed = pack_sequences(items, [0, 1], pad_multiple=4)
    unpacked = packed.unpack(packed.token_values_T["old_logprobs"])
    for item, values in zip(items, unpacked):
        assert torch.equal(values, item.token_values["old_logprobs"])  # entry 0 is 0 in the inputs too
    two_columns = packed.unpack(torch.stack([packed.labels_T, packed.labels_T], dim=1))
    assert two_columns[1][:, 0].tolist() == [0, 99, 99, 22, 23]


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32))
    allowed = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert (~mask[0, 0]).int().tolist() == allowed


def test_packed_seq_params_use_the_slot_boundaries():
    from megatron_minio3.workers.actor.step import ForwardOptions, model_inputs

    packed = pack_sequences(hand_items(), [0, 1], pad_multiple=2)
    options = ForwardOptions(temperature=1.0, vocab_size=100, device=torch.device("cpu"))
    params = model_inputs(packed, options)["packed_seq_params"]
    assert params.qkv_format == "thd" and params.shard is None and params.images is None
    assert params.cu_seqlens_q.tolist() == [0, 4, 10] and params.cu_seqlens_kv_padded.tolist() == [0, 4, 10]
    assert params.max_seqlen_q == 6


def test_padding_multiple():
    assert padding_multiple(1) == 1
    assert padding_multiple(4) == 4
    assert padding_multiple(2, cp_size=2) == 8
    with pytest.raises(ValueError):
        padding_multiple(0)


def test_item_validation():
    with pytest.raises(ValueError, match="position_ids"):
        PackingItem(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask"):
        PackingItem(torch.tensor([1, 2]), torch.tensor([0, 2]), text_positions(2))
    with pytest.raises(ValueError, match="rows"):
        PackingItem(
            torch.tensor([1, 2]), torch.tensor([0, 1]), text_positions(2),
            pixel_values=torch.zeros(5, 3), image_grid_thw=torch.tensor([[1, 2, 2]]),
        )
    with pytest.raises(ValueError, match="together"):
        PackingItem(torch.tensor([1, 2]), torch.tensor([0, 1]), text_positions(2), pixel_values=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="non-empty"):
        PackingItem(torch.tensor([], dtype=torch.long), torch.tensor([]), torch.zeros(3, 0, dtype=torch.long))
    bad_placeholders = hand_items()[1]
    bad_placeholders.token_ids = torch.tensor([21, IMAGE_TOKEN, 5, 22, 23])
    with pytest.raises(ValueError, match="1 image placeholder tokens but its images need 2"):
        bad_placeholders.check_image_tokens(IMAGE_TOKEN, spatial_merge_size=2)
    with pytest.raises(ValueError, match="same token_values"):
        first, second = hand_items()
        second.token_values = {}
        pack_sequences([first, second], [0, 1], pad_multiple=1)


def random_items(num, seed, vocab=17):
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index in range(num):
        length = int(torch.randint(3, 40, (1,), generator=generator))
        loss_mask = (torch.rand(length, generator=generator) < 0.6).long()
        loss_mask[: length // 3] = 0
        if index % 5 == 4:
            loss_mask[:] = 0  # an exceeded trajectory, fully masked
        items.append(
            PackingItem(
                token_ids=torch.randint(0, vocab, (length,), generator=generator),
                loss_mask=loss_mask,
                position_ids=text_positions(length),
                token_values={
                    "old_logprobs": -torch.rand(length, generator=generator, dtype=torch.float64) * 3,
                    "advantages": torch.full((length,), float(torch.randn(1, generator=generator)), dtype=torch.float64),
                },
            )
        )
    return items


@pytest.mark.parametrize("dp_size,tp_size,cp_size", [(1, 1, 1), (2, 2, 1), (3, 1, 2)])
def test_mini_batch_partition_budget_and_padding(dp_size, tp_size, cp_size):
    items = random_items(23, seed=dp_size)
    config = PackingConfig(max_tokens_per_microbatch=96)
    packed = pack_mini_batch(items, config, dp_size=dp_size, tp_size=tp_size, cp_size=cp_size)
    multiple = padding_multiple(tp_size, cp_size)
    assert len(packed.micro_batches) == dp_size and all(packed.micro_batches)
    seen = sorted(i for rank in packed.micro_batches for mb in rank for i in mb.sample_indices)
    assert seen == list(range(len(items)))
    for rank in packed.micro_batches:
        for mb in rank:
            assert mb.num_tokens <= 96 and mb.num_tokens % multiple == 0
            assert all(int(n) % multiple == 0 for n in mb.cu_seqlens_padded)
    assert packed.num_real_tokens == sum(item.length for item in items)
    expected_tokens = sum(int(item.loss_mask[1:].sum()) for item in items)
    expected_seqs = sum(int(item.loss_mask[1:].sum() > 0) for item in items)
    assert (packed.loss_counts.num_tokens, packed.loss_counts.num_seqs) == (expected_tokens, expected_seqs)


class BigramPolicy(torch.nn.Module):
    """A real (tiny) language model whose log-prob of token t+1 depends on token t only."""

    def __init__(self, vocab=17):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.float64))

    def forward(self, input_ids_T, labels_T):
        return torch.log_softmax(self.table[input_ids_T], dim=-1).gather(-1, labels_T[:, None]).squeeze(-1)


def mini_batch_loss_and_grad(items, agg_mode, **pack_kwargs):
    """Loss summed over every micro-batch of every rank, and the gradient summed over ranks (the DP all-reduce)."""
    packed = pack_mini_batch(items, **pack_kwargs)
    rank_grads, total_loss = [], 0.0
    for rank_micro_batches in packed.micro_batches:
        model = BigramPolicy()
        for mb in rank_micro_batches:
            logprobs_T = model(mb.input_ids_T, mb.labels_T)
            out = policy_loss(
                logprobs_T, mb.token_values_T["old_logprobs"], mb.token_values_T["advantages"], mb.loss_mask_T,
                0.2, 0.3, agg_mode, seq_ids=mb.seq_ids_T,
                global_num_tokens=packed.loss_counts.num_tokens, global_num_seqs=packed.loss_counts.num_seqs,
            )
            out.loss.backward()
            total_loss += out.loss.item()
        rank_grads.append(model.table.grad)
    return total_loss, torch.stack(rank_grads).sum(0), sum(len(rank) for rank in packed.micro_batches)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_and_grads_do_not_depend_on_the_split(agg_mode):
    items = random_items(20, seed=5)
    one_big = mini_batch_loss_and_grad(items, agg_mode, config=PackingConfig(max_tokens_per_microbatch=4096), dp_size=1)
    many = mini_batch_loss_and_grad(items, agg_mode, config=PackingConfig(max_tokens_per_microbatch=64), dp_size=1)
    dp2 = mini_batch_loss_and_grad(
        items, agg_mode, config=PackingConfig(max_tokens_per_microbatch=64), dp_size=2, tp_size=2
    )
    assert one_big[2] == 1 and many[2] > 4 and dp2[2] > 4
    for loss, grad, _ in (many, dp2):
        assert loss == pytest.approx(one_big[0], rel=1e-12, abs=1e-12)
        torch.testing.assert_close(grad, one_big[1], rtol=1e-10, atol=1e-12)
    assert one_big[1].abs().sum() > 0
