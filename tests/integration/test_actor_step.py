"""The Megatron actor on packed multimodal trajectories (tiny Qwen2.5-VL, CPU, gloo, fp32).

Default run: TP=2 (packed == one-at-a-time log-probs; first update has ppo_kl 0 and clip fraction 0; each image
encoded on one TP rank, and the vision tower's gradients summed over TP equal TP=1's).
Default run too: CP=2 (each sequence split over two ranks, two-image trajectories) gives the log-probs and the
gradients of CP=1 within 1e-5, and each image goes through the vision tower once.
Slow: the TP1 / TP2 / PP2 / DP2 layouts agree on log-probs, and the loss and gradients (after the DP
all-reduce) of one mini-batch do not depend on how it is split, for every agg_mode.
"""
import json

import pytest
import torch

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/actor_step.py"
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LAYOUTS = {  # name: (processes, script arguments)
    "tp1": (1, ["--grads", "--update"]),
    "tp2": (2, ["--tp", 2, "--grads", "--update"]),
    "pp2": (2, ["--pp", 2, "--update"]),
    "dp2": (2, ["--grads", "--update"]),
    "cp2": (2, ["--cp", 2, "--grads", "--update"]),
}


@pytest.fixture(scope="module")
def run_layout(tiny_hf_dir, tmp_path_factory):
    done = {}

    def run(name):
        if name not in done:
            nproc, args = LAYOUTS[name]
            out_dir = tmp_path_factory.mktemp(f"actor_{name}")
            run_torchrun(SCRIPT, nproc, ["--hf-dir", tiny_hf_dir, "--out-dir", out_dir, *args], timeout=600)
            ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
            logprobs = {}
            for path in sorted(out_dir.glob("logprobs_dp*.pt")):
                logprobs.update(torch.load(path)["packed"])
            grads = torch.load(out_dir / "grads.pt") if (out_dir / "grads.pt").exists() else None
            done[name] = dict(ranks=ranks, logprobs=logprobs, grads=grads)
        return done[name]

    return run


def check_first_update(ranks):
    writers = [r for r in ranks if "packed_vs_single_max_abs_diff" in r]
    assert writers
    for rank in writers:
        metrics = rank["update_metrics"]
        # old and reference log-probs from the same weights: the ratio is exactly 1, the KL exactly 0
        assert metrics["ppo_kl"] == 0.0 and metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0, metrics
        assert metrics["entropy"] > 0 and rank["grad_norm"] > 0
        assert rank["logprob_change_after_update"] > 1e-3  # the optimizer step did change the policy


def test_tp2_packed_equals_one_at_a_time_and_first_update_is_on_policy(run_layout):
    result = run_layout("tp2")
    for rank in result["ranks"]:
        if "packed_vs_single_max_abs_diff" in rank:
            assert rank["num_micro_batches"] > 1
            assert rank["packed_vs_single_max_abs_diff"] <= 1e-5
    check_first_update(result["ranks"])
    assert len(result["logprobs"]) == 12
    check_images_encoded_once(result["ranks"])


def check_images_encoded_once(ranks):
    """Every image of the share through the vision tower once over the TP x CP group, and every rank takes part."""
    assert ranks[0]["images_in_share"] == 12
    encoded = [r["images_encoded_by_this_rank"] for r in ranks]
    assert sum(encoded) == 12 and min(encoded) > 0, encoded


def check_vision_grads(reference, other, key, other_key):
    """The vision tower's gradients (replicated over TP) equal the one-rank run's."""
    reference_grads = {n: g for n, g in reference["grads"][key].items() if n.startswith("vision_model.")}
    scale = max(g.abs().max().item() for g in reference_grads.values())
    assert scale > 0 and set(other["grads"][other_key]) >= set(reference_grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(other["grads"][other_key][name], grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{other_key} {name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_log_probs_match_tp1(run_layout, layout):
    reference = run_layout("tp1")["logprobs"]
    other = run_layout(layout)["logprobs"]
    assert sorted(other) == sorted(reference) == list(range(12))
    for index, values in reference.items():
        torch.testing.assert_close(other[index], values, rtol=0, atol=1e-5)
    if "--update" in LAYOUTS[layout][1]:
        check_first_update(run_layout(layout)["ranks"])


@pytest.mark.slow
def test_split_invariance_of_loss_and_gradients(run_layout):
    tp1, dp2 = run_layout("tp1"), run_layout("dp2")
    check_first_update(tp1["ranks"])
    check_first_update(dp2["ranks"])
    assert dp2["ranks"][0]["dp_size"] == 2
    for agg_mode in AGG_MODES:
        one_big = f"{agg_mode}/dp1/budget4096"
        splits = [f"{agg_mode}/dp1/budget160", f"{agg_mode}/dp2/budget160"]
        assert tp1["ranks"][0]["micro_batches_per_split"][one_big] == 1
        assert tp1["ranks"][0]["micro_batches_per_split"][splits[0]] > 2
        reference_loss = tp1["ranks"][0]["losses"][one_big]
        reference_grads = tp1["grads"][one_big]
        scale = max(g.abs().max().item() for g in reference_grads.values())
        assert scale > 0
        for key, source in zip(splits, (tp1, dp2)):
            assert source["ranks"][0]["losses"][key] == pytest.approx(reference_loss, rel=1e-5)
            for name, grad in reference_grads.items():
                torch.testing.assert_close(source["grads"][key][name], grad, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{key} {name}: {m}")


def test_context_parallel_equals_one_rank_and_encodes_each_image_once(run_layout):
    tp1, cp2 = run_layout("tp1"), run_layout("cp2")
    assert [r["cp_size"] for r in cp2["ranks"]] == [2, 2] and [r["dp_size"] for r in cp2["ranks"]] == [1, 1]
    assert sorted(cp2["logprobs"]) == sorted(tp1["logprobs"]) == list(range(12))
    for index, values in tp1["logprobs"].items():
        torch.testing.assert_close(cp2["logprobs"][index], values, rtol=0, atol=1e-5)
    check_images_encoded_once(cp2["ranks"])
    for agg_mode in AGG_MODES:
        reference_grads = tp1["grads"][f"{agg_mode}/dp1/budget4096"]
        key = f"{agg_mode}/dp1cp2/budget160"
        assert cp2["ranks"][0]["losses"][key] == pytest.approx(tp1["ranks"][0]["losses"][f"{agg_mode}/dp1/budget4096"],
                                                               rel=1e-5)
        scale = max(g.abs().max().item() for g in reference_grads.values())
        for name, grad in reference_grads.items():
            assert cp2["grads"][key][name].abs().max() > 0 or grad.abs().max() == 0, name
            torch.testing.assert_close(cp2["grads"][key][name], grad, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"{key} {name}: {m}")
    check_first_update(cp2["ranks"])


def test_tp2_encodes_each_image_once_and_sums_the_vision_gradients_over_tp(run_layout):
    """Images shared out over the two TP ranks: the vision tower's gradients (each rank's own images' part, summed
    over TP) equal those of one rank that encoded every image, for every agg_mode."""
    tp1, tp2 = run_layout("tp1"), run_layout("tp2")
    for agg_mode in AGG_MODES:
        key = f"{agg_mode}/dp1/budget4096"
        assert tp2["ranks"][0]["losses"][key] == pytest.approx(tp1["ranks"][0]["losses"][key], rel=1e-5)
        check_vision_grads(tp1, tp2, key, key)
