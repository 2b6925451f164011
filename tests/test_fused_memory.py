"""Memory of the fused mixer paths (adapters/torch/fused.py) on CPU tensors: what they keep for the
backward, the live bytes through forward + backward, and that the memory savings change no gradient.

``LiveBytes`` is a dispatch mode that follows every tensor storage created while it is active (weak
references on the storages: a storage counts from the op that made it until it dies), so ``peak`` is
the torch-level peak above what existed before, as ``torch.cuda.max_memory_allocated`` sees it on the
GPU minus the backends' internal scratch. ``cuda_scratch`` adds a model of the CuPy backend's
scratch (its float32 work buffers and contiguous copies, read from backends/cupy/*.py) at each op call,
so that ``gpu_peak`` predicts the H200 number of bench/profile_block.py.

    python3 tests/test_fused_memory.py [--batch 8] [--length 2048] [--d-model 1024] [--kinds Mamba Mamba2] [--log]

prints that accounting (MiB) for the benchmark's blocks, fp32 parameters under bf16 autocast (about 40 s per
block on 2 CPU cores at the default shape; --log lists the ops near each step of the live bytes).
"""

from __future__ import annotations

import argparse
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ssmcore.adapters.torch.fused import mamba_inner_fn, mamba_split_conv1d_scan_combined
from ssmcore.adapters.torch.modules import Mamba, Mamba2

MIB = 2**20


# ------------------------------------------------------------------------------------ the tracker


def _pow2_ceil(n):
    return 1 << max(0, (n - 1).bit_length())


def _dense(t, order):
    """t's strides are those of a dense tensor with dims laid out in ``order`` (outermost first)."""
    expect = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def _nbytes(*shape, item=4):
    n = item
    for s in shape:
        n *= int(s)
    return n


