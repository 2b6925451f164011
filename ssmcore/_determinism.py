"""Deterministic mode: one switch that backward kernels consult.

``deterministic()`` is true when either

* the environment variable ``SSMCORE_DETERMINISTIC`` is set to ``1`` (also
  ``true``/``yes``/``on``, case-insensitive), or
* PyTorch is already imported and ``torch.use_deterministic_algorithms(True)``
  is in effect.

PyTorch is looked up in ``sys.modules`` only: asking never imports torch, so
``import ssmcore`` stays cheap. Backends call this at launch time (not at
import time), so flipping either switch takes effect on the next call.
"""

from __future__ import annotations

import os
import sys

_ENV = "SSMCORE_DETERMINISTIC"
_TRUE = frozenset({"1", "true", "yes", "on"})


def _env_on() -> bool:
    return os.environ.get(_ENV, "").strip().lower() in _TRUE


def _torch_on() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    probe = getattr(torch, "are_deterministic_algorithms_enabled", None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # a half-initialised torch must not break an op
        return False


def deterministic() -> bool:
    """True when ssmcore must produce bitwise reproducible results (see module doc)."""
    return _env_on() or _torch_on()


__all__ = ["deterministic"]
