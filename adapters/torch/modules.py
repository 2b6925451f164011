"""nn.Modules of the Mamba family, with the reference package's (mamba-ssm 2.3) constructor
arguments, parameter names, shapes, dtypes and initialisation, so its checkpoints load with
``strict=True``. Parameters are created and initialised in the reference's order.

Modules: :class:`Mamba` (Mamba-1 mixer), :class:`Mamba2`, :class:`Mamba2Simple`, :class:`MHA`
(torch SDPA attention with grouped KV heads, rotary embeddings and a KV cache),
:class:`GatedMLP`, :class:`RMSNorm`, :class:`RMSNormGated` and :class:`Block` (add -> norm ->
mixer [-> add -> norm -> MLP]). They run on CPU tensors (Numba backend) and CUDA tensors
(CuPy backend) through the ``ssmcore::`` custom ops.

Glossary: B batch, L length, D model width (``d_model``), D_in inner width (``d_inner``),
N state size, G groups, H heads, P head dim, W conv width.

Inference: a mixer given ``inference_params`` keeps its state in
``inference_params.key_value_memory_dict[layer_idx]``. With ``seqlen_offset == 0`` the forward
is a prompt and fills the cache; with ``seqlen_offset > 0`` it continues from the cache: one
token goes through ``step``, several tokens are a chunked prefill (beyond the reference, which
only takes one token at a time there) and give the same result as one longer prefill.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

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
from .fused import MambaInnerFn, mamba_inner_fn, mamba_split_conv1d_scan_combined

_NO_DT_LIMIT = (0.0, float("inf"))


def _inverse_softplus_dt(size: int, dt_min: float, dt_max: float, dt_init_floor: float, factory_kwargs) -> Tensor:
    """dt drawn log-uniformly in [dt_min, dt_max] (floored), returned as softplus^-1(dt)."""
    dt = torch.exp(
        torch.rand(size, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def _param(t: Tensor) -> Tensor:
    """A parameter (A, D, dt bias, states) as the ops take it: float32, or float64 in a float64 model."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _cached(module: nn.Module, slot: str, tensors: tuple, make):
    """``make(*tensors)``, kept on ``module`` outside autograd until one of ``tensors`` changes.

    For the float32 forms of parameters that the ops take (A = -exp(A_log), D, dt bias, the conv weight and
    bias): in a bfloat16/float16 model each is a conversion kernel per layer and call. The key is each
    tensor's data pointer and version counter (optimizer steps and load_state_dict bump it). Under autograd
    or torch.compile nothing is kept; while a CUDA graph is being captured nothing is stored either (its
    memory pool must not hold tensors that outlive the graph)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return make(*tensors)
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cache = module.__dict__.setdefault("_float32_cache", {})
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make(*tensors)
    if not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        cache[slot] = (key, value)
    return value


def _in_proj_apart(proj: nn.Linear, hidden_states: Tensor, d_inner: int) -> tuple:
    """x and z of Mamba's in_proj(hidden_states), each (B, D_in, L) and contiguous: one batched GEMM per half,
    W_half @ h_b^T over the batch with W_half broadcast (stride 0, no copy on the GPU). Under autocast the
    weight is cast once, before the broadcast. The backward is :class:`_InProjApart`'s."""
    device_type = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return _InProjApart.apply(hidden_states, proj.weight, proj.bias, d_inner, dtype)


