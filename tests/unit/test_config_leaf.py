"""config/ is the leaf of the package: importing it (and loading every shipped config) imports nothing else of
megatron_minio3, so no import circle can form between the configuration and the parts it configures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path
import megatron_minio3.config as config
for path in sorted(Path("configs").glob("*.yaml")):
    config.load_config(path)
others = sorted(m for m in sys.modules if m.startswith("megatron_minio3.") and not m.startswith("megatron_minio3.config"))
print(others)
"""


def test_config_imports_and_loads_every_shipped_config_without_the_rest_of_the_package():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
