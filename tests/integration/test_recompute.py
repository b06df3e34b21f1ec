"""actor.recompute_activations: decoder layers (megatron full recompute) and vision blocks run their forward again
in the backward pass, and the update is bit-identical to one without recompute (TP2, CPU, gloo, fp32)."""
import json

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/recompute_grads.py"


def test_recompute_reruns_layers_and_changes_no_number(tiny_hf_dir, tmp_path):
    run_torchrun(SCRIPT, 2, ["--hf-dir", tiny_hf_dir, "--out-dir", tmp_path, "--tp", 2], timeout=600)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        plain, recompute = result["plain"], result["recompute"]
        assert plain["calls"] == {"decoder_layer": 1, "vision_block": 1}, plain  # one micro-batch
        assert recompute["calls"] == {"decoder_layer": 2, "vision_block": 2}, recompute
        assert recompute["grad_norm"] == plain["grad_norm"] > 0 and recompute["loss"] == plain["loss"]
        assert result["param_max_abs_diff"] == 0.0 and result["num_micro_batches"] == 1
