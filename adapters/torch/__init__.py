"""PyTorch adapter of ssmcore (``ssmcore.adapters.torch``).

Importing it registers ssmcore's ops as ``torch.library`` custom ops in the ``ssmcore``
namespace (``torch.ops.ssmcore.selective_scan_fwd``, ...; see :mod:`.ops`), with autograd and
fake (meta) implementations, so they train, compile with ``torch.compile(fullgraph=True)`` and
run on CPU tensors (Numba backend) and CUDA tensors (CuPy backend).

Drop-in names keep the reference packages' signatures, so moving from mamba-ssm /
causal-conv1d is a one-line import change::

    from ssmcore.adapters.torch import selective_scan_fn, causal_conv1d_fn, mamba_chunk_scan_combined

The functions load with the package; the fused training paths, modules and the language model
load on first use.
"""

from __future__ import annotations

import importlib

from . import ops
from .functional import (
    causal_conv1d_fn,
    causal_conv1d_update,
    layer_norm_fn,
    mamba_chunk_scan_combined,
    rms_norm_fn,
    rmsnorm_fn,
    selective_scan_fn,
    selective_state_update,
)

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    "mamba_inner_fn": "fused",
    "mamba_split_conv1d_scan_combined": "fused",
    "Block": "modules",
    "GatedMLP": "modules",
    "MHA": "modules",
    "Mamba": "modules",
    "Mamba2": "modules",
    "Mamba2Simple": "modules",
    "RMSNorm": "modules",
    "RMSNormGated": "modules",
    "MambaConfig": "models",
    "MambaLMHeadModel": "models",
    "MixerModel": "models",
    "InferenceParams": "inference",
}

__all__ = sorted([
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "layer_norm_fn",
    "mamba_chunk_scan_combined",
    "ops",
    "rms_norm_fn",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
    *_LAZY,
])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
