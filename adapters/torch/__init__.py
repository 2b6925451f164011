"""PyTorch adapter of ssmcore (``ssmcore.adapters.torch``).

Importing it registers ssmcore's ops as ``torch.library`` custom ops in the ``ssmcore``
namespace (``torch.ops.ssmcore.selective_scan_fwd``, ...; see :mod:`.ops`), with autograd and
fake (meta) implementations, so they train, compile with ``torch.compile(fullgraph=True)`` and
run on CPU tensors (Numba backend) and CUDA tensors (CuPy backend).

Drop-in functions keep the reference packages' names and signatures, so moving from
mamba-ssm / causal-conv1d is a one-line import change::

    from ssmcore.adapters.torch import selective_scan_fn, causal_conv1d_fn, mamba_chunk_scan_combined
"""

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

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "layer_norm_fn",
    "mamba_chunk_scan_combined",
    "ops",
    "rms_norm_fn",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
]
