"""Torch tensors <-> backend arrays, without copies.

CPU tensors become NumPy arrays over the same memory (bfloat16 through an int16 view
re-typed as ``ml_dtypes.bfloat16``), so the core runs them on the Numba backend. CUDA
tensors become CuPy arrays built straight from ``data_ptr()`` and strides (no DLPack
capsule on the way in: it costs tens of microseconds per call), and every launch
goes on torch's current stream, so CUDA-graph capture records it. Results come back
with ``torch.from_numpy`` / ``torch.from_dlpack``.

CuPy is imported the first time a CUDA tensor passes, so this module imports on
machines without it.
"""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import torch

_BF16 = np.dtype(ml_dtypes.bfloat16)
_CPU = contextlib.nullcontext()


def span_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to one past its last (0 when empty)."""
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)
    return (last + 1) * t.element_size()


class _HostView:
    """``__array_interface__`` over a CPU tensor's memory; the NumPy array built from it keeps it (and so
    the tensor) alive. About twice as fast as ``np.from_dlpack(t.detach())``, and like DLPack it leaves
    the storage resizable (``Tensor.numpy()`` would not)."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, t: torch.Tensor, typestr: str):
        self.owner = t
        size = t.element_size()
        self.__array_interface__ = {
            "version": 3, "data": (t.data_ptr(), False), "shape": tuple(t.shape),
            "strides": tuple(s * size for s in t.stride()), "typestr": typestr,
        }


# torch dtype -> (typestr of the memory, NumPy dtype to view it as or None): the dtypes that take the
# fast CPU path; any other dtype goes through DLPack (complex with its conj/neg bits resolved).
_HOST_FAST = {
    torch.float32: (np.dtype(np.float32).str, None), torch.float16: (np.dtype(np.float16).str, None),
    torch.float64: (np.dtype(np.float64).str, None), torch.bfloat16: (np.dtype(np.int16).str, _BF16),
    torch.int32: (np.dtype(np.int32).str, None), torch.int64: (np.dtype(np.int64).str, None),
}


def to_array(name: str, t: torch.Tensor | None):
    """The NumPy (CPU) or CuPy (CUDA) array over ``t``'s memory; None stays None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_cpu:
        fast = _HOST_FAST.get(t.dtype)
        if fast is not None and t.numel() > 0 and type(t) in _PLAIN and not t.is_neg():
            a = np.asarray(_HostView(t, fast[0]))
            return a if fast[1] is None else a.view(fast[1])
        # DLPack, not Tensor.numpy(): numpy() marks the storage non-resizable for good, which
        # breaks FSDP2's freeing of unsharded parameters (storage.resize_(0)) after forward.
        t = t.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            return np.from_dlpack(t.view(torch.int16)).view(_BF16)
        return np.from_dlpack(t)
    if t.is_cuda:
        return _cupy_view(name, t)
    raise TypeError(f"{name}: tensors on {t.device.type} are not supported (CPU or CUDA)")


def to_tensor(a) -> torch.Tensor:
    """A torch tensor over a NumPy/CuPy result array's memory."""
    if isinstance(a, (np.ndarray, np.generic)):
        a = np.asarray(a)
        if not a.flags.writeable or min(a.strides, default=0) < 0:
            a = a.copy()  # torch.from_numpy takes neither read-only nor reversed arrays
        if a.dtype == _BF16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    t = _from_block(a, _block_of(a))
    if t is not None:
        return t
    if a.dtype == _BF16:
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


# Tensor types whose data_ptr() is real memory (a subclass such as a fake or functional tensor goes
# through DLPack, which refuses what has none).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _extent(t: torch.Tensor) -> tuple:
    """(first byte, one past the last byte) of a non-empty tensor's memory."""
    start = t.data_ptr()
    return start, start + (t.numel() * t.element_size() if t.is_contiguous() else span_bytes(t))


def _overlaps_any(extent: tuple, others) -> bool:
    a0, a1 = extent
    return any(a0 < b1 and b0 < a1 for b0, b1 in others)


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> bool:
    """True when ``t`` is laid out as ``torch.empty_like(like)`` would be: equal strides on every dimension longer
    than 1 (the ones that say where elements are), or, for a ``like`` with gaps (a slice of wider rows), ``t`` dense
    with its dimensions in the same stride order (empty_like infers such dense strides)."""
    if all(a == b for n, a, b in zip(t.shape, t.stride(), like.stride()) if n > 1):
        return True
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    order = sorted(dims, key=lambda d: t.stride(d))
    if order != sorted(dims, key=lambda d: like.stride(d)) or _dense_order(like, order):
        return False
    return _dense_order(t, order)