class _InProjApart(torch.autograd.Function):
    """in_proj as two (B, D_in, L) halves (see _in_proj_apart). Backward: dh (B, L, D) contiguous from two batched
    GEMMs accumulated in place, and the weight gradient's per-batch products summed in float32 straight into its
    two halves (autograd through the broadcast weights' slices would sum in the compute dtype, scatter each half
    into a zero-filled full-size gradient, add the two and cast: six more kernels on (2 D_in, D) tensors)."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, d_inner, dtype):
        ctx.dtypes = (hidden_states.dtype, weight.dtype, None if bias is None else bias.dtype)
        h_t = hidden_states.transpose(1, 2)  # (B, D, L)
        if dtype is not None:
            weight, h_t = weight.to(dtype), h_t.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(hidden_states.device.type, enabled=False):
            batch = h_t.shape[0]
            halves = []
            for w, b in ((weight[:d_inner], None if bias is None else bias[:d_inner]),
                         (weight[d_inner:], None if bias is None else bias[d_inner:])):
                y = torch.bmm(w.unsqueeze(0).expand(batch, -1, -1), h_t)
                halves.append(y if b is None else y.add_(b.to(y.dtype)[:, None]))
        ctx.save_for_backward(h_t, weight)
        ctx.d_inner = d_inner
        ctx.has_bias = bias is not None
        return tuple(halves)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx, dz):
        h_t, weight = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        d_inner = ctx.d_inner
        batch = h_t.shape[0]
        dx, dz = dx.to(weight.dtype), dz.to(weight.dtype)
        dh = dweight = dbias = None
        with torch.autocast(h_t.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # (B, L, D) = dx_b^T Wx + dz_b^T Wz
                dh = torch.bmm(dx.transpose(1, 2), weight[:d_inner].unsqueeze(0).expand(batch, -1, -1))
                dh.baddbmm_(dz.transpose(1, 2), weight[d_inner:].unsqueeze(0).expand(batch, -1, -1))
                dh = dh.to(h_dtype)
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            if ctx.needs_input_grad[1]:  # (2 D_in, D) = sum over b of [dx_b; dz_b] h_b
                dweight = torch.empty(weight.shape, dtype=acc, device=weight.device)
                h = h_t.transpose(1, 2)
                for g, part in ((dx, dweight[:d_inner]), (dz, dweight[d_inner:])):
                    torch.sum(torch.bmm(g, h), 0, dtype=acc, out=part)
                dweight = dweight.to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                dbias = torch.cat([dx.sum((0, 2), dtype=acc), dz.sum((0, 2), dtype=acc)]).to(b_dtype)
        return dh, dweight, dbias, None, None


def _ssm_constants(module: nn.Module, A_log: Tensor, D: Tensor, dt_bias: Tensor) -> tuple:
    """(A = -exp(A_log), D, dt_bias) as the ops take them (float32), cached by ``_cached``."""
    return _cached(module, "ssm", (A_log, D, dt_bias), lambda a, d, b: (-torch.exp(_param(a)), _param(d), _param(b)))


def _conv_params(module: nn.Module) -> tuple:
    """(weight (C, W), bias or None) of the depthwise conv in float32 (the kernels' type), cached by ``_cached``."""
    conv = module.conv1d
    return _cached(module, "conv", (conv.weight, conv.bias),
                   lambda w, b: (_param(w).reshape(w.shape[0], w.shape[-1]), None if b is None else _param(b)))


def _norm_params(norm: nn.Module) -> tuple:
    """(weight, bias or None) of a norm in float32 (the kernels' type), cached by ``_cached``."""
    if norm.weight is None:  # nn.LayerNorm(elementwise_affine=False)
        return norm.weight, norm.bias
    return _cached(norm, "norm", (norm.weight, norm.bias),
                   lambda w, b: (_param(w), None if b is None else _param(b)))


def _require_layer_idx(module: nn.Module) -> int:
    if module.layer_idx is None:
        raise ValueError(
            f"layer_idx: {type(module).__name__} needs a layer_idx (given to its constructor) to keep its "
            "state in inference_params, got None"
        )
    return module.layer_idx


def _states_from_cache(mixer, inference_params, batch_size, initialize_states):
    """The (conv_state, ssm_state) of a Mamba/Mamba2 layer in the cache, allocated on first use."""
    layer_idx = _require_layer_idx(mixer)
    cache = inference_params.key_value_memory_dict
    if layer_idx not in cache:
        cache[layer_idx] = mixer.allocate_inference_cache(batch_size, inference_params.max_seqlen)
    conv_state, ssm_state = cache[layer_idx]
    if initialize_states:
        conv_state.zero_()
        ssm_state.zero_()
    return conv_state, ssm_state


def _conv_window(x: Tensor, width: int) -> Tensor:
    """The last ``width`` steps of x (..., L), zero-padded on the left when L < width."""
    return F.pad(x, (width - x.shape[-1], 0))


def _decode_one_token(name: str, hidden_states: Tensor) -> None:
    if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
        raise ValueError(f"{name}: step() decodes one token at a time; expected shape (B, 1, D), "
                         f"got {tuple(hidden_states.shape)}")


def _check_hidden(name: str, x, d_model: int, seqlen=None) -> None:
    """A mixer's input: a floating (B, L, D) tensor with D = d_model and L >= 1, or (B*L, D) with
    ``seqlen`` given. ValueError/TypeError naming ``name`` instead of an unpacking or matmul error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor (float32, float16, bfloat16), got {x.dtype}")
    shape = tuple(x.shape)
    if seqlen is None:
        if x.dim() != 3 or shape[2] != d_model or shape[1] < 1:
            raise ValueError(f"{name}: expected shape (B, L, D) with D = d_model = {d_model} and L >= 1, got {shape}")
    elif x.dim() != 2 or shape[1] != d_model or seqlen < 1 or shape[0] % seqlen:
        raise ValueError(f"{name}: expected shape (B*L, D) with D = d_model = {d_model} and B*L a multiple of "
                         f"seqlen = {seqlen}, got {shape}")


# ---------------------------------------------------------------------------------- norms, MLP


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (mamba-ssm's ``ops.triton.layer_norm.RMSNorm``).

    forward(x, residual=None, prenorm=False, residual_in_fp32=False): s = dropout(x) + residual,
    y = s / sqrt(mean(s^2) + eps) * weight; returns y, or (y, s) when prenorm.
    """

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if self.drop is not None:
            x = self.drop(x)
        return rms_norm_fn(x, *_norm_params(self), residual=residual, eps=self.eps, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)


class RMSNormGated(nn.Module):
    """Gated, grouped RMSNorm of Mamba-2 (mamba-ssm's ``ops.triton.layernorm_gated.RMSNorm``).

    forward(x, z=None): RMSNorm(x) * silu(z) when norm_before_gate, else RMSNorm(x * silu(z)),
    statistics per group of ``group_size`` channels (None: one group).
    """

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, *_norm_params(self), z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)


