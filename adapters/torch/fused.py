"""Memory-saving fused mixer paths for training (mamba-ssm's ``mamba_inner_fn`` and
``mamba_split_conv1d_scan_combined``).

Each is one ``torch.autograd.Function`` from the mixer's in_proj output to its out_proj
output. Autograd through the separate ops would keep every intermediate alive until the
backward: the conv output, dt, the gated scan output, the normed output. These functions
keep only the in_proj output, the small projection ``x_dbl`` (Mamba-1) and one (B, L, D)
activation (the gated scan output / the SSD output, dropped early in the backward: see
``_stash``), and recompute the conv (and dt) in the backward, as the reference does; the
backward frees each temporary after its last use (bench/NOTES.md, session 6, MEM6). Shapes use the glossary letters (B batch, L length,
D channels, N state size, G groups, H heads, P head dim, W conv width).

Under autocast the weights are cast to the autocast dtype once, and the body runs with
autocast off, so the forward and the recomputing backward see the same dtypes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _plans, ops
from ._bridge import backend_scope, fresh_outputs, to_array

# torch.ops.ssmcore, straight to each op's implementation in plain eager mode (the autograd.Functions below run their
# forward and backward with grad mode off, so inference, prefill and training all skip the torch.library dispatch;
# torch.compile, fake tensors and other tracing still see the custom ops).
_ops = ops.eager


def _autocast_dtype(t: torch.Tensor):
    """The autocast dtype active for ``t``'s device type, or None."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _grad_like(grad, t):
    """``grad`` in the dtype of the input it belongs to (None when the input was None)."""
    return None if t is None or grad is None else grad.to(t.dtype)


def _present(grad, t):
    """A backward op's placeholder for an absent input becomes None."""
    return None if t is None else grad


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


# ---------------------------------------------------------------------------------- Mamba-1