def _dense_order(t: torch.Tensor, order) -> bool:
    """True when ``t``'s dimensions ``order`` (its dimensions longer than 1, by increasing stride) cover its
    elements without gaps."""
    expect = 1
    for d in order:
        if t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def fresh_outputs(results, inputs, device: torch.device, like=()) -> tuple:
    """Torch tensors for result arrays, in a fixed memory layout, owning memory nothing else shares.

    An op's fake implementation must predict its outputs' strides, so each output is made
    C-contiguous, or laid out as ``torch.empty_like(like[i])`` where ``like[i]`` is a tensor
    (causal conv outputs follow x's layout); a copy happens only when a backend chose another
    layout. A custom op must not return an alias of an input or the same memory twice, and a
    backend may hand back an input unchanged (a no-op dtype cast) or one array for two
    results: those are cloned. ``None`` results become the ``absent`` placeholder.
    """
    out = []
    taken = None  # extents of the inputs (on ``device``) and of the outputs so far, built on first need
    n_like = len(like)
    for i, a in enumerate(results):
        if a is None:
            out.append(absent(device))
            continue
        block = _block_of(a)
        t = _from_block(a, block)
        if t is None:
            t = to_tensor(a)
        reference = like[i] if i < n_like else None
        if reference is not None and t.shape == reference.shape:
            if not _same_layout(t, reference):
                t = torch.empty_like(reference, dtype=t.dtype).copy_(t)
        elif not t.is_contiguous():
            t = t.contiguous()
        if t.numel() > 0:
            # A NumPy array owning its memory (base None), met once, is memory the backend allocated for
            # this result: every input reached the backend as a view (base not None). Others are checked.
            fresh = ((type(a) is np.ndarray and a.base is None) or block is not None) and not any(
                a is r or (block is not None and block is _block_of(r)) for r in results[:i])
            if not fresh and taken is None:
                taken = [_extent(x) for x in inputs if x is not None and x.numel() > 0 and x.device == device]
                taken += [_extent(x) for x in out if x.numel() > 0]
            if taken is not None:
                extent = _extent(t)
                if not fresh and _overlaps_any(extent, taken):
                    t = t.clone(memory_format=torch.preserve_format)
                    extent = _extent(t)
                taken.append(extent)
        out.append(t)
    return tuple(out)


def absent(device) -> torch.Tensor:
    """The placeholder an op returns in place of an absent (None) result: float32, shape (0,)."""
    return torch.empty(0, device=device)


def backend_scope(t: torch.Tensor):
    """Context in which the backend runs ``t``'s op: for CUDA, torch's device, current stream and allocator.

    Convert results back (``fresh_outputs``) inside it too: DLPack's stream handshake then sees
    the producer and consumer streams as one, so it adds no wait and never touches the legacy
    default stream, which a CUDA-graph capture forbids.
    """
    if t.device.type != "cuda":
        return _CPU
    return _cuda_scope(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------- CUDA (CuPy)

_cupy = None
_streams: dict = {}


def _import_cupy(name: str):
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as err:
            raise TypeError(
                f"{name}: is a CUDA tensor, but CuPy is not installed; install ssmcore[cuda12] or ssmcore[cuda13]"
            ) from err
        _cupy = cupy
    return _cupy


_NP_DTYPES = {
    torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16), torch.bfloat16: _BF16,
    torch.float64: np.dtype(np.float64), torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64),
    torch.int16: np.dtype(np.int16), torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_), torch.complex64: np.dtype(np.complex64),
}


_CUPY_CTORS = None  # (UnownedMemory, MemoryPointer, ndarray), looked up once: this runs per tensor per op call


def _cupy_view(name: str, t: torch.Tensor):
    """A CuPy array over a CUDA tensor's memory, keeping the tensor alive as the owner."""
    global _CUPY_CTORS
    if _CUPY_CTORS is None:
        cupy = _import_cupy(name)
        _CUPY_CTORS = (cupy.cuda.UnownedMemory, cupy.cuda.MemoryPointer, cupy.ndarray)
    dtype = _NP_DTYPES.get(t.dtype)
    if dtype is None:
        raise TypeError(f"{name}: dtype {t.dtype} has no CuPy equivalent")
    device = t.get_device()
    item = dtype.itemsize
    shape = tuple(t.shape)
    if t.is_contiguous():
        nbytes = t.numel() * item
        strides = None  # C order
    else:
        nbytes = span_bytes(t)
        strides = tuple([s * item for s in t.stride()])
    if nbytes == 0:
        cupy = _cupy
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype)
    unowned, pointer, ndarray = _CUPY_CTORS
    memory = pointer(unowned(t.data_ptr(), nbytes, t, device), 0)
    return ndarray(shape, dtype, memory) if strides is None else ndarray(shape, dtype, memory, strides)