class GatedMLP(nn.Module):
    """fc2(fc1(x)[:h] * activation(fc1(x)[h:])), h = hidden_features rounded up to multiple_of."""

    def __init__(self, in_features, hidden_features=None, out_features=None, activation=F.silu, bias=False,
                 multiple_of=128, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden_features = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory_kwargs)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


# ---------------------------------------------------------------------------------- Mamba-1


class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj -> causal conv + silu -> x_proj (dt, B, C) -> selective scan
    gated by silu(z) -> out_proj. (B, L, D) -> (B, L, D).

    Parameters (reference names): in_proj (2*D_in, D), conv1d (D_in, 1, W) depthwise, x_proj
    (dt_rank + 2N, D_in), dt_proj (D_in, dt_rank) + bias, A_log (D_in, N) float32, D (D_in,)
    float32, out_proj (D, D_in). With ``use_fast_path`` (default) a forward without
    ``inference_params`` runs :func:`mamba_inner_fn`, which recomputes the conv and dt in the
    backward instead of storing them.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True,
                 layer_idx=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt_proj keeps the variance of its input at initialisation.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        # softplus(dt_proj.bias) starts log-uniform in [dt_min, dt_max].
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                         factory_kwargs))
        self.dt_proj.bias._no_reinit = True  # the LM's _init_weights zeroes every other Linear bias

        # S4D-real initialisation: A[d, n] = -(n + 1), kept as log in float32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # float32 skip connection
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.reshape(self.d_inner, self.d_conv)

    def forward(self, hidden_states, inference_params=None):
        """hidden_states: (B, L, D). Returns (B, L, D)."""
        _check_hidden("hidden_states", hidden_states, self.d_model)
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0 and seqlen == 1:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out

        A, D, dt_bias = _ssm_constants(self, self.A_log, self.D, self.dt_proj.bias)
        if self.use_fast_path and inference_params is None and os.environ.get("SSMCORE_INPROJ_APART", "1") != "0":
            # x and z each (B, D_in, L) contiguous: the conv reads x in place (no copy in its forward, recompute
            # and backward) and their gradients come back apart (no dxz). The conv weight and bias in float32,
            # cached outside autograd (a bf16 model converts them once).
            x, z = _in_proj_apart(self.in_proj, hidden_states, self.d_inner)
            return MambaInnerFn.apply(x, *_conv_params(self), self.x_proj.weight, self.dt_proj.weight,
                                      self.out_proj.weight, self.out_proj.bias, A, None, None, D, dt_bias, None,
                                      None, True, 1, z, torch.is_grad_enabled())

        # in_proj as W @ h^T: xz comes out (B, 2*D_in, L) with L contiguous, the scan's layout.
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * seqlen, -1).t()).view(-1, batch, seqlen)
        xz = xz.permute(1, 0, 2)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        if self.use_fast_path and inference_params is None:  # SSMCORE_INPROJ_APART=0: one xz, as before session 6
            return mamba_inner_fn(xz, *_conv_params(self), self.x_proj.weight, self.dt_proj.weight,
                                  self.out_proj.weight, self.out_proj.bias, A, None, None, D,
                                  delta_bias=dt_bias, delta_softplus=True)
        x, z = xz.chunk(2, dim=1)
        conv_initial = ssm_initial = None
        if conv_state is not None:
            if inference_params.seqlen_offset > 0:  # chunked prefill: continue from the cache
                conv_initial = conv_state[:, :, 1:].to(x.dtype, copy=True)
                ssm_initial = _param(ssm_state)
                window = _conv_window(torch.cat([conv_state.to(x.dtype), x], dim=-1), self.d_conv)
            else:
                window = _conv_window(x, self.d_conv)
            conv_state.copy_(window)
        x = causal_conv1d_fn(x, *_conv_params(self), initial_states=conv_initial, activation=self.activation)
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * seqlen, self.d_inner))  # (B*L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, batch, seqlen).permute(1, 0, 2)
        B = B.reshape(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        C = C.reshape(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        y = selective_scan_fn(x, dt, A, B, C, D, z=z, delta_bias=dt_bias,
                              delta_softplus=True, return_last_state=ssm_state is not None,
                              initial_state=ssm_initial)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states, conv_state, ssm_state):
        """One decode step. hidden_states: (B, 1, D); conv_state (B, D_in, W) and ssm_state
        (B, D_in, N) are updated in place. Returns (out (B, 1, D), conv_state, ssm_state)."""
        _decode_one_token("hidden_states", hidden_states)
        xz = self.in_proj(hidden_states.squeeze(1))  # (B, 2*D_in)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, *_conv_params(self), self.activation)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in with the softplus
        A, D, dt_bias = _ssm_constants(self, self.A_log, self.D, self.dt_proj.bias)
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(conv_state (B, D_in, W), ssm_state (B, D_in, N)), zeros, in ``dtype`` or the weights' dtype."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        return _states_from_cache(self, inference_params, batch_size, initialize_states)


# ---------------------------------------------------------------------------------- Mamba-2


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> [z, x, B, C, dt] -> causal conv of xBC -> SSD -> gated RMSNorm
    (or silu(z) gate) -> out_proj. (B, L, D) -> (B, L, D).

    Parameters (reference names): in_proj (2*D_in + 2*G*N + H [+ 2*d_mlp], D), conv1d (D_ssm + 2*G*N,
    1, W) depthwise, dt_bias (H,), A_log (H,), D (H,) or (D_ssm,) float32, norm.weight (D_ssm,),
    out_proj (D, D_in). ``d_ssm`` < D_in leaves D_in - d_ssm channels to a gated MLP part.
    With ``use_mem_eff_path`` (default) a forward without ``inference_params`` runs
    :func:`mamba_split_conv1d_scan_combined`, which recomputes the conv in the backward.
    Tensor parallelism (``process_group``, as the reference): each rank holds a contiguous block of
    the heads, groups and MLP channels; in_proj is column-parallel (the [z0, x0, z, x, B, C, dt]
    pieces of the rank), conv1d / dt_bias / A_log / D / norm hold the rank's channels, out_proj is
    row-parallel (bias on rank 0) and its partial outputs are all-reduced, or with
    ``sequence_parallel`` (default) u is this rank's block of dim 0 (batch, or batch*seqlen with
    ``seqlen``), all-gathered by in_proj, and the output is reduce-scattered back over dim 0.
    The world size must divide expand*d_model, d_ssm and ngroups. The gated RMSNorm groups are
    d_ssm / ngroups channels as without TP. Inference caches with TP need sequence_parallel=False.
    See :func:`~.distributed.shard_mamba2_state_dict` for the per-rank slices of unsharded weights.
    """

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, dt_limit=_NO_DT_LIMIT, bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None, sequence_parallel=True, device=None,
                 dtype=None):
        if process_group is not None and not (callable(getattr(process_group, "size", None))
                                              and callable(getattr(process_group, "rank", None))):
            raise TypeError("process_group: expected a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.world_size = 1 if process_group is None else process_group.size()
        self.local_rank = 0 if process_group is None else process_group.rank()
        world = self.world_size
        if (self.expand * self.d_model) % world:
            raise ValueError(f"process_group: its size {world} must divide expand * d_model = {expand * d_model}")
        if d_ssm is not None and d_ssm % world:
            raise ValueError(f"d_ssm: must be divisible by the process group size {world}, got {d_ssm}")
        if ngroups % world:
            raise ValueError(f"ngroups: must be divisible by the process group size {world}, got {ngroups}")
        self.d_inner = self.expand * self.d_model // world  # this rank's share
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm // world
        self.ngroups = ngroups // world
        if self.d_ssm % self.headdim:
            raise ValueError(f"headdim: must divide d_ssm={self.d_ssm}, got {headdim}")
        self.nheads = self.d_ssm // self.headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups: must divide the number of heads {self.nheads}, got {ngroups}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads  # [z, x, B, C, dt]
        if process_group is None:
            self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)
        else:
            from .distributed import ColumnParallelLinear
            self.in_proj = ColumnParallelLinear(self.d_model, d_in_proj * world, process_group, bias=bias,
                                                sequence_parallel=sequence_parallel, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory_kwargs)
        if self.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
        self.act = nn.SiLU()

        self.dt_bias = nn.Parameter(_inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, factory_kwargs))
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range!r}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if self.D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True

        if self.rmsnorm:
            # Local d_ssm over local ngroups: the unsharded group size. (The reference's TP module
            # divides the local d_ssm by the global ngroups here, which its fused path does not.)
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=self.norm_before_gate,
                                     group_size=self.d_ssm // self.ngroups, **factory_kwargs)
        if process_group is None:
            self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)
        else:
            from .distributed import RowParallelLinear
            self.out_proj = RowParallelLinear(self.d_inner * world, self.d_model, process_group, bias=bias,
                                              sequence_parallel=sequence_parallel, **factory_kwargs)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.reshape(self.conv1d.weight.shape[0], self.d_conv)

    def _dt_limit_kwargs(self) -> dict:
        return {} if self.dt_limit == _NO_DT_LIMIT else {"dt_limit": self.dt_limit}

    def _d_mlp(self, zxbcdt: Tensor) -> int:
        return (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        """u: (B, L, D), or (B*L, D) with ``seqlen`` given. seq_idx: (B, L) int32 ids of packed
        sequences. cu_seqlens: (S+1,) int32 sequence starts (B == 1), with inference_params: one
        cache row per sequence. Returns the shape of u."""
        seqlen_og = seqlen
        _check_hidden("u", u, self.d_model, seqlen)
        if seqlen is None:
            batch, seqlen, _ = u.shape
        else:
            batch = u.shape[0] // seqlen
        conv_state = ssm_state = None
        if inference_params is not None and self.process_group is not None and self.sequence_parallel:
            raise ValueError("inference_params: a tensor-parallel Mamba2 keeps an inference cache only with "
                             "sequence_parallel=False (u replicated on every rank)")
        if inference_params is not None:
            cache_batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
            conv_state, ssm_state = self._get_states_from_cache(inference_params, cache_batch)
            if inference_params.seqlen_offset > 0 and seqlen == 1:
                out, _, _ = self.step(u.view(batch, 1, -1), conv_state, ssm_state)
                return out if seqlen_og is None else out.view(batch, -1)

        zxbcdt = self.in_proj(u)  # with sequence_parallel TP: all ranks' blocks of dim 0
        if seqlen_og is not None:
            zxbcdt = zxbcdt.view(-1, seqlen, zxbcdt.shape[-1])
        batch = zxbcdt.shape[0]
        A, D, dt_bias = _ssm_constants(self, self.A_log, self.D, self.dt_bias)
        if self.D_has_hdim:
            D = D.view(self.nheads, self.headdim)
        if self.use_mem_eff_path and inference_params is None:
            out = mamba_split_conv1d_scan_combined(
                zxbcdt, *_conv_params(self), dt_bias, A, D,
                self.chunk_size, seq_idx=seq_idx, activation=self.activation,
                rmsnorm_weight=_norm_params(self.norm)[0] if self.rmsnorm else None,
                rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6, outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias, headdim=None if self.D_has_hdim else self.headdim,
                ngroups=self.ngroups, norm_before_gate=self.norm_before_gate, **self._dt_limit_kwargs())
            if seqlen_og is not None:
                out = out.reshape(batch * seqlen, -1)
            if self.process_group is not None:  # out_proj was applied to this rank's columns only
                from .distributed import all_reduce, reduce_scatter
                out = (reduce_scatter if self.sequence_parallel else all_reduce)(out, self.process_group)
            return out

        d_mlp = self._d_mlp(zxbcdt)
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        continuing = inference_params is not None and inference_params.seqlen_offset > 0
        xBC_t = xBC.transpose(1, 2)  # (B, C, L)
        conv_initial = ssm_initial = None
        if conv_state is not None:
            if continuing:
                if cu_seqlens is not None:
                    raise ValueError("cu_seqlens: packed sequences can only start a cache (seqlen_offset == 0), "
                                     f"got seqlen_offset={inference_params.seqlen_offset}")
                conv_initial = conv_state[:, :, 1:].to(xBC.dtype, copy=True)
                ssm_initial = _param(ssm_state)
                conv_state.copy_(_conv_window(torch.cat([conv_state.to(xBC.dtype), xBC_t], dim=-1), self.d_conv))
            elif cu_seqlens is None:
                conv_state.copy_(_conv_window(xBC_t, self.d_conv))
            else:
                conv_state.copy_(_varlen_conv_states(xBC[0], cu_seqlens, conv_state.shape[-1]))
        xBC = causal_conv1d_fn(xBC_t, *_conv_params(self), seq_idx=seq_idx,
                               initial_states=conv_initial, activation=self.activation).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        heads = (batch, seqlen, self.nheads, self.headdim)
        groups = (batch, seqlen, self.ngroups, self.d_state)
        y = mamba_chunk_scan_combined(
            x.reshape(heads), dt, A, B.reshape(groups), C.reshape(groups), chunk_size=self.chunk_size, D=D,
            z=None if self.rmsnorm else z.reshape(heads), dt_bias=dt_bias, dt_softplus=True,
            initial_states=ssm_initial, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            return_final_states=ssm_state is not None,
            return_varlen_states=cu_seqlens is not None and inference_params is not None,
            **self._dt_limit_kwargs())
        if ssm_state is not None:
            y, last_state, *varlen_states = y
            ssm_state.copy_(varlen_states[0] if cu_seqlens is not None else last_state)
        y = y.reshape(batch, seqlen, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        if seqlen_og is not None:
            y = y.reshape(batch * seqlen, -1)
        return self.out_proj(y)

    def step(self, hidden_states, conv_state, ssm_state):
        """One decode step. hidden_states: (B, 1, D); conv_state (B, D_ssm + 2GN, W) and ssm_state
        (B, H, P, N) are updated in place. Returns (out (B, 1, D), conv_state, ssm_state)."""
        _decode_one_token("hidden_states", hidden_states)
        batch = hidden_states.shape[0]
        zxbcdt = self.in_proj(hidden_states.squeeze(1))
        d_mlp = self._d_mlp(zxbcdt)
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        xBC = causal_conv1d_update(xBC, conv_state, *_conv_params(self), self.activation)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        # Per-head scalars seen as (H, P[, N]) through stride-0 views.
        heads = (self.nheads, self.headdim)
        A, D, dt_bias = _ssm_constants(self, self.A_log, self.D, self.dt_bias)
        A = A[:, None, None].expand(*heads, self.d_state)
        D = D.view(heads) if self.D_has_hdim else D[:, None].expand(heads)
        y = selective_state_update(
            ssm_state, x.reshape(batch, *heads), dt[:, :, None].expand(batch, *heads), A,
            B.reshape(batch, self.ngroups, self.d_state), C.reshape(batch, self.ngroups, self.d_state), D,
            z=None if self.rmsnorm else z.reshape(batch, *heads),
            dt_bias=dt_bias[:, None].expand(heads), dt_softplus=True)
        y = y.reshape(batch, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(conv_state (B, D_ssm + 2GN, W) with channels contiguous, ssm_state (B, H, P, N)), zeros."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0], device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype).transpose(1, 2)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=self.in_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        return _states_from_cache(self, inference_params, batch_size, initialize_states)


def _varlen_conv_states(xBC: Tensor, cu_seqlens: Tensor, width: int) -> Tensor:
    """Per packed sequence, its last ``width`` conv inputs: xBC (L, C) -> (S, C, width), zero-padded."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    positions = ends[:, None] - width + torch.arange(width, device=xBC.device)  # (S, width)
    valid = positions >= starts[:, None]
    window = xBC[positions.clamp(min=0)] * valid[..., None].to(xBC.dtype)  # (S, width, C)
    return window.transpose(1, 2)


