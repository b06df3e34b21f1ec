"""megatron-core GPTModel training on CPU over gloo, through the real pipeline schedule (2 processes)."""
import json
import math

import pytest

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/gpt_train.py"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_gpt_trains_with_decreasing_loss(tmp_path, tp, pp):
    out = tmp_path / "losses.json"
    run_torchrun(SCRIPT, 2, ["--tp", tp, "--pp", pp, "--steps", 6, "--out", out], timeout=300)
    result = json.loads(out.read_text())
    losses = result["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    # Random init over a 128-token vocabulary: cross-entropy starts near ln(128).
    assert abs(losses[0] - math.log(128)) < 0.2, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss not strictly decreasing: {losses}"
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(math.isfinite(g) and g > 0 for g in result["grad_norms"]), result["grad_norms"]
