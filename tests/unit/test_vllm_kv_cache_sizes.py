"""Every test and tool that starts vLLM gives it an explicit KV cache size.

Without one, vLLM CPU sizes the cache as a share of free RAM (`gpu_memory_utilization`), which on a loaded
2-core machine came out negative ("Available memory ... less than requested memory for kv (-0.1/1.1 GiB)").
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# vLLM's own entry points: they must get kv_cache_memory_bytes.
VLLM_CALLS = {"LLM", "EngineArgs", "AsyncEngineArgs"}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _positive_keyword(call: ast.Call, key: str) -> bool:
    for keyword in call.keywords:
        if keyword.arg == key:
            value = keyword.value
            return not (isinstance(value, ast.Constant) and not value.value)
    return False


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    starts_engine = any(_name(call.func) == "VllmEngine" for call in calls)
    offences = []
    for call in calls:
        name = _name(call.func)
        where = f"{path.relative_to(REPO_ROOT)}:{call.lineno}"
        if name in VLLM_CALLS and not _positive_keyword(call, "kv_cache_memory_bytes"):
            offences.append(f"{where}: {name}(...) without kv_cache_memory_bytes")
        # our engine takes its size from RolloutConfig.kv_cache_memory_mb (0 = vLLM's share of free memory)
        if starts_engine and name == "RolloutConfig" and not _positive_keyword(call, "kv_cache_memory_mb"):
            offences.append(f"{where}: RolloutConfig(...) for a VllmEngine without kv_cache_memory_mb")
    return offences


def test_every_vllm_start_in_tests_and_tools_sizes_its_kv_cache():
    files = sorted([*REPO_ROOT.glob("tests/**/*.py"), *REPO_ROOT.glob("tools/**/*.py")])
    assert len(files) > 20
    offences = [offence for path in files for offence in _offences(path)]
    assert not offences, "\n".join(offences)


def test_configs_used_by_tests_size_the_kv_cache():
    from megatron_minio3.config import load_config

    for name in ("tiny_cpu.yaml", "demo_cpu.yaml"):
        assert load_config(REPO_ROOT / "configs" / name).rollout.kv_cache_memory_mb > 0, name