class Mamba2Simple(nn.Module):
    """The minimal Mamba-2 mixer of the reference (``modules/mamba2_simple.py``): no MLP part, no
    inference cache, RMSNorm(y * silu(z)) over all D_in channels, optional learnable initial states.
    (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model, d_state=64, d_conv=4, conv_init=None, expand=2, headdim=128, ngroups=1,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=_NO_DT_LIMIT,
                 learnable_init_states=False, activation="swish", bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = self.expand * self.d_model
        self.headdim = headdim
        self.ngroups = ngroups
        if self.d_inner % self.headdim:
            raise ValueError(f"headdim: must divide d_inner={self.d_inner}, got {headdim}")
        self.nheads = self.d_inner // self.headdim
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.learnable_init_states = learnable_init_states
        if activation not in ("silu", "swish"):
            raise ValueError(f"activation: expected 'silu' or 'swish', got {activation!r}")
        self.activation = activation
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory_kwargs)
        if self.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
        if self.learnable_init_states:
            self.init_states = nn.Parameter(torch.zeros(self.nheads, self.headdim, self.d_state, **factory_kwargs))
            self.init_states._no_weight_decay = True
        self.act = nn.SiLU()

        self.dt_bias = nn.Parameter(_inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, factory_kwargs))
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range!r}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.D._no_weight_decay = True

        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=False, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def forward(self, u, seq_idx=None):
        """u: (B, L, D); seq_idx: (B, L) int32, optional. Returns (B, L, D)."""
        batch, seqlen, _ = u.shape
        zxbcdt = self.in_proj(u)
        A = -torch.exp(_param(self.A_log))
        initial_states = None
        if self.learnable_init_states:
            initial_states = _param(self.init_states)[None].expand(batch, -1, -1, -1)
        dt_limit_kwargs = {} if self.dt_limit == _NO_DT_LIMIT else {"dt_limit": self.dt_limit}
        conv_weight = self.conv1d.weight.reshape(self.conv1d.weight.shape[0], self.d_conv)
        if self.use_mem_eff_path:
            return mamba_split_conv1d_scan_combined(
                zxbcdt, conv_weight, self.conv1d.bias, _param(self.dt_bias), A, _param(self.D), self.chunk_size,
                initial_states=initial_states, seq_idx=seq_idx, activation=self.activation,
                rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias, headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False,
                **dt_limit_kwargs)

        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state, self.nheads],
                                 dim=-1)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
        xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv_weight, bias=self.conv1d.bias, seq_idx=seq_idx,
                               activation=self.activation).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        groups = (batch, seqlen, self.ngroups, self.d_state)
        y = mamba_chunk_scan_combined(
            x.reshape(batch, seqlen, self.nheads, self.headdim), dt, A, B.reshape(groups), C.reshape(groups),
            chunk_size=self.chunk_size, D=_param(self.D), seq_idx=seq_idx, initial_states=initial_states,
            **dt_limit_kwargs)
        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)
        return self.out_proj(y)


# ---------------------------------------------------------------------------------- attention


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of the first ``dim`` channels of each head (flash-attn's layout:
    ``interleaved=False`` rotates the halves (GPT-NeoX), True rotates adjacent pairs (GPT-J)).
    It has no state-dict entries; cos and sin are computed in float32 (float64 for float64 x) and
    rounded to x's dtype, as flash-attn's cache holds them."""

    def __init__(self, dim, base=10000.0, interleaved=False):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, L, H, P); positions: (B, L) or (L,) integer. Returns x rotated, x's dtype."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=x.device, dtype=compute) / self.dim))
        angles = positions.to(compute)[..., None] * inv_freq  # (..., L, dim/2)
        cos = torch.cos(angles).to(x.dtype).to(compute)
        sin = torch.sin(angles).to(x.dtype).to(compute)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, L, 1, dim/2)
        rotated, rest = x[..., :self.dim].to(compute), x[..., self.dim:]
        if self.interleaved:
            x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        else:
            x1, x2 = rotated.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return torch.cat([out.to(x.dtype), rest], dim=-1)