class MambaInnerFn(torch.autograd.Function):
    """in_proj output -> conv + silu -> x_proj -> dt, B, C -> selective scan gated by z -> out_proj."""

    @staticmethod
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                delta_softplus=True, checkpoint_lvl=1, z=None, backward_follows=None):
        # z given (ssmcore's Mamba module): xz is x alone, (B, D, L), and z comes apart; both may then be contiguous
        # (the conv reads a contiguous x without copying it) and their gradients come back apart (no dxz).
        # backward_follows: False when the caller knows no backward will run (grad mode was off at the call; the
        # forward itself always runs with it off): then no scan checkpoints are kept.
        if checkpoint_lvl not in (0, 1):
            raise ValueError(f"checkpoint_lvl: expected 0 (store conv output and dt) or 1 (recompute them), "
                             f"got {checkpoint_lvl!r}")
        if A.is_complex():
            raise TypeError("A: complex A is not supported by ssmcore's selective scan; expected a real (D, N) tensor")
        input_dtypes = tuple(None if t is None else t.dtype
                             for t in (xz, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias))
        ctx.z_dtype = None if z is None else z.dtype
        dtype = _autocast_dtype(xz)
        if dtype is not None:
            xz, z = xz.to(dtype), _cast(z, dtype)
            x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias = (
                _cast(t, dtype) for t in (x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias))
        with _no_autocast(xz):
            conv_weight = conv1d_weight.reshape(conv1d_weight.shape[0], conv1d_weight.shape[-1])
            x, z = xz.chunk(2, dim=1) if z is None else (xz, z)
            conv_out = _conv_silu(x, conv_weight, conv1d_bias)
            x_dbl = _x_proj(conv_out, x_proj_weight)  # (B*L, R + 2N)
            delta = _delta(x_dbl, delta_proj_weight, xz.shape[0])
            B_scan, C_scan = _scan_BC(x_dbl, B, C, B_proj_bias, C_proj_bias, delta_proj_weight.shape[1],
                                      A.shape[-1], xz.shape[0])
            ckpt = None
            if backward_follows is not False and any(ctx.needs_input_grad) and _keep_checkpoints(conv_out):
                out_z, ckpt = _scan_fwd_checkpoints(conv_out, delta, A, B_scan, C_scan, D, z, delta_bias,
                                                    bool(delta_softplus))
            else:
                out_z, _ = _ops.selective_scan_fwd(conv_out, delta, A, B_scan, C_scan, D, z, delta_bias, None,
                                                   bool(delta_softplus))
            out = F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)
        if checkpoint_lvl == 1:
            conv_out = delta = None
        # The scan's state checkpoints (CUDA, plain eager: see _keep_checkpoints) go to the scan backward, which
        # then skips its own checkpoint pass (a second scan forward); dropped there.
        ctx.ckpt = ckpt
        # out_z only feeds the out_proj weight gradient, the backward's first step: kept on ctx (see _stash) it
        # is dropped before the scan backward, the peak of the backward.
        ctx.out_z = out_z if _stash() else None
        ctx.save_for_backward(xz, conv_weight, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight,
                              out_proj_weight, conv_out, delta, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                              None if ctx.out_z is not None else out_z, z if ctx.z_dtype is not None else None)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.has_out_proj_bias = out_proj_bias is not None
        ctx.input_dtypes = input_dtypes
        ctx.conv_weight_shape = conv1d_weight.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        (xz, conv_weight, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight, out_proj_weight, conv_out, delta,
         A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, out_z, z_apart) = ctx.saved_tensors
        if out_z is None:
            out_z, ctx.out_z = ctx.out_z, None
        batch, _, length = xz.shape
        rank, dstate = delta_proj_weight.shape[1], A.shape[-1]
        # Peak memory: every (B, D, L) temporary is dropped right after its last use (the scan backward, with
        # its checkpoints, is the peak); see bench/NOTES.md, session 6 (helper MEM6).
        with _no_autocast(xz):
            x, z = xz.chunk(2, dim=1) if z_apart is None else (xz, z_apart)
            if conv_out is None:
                conv_out = _conv_silu(x, conv_weight, conv1d_bias)
                delta = _delta(x_dbl, delta_proj_weight, batch)
            B_scan, C_scan = _scan_BC(x_dbl, B, C, B_proj_bias, C_proj_bias, rank, dstate, batch)
            ckpt, ctx.ckpt = getattr(ctx, "ckpt", None), None
            if out_z is None:  # a second backward (retain_graph) after the first dropped it
                out_z, _ = _ops.selective_scan_fwd(conv_out, delta, A, B_scan, C_scan, D, z, delta_bias, None,
                                                   ctx.delta_softplus)
            dout = dout.to(out_proj_weight.dtype).reshape(batch * length, -1)  # (B*L, E)
            # Products with a (B, D, L) operand contract over (b, l), which no single stride spans: batched GEMMs
            # over b read it in place (no (B*L, D) transposing copy) and their (B, ., .) results are summed.
            dout_proj_weight = _batch_sum(torch.bmm(dout.view(batch, length, -1).transpose(1, 2),
                                                    out_z.transpose(1, 2)))  # (E, D)
            del out_z
            dout_proj_bias = dout.sum(0) if ctx.has_out_proj_bias else None
            # (D, B*L) = W^T dout^T, viewed (B, D, L) with L contiguous: the scan reads it through its strides
            # (no copy), where (dout @ W) viewed (B, D, L) has D contiguous and needs one.
            dout_y = torch.matmul(out_proj_weight.t(), dout.t()).view(-1, batch, length).permute(1, 0, 2)
            if ckpt is not None:
                dconv_out, ddelta, dA, dB, dC, dD, dz, ddelta_bias, _ = _scan_bwd_checkpoints(
                    dout_y, conv_out, delta, A, B_scan, C_scan, D, z, delta_bias, ctx.delta_softplus, ckpt)
            else:
                dconv_out, ddelta, dA, dB, dC, dD, dz, ddelta_bias, _ = _ops.selective_scan_bwd(
                    dout_y, conv_out, delta, A, B_scan, C_scan, D, z, delta_bias, None, None, ctx.delta_softplus)
            del dout_y, delta, B_scan, C_scan, ckpt

            x_dbl3 = x_dbl.view(batch, length, -1)
            # (D, R) = sum over b of ddelta_b (D, L) @ x_dbl_b[:, :R] (L, R)
            ddelta_proj_weight = _batch_sum(torch.bmm(ddelta, x_dbl3[:, :, :rank]))
            # Columns of x_dbl that feed a constant B or C are unused: their gradient is 0.
            dx_dbl = torch.empty_like(x_dbl) if B is None and C is None else torch.zeros_like(x_dbl)
            dx_dbl3 = dx_dbl.view(batch, length, -1)
            dx_dbl3[:, :, :rank].copy_(torch.bmm(ddelta.transpose(1, 2),
                                                 delta_proj_weight.unsqueeze(0).expand(batch, -1, -1)))
            del ddelta
            dB_proj_bias = dC_proj_bias = None
            if B is None:
                dx_dbl3[:, :, rank:rank + dstate].copy_(dB.transpose(1, 2))
                dB_proj_bias = dB.sum((0, 2)) if B_proj_bias is not None else None
                dB = None
            if C is None:
                dx_dbl3[:, :, rank + dstate:rank + 2 * dstate].copy_(dC.transpose(1, 2))
                dC_proj_bias = dC.sum((0, 2)) if C_proj_bias is not None else None
                dC = None
            # (R + 2N, D) = sum over b of dx_dbl_b^T (R + 2N, L) @ conv_out_b^T (L, D)
            dx_proj_weight = _batch_sum(torch.bmm(dx_dbl3.transpose(1, 2), conv_out.transpose(1, 2)))
            del conv_out
            # The x_proj term W_x^T dx_dbl_b^T is accumulated into the scan's gradient (a fresh tensor of ours) by
            # one batched GEMM (no (B*L, D) product and no strided add).
            dconv_out.baddbmm_(x_proj_weight.t().unsqueeze(0).expand(batch, -1, -1),
                               dx_dbl.view(batch, length, -1).transpose(1, 2))
            dx, dconv_weight, dconv_bias, _ = _ops.causal_conv1d_bwd(
                dconv_out.to(x.dtype), x, conv_weight, conv1d_bias, None, None, None, "silu")
            del dconv_out
            if z_apart is not None:
                dxz = dx
            else:
                dxz = torch.empty(xz.shape, dtype=torch.promote_types(dz.dtype, x.dtype), device=xz.device)
                dxz[:, x.shape[1]:].copy_(dz)
                dz = None
                dxz[:, :x.shape[1]].copy_(dx)
            del dx
        xz_dtype, x_proj_dtype, delta_proj_dtype, out_proj_dtype, out_bias_dtype = ctx.input_dtypes
        return (
            dxz.to(xz_dtype),
            dconv_weight.reshape(ctx.conv_weight_shape),
            _present(dconv_bias, conv1d_bias),
            dx_proj_weight.to(x_proj_dtype),
            ddelta_proj_weight.to(delta_proj_dtype),
            dout_proj_weight.to(out_proj_dtype),
            None if dout_proj_bias is None else dout_proj_bias.to(out_bias_dtype),
            dA, dB, dC, _present(dD, D), _present(ddelta_bias, delta_bias),
            _grad_like(dB_proj_bias, B_proj_bias), _grad_like(dC_proj_bias, C_proj_bias),
            None, None, None if z_apart is None else dz.to(ctx.z_dtype), None,
        )


