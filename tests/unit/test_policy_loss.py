import math

import pytest
import torch

from megatron_minio3.algorithms.filters import mask_exceeded
from megatron_minio3.algorithms.policy_loss import count_loss_tokens_and_seqs, policy_loss

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
NAN = float("nan")


def hand_batch():
    """Rows: A (adv +1, ratios 1.5 and 1.0), B (adv -2, ratios 0.5, 1.2, 2.0), C fully masked with NaNs."""
    ratios = torch.tensor(
        [[1.5, 1.0, 1.0, 1.0], [0.5, 1.2, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )
    old_logprobs = torch.tensor([[-1.0, -2.0, NAN, NAN], [-0.5, -1.5, -3.0, NAN], [NAN] * 4], dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()).clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, NAN, NAN], [-2.0, -2.0, -2.0, NAN], [NAN] * 4], dtype=torch.float64)
    loss_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    return logprobs, old_logprobs, advantages, loss_mask


# per-token losses: A -> [-1.3 (clipped at 1.3), -1.0]; B -> [1.6 (clipped at 0.8), 2.4, 4.0 (unclipped)]
HAND_LOSS = {"token-mean": 5.7 / 5, "seq-mean-token-mean": (-2.3 / 2 + 8.0 / 3) / 2, "seq-mean-token-sum": 5.7 / 2}
# d loss / d logprobs = weight * (-A * ratio) on unclipped tokens, 0 on clipped ones
HAND_GRAD_NUMERATOR = torch.tensor([[0.0, -1.0, 0, 0], [0.0, 2.4, 4.0, 0], [0, 0, 0, 0]], dtype=torch.float64)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_hand_computed_loss_gradient_and_metrics(agg_mode):
    logprobs, old_logprobs, advantages, loss_mask = hand_batch()
    out = policy_loss(logprobs, old_logprobs, advantages, loss_mask, 0.2, 0.3, agg_mode)
    torch.testing.assert_close(out.loss, torch.tensor(HAND_LOSS[agg_mode], dtype=torch.float64))
    out.loss.backward()
    weights = {
        "token-mean": torch.full((3, 1), 1 / 5),
        "seq-mean-token-mean": torch.tensor([[1 / 4], [1 / 6], [0.0]]),
        "seq-mean-token-sum": torch.full((3, 1), 1 / 2),
    }[agg_mode].to(torch.float64)
    torch.testing.assert_close(logprobs.grad, HAND_GRAD_NUMERATOR * weights)
    metrics = out.metrics
    torch.testing.assert_close(metrics.clip_fraction, torch.tensor(0.4, dtype=torch.float64))
    expected_ppo_kl = -(math.log(1.5) + math.log(0.5) + math.log(1.2) + math.log(2.0)) / 5
    torch.testing.assert_close(metrics.ppo_kl, torch.tensor(expected_ppo_kl, dtype=torch.float64))
    torch.testing.assert_close(metrics.pg_loss, torch.tensor(5.7 / 5, dtype=torch.float64))
    assert metrics.entropy is None and metrics.kl is None
    assert set(metrics.as_dict()) == {"pg_loss", "clip_fraction", "ppo_kl"}


def random_packed_batch(seed, dtype=torch.float64, seq_lens=(5, 9, 3, 12, 7, 4)):
    generator = torch.Generator().manual_seed(seed)
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(seq_lens)])
    num_tokens = seq_ids.numel()
    old_logprobs = -torch.rand(num_tokens, generator=generator, dtype=dtype) * 3
    logprobs = (old_logprobs + 0.4 * torch.randn(num_tokens, generator=generator, dtype=dtype)).requires_grad_(True)
    advantages = torch.randn(len(seq_lens), generator=generator, dtype=dtype)[seq_ids]
    loss_mask = (torch.rand(num_tokens, generator=generator) < 0.7).to(dtype)
    loss_mask[seq_ids == 2] = 0  # one fully masked sequence
    entropy = torch.rand(num_tokens, generator=generator, dtype=dtype).requires_grad_(True)
    ref_logprobs = old_logprobs + 0.1 * torch.randn(num_tokens, generator=generator, dtype=dtype)
    return dict(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, loss_mask=loss_mask,
        seq_ids=seq_ids, entropy=entropy, ref_logprobs=ref_logprobs,
    )


