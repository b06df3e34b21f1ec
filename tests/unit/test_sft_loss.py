"""The SFT loss: token-mean NLL over the whole batch, the same however the batch is split."""
import pytest
import torch

from megatron_minio3.algorithms.sft_loss import sft_loss


def test_sft_loss_is_the_batch_token_mean_whatever_the_split():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 7, generator=generator, requires_grad=True)
    labels = torch.randint(0, 7, (3, 10), generator=generator)
    mask = (torch.rand(3, 10, generator=generator) > 0.4).long()
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    expected = -(logprobs * mask).sum() / mask.sum()
    total = int(mask.sum())
    whole = sft_loss(logprobs.reshape(-1), mask.reshape(-1), total).loss
    parts = sum(sft_loss(logprobs[i], mask[i], total).loss for i in range(3))
    assert whole.item() == pytest.approx(expected.item()) and parts.item() == pytest.approx(expected.item())
    (grad_whole,) = torch.autograd.grad(whole, logits, retain_graph=True)
    (grad_parts,) = torch.autograd.grad(parts, logits)
    assert torch.allclose(grad_whole, grad_parts)
    assert grad_whole[mask == 0].abs().max() == 0  # tokens off the mask (prompt, observations) get no gradient


def test_sft_loss_counts_and_rejects_bad_inputs():
    out = sft_loss(torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([1, 0, 1]), 2)
    assert out.loss.item() == pytest.approx(1.25) and out.num_tokens.item() == 2
    with pytest.raises(ValueError, match="differ"):
        sft_loss(torch.zeros(3), torch.zeros(2), 1)
    with pytest.raises(ValueError, match="global_num_tokens"):
        sft_loss(torch.zeros(3), torch.zeros(3), 0)
