"""The CPU compatibility layer and the parallel-size checks (run in a subprocess: activation is process-wide)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_minio3.parallel import validate_parallel_sizes

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer is inert with CUDA")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip()


def test_cuda_device_arguments_map_to_cpu():
    out = _run(
        """
        import torch
        from megatron_minio3.parallel import activate_cpu_compat
        assert activate_cpu_compat() and activate_cpu_compat()  # idempotent
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.tensor([1.0], device=torch.device("cuda", 0)).cuda().to("cuda:0")
        torch.cuda.synchronize()
        print(a.device, b.device, c.device)
        """
    )
    assert out == "cpu cpu cpu"


def test_without_activation_cuda_arguments_still_fail():
    out = _run(
        """
        import torch
        try:
            torch.zeros(1, device="cuda")
            print("no error")
        except (RuntimeError, AssertionError) as e:
            print("error")
        """
    )
    assert out == "error"


def test_grad_clip_matches_torch_on_a_single_rank():
    out = _run(
        """
        import torch
        from megatron_minio3.parallel import init_parallel, destroy_parallel
        from megatron_minio3.parallel.grad import clip_grad_norm_
        init_parallel()
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        for p, q in zip(a, b):
            g = torch.randn_like(p) * 3
            p.grad, q.grad = g.clone(), g.clone()
        n1 = clip_grad_norm_(a, 1.0)
        n2 = float(torch.nn.utils.clip_grad_norm_(b, 1.0))
        assert abs(n1 - n2) < 1e-4 * n2, (n1, n2)
        assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6) for p, q in zip(a, b))
        destroy_parallel()
        print("ok", n1 > 1.0)
        """
    )
    assert out == "ok True"


@pytest.mark.parametrize("world,tp,pp,cp,dp", [(8, 2, 2, 1, 2), (4, 4, 1, 1, 1), (8, 1, 2, 2, 2)])
def test_data_parallel_size(world, tp, pp, cp, dp):
    assert validate_parallel_sizes(world, tp, pp, cp) == dp


def test_sizes_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp\*cp = 4\*1\*1"):
        validate_parallel_sizes(6, 4, 1)
    with pytest.raises(ValueError, match="parallel.pp must be >= 1"):
        validate_parallel_sizes(2, 1, 0)