def _stash() -> bool:
    """Whether an intermediate the backward needs only briefly may live on ``ctx`` (dropped there as soon as it
    is used) instead of ``save_for_backward`` (held until the backward returns): in plain eager mode only, so
    that saved-tensor hooks (offloading, checkpointing) and tracing still see every saved tensor. A second
    backward (``retain_graph=True``) recomputes what the first dropped."""
    if torch.compiler.is_compiling():
        return False
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    except (AttributeError, RuntimeError, TypeError):  # an internal API: without it, save everything
        return False


def _batch_sum(t):
    """(B, M, K) per-batch products -> their (M, K) sum, added in float32 (float64 for float64; the caller
    casts to the parameter's dtype)."""
    return t.sum(0, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


# Keep the scan's state checkpoints from the forward for the backward (Mamba-1 fused path, CUDA, plain eager):
# "1" or "0" (default: the backward recomputes them: one more scan forward per step, as the reference's backward
# kernel recomputes its chunks). Kept, they are held from the forward to the backward: (B, L / chunk, D, N padded)
# float32, 64 MiB at B8 D2048 L2048 N16 (chunk 32), one bf16 (B, D, L) activation per layer (~195 -> 259 MiB held per
# layer at that shape; the reference holds ~197): a deep model's activations would grow by a third, so keeping is
# opt-in. A single block's peak (the scan backward, where they exist either way) does not change.
# The module attribute wins when set; else SSMCORE_MAMBA_CKPT, read on every call.
keep_checkpoints = None


def _keep_checkpoints(u) -> bool:
    """Whether MambaInnerFn keeps the scan's checkpoints (CuPy backend, see keep_checkpoints): CUDA tensors in
    plain eager mode with stashing allowed (``_stash``), nothing tracing or intercepting the calls."""
    if not u.is_cuda:
        return False
    knob = keep_checkpoints if keep_checkpoints is not None else os.environ.get("SSMCORE_MAMBA_CKPT", "0") == "1"
    if not knob or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return _stash()


def _scan_arrays(u, delta, A, B, C, D, z, delta_bias, dout=None):
    """Validated CuPy arrays of a selective scan call (the core op's checks, cached the same way)."""
    from ssmcore._checks import ValidCache
    from ssmcore._dispatch import resolve
    from ssmcore.ops import scan as scan_op

    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=None)
    if dout is not None:
        named["dout"] = dout
    call = resolve(**{k: to_array(k, t) for k, t in named.items()})
    key = ValidCache.signature(call.library, call.arrays.values(), ("fused-ckpt", dout is not None))
    if key not in scan_op._VALID:
        dims = scan_op._check_args(call, True)
        if dout is not None:
            dims.check("dout", call.arrays["dout"], "BDL", optional=False)
        scan_op._VALID.add(key)
    return call.arrays