def _external_stream(cupy, torch_stream, device: int):
    """A CuPy stream over a torch stream (CuPy >= 14: the CUDA stream protocol; before: ExternalStream)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device)


class _Block:
    """Owner of a CuPy allocation made in an op's scope: the torch uint8 tensor holding the bytes (from torch's
    caching allocator). A result array over such a block becomes a torch tensor over the same storage
    (``_from_block``), without DLPack; the block goes back to torch when both sides let go."""

    __slots__ = ("tensor", "__weakref__")  # weakly referenced by the launch-plan recorder (_plans.py)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


_TORCH_DEVICES: dict = {}


def _torch_malloc(size: int):
    """CuPy allocator drawing from torch's caching allocator on torch's current stream.

    Backend outputs and scratch then live in torch's memory pool (no second pool beside it),
    and allocations during a CUDA-graph capture come from the graph's private pool instead of
    a cudaMalloc, which a capture forbids. Sizes are rounded up to 16 bytes, so that a block can be
    viewed as any element type.
    """
    cupy = _cupy
    device = cupy.cuda.runtime.getDevice()
    if size == 0:
        if _alloc_hook is not None:
            _alloc_hook(0, None)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
    where = _TORCH_DEVICES.get(device)
    if where is None:
        where = _TORCH_DEVICES[device] = torch.device("cuda", device)
    block = torch.empty(((size + 15) >> 4) << 4, dtype=torch.uint8, device=where)
    owner = _Block(block)
    if _alloc_hook is not None:
        _alloc_hook(size, owner)
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, owner, device), 0)


# While the launch-plan recorder (_plans.py) runs: called as (requested bytes, _Block or None) by every
# allocation of an op's scope, from _torch_malloc's frame (it looks at the allocating caller); None otherwise.
_alloc_hook = None


def _block_of(a):
    """The _Block under a CuPy array allocated in an op's scope, else None."""
    if _cupy is None or not isinstance(a, _cupy.ndarray):
        return None
    owner = getattr(a.data.mem, "_owner", None)
    return owner if type(owner) is _Block else None


_TORCH_OF_NP: dict = {}


def _from_block(a, block):
    """The torch tensor over ``a``, a result array in ``block`` (``_block_of(a)``), else None."""
    if block is None:
        return None
    if not _TORCH_OF_NP:
        _TORCH_OF_NP.update({v: k for k, v in _NP_DTYPES.items()})
    dtype = _TORCH_OF_NP.get(a.dtype)
    item = a.itemsize
    offset = a.data.ptr - a.data.mem.ptr
    if dtype is None or offset % item or any(st < 0 or st % item for st in a.strides):
        return None
    # A tensor over the block's storage that is not a view of it (set_, not as_strided): custom-op outputs
    # must not be views, or autograd forbids in-place changes of them later.
    base = block.tensor
    return base.new_empty((0,), dtype=dtype).set_(
        base.untyped_storage(), offset // item, a.shape, tuple([st // item for st in a.strides]))


def _current_raw_stream(device: int) -> int:
    """torch's current CUDA stream on ``device`` as a cudaStream_t int, without building a Stream object."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device)
    return torch.cuda.current_stream(device).cuda_stream


class _cuda_scope:
    """For one op call: CuPy's current device, stream and allocator set to torch's.

    Plain calls instead of ``cupy.cuda.using_allocator`` (a generator context manager) and no device
    switch when CuPy's current device is already the tensor's: this runs once per op call.
    """

    __slots__ = ("device", "_device_ctx", "_stream", "_allocator")

    def __init__(self, device: int):
        self.device = device

    def __enter__(self):
        cupy = _import_cupy("tensor")
        key = (self.device, _current_raw_stream(self.device))
        stream = _streams.get(key)
        if stream is None:
            torch_stream = torch.cuda.current_stream(self.device)
            key = (self.device, torch_stream.cuda_stream)
            stream = _streams[key] = _external_stream(cupy, torch_stream, self.device)
        if cupy.cuda.runtime.getDevice() != self.device:
            self._device_ctx = cupy.cuda.Device(self.device)
            self._device_ctx.__enter__()
        else:
            self._device_ctx = None
        stream.__enter__()
        self._stream = stream
        memory = cupy.cuda.memory
        self._allocator = memory._get_thread_local_allocator()
        memory._set_thread_local_allocator(_torch_malloc)
        return self

    def __exit__(self, *exc):
        _cupy.cuda.memory._set_thread_local_allocator(self._allocator)
        self._stream.__exit__(*exc)
        if self._device_ctx is not None:
            self._device_ctx.__exit__(*exc)
        return False
