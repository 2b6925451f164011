"""The CUDA bridge's result mapping, checked without a GPU: a CuPy array over a block from the op-scope
allocator becomes a torch tensor by views of the block's uint8 tensor (no DLPack). CuPy builds arrays over
any pointer without touching a device, so a CPU uint8 tensor stands in for the CUDA block here; the GPU
tests (tests/gpu/test_torch_gpu.py) run the real path."""

import numpy as np
import pytest
import torch

cupy = pytest.importorskip("cupy")

from ssmcore.adapters.torch import _bridge  # noqa: E402


def block_array(nbytes, dtype, shape, strides_elems, offset_elems):
    _bridge._import_cupy("test")
    base = torch.empty(((nbytes + 15) >> 4) << 4, dtype=torch.uint8)
    mem = cupy.cuda.UnownedMemory(base.data_ptr(), nbytes, _bridge._Block(base), 0)
    item = np.dtype(dtype).itemsize
    ptr = cupy.cuda.MemoryPointer(mem, offset_elems * item)
    a = cupy.ndarray(shape, dtype, ptr, tuple(s * item for s in strides_elems))
    return base, a


@pytest.mark.parametrize("dtype,torch_dtype", [(np.float32, torch.float32), (_bridge._BF16, torch.bfloat16),
                                               (np.float16, torch.float16), (np.int64, torch.int64)])
@pytest.mark.parametrize("shape,strides,offset", [((3, 5), (5, 1), 0), ((2, 3, 4), (1, 8, 2), 3), ((7,), (2,), 1),
                                                  ((), (), 2)])
def test_block_result_maps_to_views(dtype, torch_dtype, shape, strides, offset):
    base, a = block_array(256, dtype, shape, strides, offset)
    t = _bridge.to_tensor(a)
    assert t.dtype == torch_dtype and tuple(t.shape) == shape and t.stride() == strides
    assert t.data_ptr() == a.data.ptr
    assert t.untyped_storage().data_ptr() == base.data_ptr()  # the block's storage: keeps it alive
    assert not t._is_view()  # custom-op outputs must not be views (autograd forbids in-place on them)
    # Writing through the tensor lands in the block at the array's addresses.
    t.fill_(1)
    assert int(base.count_nonzero()) > 0 or t.numel() == 0


def test_results_sharing_a_block_are_not_both_fresh():
    base, a = block_array(256, np.float32, (4, 4), (4, 1), 0)
    b = a[1:3]  # a view of the same block: fresh_outputs must clone one of them
    assert _bridge._block_of(a) is not None and _bridge._block_of(b) is _bridge._block_of(a)
    first, second = _bridge.fresh_outputs((a, b), (), torch.device("cpu"))
    assert first.untyped_storage().data_ptr() == base.data_ptr()  # the first result keeps the block
    assert second.untyped_storage().data_ptr() != base.data_ptr()  # the second, sharing it, is cloned
    plain = cupy.ndarray((2,), np.float32, cupy.cuda.MemoryPointer(
        cupy.cuda.UnownedMemory(base.data_ptr(), 8, base, 0), 0))
    assert _bridge._block_of(plain) is None and _bridge._from_block(plain, _bridge._block_of(plain)) is None  # input views keep DLPack
    assert _bridge._block_of(np.zeros(3)) is None