class MHA(nn.Module):
    """Multi-head self-attention with grouped KV heads (GQA/MQA), optional rotary embedding,
    depthwise conv of qkv, a gated MLP sharing in_proj/out_proj, and a KV cache, on torch SDPA.

    Parameters (reference names): in_proj (H*P + 2*Hkv*P + mlp_dim, D) [+ bias], conv1d when
    d_conv > 0, out_proj (D, H*P + mlp_dim/2) [+ bias]. x: (B, L, D) -> (B, L, D).
    """

    def __init__(self, embed_dim, num_heads, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
                 out_proj_bias=True, softmax_scale=None, causal=False, layer_idx=None, d_conv=0, rotary_emb_dim=0,
                 rotary_emb_base=10000.0, rotary_emb_interleaved=False, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.layer_idx = layer_idx
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if self.num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads_kv: must divide num_heads={num_heads}, got {self.num_heads_kv}")
        if head_dim is None and self.embed_dim % num_heads:
            raise ValueError(f"num_heads: must divide embed_dim={embed_dim} when head_dim is None, got {num_heads}")
        self.head_dim = head_dim if head_dim is not None else self.embed_dim // num_heads
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        if self.rotary_emb_dim > 0:
            self.rotary_emb = RotaryEmbedding(self.rotary_emb_dim, base=rotary_emb_base,
                                              interleaved=rotary_emb_interleaved)
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory_kwargs)
        if self.d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=self.d_conv, padding=self.d_conv - 1, groups=qkv_dim,
                                    **factory_kwargs)
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory_kwargs)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(kv_cache (B, max_seqlen, 2, Hkv, P), conv_state (B, qkv_dim, W) or None), zeros."""
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        device = self.out_proj.weight.device
        conv_state = None
        if self.d_conv > 0:
            conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device, dtype=dtype)
        # Zeros, not empty: masked-out slots must not hold NaN, which would leak through 0 * NaN.
        kv_cache = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype,
                               device=device)
        return kv_cache, conv_state

    def _qkv_conv(self, qkv, inference_params):
        """Depthwise causal conv of qkv (B, L, C), keeping the conv state of a cache."""
        weight = self.conv1d.weight.reshape(self.conv1d.weight.shape[0], self.d_conv)
        if inference_params is not None and inference_params.seqlen_offset > 0:
            _, conv_state = inference_params.key_value_memory_dict[self.layer_idx]
            if qkv.shape[1] == 1:
                return causal_conv1d_update(qkv[:, 0], conv_state, weight, self.conv1d.bias)[:, None]
            qkv_t = qkv.transpose(1, 2)
            initial = conv_state[:, :, 1:].to(qkv.dtype, copy=True)
            out = causal_conv1d_fn(qkv_t, weight, self.conv1d.bias, initial_states=initial)
            conv_state.copy_(_conv_window(torch.cat([conv_state.to(qkv.dtype), qkv_t], dim=-1), self.d_conv))
            return out.transpose(1, 2)
        qkv_t = qkv.transpose(1, 2)
        if inference_params is not None:
            _, conv_state = inference_params.key_value_memory_dict[self.layer_idx]
            conv_state.copy_(_conv_window(qkv_t, self.d_conv))
        return causal_conv1d_fn(qkv_t, weight, self.conv1d.bias).transpose(1, 2)

    def forward(self, x, inference_params=None):
        """x: (B, L, D). With inference_params, keys and values go to the cache at the sequence's
        offset (``lengths_per_sample`` per row when set, else ``seqlen_offset``) and the queries
        attend to everything cached before them."""
        batch, seqlen, _ = x.shape
        if inference_params is not None:
            layer_idx = _require_layer_idx(self)
            if layer_idx not in inference_params.key_value_memory_dict:
                inference_params.key_value_memory_dict[layer_idx] = self.allocate_inference_cache(
                    batch, inference_params.max_seqlen, dtype=x.dtype)
        qkv = self.in_proj(x)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
            x_mlp_up, x_mlp_gate = x_mlp.chunk(2, dim=-1)
            x_mlp = x_mlp_up * F.silu(x_mlp_gate)
        if self.d_conv > 0:
            qkv = self._qkv_conv(qkv, inference_params)
        q, kv = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * 2 * self.head_dim], dim=-1)
        q = q.reshape(batch, seqlen, self.num_heads, self.head_dim)
        kv = kv.reshape(batch, seqlen, 2, self.num_heads_kv, self.head_dim)
        offsets = self._offsets(inference_params, batch, x.device)
        if self.rotary_emb_dim > 0:
            positions = torch.arange(seqlen, device=x.device)
            positions = positions if offsets is None else offsets[:, None] + positions
            q = self.rotary_emb(q, positions)
            kv = torch.stack([self.rotary_emb(kv[:, :, 0], positions), kv[:, :, 1]], dim=2)
        if inference_params is None:
            k, v = kv.unbind(dim=2)
            context = self._attend(q, k, v, None, is_causal=self.causal)
        else:
            context = self._attend_cached(q, kv, inference_params, offsets)
        context = context.reshape(batch, seqlen, self.num_heads * self.head_dim)
        if self.mlp_dim > 0:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)

    @staticmethod
    def _offsets(inference_params, batch, device):
        """Tokens already cached per row (B,) int64, or None outside inference."""
        if inference_params is None:
            return None
        if inference_params.lengths_per_sample is not None:
            return inference_params.lengths_per_sample[:batch].long()
        return torch.full((batch,), inference_params.seqlen_offset, dtype=torch.long, device=device)

    def _attend(self, q, k, v, mask, is_causal=False):
        """SDPA over (B, L, H, P) queries and (B, S, Hkv, P) keys/values; mask (B, 1, L, S) bool or None."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
            scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_heads_kv)
        return out.transpose(1, 2)

    def _attend_cached(self, q, kv, inference_params, offsets):
        """Write kv (B, L, 2, Hkv, P) into the cache at each row's offset, then attend to the cache."""
        kv_cache, _ = inference_params.key_value_memory_dict[self.layer_idx]
        batch, seqlen = q.shape[:2]
        start = inference_params.batch_size_offset
        rows = kv_cache[start:start + batch]
        if inference_params.lengths_per_sample is None:
            end = inference_params.seqlen_offset + seqlen
            if end > rows.shape[1]:
                raise ValueError(f"inference_params: the cache holds max_seqlen={rows.shape[1]} tokens, "
                                 f"but seqlen_offset + L = {end}")
            rows[:, inference_params.seqlen_offset:end] = kv
            keys = rows[:, :end]
        else:  # per-row offsets: attend to the whole cache, masked per row
            positions = offsets[:, None] + torch.arange(seqlen, device=q.device)  # (B, L)
            rows[torch.arange(batch, device=q.device)[:, None], positions] = kv
            keys = rows
        key_pos = torch.arange(keys.shape[1], device=q.device)
        query_pos = offsets[:, None] + torch.arange(seqlen, device=q.device)  # (B, L)
        if self.causal:
            mask = key_pos[None, None, :] <= query_pos[:, :, None]
        else:
            mask = (key_pos[None, None, :] < (offsets + seqlen)[:, None, None]).expand(batch, seqlen, -1)
        k, v = keys.unbind(dim=2)
        return self._attend(q, k, v, mask[:, None])