def _copy_bytes(t, contiguous_ok=None):
    """Bytes of the contiguous copy the CuPy backend makes of t (0 if t is C-contiguous or absent)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    if t.is_contiguous() or (contiguous_ok is not None and contiguous_ok(t)):
        return 0
    return t.numel() * t.element_size()


def cuda_scratch(name, args, sm_count=132):
    """Bytes the CuPy backend allocates inside op ``name`` beyond its outputs (its peak, approximately)."""
    if name == "selective_scan_bwd":
        dout, u, delta, A, B, C = args[:6]
        nb, nd, length = u.shape
        n = A.shape[1]
        npad = _pow2_ceil(n)
        wide = max(min(npad, 4), npad // 32)
        narrow = max(1, wide // 4, npad // 32)
        s = wide if nb * nd * (npad // wide) >= sm_count * 512 else narrow
        r = npad // s
        chunk = min(64 // s, 32, max(8, 512 // (128 // r)))
        ckpt = _nbytes(nb, -(-length // chunk), nd, s * r)
        bc = sum(_nbytes(nb, 1 if X.dim() == 3 else X.shape[1], n, length) for X in (B, C) if X.dim() >= 3)
        return ckpt + bc
    if name == "causal_conv1d_fwd":
        x = args[0]
        if _dense(x, (0, 2, 1)):
            return 0
        # a channel slice of wider channel-last rows is read in place; other layouts are copied contiguous
        if x.stride(1) == 1 and x.shape[1] % 8 == 0:
            return 0
        return _copy_bytes(x)
    if name == "causal_conv1d_bwd":
        dout, x = args[:2]
        if x.stride(1) == 1 and x.shape[1] > 1:  # channel-last: x and dout dense (B, L, D) or copied so
            return sum(0 if _dense(t, (0, 2, 1)) else t.numel() * t.element_size() for t in (x, dout))
        return _copy_bytes(x) + _copy_bytes(dout)
    if name in ("gated_rms_norm_fwd", "gated_rms_norm_bwd"):  # rows read through their stride (unit last axis)
        return sum(_copy_bytes(t, lambda t: t.stride(-1) == 1 and t.dim() == 3 and t.stride(0) == t.shape[1]
                               * t.stride(1)) for t in args[:4])
    if name == "ssd_fwd":
        x, dt, A, B, C, chunk = args[:6]
        b, length, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        nc = -(-length // min(int(chunk), length))
        states = _nbytes(b, nc, h, p, n)
        starts = _nbytes(b, nc, h, p, n, item=x.element_size())
        cb = _nbytes(b, nc, g, 10, 64, 64)  # ntri = 10 triangles of 64 x 64 for a 256-chunk (small)
        return states + starts + cb + _nbytes(b, h, nc * min(int(chunk), length)) * 2
    if name == "ssd_bwd":
        dy_in, x, dt, A, B, C, chunk, D, z = args[:9]
        b, length, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        q = min(int(chunk), 256, length)
        nc = -(-length // q)
        nt = -(-q // 64)
        copies = sum(_copy_bytes(t) for t in (x, B, C, dy_in, z))
        small = _nbytes(b, length, h) * 7 + _nbytes(b, nc, h, nt, q) * 4 + _nbytes(b, nc, h, nt, p)
        work = (_nbytes(b, length, h, p)  # dy in float32
                + 2 * _nbytes(b, nc, g, q, q)  # cb, F
                + 2 * _nbytes(b, nc, h, p, n)  # h0, dh
                + 2 * _nbytes(b, length, g, n))  # dB, dC (float32)
        if z is not None:
            work += 3 * _nbytes(b, length, h, p)  # dz, hC, dhB (float32)
        tiles = nt * -(-n // 64)
        splits = max(1, min(h // g, -(-800 // (nc * g * tiles * b))))
        if splits > 1:
            work += 2 * splits * _nbytes(b, length, g, n) + 2 * _nbytes(b, length, g, n)
        return copies + small + work
    return 0


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created under the mode; ``peak`` / ``gpu_peak`` (with ``cuda_scratch``)."""

    def __init__(self, log=False, existing=()):
        super().__init__()
        self.live = self.peak = self.gpu_peak = 0
        self.ptrs = {}
        # storages made before the mode (inputs, parameters) are not counted when an op returns a view of them
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.log = [] if log else None
        self._last = 0

    def _free(self, ptr):
        self.live -= self.ptrs.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                nbytes = storage.nbytes()
                if nbytes and ptr not in self.ptrs and ptr not in self.existing:
                    self.ptrs[ptr] = nbytes
                    self.live += nbytes
                    weakref.finalize(storage, self._free, ptr)
        self.peak = max(self.peak, self.live)
        name = func.__name__.split(".")[0] if func.namespace == "ssmcore" else None
        scratch = cuda_scratch(name, args) if name else 0
        self.gpu_peak = max(self.gpu_peak, self.live + scratch)
        if self.log is not None and (name or abs(self.live - self._last) >= 2**24):
            self.log.append((str(func), self.live, scratch))
        self._last = self.live
        return out


def block_step(kind, batch, length, d_model, dtype=torch.bfloat16, log=False, **kw):
    """fwd+bwd of a block as bench/profile_block.py runs it: (tracker, output, grads)."""
    torch.manual_seed(0)
    if kind == "Mamba":
        module = Mamba(d_model, d_state=kw.pop("d_state", 16), **kw)
    else:
        module = Mamba2(d_model, d_state=kw.pop("d_state", 128), headdim=kw.pop("headdim", 64),
                        chunk_size=kw.pop("chunk_size", 256), **kw)
    x = torch.randn(batch, length, d_model, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    params = [p for p in module.parameters() if p.requires_grad]
    with LiveBytes(log, [x, g] + params) as mem:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32 and dtype != torch.float64):
            out = module(x)
        grads = torch.autograd.grad(out, [x] + params, g)
    return mem, out, grads


