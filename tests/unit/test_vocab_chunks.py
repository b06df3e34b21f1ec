"""Vocab-chunked log-probs and entropy (one rank): chunked == unchunked == full log_softmax, and no float32
[T, V_local] tensor is ever created when chunk_size < V_local (AllocationTracker from tools/bench/logprobs.py).
TP2 runs are in tests/integration/test_vocab_parallel.py."""
import importlib.util
from functools import partial

import pytest
import torch

from megatron_minio3.parallel.vocab_parallel import DEFAULT_VOCAB_CHUNK_SIZE, vocab_parallel_logprobs_and_entropy
from tests.distributed import REPO_ROOT

NUM_TOKENS, NUM_COLUMNS = 37, 50
# float32 agreement: 1e-6, plus one rounding step of the value itself (2^-23 relative): log-probs here reach
# -30, where neighbouring float32 numbers are 1.9e-6 apart, so two summation orders can land one step apart.
FP32_TOL = {"rtol": 2**-23, "atol": 1e-6}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_logprobs", REPO_ROOT / "tools" / "bench" / "logprobs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def inputs(dtype, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits_TV = (3 * torch.randn(NUM_TOKENS, NUM_COLUMNS, generator=generator, dtype=torch.float64)).to(dtype)
    targets_T = torch.randint(0, vocab_size, (NUM_TOKENS,), generator=generator)
    weights_2T = torch.randn(2, NUM_TOKENS, generator=generator, dtype=torch.float64)
    return logits_TV, targets_T, weights_2T


def run(logits_TV, targets_T, weights_2T, temperature, vocab_size, chunk_size):
    """(log-probs, entropies, d(w1 . logprobs + w2 . entropies)/d logits)."""
    leaf_TV = logits_TV.detach().clone().requires_grad_(True)
    logprobs_T, entropy_T = vocab_parallel_logprobs_and_entropy(
        leaf_TV, targets_T, temperature, vocab_size=vocab_size, chunk_size=chunk_size
    )
    (weights_2T[0] @ logprobs_T.double() + weights_2T[1] @ entropy_T.double()).backward()
    return logprobs_T.detach(), entropy_T.detach(), leaf_TV.grad


def reference(logits_TV, targets_T, weights_2T, temperature, vocab_size):
    """Full-vocabulary log_softmax in float64, through autograd."""
    leaf_TV = logits_TV.detach().double().requires_grad_(True)
    log_probs_TV = torch.log_softmax(leaf_TV[:, :vocab_size] / temperature, dim=-1)
    logprobs_T = log_probs_TV.gather(-1, targets_T[:, None]).squeeze(-1)
    entropy_T = -(log_probs_TV.exp() * log_probs_TV).sum(-1)
    (weights_2T[0] @ logprobs_T + weights_2T[1] @ entropy_T).backward()
    return logprobs_T.detach(), entropy_T.detach(), leaf_TV.grad


# 7 and 16 do not divide the 43 or 50 real columns; 43 is exactly the real vocabulary; 50 and 64 are one chunk.
CHUNK_SIZES = [1, 7, 16, 43, 50, 64]
SETTINGS = [(1.0, NUM_COLUMNS), (0.6, 43), (1.7, 43)]  # (temperature, real vocabulary: 43 = 7 padding columns)


@pytest.mark.parametrize("temperature,vocab_size", SETTINGS)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_float32_chunked_equals_unchunked_and_reference(chunk_size, temperature, vocab_size):
    data = inputs(torch.float32, vocab_size)
    logprobs, entropy, grad = run(*data, temperature, vocab_size, chunk_size)
    whole_logprobs, whole_entropy, whole_grad = run(*data, temperature, vocab_size, NUM_COLUMNS)
    assert logprobs.dtype == entropy.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(logprobs, whole_logprobs, **FP32_TOL)
    torch.testing.assert_close(entropy, whole_entropy, **FP32_TOL)
    torch.testing.assert_close(grad, whole_grad, **FP32_TOL)
    expected = reference(*data, temperature, vocab_size)
    for got, want in zip((logprobs, entropy, grad), expected):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert torch.all(grad[:, vocab_size:] == 0)


@pytest.mark.parametrize("temperature,vocab_size", SETTINGS)
@pytest.mark.parametrize("chunk_size", [1, 7, 43, 64])
def test_bfloat16_chunked_equals_unchunked(chunk_size, temperature, vocab_size):
    """bf16 logits are computed in float32: the outputs agree to float32 rounding; the gradients come back in
    bf16, where the same float32 value can round to either neighbour: within one bf16 step (2^-8 relative)."""
    data = inputs(torch.bfloat16, vocab_size)
    logprobs, entropy, grad = run(*data, temperature, vocab_size, chunk_size)
    whole_logprobs, whole_entropy, whole_grad = run(*data, temperature, vocab_size, NUM_COLUMNS)
    assert logprobs.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(logprobs, whole_logprobs, **FP32_TOL)
    torch.testing.assert_close(entropy, whole_entropy, **FP32_TOL)
    assert (grad.double() - whole_grad.double()).abs().max() <= 2**-8 * whole_grad.double().abs().max()
    expected_grad = reference(*data, temperature, vocab_size)[2]
    assert (grad.double() - expected_grad).abs().max() <= 2**-8 * expected_grad.abs().max()


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_float64_chunked_matches_reference_and_gradcheck(chunk_size):
    data = inputs(torch.float64, 43)
    for got, want in zip(run(*data, 0.6, 43, chunk_size), reference(*data, 0.6, 43)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    logits_TV = data[0][:5, :12].clone().requires_grad_(True)
    targets_T = data[1][:5] % 10

    def both(x):
        return vocab_parallel_logprobs_and_entropy(x, targets_T, 0.8, vocab_size=10, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(both, (logits_TV,))
    assert torch.autograd.gradcheck(lambda x: both(x)[1], (logits_TV,))


def test_online_rescaling_with_the_maximum_in_the_last_chunk():
    """The running max rises chunk after chunk (increasing logits), so every chunk rescales S and E."""
    logits_TV = torch.linspace(-40, 40, 3 * 64, dtype=torch.float32).reshape(3, 64)
    targets_T = torch.tensor([0, 31, 63])
    weights_2T = torch.ones(2, 3, dtype=torch.float64)
    chunked = run(logits_TV, targets_T, weights_2T, 1.0, 64, 5)
    for got, want in zip(chunked, run(logits_TV, targets_T, weights_2T, 1.0, 64, 64)):
        torch.testing.assert_close(got, want, **FP32_TOL)
    for got, want in zip(chunked, reference(logits_TV, targets_T, weights_2T, 1.0, 64)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_only_one_output_used_and_no_tokens():
    logits_TV = torch.randn(6, 20, requires_grad=True)
    targets_T = torch.arange(6)
    logprobs, _ = vocab_parallel_logprobs_and_entropy(logits_TV, targets_T, chunk_size=3)
    logprobs.sum().backward()
    expected = torch.softmax(logits_TV.detach(), -1).neg_()
    expected[torch.arange(6), targets_T] += 1
    torch.testing.assert_close(logits_TV.grad, expected, **FP32_TOL)
    empty_TV = torch.randn(0, 20, requires_grad=True)
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(empty_TV, targets_T[:0], chunk_size=3)
    (logprobs.sum() + entropy.sum()).backward()
    assert logprobs.shape == entropy.shape == (0,) and empty_TV.grad.shape == (0, 20)


def test_chunk_size_errors():
    logits_TV, targets_T = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk_size"):
            vocab_parallel_logprobs_and_entropy(logits_TV, targets_T, chunk_size=bad)
    assert DEFAULT_VOCAB_CHUNK_SIZE == 4096


def test_allocation_tracker_counts_new_storages_not_views():
    bench = load_bench()
    with bench.AllocationTracker() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]
        a.add_(1)
        b = (view * 2).double()  # 40 float32 bytes, then 80 float64 bytes
        del a, view
        c = torch.zeros(10, dtype=torch.bfloat16)
    assert [dtype for dtype, _ in tracker.allocations] == [torch.float32, torch.float32, torch.float64, torch.bfloat16]
    assert [numel for _, numel in tracker.allocations] == [1000, 10, 10, 10]
    assert tracker.peak_bytes == 4000 + 40 + 80
    assert tracker.live_bytes == 80 + 20  # a and the float32 temporary were freed; b and c are alive
    assert tracker.largest() == 1000 and tracker.largest((torch.bfloat16,)) == 10
    del b, c


MEMORY_TOKENS, MEMORY_COLUMNS, MEMORY_CHUNK = 64, 512, 100  # 100 does not divide 512


@pytest.mark.parametrize("padding_columns", [0, 45])
def test_no_float32_tensor_of_the_whole_slice_when_chunked(padding_columns):
    """bf16 logits (the GPU case), forward + backward through both outputs at temperature 0.7."""
    bench = load_bench()
    vocab_size = MEMORY_COLUMNS - padding_columns
    logits_TV, targets_T, weights_2T = bench.make_inputs(MEMORY_TOKENS, MEMORY_COLUMNS, torch.bfloat16, "cpu")
    targets_T %= vocab_size
    trackers = {}
    for chunk_size in (MEMORY_CHUNK, MEMORY_COLUMNS):
        function = partial(vocab_parallel_logprobs_and_entropy, vocab_size=vocab_size, chunk_size=chunk_size)
        with bench.AllocationTracker() as trackers[chunk_size]:
            bench.forward_backward(function, logits_TV, targets_T, weights_2T, 0.7)
    chunked, whole = trackers[MEMORY_CHUNK], trackers[MEMORY_COLUMNS]
    # The tracker sees the whole-slice float32 buffers when the slice is one chunk...
    assert whole.largest() == MEMORY_TOKENS * vocab_size
    # ...and none larger than one chunk otherwise.
    assert chunked.largest() == MEMORY_TOKENS * MEMORY_CHUNK
    # What stays alive at once: the bf16 gradient, two float32 chunk buffers, and [T] statistics.
    gradient_bytes = MEMORY_TOKENS * MEMORY_COLUMNS * 2
    assert chunked.peak_bytes <= gradient_bytes + 2 * MEMORY_TOKENS * MEMORY_CHUNK * 4 + 32 * MEMORY_TOKENS * 8
    assert whole.peak_bytes >= 2 * MEMORY_TOKENS * vocab_size * 4
    assert logits_TV.grad.dtype == torch.bfloat16


def test_float32_logits_only_the_returned_gradient_has_the_slice_size():
    bench = load_bench()
    logits_TV, targets_T, weights_2T = bench.make_inputs(MEMORY_TOKENS, MEMORY_COLUMNS, torch.float32, "cpu")
    function = partial(vocab_parallel_logprobs_and_entropy, chunk_size=MEMORY_CHUNK)
    with bench.AllocationTracker() as tracker:
        bench.forward_backward(function, logits_TV, targets_T, weights_2T, 1.3)
    large = [numel for dtype, numel in tracker.allocations if numel > MEMORY_TOKENS * MEMORY_CHUNK]
    assert large == [MEMORY_TOKENS * MEMORY_COLUMNS]  # the gradient itself, [T, V_local] like the logits
