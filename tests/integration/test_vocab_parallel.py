"""Vocab-parallel log-probs and entropy: one process (no group) and TP=2 under torchrun with gloo."""
import json

import pytest
import torch

from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy
from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/vp_logprobs.py"
NUM_TOKENS = 37


def reference(logits_TV, targets_T, temperature, vocab_size):
    log_probs_TV = torch.log_softmax(logits_TV[:, :vocab_size].double() / temperature, dim=-1)
    return log_probs_TV.gather(-1, targets_T[:, None]).squeeze(-1), -(log_probs_TV.exp() * log_probs_TV).sum(-1)


@pytest.mark.parametrize("temperature,vocab_size", [(1.0, 50), (0.6, 43)])
def test_single_rank_matches_log_softmax(temperature, vocab_size):
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(9, 50, generator=generator, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, vocab_size, (9,), generator=generator)
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(logits, targets, temperature, vocab_size=vocab_size)
    expected_logprobs, expected_entropy = reference(logits.detach(), targets, temperature, vocab_size)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-12)


def test_single_rank_gradcheck_through_both_outputs():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 12, generator=generator, dtype=torch.float64).requires_grad_(True)
    targets = torch.randint(0, 10, (5,), generator=generator)

    def both(x):
        return vocab_parallel_logprobs_and_entropy(x, targets, 0.8, vocab_size=10)

    assert torch.autograd.gradcheck(both, (logits,))
    assert torch.autograd.gradcheck(lambda x: both(x)[0], (logits,))
    assert torch.autograd.gradcheck(lambda x: both(x)[1], (logits,))


def test_does_not_modify_the_logits():
    logits = torch.randn(4, 8)
    before = logits.clone()
    vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(logits, before)


def test_user_errors():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="targets must be token ids"):
        vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2, 8]))
    with pytest.raises(ValueError, match="targets must be token ids"):
        vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2, 6]), vocab_size=6)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2, 3]), vocab_size=9)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2, 3]), 0.0)
    with pytest.raises(ValueError, match="expected logits"):
        vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, 1, 2]))


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vp")
    run_torchrun(SCRIPT, 2, ["--out-dir", out_dir], timeout=300)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_tp2_matches_full_vocabulary_reference(tp2_results):
    assert [r["tp_rank"] for r in tp2_results] == [0, 1]
    for result in tp2_results:
        assert result["tp_size"] == 2
        for name, case in result["cases"].items():
            assert case["output_dtype"] == ("torch.float64" if name.startswith("fp64") else "torch.float32")
            assert case["logprob_diff"] <= 1e-5, (name, case)
            assert case["entropy_diff"] <= 1e-5, (name, case)
            if name.startswith("bf16"):
                # gradients come back in the logits' dtype: within bf16 rounding of the reference
                assert case["grad_dtype"] == "torch.bfloat16"
                assert case["grad_diff"] <= 2 ** -8 * case["grad_scale"], (name, case)
            else:
                assert case["grad_diff"] <= 1e-5, (name, case)
        # megatron's own vocab-parallel cross-entropy agrees (log-prob = -CE at temperature 1)
        assert result["megatron_cross_entropy_diff"] <= 1e-5


def test_tp2_never_moves_more_than_three_numbers_per_token(tp2_results):
    for result in tp2_results:
        for name, case in result["cases"].items():
            assert case["collectives"] == [["all_reduce", NUM_TOKENS], ["all_reduce", 3 * NUM_TOKENS]], name


CHUNKS_SCRIPT = REPO_ROOT / "tests/integration/scripts/vp_chunks.py"


@pytest.fixture(scope="module")
def tp2_chunk_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vp_chunks")
    run_torchrun(CHUNKS_SCRIPT, 2, ["--out-dir", out_dir], timeout=300)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_tp2_vocab_chunks_match_unchunked_and_reference(tp2_chunk_results):
    """Chunk sizes 1, 5, 13 (not dividing the 32-column slices), 32 and 40 (one chunk) at TP2 with temperatures
    0.7-1.3, 7 padding columns on rank 1, and a rank 1 of padding only. float32: within 1e-6 plus one float32
    rounding step of the largest value (2^-23 relative) of the unchunked call, 1e-5 of the float64 reference;
    bf16 logits: the same for the float32 outputs, gradients (bf16) within one bf16 step (2^-8 of the largest
    gradient) of both."""
    assert [r["tp_rank"] for r in tp2_chunk_results] == [0, 1]
    padding_seen = set()
    for result in tp2_chunk_results:
        for name, case in result["cases"].items():
            bf16 = name.startswith("bf16")
            assert case["grad_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
            assert sorted(map(int, case["chunks"])) == [1, 5, 13, 32, 40]
            for chunk_size, chunk in case["chunks"].items():
                where = (result["tp_rank"], name, chunk_size)
                assert chunk["logprob_vs_unchunked"] <= 1e-6 + 2**-23 * chunk["max_abs_logprob"], where
                assert chunk["entropy_vs_unchunked"] <= 1e-6 + 2**-23 * chunk["max_abs_entropy"], where
                assert chunk["logprob_vs_reference"] <= 1e-5 and chunk["entropy_vs_reference"] <= 1e-5, where
                if bf16:
                    assert chunk["grad_vs_unchunked"] <= 2**-8 * case["grad_scale"], where
                    assert chunk["grad_vs_reference"] <= 2**-8 * case["grad_scale"], where
                else:
                    assert chunk["grad_vs_unchunked"] <= 1e-6 + 2**-23 * case["grad_scale"], where
                    assert chunk["grad_vs_reference"] <= 1e-5, where
                assert chunk["padding_grad_abs_sum"] == 0.0, where
                padding_seen.add(chunk["num_padding_columns"])
                # chunking adds no communication: still one MAX of T and one SUM of 3T numbers
                assert chunk["collectives"] == [["all_reduce", NUM_TOKENS], ["all_reduce", 3 * NUM_TOKENS]], where
    assert padding_seen == {0, 2, 7, 32}  # none, partly padded slices (vocab 30 and 57), padding only
