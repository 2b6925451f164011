"""Backends of ssmcore, installed as ``ssmcore.backends``.

``numba``: CPU kernels (NumPy arrays). ``cupy``: CUDA/HIP kernels compiled at run
time (CuPy arrays). Each backend module exposes functions named like the public
ops (``selective_scan``, ``selective_scan_bwd``, ...) taking the same arguments,
already validated by ``ssmcore.ops``. Backends never import torch.
"""
