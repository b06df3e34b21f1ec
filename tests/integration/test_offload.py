"""The actor's params, grads and optimizer state to host memory and back, bit-identically (CPU/gloo, 2 ranks).

Default: TP=2, fp32 and bf16 (megatron's mixed-precision optimizer with fp32 main params). Slow: PP=2.
On CPU the offload is host-to-host: each storage is copied into its host buffer and the original freed, so the
resident set must not grow while the state is parked, must drop by the state's size once the host buffers
exist, and the peak while offloading stays within one bucket of the start.
"""
import json

import pytest

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/offload_roundtrip.py"
BUCKET_BYTES = 1 << 20
MARGIN = 6 << 20  # allocator noise: small tensors live in malloc arenas that do not shrink
MIB = 2**20


def run_layout(hf_dir, out_dir, layout_args):
    run_torchrun(
        SCRIPT, 2, ["--hf-dir", hf_dir, "--out-dir", out_dir, "--bucket-bytes", BUCKET_BYTES, *layout_args],
        timeout=600,
        # freed tensors must leave the resident set for VmRSS/VmHWM to show where the state is
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def report(rank, case):
    for index, c in enumerate(case["cycles"]):
        print(
            f"rank {rank['rank']} {case['dtype']} cycle {index}: state {case['state_bytes'] / MIB:.1f} MiB in "
            f"{case['num_storages']} storages | RSS before {c['rss_before'] / MIB:.1f}, offloaded "
            f"{c['rss_offloaded'] / MIB:.1f} (peak {c['peak_offload'] / MIB:.1f}), reloaded "
            f"{c['rss_reloaded'] / MIB:.1f} (peak {c['peak_reload'] / MIB:.1f}) MiB | offload "
            f"{c['offload_seconds'] * 1e3:.1f} ms {c['offload_buckets']}, reload {c['reload_seconds'] * 1e3:.1f} ms"
        )


def check_ranks(ranks, dtypes):
    for rank in ranks:
        assert [case["dtype"] for case in rank["dtypes"]] == list(dtypes)
        for case in rank["dtypes"]:
            report(rank, case)
            assert case["num_optimizer_state_tensors"] > 0  # Adam state existed when offloaded
            if case["dtype"] == "bfloat16":
                assert "torch.bfloat16" in case["param_dtypes"] and case["num_main_params"] > 0
            first, second = case["cycles"]
            largest_bucket = max(BUCKET_BYTES, case["largest_storage_bytes"])
            for cycle in (first, second):
                assert cycle["num_not_freed"] == 0, cycle  # every device storage was freed
                assert cycle["num_changed"] == 0, cycle  # every tensor came back bit-identical
                assert sum(cycle["offload_bytes"].values()) == case["state_bytes"]
                assert cycle["host_bytes"] == case["state_bytes"]
            # first round trip: the state moves into new host buffers, it is not duplicated
            assert first["rss_offloaded"] - first["rss_before"] <= MARGIN, first
            assert first["peak_offload"] - first["rss_before"] <= largest_bucket + MARGIN, first
            assert first["rss_reloaded"] - first["rss_before"] <= case["state_bytes"] + MARGIN, first
            # second: the host buffers are reused, and the parked state really left its storages
            assert second["rss_before"] - second["rss_offloaded"] >= case["state_bytes"] - MARGIN, second
            assert second["peak_offload"] - second["rss_before"] <= MARGIN, second
            assert abs(second["rss_offloaded"] - first["rss_offloaded"]) <= MARGIN, (first, second)
            # the step after the round trip is the step without it, bit for bit
            assert case["second_step_metrics"][0] == case["second_step_metrics"][1]
            assert case["second_step_grad_norms"][0] == case["second_step_grad_norms"][1]
            assert case["second_step_params_differ"] == 0 and case["second_step_state_differ"] == 0
            assert case["second_step_params_changed"] > 0
        assert rank["ref_parked_nonzero_storages"] == 0 and rank["ref_parked_after_use_nonzero"] == 0
        if rank["last_stage"]:
            assert rank["ref_logprobs_equal"] is True
    assert any(case["second_step_metrics"][0] for rank in ranks for case in rank["dtypes"])  # losses compared


def test_tp2_round_trip_is_bit_identical_and_moves_the_state(tiny_hf_dir, tmp_path):
    ranks = run_layout(tiny_hf_dir, tmp_path, ["--tp", 2, "--dtypes", "float32,bfloat16"])
    assert {rank["tp"] for rank in ranks} == {2}
    check_ranks(ranks, ["float32", "bfloat16"])


@pytest.mark.slow
def test_pp2_round_trip_is_bit_identical_and_moves_the_state(tiny_hf_dir, tmp_path):
    ranks = run_layout(tiny_hf_dir, tmp_path, ["--pp", 2, "--dtypes", "float32,bfloat16"])
    assert {rank["pp"] for rank in ranks} == {2}
    assert ranks[0]["dtypes"][0]["state_bytes"] != ranks[1]["dtypes"][0]["state_bytes"]  # different stages
    check_ranks(ranks, ["float32", "bfloat16"])
