"""actor.recompute_activations: decoder layers (megatron full recompute), or only their core attention and MLP
(selective), and vision blocks run their forward again in the backward pass, and the update is bit-identical to
one without recompute (TP2, CPU, gloo, fp32)."""
import json

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/recompute_grads.py"


def test_recompute_reruns_layers_and_changes_no_number(tiny_hf_dir, tmp_path):
    run_torchrun(SCRIPT, 2, ["--hf-dir", tiny_hf_dir, "--out-dir", tmp_path, "--tp", 2], timeout=600)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        plain, full, selective = result["plain"], result["full"], result["selective"]
        once = {"decoder_layer": 1, "core_attention": 1, "mlp": 1, "vision_block": 1}  # one micro-batch
        assert plain["calls"] == once, plain
        assert full["calls"] == {"decoder_layer": 2, "core_attention": 2, "mlp": 2, "vision_block": 2}, full
        # selective: the layer itself runs once, its core attention and MLP again in the backward pass
        assert selective["calls"] == {"decoder_layer": 1, "core_attention": 2, "mlp": 2, "vision_block": 2}, selective
        for recompute in (full, selective):
            assert recompute["grad_norm"] == plain["grad_norm"] > 0 and recompute["loss"] == plain["loss"]
        assert result["param_max_abs_diff"] == {"full": 0.0, "selective": 0.0}
        assert result["num_micro_batches"] == 1