def _scan_fwd_checkpoints(u, delta, A, B, C, D, z, delta_bias, softplus):
    """(out_z, ckpt) of the CuPy scan in one pass (backends/cupy/scan.py: selective_scan_checkpoints), replayed
    from a launch plan when one applies (adapters/torch/_plans.py, as the custom ops' implementations are)."""
    return _plans.run("mamba_inner_scan_fwd_ckpt", _scan_fwd_checkpoints_impl,
                      (u, delta, A, B, C, D, z, delta_bias, softplus), {})


def _scan_fwd_checkpoints_impl(u, delta, A, B, C, D, z, delta_bias, softplus):
    from ssmcore.backends.cupy import scan as cuda_scan

    with backend_scope(u):
        a = _scan_arrays(u, delta, A, B, C, D, z, delta_bias)
        results = cuda_scan.selective_scan_checkpoints(
            a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
            delta_softplus=softplus)
        return fresh_outputs(results, (u, delta, A, B, C, D, z, delta_bias), u.device)


def _scan_bwd_checkpoints(dout, u, delta, A, B, C, D, z, delta_bias, softplus, ckpt):
    """The CuPy scan backward from the forward's checkpoints: the 9 gradients of ops.selective_scan_bwd (absent
    placeholders for absent inputs). No launch plan: the backward allocates with cupy.zeros and reduces with
    CuPy, which the recorder refuses (the op's own backward runs the normal path too)."""
    from ssmcore.backends.cupy import scan as cuda_scan

    with backend_scope(u):
        a = _scan_arrays(u, delta, A, B, C, D, z, delta_bias, dout)
        grads = cuda_scan.selective_scan_bwd(
            a["dout"], a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
            delta_softplus=softplus, ckpt=to_array("ckpt", ckpt))
        return fresh_outputs(grads, (dout, u, delta, A, B, C, D, z, delta_bias, ckpt), u.device)


def _x_proj(conv_out, weight):
    """x_dbl = conv_out's rows (B*L, D) @ W^T as one batched GEMM over (B, L, D) views: (B*L, R + 2N) contiguous,
    without the (B*L, D) transposing copy of conv_out."""
    batch, _, length = conv_out.shape
    out = torch.bmm(conv_out.transpose(1, 2), weight.t().unsqueeze(0).expand(batch, -1, -1))
    return out.view(batch * length, -1)


def _conv_silu(x, weight, bias):
    return _ops.causal_conv1d_fwd(x, weight, bias, None, None, "silu", False)[0]


def _delta(x_dbl, delta_proj_weight, batch):
    """dt before bias and softplus, (B, D, L), from the first R columns of x_dbl (B*L, R + 2N)."""
    rank = delta_proj_weight.shape[1]
    delta = delta_proj_weight @ x_dbl[:, :rank].t()  # (D, B*L)
    return delta.view(delta.shape[0], batch, -1).permute(1, 0, 2)


