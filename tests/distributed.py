"""Launching multi-process (torchrun, gloo) test workers."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_minio3.parallel import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_torchrun(
    script: str | os.PathLike,
    nproc: int,
    args: Sequence[str] = (),
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``torchrun --nproc_per_node nproc script args`` with this interpreter; raises with the output on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *map(str, args),
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} x{nproc} failed (exit {proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return proc