# ---------------------------------------------------------------------------------- block


class Block(nn.Module):
    """Add -> norm -> mixer [-> add -> norm2 -> MLP]: returns (hidden_states, residual).

    The residual stream is added before the norm (so a fused add + norm can do both), as in the
    reference: hidden_states = mixer(norm(hidden_states + residual)). With ``fused_add_norm`` the
    add and the norm are one op (``layer_norm_fn``); ``residual_in_fp32`` keeps the residual
    stream in float32.
    """

    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        if self.fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm)):
            raise TypeError("norm_cls: fused_add_norm supports nn.LayerNorm and RMSNorm, "
                            f"got {type(self.norm).__name__}")

    def _add_norm(self, norm, hidden_states, residual):
        if not self.fused_add_norm:
            residual = hidden_states + residual if residual is not None else hidden_states
            hidden_states = norm(residual.to(dtype=norm.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
            return hidden_states, residual
        return layer_norm_fn(hidden_states, *_norm_params(norm), residual=residual, prenorm=True,
                             residual_in_fp32=self.residual_in_fp32, eps=norm.eps,
                             is_rms_norm=isinstance(norm, RMSNorm))

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None, inference_params=None, **mixer_kwargs):
        """hidden_states, residual: (B, L, D) (residual None in the first block). Returns both, updated."""
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


__all__ = ["Block", "GatedMLP", "MHA", "Mamba", "Mamba2", "Mamba2Simple", "RMSNorm", "RMSNormGated",
           "RotaryEmbedding"]