def _scan_BC(x_dbl, B, C, B_proj_bias, C_proj_bias, rank, dstate, batch):
    """The scan's B and C: the given constant (D, N) ones, or (B, N, L) slices of x_dbl."""
    if B is None:
        B = x_dbl[:, rank:rank + dstate]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = B.reshape(batch, -1, dstate).transpose(1, 2).contiguous()
    if C is None:
        C = x_dbl[:, rank + dstate:rank + 2 * dstate]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = C.reshape(batch, -1, dstate).transpose(1, 2).contiguous()
    return B, C


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1):
    """The whole Mamba-1 mixer after in_proj, recomputing the conv and dt in the backward.

    Args:
        xz: (B, 2D, L), the in_proj output, x then z along the channels.
        conv1d_weight: (D, 1, W) (nn.Conv1d's layout) or (D, W). conv1d_bias: (D,) or None.
        x_proj_weight: (R + 2N, D). delta_proj_weight: (D, R). out_proj_weight: (E, D). out_proj_bias: (E,).
        A: (D, N) float32. B, C: None (input-dependent, from x_proj) or constant (D, N) float32.
        D, delta_bias: (D,) float32, optional. B_proj_bias, C_proj_bias: (N,), optional.
        delta_softplus: softplus on dt + delta_bias. checkpoint_lvl: 1 recomputes the conv output
            and dt in the backward; 0 stores them.

    Returns:
        (B, L, E), the mixer output.
    """
    return MambaInnerFn.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                              out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                              checkpoint_lvl, None, torch.is_grad_enabled())


# ---------------------------------------------------------------------------------- Mamba-2


def _split_sizes(zxbcdt, conv_dim, nheads, headdim, ngroups):
    """(d_nonssm, dim, dstate) of a Mamba-2 in_proj output, checked against the conv width."""
    dim = nheads * headdim
    if (conv_dim - dim) <= 0 or (conv_dim - dim) % (2 * ngroups):
        raise ValueError(f"conv1d_weight: expected {dim} + 2 * ngroups * N channels (ngroups={ngroups}), "
                         f"got {conv_dim}")
    dstate = (conv_dim - dim) // ngroups // 2
    extra = zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads
    if extra < 0 or extra % 2:
        raise ValueError(f"zxbcdt: expected a last dim of 2 * d_mlp + {2 * dim + 2 * ngroups * dstate + nheads} "
                         f"(z, x, B, C, dt for H={nheads}, P={headdim}, G={ngroups}, N={dstate}), "
                         f"got shape {tuple(zxbcdt.shape)}")
    return extra // 2, dim, dstate


def _swiglu(zx0):
    z0, x0 = zx0.chunk(2, dim=-1)
    return F.silu(z0) * x0


def _swiglu_bwd(zx0, dout0):
    """Gradient of silu(z0) * x0 w.r.t. zx0 = [z0, x0], in float32 (float64 for float64) then zx0's dtype."""
    compute = torch.promote_types(zx0.dtype, torch.float32)
    z0, x0 = zx0.to(compute).chunk(2, dim=-1)
    dout0 = dout0.to(compute)
    sig = torch.sigmoid(z0)
    dz0 = dout0 * x0 * sig * (1 + z0 * (1 - sig))
    dx0 = dout0 * z0 * sig
    return torch.cat([dz0, dx0], dim=-1).to(zx0.dtype)


