"""Packaging and layering rules (ARCHITECTURE.md)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ssmcore

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    return out.stdout


def test_import_ssmcore_loads_no_heavy_library():
    code = (
        "import sys, json, ssmcore\n"
        "ssmcore.__dir__()\n"
        "print(json.dumps(sorted(m for m in ('torch', 'cupy', 'numba') if m in sys.modules)))\n"
    )
    assert json.loads(_run(code)) == []


def test_reference_and_ops_import_no_backend():
    code = (
        "import sys, json, ssmcore, ssmcore.reference\n"
        "import ssmcore.ops.scan, ssmcore.ops.conv, ssmcore.ops.state_update, ssmcore.ops.ssd, ssmcore.ops.norm\n"
        "print(json.dumps(sorted(m for m in ('torch', 'cupy', 'numba') if m in sys.modules)))\n"
    )
    assert json.loads(_run(code)) == []


def test_one_import_root():
    assert importlib.util.find_spec("ssmcore.backends.numba") is not None
    assert importlib.util.find_spec("ssmcore.backends.cupy") is not None
    assert importlib.util.find_spec("ssmcore.adapters.torch") is not None
    # Outside the repository, no top-level 'backends' or 'adapters' package comes from this distribution.
    code = (
        "import importlib.util, json\n"
        "specs = [importlib.util.find_spec(n) for n in ('backends', 'adapters')]\n"
        "print(json.dumps([s.origin if s else None for s in specs]))\n"
    )
    for origin in json.loads(_run(code)):
        assert origin is None or str(ROOT) not in origin


def test_layout():
    for path in ("ssmcore", "backends", "adapters", "tests", "bench", "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize(
    "name",
    [
        "selective_scan", "selective_scan_bwd", "causal_conv1d", "causal_conv1d_bwd", "causal_conv1d_update",
        "selective_state_update", "ssd", "ssd_bwd", "rms_norm", "rms_norm_bwd", "layer_norm", "layer_norm_bwd",
        "gated_rms_norm", "gated_rms_norm_bwd",
    ],
)
def test_public_op_exists_in_core_and_numba_backend(name):
    import ssmcore.backends.numba as nb

    op = getattr(ssmcore, name)
    assert callable(op) and op.__doc__, name
    assert callable(getattr(nb, name))


def test_non_array_argument_is_a_type_error():
    import numpy as np

    with pytest.raises(TypeError, match=r"^x:"):
        ssmcore.rms_norm([[1.0, 2.0]], np.ones(2, np.float32))


def test_console_script_info():
    out = subprocess.run(["ssmcore", "info"], capture_output=True, text=True, check=True).stdout
    assert "ssmcore" in out and "numba" in out