# ------------------------------------------------------------------------------------ tests


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("kind", ["Mamba", "Mamba2"])
def test_block_peak_live_bytes(kind):
    """Torch-level peak of one block's fwd+bwd above its inputs, in units of one (B, L, D_in) bf16 activation.

    B2 L256 d_model 64 under bf16 autocast: 9.55 (Mamba) and 9.44 (Mamba2) units with the session-6 backward,
    12.65 and 13.69 before it (the intermediates held to the end of the backward, y and out_z for all of it).
    """
    batch, length, d_model = 2, 256, 64
    kw = dict(d_state=8) if kind == "Mamba" else dict(d_state=16, headdim=16, chunk_size=32)
    mem, _, _ = block_step(kind, batch, length, d_model, **kw)
    unit = batch * length * 2 * d_model * 2
    assert mem.peak <= 10.0 * unit, mem.peak / unit


def _assert_same(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert torch.equal(x, y)


def _mamba_case(dtype=torch.float64):
    torch.manual_seed(1)
    module = Mamba(16, d_state=4, d_conv=3, dtype=dtype)
    u = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    return module, u


def _mamba2_case(dtype=torch.float64, rmsnorm=True, d_ssm=None):
    torch.manual_seed(2)
    module = Mamba2(16, d_state=8, headdim=8, chunk_size=8, d_conv=3, rmsnorm=rmsnorm, d_ssm=d_ssm, dtype=dtype)
    u = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    return module, u


@pytest.mark.parametrize("case", ["mamba", "mamba2", "mamba2_no_norm", "mamba2_mlp"])
def test_stash_hooks_and_retain_graph_give_the_same_gradients(case):
    """The intermediates kept on ctx (plain eager) or saved (under saved-tensor hooks) give bitwise the same
    output and gradients, and a second backward through a retained graph (which recomputes what the first
    dropped) too."""
    make = {"mamba": _mamba_case, "mamba2": _mamba2_case,
            "mamba2_no_norm": lambda: _mamba2_case(rmsnorm=False),
            "mamba2_mlp": lambda: _mamba2_case(d_ssm=16)}[case]
    module, u = make()
    inputs = [u] + [p for p in module.parameters()]
    g = torch.randn(u.shape, dtype=u.dtype)
    out = module(u)
    plain = torch.autograd.grad(out, inputs, g, retain_graph=True)
    again = torch.autograd.grad(out, inputs, g)
    _assert_same(plain, again)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out_hooked = module(u)
    assert torch.equal(out, out_hooked)
    _assert_same(plain, torch.autograd.grad(out_hooked, inputs, g))


@pytest.mark.parametrize("case", ["mamba", "mamba2"])
def test_fused_gradients_match_unfused(case):
    """The fused path (memory-saving backward) against autograd through the separate ops, float64."""
    module, u = _mamba_case() if case == "mamba" else _mamba2_case()
    inputs = [u] + [p for p in module.parameters()]
    g = torch.randn(u.shape, dtype=u.dtype)
    fused = torch.autograd.grad(module(u), inputs, g, allow_unused=True)
    if case == "mamba":
        module.use_fast_path = False
    else:
        module.use_mem_eff_path = False
    plain = torch.autograd.grad(module(u), inputs, g, allow_unused=True)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("checkpoint_lvl", [0, 1])
def test_inner_fn_with_z_apart_equals_xz(checkpoint_lvl):
    """MambaInnerFn with x and z apart (the module's path) against the public mamba_inner_fn(xz), float64:
    same output, dxz = [dx, dz], same parameter gradients."""
    from ssmcore.adapters.torch.fused import MambaInnerFn

    torch.manual_seed(5)
    b, d, length, n, r = 2, 12, 19, 4, 3
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, d, length, **f64, requires_grad=True)
    z = torch.randn(b, d, length, **f64, requires_grad=True)
    weights = [torch.randn(d, 1, 4, **f64, requires_grad=True), torch.randn(d, **f64, requires_grad=True),
               torch.randn(r + 2 * n, d, **f64, requires_grad=True), torch.randn(d, r, **f64, requires_grad=True),
               torch.randn(8, d, **f64, requires_grad=True), torch.randn(8, **f64, requires_grad=True)]
    A, D, bias = -torch.rand(d, n, **f64) - 0.5, torch.randn(d, **f64), torch.randn(d, **f64)
    g = torch.randn(b, length, 8, **f64)
    apart = MambaInnerFn.apply(x, *weights, A, None, None, D, bias, None, None, True, checkpoint_lvl, z)
    ga = torch.autograd.grad(apart, [x, z] + weights, g)
    xz = torch.cat([x, z], dim=1).detach().requires_grad_(True)
    one = mamba_inner_fn(xz, *weights, A, None, None, D, bias, checkpoint_lvl=checkpoint_lvl)
    go = torch.autograd.grad(one, [xz] + weights, g)
    torch.testing.assert_close(apart, one, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat(ga[:2], dim=1), go[0], rtol=1e-10, atol=1e-12)
    for a, o in zip(ga[2:], go[1:]):
        torch.testing.assert_close(a, o, rtol=1e-10, atol=1e-12)