class MambaSplitConv1dScanCombinedFn(torch.autograd.Function):
    """zxbcdt -> conv(xBC) -> SSD -> gated RMSNorm (or z gate) -> [swiglu MLP part] -> out_proj."""

    @staticmethod
    def forward(ctx, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
                rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                ngroups=1, norm_before_gate=True):
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
        if D.dim() == 1:
            if headdim is None:
                raise ValueError("headdim: is required when D has shape (H,), got None")
            nheads = D.shape[0]
        else:
            nheads, headdim = D.shape
        if outproj_weight is None and outproj_bias is not None:
            raise ValueError("outproj_bias: expected None when outproj_weight is None")
        d_nonssm, dim, dstate = _split_sizes(zxbcdt, conv1d_weight.shape[0], nheads, headdim, ngroups)
        proj_dtypes = (None if outproj_weight is None else outproj_weight.dtype,
                       None if outproj_bias is None else outproj_bias.dtype)
        dtype = _autocast_dtype(zxbcdt)
        input_dtype = zxbcdt.dtype
        if dtype is not None:
            zxbcdt = zxbcdt.to(dtype)
            outproj_weight, outproj_bias = _cast(outproj_weight, dtype), _cast(outproj_bias, dtype)
        conv_activation = "silu" if activation in ("silu", "swish") else None
        dt_min, dt_max = float(dt_limit[0]), float(dt_limit[1])
        batch, seqlen, _ = zxbcdt.shape
        with _no_autocast(zxbcdt):
            zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
            x, B, C = _conv_xBC(xBC, conv1d_weight, conv1d_bias, seq_idx, conv_activation, nheads, ngroups, dstate)
            z = z.reshape(batch, seqlen, nheads, headdim)
            y, final_states, _ = _ops.ssd_fwd(
                x, dt, A, B, C, int(chunk_size), D, None if rmsnorm_weight is not None else z, dt_bias,
                initial_states, seq_idx, None, True, dt_min, dt_max, False)
            out = _mixer_out(y, z, zx0, rmsnorm_weight, rmsnorm_eps, dim // ngroups, norm_before_gate)
            if outproj_weight is not None:
                out = F.linear(out, outproj_weight, outproj_bias)
        # y feeds the norm's backward (or, without the norm, the out_proj weight gradient) early in the backward:
        # kept on ctx (see _stash) it is dropped before the SSD backward, the peak of the backward.
        ctx.y = y if _stash() else None
        ctx.save_for_backward(zxbcdt, conv1d_weight, conv1d_bias, None if ctx.y is not None else y, A, D, dt_bias,
                              initial_states, seq_idx, rmsnorm_weight, outproj_weight, outproj_bias)
        ctx.options = (int(chunk_size), dt_min, dt_max, conv_activation, float(rmsnorm_eps), bool(norm_before_gate),
                       headdim, ngroups, d_nonssm, dstate)
        ctx.dtypes = (input_dtype, *proj_dtypes)
        return (out, final_states) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, dfinal_states=None):
        (zxbcdt, conv1d_weight, conv1d_bias, y, A, D, dt_bias, initial_states, seq_idx, rmsnorm_weight,
         outproj_weight, outproj_bias) = ctx.saved_tensors
        (chunk_size, dt_min, dt_max, conv_activation, eps, norm_before_gate, headdim, ngroups, d_nonssm,
         dstate) = ctx.options
        if y is None:
            y, ctx.y = ctx.y, None
        nheads = D.shape[0]
        dim = nheads * headdim
        batch, seqlen, _ = zxbcdt.shape
        # Peak memory (the SSD backward and its float32 work buffers): everything else not needed there is gone
        # by then (y, the out_proj input, dout), and x comes from a conv of its own channels, contiguous, so
        # that the SSD backward does not copy it. See bench/NOTES.md, session 6 (helper MEM6).
        with _no_autocast(zxbcdt):
            zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
            x, B, C = _conv_xBC(xBC, conv1d_weight, conv1d_bias, seq_idx, conv_activation, nheads, ngroups, dstate,
                                split=True)
            z = z.reshape(batch, seqlen, nheads, headdim)
            if y is None:  # a second backward (retain_graph) after the first dropped it
                y = _ops.ssd_fwd(x, dt, A, B, C, chunk_size, D, None if rmsnorm_weight is not None else z, dt_bias,
                                 initial_states, seq_idx, None, True, dt_min, dt_max, False)[0]
            doutproj_weight = doutproj_bias = None
            if outproj_weight is not None:
                dout = dout.to(outproj_weight.dtype)
                out = _mixer_out(y, z, zx0, rmsnorm_weight, eps, dim // ngroups, norm_before_gate)
                doutproj_weight = dout.reshape(-1, dout.shape[-1]).t() @ out.reshape(-1, out.shape[-1])
                del out
                doutproj_bias = dout.sum(dim=(0, 1)) if outproj_bias is not None else None
                dout = dout @ outproj_weight
            dout0, dout1 = dout.split([d_nonssm, dim], dim=-1)
            del dout
            # (no MLP part, the Mamba2 module's case: none of swiglu's dozen torch calls on empty tensors)
            dzx0 = _swiglu_bwd(zx0, dout0) if d_nonssm else None
            del dout0
            drmsnorm_weight = None
            if rmsnorm_weight is not None:
                dy, drmsnorm_weight, dz = _ops.gated_rms_norm_bwd(
                    dout1.to(y.dtype).contiguous(), y.reshape(batch, seqlen, dim), rmsnorm_weight,
                    z.reshape(batch, seqlen, dim), eps, dim // ngroups, norm_before_gate)
                dy = dy.reshape(batch, seqlen, nheads, headdim)
                ssd_z = None
            else:
                dy = dout1.to(y.dtype).reshape(batch, seqlen, nheads, headdim)
                ssd_z = z
            del dout1, y, z
            # The SSD backward reads dt as contiguous float32 and B, C as contiguous rows: given so here (torch: an
            # exact widening, and the copies it would make itself), its call is only allocations and launches, which
            # a launch plan replays (adapters/torch/_plans.py; session 8, helper OVH8). ddt comes back in float32 and
            # is rounded once into dzxbcdt below (the same bits as the SSD's own cast to dt's dtype).
            if dt.is_cuda and dt.dtype != torch.float64:  # (float64 on the CPU backend: kept as it is)
                dt = dt.to(torch.float32, memory_format=torch.contiguous_format)
                B, C = B.contiguous(), C.contiguous()
            dx, ddt, dA, dB, dC, dD, dz_ssd, ddt_bias, dinitial_states = _ops.ssd_bwd(
                dy, x, dt, A, B, C, chunk_size, D, ssd_z, dt_bias, initial_states, seq_idx, None, dfinal_states,
                True, dt_min, dt_max)
            if ssd_z is not None:
                dz = dz_ssd
            del dy, dz_ssd, x, B, C
            # The gradients go straight into preallocated buffers (in the conv's dtype, then zxbcdt's) and each
            # is freed as soon as it is copied, instead of float32 concatenations.
            nx, nbc = dx.shape[2] * dx.shape[3], dB.shape[2] * dB.shape[3]
            dxBC_conv = torch.empty((batch, seqlen, nx + 2 * nbc), dtype=xBC.dtype, device=xBC.device)
            dxBC_conv[..., :nx].copy_(dx.reshape(batch, seqlen, nx))
            dxBC_conv[..., nx:nx + nbc].copy_(dB.reshape(batch, seqlen, nbc))
            dxBC_conv[..., nx + nbc:].copy_(dC.reshape(batch, seqlen, nbc))
            del dx, dB, dC
            dzxbcdt = torch.empty(zxbcdt.shape, dtype=zxbcdt.dtype if dzx0 is None else
                                  torch.promote_types(zxbcdt.dtype, dzx0.dtype),
                                  device=zxbcdt.device)
            if dzx0 is not None:
                dzxbcdt[..., :2 * d_nonssm].copy_(dzx0)
            dzxbcdt[..., 2 * d_nonssm:2 * d_nonssm + dim].copy_(dz.reshape(batch, seqlen, dim))
            dzxbcdt[..., zxbcdt.shape[-1] - nheads:].copy_(ddt)
            del dzx0, dz, ddt
            dxBC, dconv_weight, dconv_bias, _ = _ops.causal_conv1d_bwd(
                dxBC_conv.transpose(1, 2), xBC.contiguous().transpose(1, 2), conv1d_weight,
                conv1d_bias, seq_idx, None, None, conv_activation)
            del dxBC_conv
            dzxbcdt[..., 2 * d_nonssm + dim:zxbcdt.shape[-1] - nheads].copy_(dxBC.transpose(1, 2))
        input_dtype, outproj_weight_dtype, outproj_bias_dtype = ctx.dtypes
        return (
            dzxbcdt.to(input_dtype), dconv_weight, _present(dconv_bias, conv1d_bias), _present(ddt_bias, dt_bias),
            dA, dD, None, _present(dinitial_states, initial_states), None, None, None, None, drmsnorm_weight, None,
            None if doutproj_weight is None else doutproj_weight.to(outproj_weight_dtype),
            None if doutproj_bias is None else doutproj_bias.to(outproj_bias_dtype),
            None, None, None,
        )


def _conv_xBC(xBC, weight, bias, seq_idx, activation, nheads, ngroups, dstate, split=False):
    """Causal conv of xBC (B, L, C) along L, split into x (B, L, H, P), B and C (B, L, G, N).

    split: two convs (the channels are independent), of x's channels and of B and C's, so that x comes out
    contiguous (the SSD backward takes strided x rows only by copying them); same values, one more launch.
    """
    batch, seqlen, _ = xBC.shape
    if split:
        nbc = 2 * ngroups * dstate
        nx = xBC.shape[-1] - nbc
        x = _ops.causal_conv1d_fwd(xBC[..., :nx].transpose(1, 2), weight[:nx], None if bias is None else bias[:nx],
                                   seq_idx, None, activation, False)[0].transpose(1, 2)
        bc = _ops.causal_conv1d_fwd(xBC[..., nx:].transpose(1, 2), weight[nx:], None if bias is None else bias[nx:],
                                    seq_idx, None, activation, False)[0].transpose(1, 2)
        B, C = torch.split(bc, [ngroups * dstate, ngroups * dstate], dim=-1)
        return (x.reshape(batch, seqlen, nheads, -1), B.reshape(batch, seqlen, ngroups, dstate),
                C.reshape(batch, seqlen, ngroups, dstate))
    # xBC is a channel slice of the in_proj output: the channel-last conv reads its rows in place.
    conv = _ops.causal_conv1d_fwd(xBC.transpose(1, 2), weight, bias, seq_idx, None, activation,
                                  False)[0].transpose(1, 2)
    x, B, C = torch.split(conv, [conv.shape[-1] - 2 * ngroups * dstate, ngroups * dstate, ngroups * dstate], dim=-1)
    return (x.reshape(batch, seqlen, nheads, -1), B.reshape(batch, seqlen, ngroups, dstate),
            C.reshape(batch, seqlen, ngroups, dstate))


def _mixer_out(y, z, zx0, rmsnorm_weight, eps, group_size, norm_before_gate):
    """The input of out_proj: [swiglu(zx0),] then the (normed and) gated SSD output y."""
    batch, seqlen = y.shape[:2]
    y = y.reshape(batch, seqlen, -1)
    if rmsnorm_weight is not None:
        y = _ops.gated_rms_norm_fwd(y, rmsnorm_weight, z.reshape(batch, seqlen, -1), eps, group_size,
                                    norm_before_gate)
    if zx0.shape[-1] == 0:
        return y
    return torch.cat([_swiglu(zx0).to(y.dtype), y], dim=-1)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """The whole Mamba-2 mixer after in_proj, recomputing the conv in the backward.

    Args:
        zxbcdt: (B, L, 2 * d_mlp + 2 * H*P + 2 * G*N + H): [z0, x0] (a swiglu MLP part, may be empty),
            z, x, B, C, dt along the last dim.
        conv1d_weight: (H*P + 2*G*N, W). conv1d_bias: (H*P + 2*G*N,) or None.
        dt_bias: (H,) float32. A: (H,) float32. D: (H,) (then headdim is required) or (H, P), float32.
        chunk_size: SSD chunk length (a speed knob). initial_states: (B, H, P, N) float32, optional.
        seq_idx: (B, L) int32, optional. dt_limit: (min, max) clamp of softplus(dt + dt_bias).
        return_final_states: also return the (B, H, P, N) float32 final states.
        activation: of the conv, None, "silu" or "swish".
        rmsnorm_weight: (H*P,) for the gated RMSNorm (statistics per group of H*P / ngroups channels);
            None gates the SSD output with silu(z) instead. rmsnorm_eps: its eps.
        outproj_weight: (E, d_mlp + H*P), optional. outproj_bias: (E,), optional.
        norm_before_gate: RMSNorm(y) * silu(z) if True, RMSNorm(y * silu(z)) if False.

    Returns:
        out (B, L, E) (or (B, L, d_mlp + H*P) without outproj_weight), or (out, final_states).
    """
    return MambaSplitConv1dScanCombinedFn.apply(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                                initial_states, seq_idx, dt_limit, return_final_states, activation,
                                                rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim,
                                                ngroups, norm_before_gate)


__all__ = ["MambaInnerFn", "MambaSplitConv1dScanCombinedFn", "mamba_inner_fn", "mamba_split_conv1d_scan_combined"]
