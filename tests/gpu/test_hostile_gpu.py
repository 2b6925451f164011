"""Hostile inputs for every public op on the GPU (CuPy backend), and flat memory while generating.

Same builders as tests/test_hostile.py (valid small problems), moved to CuPy, then one thing made
hostile: layouts (non-contiguous, negative strides, Fortran order: same result), wrong dtypes
(float64 has no GPU kernel), wrong ranks/shapes, mixed devices (NumPy with CuPy, two GPUs), empty
and one-element sizes, NaN/inf data, out-of-range / repeated pool indices. After every call the
device is synchronised, so an illegal memory access fails the test that caused it.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import sys

import numpy as np
import pytest

import ssmcore

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import assert_close  # noqa: E402
from test_hostile import (ARRAY_ARGS, BASE, DATA_ARG, INDEX_ARGS, INPLACE_ARGS, LAYOUTS, OPS,  # noqa: E402
                          SIZE_LETTERS, _arrays, _first, _low_dtype)

GPU_DTYPES = ("float32", "float16", "bfloat16")


def _sync():
    if hasattr(cupy, "cuda"):  # (the CPU emulator's stand-in for cupy has no devices)
        cupy.cuda.Device().synchronize()


@pytest.fixture(autouse=True)
def _emulator_shim():
    """Under the CPU emulator (tests/gpu on the CPU, cupy replaced by a NumPy shim), fill in the few
    array functions this file uses. On a real GPU this does nothing."""
    if not hasattr(cupy, "cuda"):
        for name in ("concatenate", "repeat"):
            if not hasattr(cupy, name):
                setattr(cupy, name, getattr(np, name))
    yield


def _to_gpu(kw):
    return {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


def _host(out):
    if isinstance(out, tuple):
        return tuple(_host(o) for o in out)
    return None if out is None else cupy.asnumpy(out)


def _problem(op, dtype, dims=BASE, seed=0):
    kw = OPS[op][0](np.random.default_rng(seed), dtype, dims)
    return kw, _to_gpu(kw)


def _call(op, kw):
    out = getattr(ssmcore, op)(**kw)
    _sync()
    return out


def _expect_error(op, kw, bad):
    params = set(inspect.signature(getattr(ssmcore, op)).parameters)
    with pytest.raises((ValueError, TypeError)) as info:
        _call(op, kw)
    msg = str(info.value)
    assert msg.split(":", 1)[0] in params, f"{op}: message does not start with an argument name: {msg!r}"
    assert bad in msg, f"{op}: hostile {bad} not named in {msg!r}"
    _sync()


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_matches_cpu(op, dtype):
    host, dev = _problem(op, dtype)
    want = getattr(ssmcore, op)(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in host.items()})
    got = _host(_call(op, dev))
    for g, w in zip(_arrays(got), _arrays(want)):
        assert_close(g, w, _low_dtype(host), name=op)


def _device_view(a, layout):
    """``a`` on the GPU as a strided view, built without device kernels (bf16 needs none):
    the data is laid out on the host and uploaded, then viewed."""
    if not a.ndim:
        return cupy.asarray(a)
    if layout == "flipped":  # negative strides on every axis
        sl = (slice(None, None, -1),) * a.ndim
        return cupy.asarray(np.ascontiguousarray(a[sl]))[sl]
    if layout == "fortran":
        axes = tuple(reversed(range(a.ndim)))
        return cupy.asarray(np.ascontiguousarray(a.transpose(axes))).transpose(axes)
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)  # noncontig: every other element
    big[..., 1::2] = a
    return cupy.asarray(big)[..., 1::2]


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gpu_layouts_give_the_same_result(op, layout):
    host, dev = _problem(op, "bfloat16", seed=1)
    base = _host(_call(op, dev))
    _, dev = _problem(op, "bfloat16", seed=1)  # fresh in-place states
    kw = {k: (_device_view(v, layout) if isinstance(v, np.ndarray) and k not in INPLACE_ARGS else dev[k])
          for k, v in host.items()}
    if hasattr(cupy, "cuda"):
        assert any(isinstance(v, cupy.ndarray) and v.ndim > 1 and not v.flags.c_contiguous for v in kw.values())
    got = _host(_call(op, kw))
    for g, w in zip(_arrays(got), _arrays(base)):
        assert_close(g, w, "bfloat16", name=f"{op} {layout}")


@pytest.mark.parametrize("op,arg", [c for c in ARRAY_ARGS if c[1] not in INDEX_ARGS])
def test_float64_and_int_have_no_gpu_kernel(op, arg):
    host, dev = _problem(op, "float32")
    dev[arg] = cupy.asarray(host[arg]).astype(cupy.float64)
    try:
        out = _call(op, dev)
    except (ValueError, TypeError) as err:
        assert str(err).split(":", 1)[0] in inspect.signature(getattr(ssmcore, op)).parameters, str(err)
    else:  # float64 parameters may be converted; then the result must still be right
        want = getattr(ssmcore, op)(**host)
        for g, w in zip(_arrays(_host(out)), _arrays(want)):
            assert_close(g, w, "float32", name=f"{op} {arg} float64")
    for bad in ("int32", "bool", "complex64"):
        host2, dev2 = _problem(op, "float32")
        dev2[arg] = cupy.asarray(np.abs(host2[arg]) * 3).astype(bad)
        _expect_error(op, dev2, arg)


@pytest.mark.parametrize("op,arg", ARRAY_ARGS)
@pytest.mark.parametrize("how", ["add_dim", "drop_dim", "grow"])
def test_gpu_wrong_rank_or_shape(op, arg, how):
    _, dev = _problem(op, "float32")
    a = dev[arg]
    if how == "add_dim":
        a = cupy.ascontiguousarray(cupy.repeat(a[..., None], 2, axis=-1))
    elif how == "drop_dim":
        a = cupy.ascontiguousarray(a).reshape(-1) if a.ndim > 1 else a[0]
    else:
        if a.ndim == 0:
            return
        axis = 1 if arg in INPLACE_ARGS else int(np.argmax(a.shape))
        a = cupy.concatenate([a, a[(slice(None),) * axis + (slice(0, 1),)]], axis=axis)
    dev[arg] = a
    _expect_error(op, dev, arg)


@pytest.mark.parametrize("op,arg", ARRAY_ARGS)
def test_gpu_host_array_mixed_in_is_refused(op, arg):
    if not hasattr(cupy, "cuda"):
        pytest.skip("the emulator's arrays are NumPy arrays")
    host, dev = _problem(op, "float32")
    dev[arg] = host[arg]
    with pytest.raises(ValueError, match="same device"):
        _call(op, dev)


@pytest.mark.parametrize("op", sorted(OPS))
def test_gpu_second_device_mixed_in_is_refused(op):
    if not hasattr(cupy, "cuda") or cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    host, dev = _problem(op, "float32")
    arg = [k for k, v in host.items() if isinstance(v, np.ndarray)][-1]
    with cupy.cuda.Device(1):
        dev[arg] = cupy.asarray(host[arg])
    with pytest.raises(ValueError, match=rf"^{arg}: is in GPU 1"):
        _call(op, dev)


@pytest.mark.parametrize("op", sorted(OPS))
def test_gpu_empty_and_one_element_sizes(op):
    letters = SIZE_LETTERS[op]
    params = set(inspect.signature(getattr(ssmcore, op)).parameters)
    for combo in itertools.product([0, 1, 2], repeat=len(letters)):
        dims = dict(BASE, **dict(zip(letters, combo)))
        if dims["W"] == 0:
            continue
        try:
            host, dev = _problem(op, "float32", dims)
        except ValueError:
            continue
        try:
            out = _host(_call(op, dev))
        except (ValueError, TypeError) as err:
            assert str(err).split(":", 1)[0] in params, f"{op} {dims}: {err}"
            continue
        want = getattr(ssmcore, op)(**host)
        for g, w in zip(_arrays(out), _arrays(want)):
            assert_close(g, w, "float32", name=f"{op} {dims}")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_gpu_non_finite_data_propagates(op, value):
    host, dev = _problem(op, "bfloat16", seed=2)
    arg = DATA_ARG[op]
    a = host[arg].copy()
    a.reshape(-1)[a.size // 2] = value
    dev[arg] = cupy.asarray(a)
    out = _host(_call(op, dev))
    assert not np.isfinite(np.asarray(_first(out), np.float64)).all()


@pytest.mark.parametrize("op,arg,state", [("causal_conv1d_update", "conv_state_indices", "conv_state"),
                                          ("selective_state_update", "state_batch_indices", "state")])
@pytest.mark.parametrize("how", ["too_big", "repeated", "huge"])
def test_gpu_bad_pool_indices(op, arg, state, how):
    _, dev = _problem(op, "float32")
    idx = dev[arg].copy()
    rows = dev[state].shape[0]
    idx[-1] = {"too_big": rows, "repeated": int(idx[0]), "huge": 2**31 - 1}[how]
    dev[arg] = idx
    before = dev[state].copy()
    _expect_error(op, dev, arg)
    assert bool((dev[state] == before).all())


def test_gpu_cu_seqlens_not_ending_at_L():
    _, dev = _problem("ssd", "float32", dict(BASE, B=1))
    dev.pop("seq_idx")
    dev["cu_seqlens"] = cupy.asarray([0, 2, 9], dtype=cupy.int32)
    _expect_error("ssd", dev, "cu_seqlens")


# ------------------------------------------------------------------------------------ torch on CUDA

torch = pytest.importorskip("torch")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")


@needs_cuda
@pytest.mark.parametrize("name", ["Mamba", "Mamba2"])
def test_module_on_cuda_with_cpu_input_is_refused(name):
    from ssmcore.adapters.torch.modules import Mamba, Mamba2

    m = (Mamba(d_model=16, d_state=4) if name == "Mamba" else Mamba2(d_model=32, d_state=8, headdim=16)).cuda()
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        m(torch.randn(2, 5, 16 if name == "Mamba" else 32))
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_generation_gpu_memory_is_flat(kind):
    """10,000 decode steps: torch.cuda.memory_allocated sampled every 1,000 tokens stays flat, up to the
    one (B,) token tensor per step that generate keeps for its result (512 B allocator blocks)."""
    from ssmcore.adapters.torch.generation import generate
    from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel

    ssm = (dict(d_state=16, d_conv=4, expand=2) if kind == "mamba1"
           else dict(layer="Mamba2", d_state=32, d_conv=4, expand=2, headdim=16, chunk_size=64))
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=64, ssm_cfg=ssm), device="cuda").eval()
    prompt = torch.randint(0, 64, (2, 7), device="cuda")
    samples = []

    class Sampler:
        count = -1

        def put(self, tokens):
            self.count += 1
            if self.count and self.count % 1000 == 0:
                torch.cuda.synchronize()
                samples.append((self.count, torch.cuda.memory_allocated()))

        def end(self):
            pass

    with torch.no_grad():
        generate(model, prompt, max_length=7 + 20)
        torch.cuda.synchronize()
        out = generate(model, prompt, max_length=7 + 10_000, streamer=Sampler())
    assert out.shape == (2, 7 + 10_000)
    base = samples[1][1]
    growth = max(m for _, m in samples[1:]) - base
    print(f"{kind}: memory_allocated samples {samples}, growth {growth} B over 8000 tokens")
    assert growth <= 8000 * 1024, samples