def test_split_conv_equals_one_conv():
    """The backward's conv of x's channels and of B, C's apart gives bitwise the single conv's values, with x
    contiguous."""
    from ssmcore.adapters.torch.fused import _conv_xBC

    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        zxbcdt = torch.randn(2, 11, 3 + 16 + 16 + 2 * 8 + 2, dtype=dtype)
        xBC = zxbcdt[..., 19:19 + 32]
        weight, bias = torch.randn(32, 4), torch.randn(32)
        one = _conv_xBC(xBC, weight, bias, None, "silu", 2, 1, 8)
        two = _conv_xBC(xBC, weight, bias, None, "silu", 2, 1, 8, split=True)
        assert two[0].is_contiguous()
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_saved_bytes_of_the_fused_functions():
    """What the fused functions keep for the backward (plain eager): Mamba-1 xz, x_dbl and the small
    parameters (out_z lives on ctx until the backward's first step); Mamba-2 zxbcdt and the parameters (y
    on ctx until the norm's backward)."""
    torch.manual_seed(4)
    b, d, length, n, r = 2, 24, 40, 4, 3
    xz = torch.randn(b, 2 * d, length, requires_grad=True)
    weights = [torch.randn(d, 1, 4, requires_grad=True), torch.randn(d, requires_grad=True),
               torch.randn(r + 2 * n, d, requires_grad=True), torch.randn(d, r, requires_grad=True),
               torch.randn(8, d, requires_grad=True), None]
    A = -torch.rand(d, n) - 0.5
    _, saved = _saved_bytes(lambda: mamba_inner_fn(xz, *weights, A, None, None, torch.randn(d), torch.randn(d)))
    params = sum(w.numel() * 4 for w in weights if w is not None) + A.numel() * 4 + 2 * d * 4
    x_dbl = b * length * (r + 2 * n) * 4
    # saved-tensor hooks see out_z too (saved normally when hooks are active): xz + x_dbl + out_z + params
    assert saved <= xz.numel() * 4 + x_dbl + b * d * length * 4 + params + 64

    h, p, g, n2 = 2, 8, 1, 8
    dim = h * p
    zxbcdt = torch.randn(b, length, 2 * dim + 2 * g * n2 + h, requires_grad=True)
    conv_w, conv_b = torch.randn(dim + 2 * g * n2, 4), torch.randn(dim + 2 * g * n2)
    out_w = torch.randn(8, dim)
    _, saved2 = _saved_bytes(lambda: mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, torch.rand(h), -torch.rand(h) - 0.5, torch.randn(h), 8, headdim=p,
        rmsnorm_weight=torch.randn(dim), outproj_weight=out_w))
    small = (conv_w.numel() + conv_b.numel() + out_w.numel() + dim + 3 * h) * 4
    assert saved2 <= zxbcdt.numel() * 4 + b * length * dim * 4 + small + 64