def run_loss(batch, agg_mode, select=None, **counts):
    def take(t):
        return t if select is None else t[select]

    return policy_loss(
        take(batch["logprobs"]), take(batch["old_logprobs"]), take(batch["advantages"]), take(batch["loss_mask"]),
        0.2, 0.28, agg_mode, seq_ids=take(batch["seq_ids"]), entropy=take(batch["entropy"]), entropy_coef=0.01,
        ref_logprobs=take(batch["ref_logprobs"]), kl_coef=0.05, kl_estimator="k3", **counts,
    )


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_split_into_micro_batches_gives_same_loss_and_grads(agg_mode, dtype, tolerance):
    batch = random_packed_batch(seed=1, dtype=dtype)
    full = run_loss(batch, agg_mode)
    full.loss.backward()
    full_grads = batch["logprobs"].grad.clone(), batch["entropy"].grad.clone()
    batch["logprobs"].grad, batch["entropy"].grad = None, None

    counts = count_loss_tokens_and_seqs(batch["loss_mask"], batch["seq_ids"])
    assert (counts.num_tokens, counts.num_seqs) == (int(batch["loss_mask"].sum()), 5)
    # micro-batches of whole sequences, in a shuffled order: {3, 0}, {5, 1}, {2, 4}
    micro_batches = [[3, 0], [5, 1], [2, 4]]
    summed_loss, summed_metrics = 0.0, {}
    for seqs in micro_batches:
        select = torch.isin(batch["seq_ids"], torch.tensor(seqs))
        out = run_loss(batch, agg_mode, select, global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs)
        out.loss.backward()  # gradients accumulate as in a gradient-accumulation loop
        summed_loss = summed_loss + out.loss.detach()
        for name, value in out.metrics.as_dict().items():
            summed_metrics[name] = summed_metrics.get(name, 0.0) + value
    torch.testing.assert_close(summed_loss, full.loss.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(batch["logprobs"].grad, full_grads[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(batch["entropy"].grad, full_grads[1], rtol=tolerance, atol=tolerance)
    for name, value in full.metrics.as_dict().items():
        torch.testing.assert_close(summed_metrics[name], value, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_same_logprobs_give_zero_ppo_kl_and_clip_fraction(agg_mode):
    batch = random_packed_batch(seed=2, dtype=torch.float32)
    logprobs = batch["old_logprobs"].clone().requires_grad_(True)
    out = policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"], 0.2, 0.3, agg_mode,
        seq_ids=batch["seq_ids"],
    )
    assert out.metrics.ppo_kl.item() == 0.0
    assert out.metrics.clip_fraction.item() == 0.0


def test_flat_and_row_layouts_agree():
    logprobs, old_logprobs, advantages, loss_mask = hand_batch()
    seq_ids = torch.arange(3)[:, None].expand(3, 4).reshape(-1)
    for agg_mode in AGG_MODES:
        rows = policy_loss(logprobs, old_logprobs, advantages, loss_mask, 0.2, 0.3, agg_mode)
        flat = policy_loss(
            logprobs.reshape(-1), old_logprobs.reshape(-1), advantages.reshape(-1), loss_mask.reshape(-1),
            0.2, 0.3, agg_mode, seq_ids=seq_ids,
        )
        torch.testing.assert_close(rows.loss, flat.loss)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_exceeded_rows_are_out_of_the_loss(agg_mode):
    logprobs, old_logprobs, advantages, loss_mask = hand_batch()
    # add an exceeded copy of row A with a different advantage: the loss must stay the hand value
    logprobs4 = torch.cat([logprobs.detach(), logprobs.detach()[:1]]).requires_grad_(True)
    old4 = torch.cat([old_logprobs, old_logprobs[:1]])
    adv4 = torch.cat([advantages, torch.full((1, 4), 5.0, dtype=torch.float64)])
    exceed = torch.tensor([False, False, False, True])
    mask4 = mask_exceeded(torch.cat([loss_mask, loss_mask[:1]]), exceed)
    out = policy_loss(logprobs4, old4, adv4, mask4, 0.2, 0.3, agg_mode)
    torch.testing.assert_close(out.loss, torch.tensor(HAND_LOSS[agg_mode], dtype=torch.float64))
    out.loss.backward()
    assert (logprobs4.grad[3] == 0).all()


def exceeded_and_empty_batch():
    """Rows: A (adv +1, 2 loss tokens), B (adv -2, 3 loss tokens), C exceeded (3 generated tokens, masked by
    ignore_exceed), D empty (no loss token: its only turn was cut off). Old == new log-probs: ratio 1, so every
    loss token of A has loss -1 and every loss token of B +2."""
    generated = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    loss_mask = mask_exceeded(generated, torch.tensor([False, False, True, False]))
    old_logprobs = torch.full((4, 4), -0.7, dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 1.0, 0.5], dtype=torch.float64)[:, None].expand(4, 4).contiguous()
    return old_logprobs.clone().requires_grad_(True), old_logprobs, advantages, loss_mask


# (loss, gradient weight of an A token, of a B token) per agg_mode and seq_mean_denominator, by hand:
# M = 5 loss tokens; S = 2 sequences with loss tokens (with_loss_tokens) or 4 (all: C and D count)
DENOMINATOR_CASES = {
    ("token-mean", "with_loss_tokens"): ((-1 - 1 + 2 + 2 + 2) / 5, 1 / 5, 1 / 5),
    ("token-mean", "all"): ((-1 - 1 + 2 + 2 + 2) / 5, 1 / 5, 1 / 5),  # masked tokens never count in M
    ("seq-mean-token-mean", "with_loss_tokens"): ((-1 + 2) / 2, 1 / (2 * 2), 1 / (3 * 2)),
    ("seq-mean-token-mean", "all"): ((-1 + 2) / 4, 1 / (2 * 4), 1 / (3 * 4)),  # half the step: 2 of 4 count
    ("seq-mean-token-sum", "with_loss_tokens"): ((-2 + 6) / 2, 1 / 2, 1 / 2),
    ("seq-mean-token-sum", "all"): ((-2 + 6) / 4, 1 / 4, 1 / 4),
}


@pytest.mark.parametrize("agg_mode,denominator", list(DENOMINATOR_CASES))
def test_seq_mean_denominator_with_exceeded_and_empty_sequences(agg_mode, denominator):
    logprobs, old_logprobs, advantages, loss_mask = exceeded_and_empty_batch()
    counts = count_loss_tokens_and_seqs(loss_mask, seq_mean_denominator=denominator)
    assert (counts.num_tokens, counts.num_seqs) == (5, 4 if denominator == "all" else 2)
    out = policy_loss(logprobs, old_logprobs, advantages, loss_mask, 0.2, 0.3, agg_mode,
                      global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs)
    expected_loss, weight_a, weight_b = DENOMINATOR_CASES[agg_mode, denominator]
    torch.testing.assert_close(out.loss, torch.tensor(expected_loss, dtype=torch.float64))
    out.loss.backward()
    # d l_t / d logprob_t = -A_t at ratio 1 (unclipped): -1 on A's tokens, +2 on B's, 0 on C and D
    expected_grad = torch.tensor([[-weight_a] * 2 + [0, 0], [2 * weight_b] * 3 + [0], [0] * 4, [0] * 4],
                                 dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected_grad)
    # the metrics are token-means over loss tokens whatever the denominator
    torch.testing.assert_close(out.metrics.pg_loss, torch.tensor(0.8, dtype=torch.float64))


def test_all_sequences_is_the_originals_per_sequence_mean():
    """The seed's loss (verl, ppo_micro_batch_size_per_gpu=1): each micro-batch is one sequence, its token-mean
    masked_mean(l, mask) = sum l / (n + 1e-6), divided by the sequences per GPU (gradient accumulation) and
    averaged over GPUs, i.e. summed over every sequence of the mini-batch and divided by their number."""
    logprobs, old_logprobs, advantages, loss_mask = exceeded_and_empty_batch()
    per_token = -advantages  # ratio 1
    per_sequence = [(per_token[i] * loss_mask[i]).sum() / (loss_mask[i].sum() + 1e-6) for i in range(4)]
    original = sum(per_sequence) / 4
    counts = count_loss_tokens_and_seqs(loss_mask, seq_mean_denominator="all")
    ours = policy_loss(logprobs, old_logprobs, advantages, loss_mask, 0.2, 0.3, "seq-mean-token-mean",
                       global_num_tokens=counts.num_tokens, global_num_seqs=counts.num_seqs)
    torch.testing.assert_close(ours.loss.detach(), original, rtol=1e-5, atol=0)


@pytest.mark.parametrize("agg_mode", ("seq-mean-token-mean", "seq-mean-token-sum"))
def test_all_sequences_scales_loss_and_grads_and_stays_split_invariant(agg_mode):
    batch = random_packed_batch(seed=4)  # 6 sequences, one of them without a loss token
    counts = {d: count_loss_tokens_and_seqs(batch["loss_mask"], batch["seq_ids"], seq_mean_denominator=d)
              for d in ("with_loss_tokens", "all")}
    assert (counts["with_loss_tokens"].num_seqs, counts["all"].num_seqs) == (5, 6)
    losses, grads = {}, {}
    for denominator, c in counts.items():
        batch["logprobs"].grad = None
        out = run_loss(batch, agg_mode, global_num_tokens=c.num_tokens, global_num_seqs=c.num_seqs)
        out.loss.backward()
        losses[denominator], grads[denominator] = out.loss.detach(), batch["logprobs"].grad.clone()
    # the whole loss (policy-gradient, entropy and KL terms, all aggregated alike) scales by S_with / S_all = 5/6
    torch.testing.assert_close(losses["all"], losses["with_loss_tokens"] * 5 / 6)
    torch.testing.assert_close(grads["all"], grads["with_loss_tokens"] * 5 / 6)
    # micro-batches with the global counts, one of them holding only the sequence without loss tokens
    batch["logprobs"].grad = None
    summed = 0.0
    for seqs in ([2], [3, 0], [5, 1, 4]):
        select = torch.isin(batch["seq_ids"], torch.tensor(seqs))
        out = run_loss(batch, agg_mode, select, global_num_tokens=counts["all"].num_tokens,
                       global_num_seqs=counts["all"].num_seqs)
        out.loss.backward()
        summed = summed + out.loss.detach()
    torch.testing.assert_close(summed, losses["all"])
    torch.testing.assert_close(batch["logprobs"].grad, grads["all"])


def test_entropy_bonus_and_kl_terms():
    batch = random_packed_batch(seed=3)
    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["loss_mask"], 0.2, 0.3, "token-mean")
    base = policy_loss(*args, seq_ids=batch["seq_ids"])
    with_terms = policy_loss(
        *args, seq_ids=batch["seq_ids"], entropy=batch["entropy"], entropy_coef=0.1,
        ref_logprobs=batch["ref_logprobs"], kl_coef=0.5, kl_estimator="mse",
    )
    mask = batch["loss_mask"].bool()
    mean_entropy = batch["entropy"].detach()[mask].mean()
    mean_kl = (0.5 * (batch["logprobs"].detach() - batch["ref_logprobs"]).square())[mask].mean()
    torch.testing.assert_close(with_terms.metrics.entropy, mean_entropy)
    torch.testing.assert_close(with_terms.metrics.kl, mean_kl)
    torch.testing.assert_close(with_terms.loss, base.loss - 0.1 * mean_entropy + 0.5 * mean_kl)
    with_terms.loss.backward()
    expected_entropy_grad = torch.where(mask, -0.1 / mask.sum(), 0.0).to(torch.float64)
    torch.testing.assert_close(batch["entropy"].grad, expected_entropy_grad)


def test_fully_masked_micro_batch_gives_zero_loss_and_finite_grads():
    logprobs, old_logprobs, advantages, loss_mask = hand_batch()
    for agg_mode in AGG_MODES:
        out = policy_loss(logprobs[2:], old_logprobs[2:], advantages[2:], loss_mask[2:], 0.2, 0.3, agg_mode,
                          global_num_tokens=5, global_num_seqs=2)
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert torch.equal(logprobs.grad[2], torch.zeros(4, dtype=torch.float64))


def test_user_errors():
    logprobs, old_logprobs, advantages, loss_mask = hand_batch()
    args = (logprobs, old_logprobs, advantages, loss_mask, 0.2, 0.3)
    with pytest.raises(ValueError, match="agg_mode"):
        policy_loss(*args, "sum")
    with pytest.raises(ValueError, match="seq_ids is required"):
        policy_loss(*(a.reshape(-1) for a in args[:4]), 0.2, 0.3, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="global_num_tokens"):
        policy_loss(*args, "token-mean", global_num_tokens=3)
    with pytest.raises(ValueError, match="global_num_seqs"):
        policy_loss(*args, "seq-mean-token-sum", global_num_tokens=5, global_num_seqs=1)
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(*args, "token-mean", entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        policy_loss(*args, "token-mean", kl_coef=0.1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        policy_loss(logprobs, old_logprobs, advantages, loss_mask * 0.5, 0.2, 0.3, "token-mean")
    with pytest.raises(ValueError, match="shaped like logprobs"):
        policy_loss(logprobs, old_logprobs[:, :2], advantages, loss_mask, 0.2, 0.3, "token-mean")
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logprobs, old_logprobs, advantages, loss_mask, 1.0, 0.3, "token-mean")
    with pytest.raises(ValueError, match="seq_mean_denominator"):
        count_loss_tokens_and_seqs(loss_mask, seq_mean_denominator="trained")
