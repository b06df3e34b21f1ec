import math

import pytest
import torch

from megatron_minio3.algorithms.kl import kl_penalty


def test_hand_values():
    logprobs = torch.tensor([math.log(0.5), -1.0], dtype=torch.float64)
    ref_logprobs = torch.tensor([math.log(0.25), -1.0], dtype=torch.float64)
    d = math.log(2.0)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([d, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([0.5 + d - 1.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "mse"), torch.tensor([0.5 * d * d, 0.0], dtype=torch.float64)
    )


def test_k1_and_k3_are_unbiased_over_the_policy():
    # E_{x ~ p}[k(x)] = KL(p || ref) for k1 and k3, evaluated exactly over a categorical support.
    generator = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, generator=generator, dtype=torch.float64), dim=0)
    ref = torch.log_softmax(torch.randn(7, generator=generator, dtype=torch.float64), dim=0)
    true_kl = (logp.exp() * (logp - ref)).sum()
    for estimator in ("k1", "k3"):
        expectation = (logp.exp() * kl_penalty(logp, ref, estimator)).sum()
        torch.testing.assert_close(expectation, true_kl, rtol=1e-12, atol=1e-12)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_gradient():
    logprobs = torch.tensor([-0.3, -2.0, -1.0], requires_grad=True, dtype=torch.float64)
    ref_logprobs = torch.tensor([-1.0, -0.5, -1.0], dtype=torch.float64)
    kl_penalty(logprobs, ref_logprobs, "k3").sum().backward()
    torch.testing.assert_close(logprobs.grad, 1.0 - torch.exp(ref_logprobs - logprobs.detach()))


def test_k3_finite_for_extreme_ratios():
    values = kl_penalty(torch.tensor([-200.0, 0.0]), torch.tensor([0.0, -200.0]), "k3")
    assert torch.isfinite(values).all()


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k2")