class OpCounts(TorchDispatchMode):
    """(op name, output numel) of every op dispatched under the mode (ssmcore custom ops included: a dispatch
    mode sends the fused functions through torch.ops.ssmcore)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        self.ops.append((str(func.overloadpacket), first.numel() if isinstance(first, torch.Tensor) else 0))
        return out

    def count(self, name, min_numel=0):
        return sum(1 for op, n in self.ops if op == name and n >= min_numel)


_COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")


def test_mamba_step_runs_one_scan_forward_and_no_activation_copies():
    """One training step of the Mamba block (fp32 parameters, bf16 autocast, the profile_block setting): one
    scan forward, one scan backward, the conv twice forward (forward + recompute) and once backward, and no
    copy of a (B, D_in, L)-sized tensor (session 7: out_z's, conv_out's and ddelta's transposing copies in the
    backward became batched GEMMs reading them in place). Copies left (11): the scan's (B, N, L) B and C (twice:
    forward and recompute), the (B, L, N) dB / dC and (B, L, R) dt parts of dx_dbl, and autocast's casts of the
    four projection weights (their gradients come out of float32 sums, no casts back)."""
    torch.manual_seed(0)
    batch, length, d_model = 2, 128, 32  # activations (B, D_in, L) larger than any weight or (B, N, L)
    module = Mamba(d_model, d_state=16)
    d_inner = module.d_inner
    x = torch.randn(batch, length, d_model, dtype=torch.bfloat16, requires_grad=True)
    params = list(module.parameters())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        return torch.autograd.grad(out, [x] + params, torch.randn_like(out))

    step()
    with OpCounts() as ops:
        step()
    assert ops.count("ssmcore.selective_scan_fwd") == 1
    assert ops.count("ssmcore.selective_scan_bwd") == 1
    assert ops.count("ssmcore.causal_conv1d_fwd") == 2
    assert ops.count("ssmcore.causal_conv1d_bwd") == 1
    activation = batch * d_inner * length
    big = [(op, n) for op, n in ops.ops if op in _COPIES and n >= activation // 2]
    assert not big, big
    copies = sum(ops.count(name) for name in _COPIES)
    assert copies <= 11, [(op, n) for op, n in ops.ops if op in _COPIES]


def test_mamba_checkpoints_go_from_forward_to_backward(monkeypatch):
    """The CUDA path's plumbing, on CPU with stand-ins: the forward's checkpoints reach the scan backward once;
    a second backward through a retained graph recomputes (the op path); gradients are the same."""
    from ssmcore.adapters.torch import fused

    calls = []
    ckpt_marker = torch.zeros(1)

    def fwd(u, delta, A, B, C, D, z, delta_bias, softplus):
        calls.append("fwd")
        out, _ = fused._ops.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, None, softplus)
        return out, ckpt_marker

    def bwd(dout, u, delta, A, B, C, D, z, delta_bias, softplus, ckpt):
        assert ckpt is ckpt_marker
        calls.append("bwd")
        return fused._ops.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, None, None, softplus)

    module, u = _mamba_case()
    inputs = [u] + list(module.parameters())
    g = torch.randn(u.shape, dtype=u.dtype)
    want = torch.autograd.grad(module(u), inputs, g)
    monkeypatch.setattr(fused, "_keep_checkpoints", lambda t: True)
    monkeypatch.setattr(fused, "_scan_fwd_checkpoints", fwd)
    monkeypatch.setattr(fused, "_scan_bwd_checkpoints", bwd)
    out = module(u)
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g)
    assert calls == ["fwd", "bwd"]
    with torch.no_grad():  # no backward to follow: the plain forward
        module(u)
    assert calls == ["fwd", "bwd"]
    _assert_same(want, first)
    _assert_same(want, second)


@pytest.mark.parametrize("bias", [False, True])
def test_in_proj_apart_matches_linear(bias):
    """Mamba's in_proj halves (modules._InProjApart: its own backward) against F.linear + split, float64
    (gradcheck too) and under bf16 autocast (same bf16 inputs, float32 sums: close to autograd's)."""
    from ssmcore.adapters.torch.modules import _in_proj_apart

    torch.manual_seed(7)
    proj = torch.nn.Linear(6, 10, bias=bias, dtype=torch.float64)
    h = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    leaves = [h] + list(proj.parameters())
    x, z = _in_proj_apart(proj, h, 5)
    xz = torch.nn.functional.linear(h, proj.weight, proj.bias).transpose(1, 2)
    torch.testing.assert_close(torch.cat([x, z], dim=1), xz, rtol=1e-12, atol=1e-12)
    assert x.is_contiguous() and z.is_contiguous()
    gx, gz = torch.randn_like(x), torch.randn_like(z)
    got = torch.autograd.grad((x * gx).sum() + (z * gz).sum(), leaves)
    want = torch.autograd.grad((xz * torch.cat([gx, gz], dim=1)).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[0].is_contiguous()
    torch.autograd.gradcheck(lambda *t: _in_proj_apart(proj, t[0], 5), (h,))

    proj32 = torch.nn.Linear(6, 10, bias=bias)
    h32 = torch.randn(3, 7, 6, requires_grad=True)
    leaves32 = [h32] + list(proj32.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, z = _in_proj_apart(proj32, h32, 5)
        xz = torch.nn.functional.linear(h32, proj32.weight, proj32.bias).transpose(1, 2)
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([x, z], dim=1), xz, rtol=1e-2, atol=1e-2)
    g = torch.randn(3, 10, 7, dtype=torch.bfloat16)
    got = torch.autograd.grad((torch.cat([x, z], dim=1).float() * g.float()).sum(), leaves32)
    want = torch.autograd.grad((xz.float() * g.float()).sum(), leaves32)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("states", [False, True])
def test_causal_conv1d_fn_eager_autograd_equals_the_custom_op(monkeypatch, states):
    """causal_conv1d_fn under autograd in plain eager mode (functional._CausalConv1dFn over the ops' direct
    calls) against the custom op's registered autograd: bitwise the same output, final states and gradients."""
    from ssmcore.adapters.torch import functional

    torch.manual_seed(6)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, weight = torch.randn(2, 5, 11, **f64), torch.randn(5, 3, **f64)
    bias = None if states else torch.randn(5, **f64)
    init = torch.randn(2, 5, 2, **f64) if states else None
    leaves = [t for t in (x, weight, bias, init) if t is not None]

    def run():
        res = functional.causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=states,
                                          activation="silu")
        outs = res if states else (res,)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
        return outs, torch.autograd.grad(loss, leaves)

    assert functional._eager_autograd(x, weight)
    got = run()
    monkeypatch.setattr(functional, "_eager_autograd", lambda *t: False)
    want = run()
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])


# ------------------------------------------------------------------------------------ accounting


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--scale-to", type=int, default=None,
                    help="report as if batch were this (scales the weight casts too: a rough figure)")
    ap.add_argument("--kinds", nargs="+", default=["Mamba", "Mamba2"])
    ap.add_argument("--log", action="store_true", help="print the ops near the peak")
    args = ap.parse_args()
    scale = (args.scale_to or args.batch) / args.batch
    for kind in args.kinds:
        mem, _, _ = block_step(kind, args.batch, args.length, args.d_model, log=args.log)
        print(f"{kind} B{args.scale_to or args.batch} L{args.length} d_model {args.d_model} (measured at B{args.batch}, x{scale:g}):"
              f" torch-level peak {mem.peak * scale / MIB:7.1f} MiB, with modelled CuPy scratch"
              f" {mem.gpu_peak * scale / MIB:7.1f} MiB")
        if args.log:
            for op, live, scratch in mem.log:
                print(f"   {live * scale / MIB:8.1f} + {scratch * scale / MIB:7.1f}  {op}")


if __name__ == "__main__":
    main()
