"""Tensor-parallel building blocks for ``torch.distributed`` (the reference's
``mamba_ssm.distributed`` names and semantics).

- Collectives over dim 0: :func:`all_gather_raw`, :func:`reduce_scatter_raw`, :func:`all_reduce_raw`
  (no autograd) and their autograd versions :func:`all_gather`, :func:`reduce_scatter`,
  :func:`all_reduce` (backward: reduce-scatter, all-gather, identity).
- :class:`ColumnParallelLinear`: each rank holds a block of output rows of the weight. With
  ``sequence_parallel`` the input is sharded over dim 0 (batch or batch*seqlen) and all-gathered
  before the matmul; the input gradient is reduce-scattered (else all-reduced).
- :class:`RowParallelLinear`: each rank holds a block of input columns (bias on rank 0 only); the
  partial products are reduce-scattered over dim 0 (``sequence_parallel``) or all-reduced.
- :func:`shard_mamba2_state_dict`: the per-rank slices of an unsharded ``Mamba2`` state dict, in the
  layout of ``Mamba2(..., process_group=pg)`` on that rank.

Works with every backend (gloo on CPU, NCCL on CUDA). Dim 0 of a sharded tensor must be divisible
by the world size for the reduce-scatter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "all_gather_raw", "reduce_scatter_raw", "all_reduce_raw", "all_gather", "reduce_scatter", "all_reduce",
    "parallel_linear_func", "ColumnParallelLinear", "RowParallelLinear", "get_dim_for_local_rank",
    "shard_mamba2_state_dict", "gather_mamba2_state_dict", "allreduce_sequence_parallel_grad",
]

# torch >= 2.13 names the single-tensor collectives *_single and deprecates *_into_tensor / *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(process_group) -> int:
    return dist.get_world_size(process_group)


def all_gather_raw(input_: Tensor, process_group, async_op: bool = False):
    """Concatenate every rank's ``input_`` over dim 0. Returns (output, work handle or None)."""
    world = _world(process_group)
    output = torch.empty(world * input_.shape[0], *input_.shape[1:], dtype=input_.dtype, device=input_.device)
    handle = _all_gather_single(output, input_.contiguous(), group=process_group, async_op=async_op)
    return output, handle


def reduce_scatter_raw(input_: Tensor, process_group, async_op: bool = False):
    """Sum ``input_`` over ranks and keep this rank's block of dim 0. Returns (output, handle)."""
    world = _world(process_group)
    if input_.shape[0] % world:
        raise ValueError(f"input_: dim 0 ({input_.shape[0]}) must be divisible by the world size {world}")
    output = torch.empty(input_.shape[0] // world, *input_.shape[1:], dtype=input_.dtype, device=input_.device)
    handle = _reduce_scatter_single(output, input_.contiguous(), group=process_group, async_op=async_op)
    return output, handle


def all_reduce_raw(input_: Tensor, process_group, async_op: bool = False):
    """Sum ``input_`` over ranks (in place on a contiguous copy if needed). Returns (output, handle)."""
    input_ = input_.contiguous()
    handle = dist.all_reduce(input_, group=process_group, async_op=async_op)
    return input_, handle


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        ctx.process_group = process_group
        return all_gather_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return reduce_scatter_raw(grad_output, ctx.process_group)[0], None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        ctx.process_group = process_group
        return reduce_scatter_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_raw(grad_output, ctx.process_group)[0], None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        # A copy: all_reduce works in place and the caller's tensor must stay unchanged.
        return all_reduce_raw(input_.clone(), process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def all_gather(input_: Tensor, process_group) -> Tensor:
    """Autograd all-gather over dim 0 (backward: reduce-scatter)."""
    return _AllGather.apply(input_, process_group)


def reduce_scatter(input_: Tensor, process_group) -> Tensor:
    """Autograd reduce-scatter over dim 0 (backward: all-gather)."""
    return _ReduceScatter.apply(input_, process_group)


def all_reduce(input_: Tensor, process_group) -> Tensor:
    """Autograd sum over ranks (backward: identity, as each rank's output feeds the same loss)."""
    return _AllReduce.apply(input_, process_group)


def _autocast_dtype(device_type: str):
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if device_type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


class _ParallelLinear(torch.autograd.Function):
    """y = gather(x) @ W^T + b; backward reduce-scatters (sequence_parallel) or all-reduces dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, process_group, sequence_parallel):
        cast = _autocast_dtype(x.device.type)
        if cast is not None:
            x, weight = x.to(cast), weight.to(cast)
            bias = bias.to(cast) if bias is not None else None
        ctx.process_group = process_group
        ctx.sequence_parallel = sequence_parallel
        ctx.has_bias = bias is not None
        x = x.contiguous()
        total_x = all_gather_raw(x, process_group)[0] if process_group is not None and sequence_parallel else x
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(total_x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        group, seq_par = ctx.process_group, ctx.sequence_parallel
        grad_output = grad_output.contiguous().to(weight.dtype)
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        handle = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_2d @ weight).reshape(*grad_output.shape[:-1], weight.shape[1])
            if group is not None:
                reduce = reduce_scatter_raw if seq_par else all_reduce_raw
                grad_input, handle = reduce(grad_input, group, async_op=True)
        if ctx.needs_input_grad[1]:
            total_x = all_gather_raw(x, group)[0] if group is not None and seq_par else x
            grad_weight = grad_2d.t() @ total_x.reshape(-1, total_x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None


def parallel_linear_func(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, process_group=None,
                         sequence_parallel: bool = True) -> Tensor:
    """x (..., K) -> (..., N). With a process group and ``sequence_parallel``, x is this rank's
    block of dim 0 and is all-gathered first; the input gradient is reduced over ranks."""
    return _ParallelLinear.apply(x, weight, bias, process_group, sequence_parallel)


def get_dim_for_local_rank(dim: int, world_size: int, local_rank: int, multiple_of: int = 1) -> int:
    """This rank's share of ``dim`` split in units of ``multiple_of`` (the first ``dim % world`` ranks get one more)."""
    multiple = dim // multiple_of
    return (multiple // world_size + int(local_rank < multiple % world_size)) * multiple_of


class ColumnParallelLinear(nn.Linear):
    """Linear whose weight rows (outputs) are split over ``process_group``. Input: (.., in_features),
    this rank's dim-0 block when ``sequence_parallel``; output: this rank's output features."""

    def __init__(self, in_features: int, out_features: int, process_group, bias: bool = True,
                 sequence_parallel: bool = True, multiple_of: int = 1, device=None, dtype=None) -> None:
        if out_features % multiple_of:
            raise ValueError(f"out_features: must be a multiple of {multiple_of}, got {out_features}")
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        local = get_dim_for_local_rank(out_features, world, rank, multiple_of)
        super().__init__(in_features, local, bias=bias, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return parallel_linear_func(x, self.weight, self.bias, self.process_group, self.sequence_parallel)


class RowParallelLinear(nn.Linear):
    """Linear whose weight columns (inputs) are split over ``process_group``; bias on rank 0 only.
    The partial outputs are reduce-scattered over dim 0 (``sequence_parallel``) or all-reduced."""

    def __init__(self, in_features: int, out_features: int, process_group, bias: bool = True,
                 sequence_parallel: bool = True, multiple_of: int = 1, device=None, dtype=None) -> None:
        if in_features % multiple_of:
            raise ValueError(f"in_features: must be a multiple of {multiple_of}, got {in_features}")
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        local = get_dim_for_local_rank(in_features, world, rank, multiple_of)
        super().__init__(local, out_features, bias=bias and rank == 0, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        out = parallel_linear_func(x, self.weight, self.bias)
        return (reduce_scatter if self.sequence_parallel else all_reduce)(out, self.process_group)


def allreduce_sequence_parallel_grad(model: nn.Module, process_group) -> None:
    """Sum over ranks the gradients of parameters marked ``_sequence_parallel`` (replicated
    parameters that see only this rank's block of the sequence, e.g. norms between TP layers)."""
    grads = [p.grad for _, p in sorted(model.named_parameters())
             if getattr(p, "_sequence_parallel", False) and p.grad is not None]
    if grads:
        with torch.no_grad():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=process_group)
            for buf, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                buf.copy_(synced)


# ---------------------------------------------------------------------------------- Mamba2 sharding


def _mamba2_pieces(mixer, world_size: int):
    """Global (unsharded) sizes of the [z0, x0, z, x, B, C, dt] row pieces of in_proj, the [x, B, C]
    conv channels and the [mlp, y] columns of out_proj of ``mixer`` (sharded or not), each checked
    divisible by ``world_size``."""
    d_inner = mixer.d_inner * mixer.world_size
    d_ssm = mixer.d_ssm * mixer.world_size
    gn = mixer.ngroups * mixer.world_size * mixer.d_state
    nheads = mixer.nheads * mixer.world_size
    d_mlp = d_inner - d_ssm
    for name, size in (("d_inner", d_inner), ("d_ssm", d_ssm), ("ngroups*d_state", gn), ("nheads", nheads)):
        if size % world_size:
            raise ValueError(f"world_size: must divide {name}={size}, got {world_size}")
    return {"in": [d_mlp, d_mlp, d_ssm, d_ssm, gn, gn, nheads], "conv": [d_ssm, gn, gn], "out": [d_mlp, d_ssm],
            "heads": nheads, "d_ssm": d_ssm}


def _take(t: Tensor, sizes, dim: int, rank: int, world: int) -> Tensor:
    parts = torch.split(t, sizes, dim=dim)
    return torch.cat([p.chunk(world, dim=dim)[rank] if p.shape[dim] else p for p in parts], dim=dim)


def shard_mamba2_state_dict(state_dict: dict, mixer, rank: int, world_size: int, prefix: str = "") -> dict:
    """The slices of an unsharded Mamba2 ``state_dict`` (keys ``prefix + name``) that rank ``rank`` of
    ``world_size`` holds in a tensor-parallel Mamba2. ``mixer``: the unsharded module (for its sizes).
    Heads, groups and MLP channels are split in contiguous blocks; out_proj.bias stays on rank 0."""
    sizes = _mamba2_pieces(mixer, world_size)
    out = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in ("in_proj.weight", "in_proj.bias"):
            value = _take(value, sizes["in"], 0, rank, world_size)
        elif name in ("conv1d.weight", "conv1d.bias"):
            value = _take(value, sizes["conv"], 0, rank, world_size)
        elif name == "out_proj.weight":
            value = _take(value, sizes["out"], 1, rank, world_size)
        elif name == "out_proj.bias":
            if rank != 0:
                continue
        elif name in ("dt_bias", "A_log", "D", "norm.weight"):
            value = value.chunk(world_size, dim=0)[rank]
        out[key] = value.clone()
    return out


def gather_mamba2_state_dict(local: dict, mixer, process_group, prefix: str = "") -> dict:
    """Inverse of :func:`shard_mamba2_state_dict` (collective): every rank's slices of a TP Mamba2's
    tensors (parameters or gradients, keyed like its state dict) joined into unsharded tensors."""
    world = dist.get_world_size(process_group)
    sizes = _mamba2_pieces(mixer, world)  # global sizes, from the sharded module's local ones
    full = {}

    def join(t: Tensor, global_sizes, dim: int):
        t = t.movedim(dim, 0).contiguous()
        g = all_gather_raw(t, process_group)[0].reshape(world, *t.shape)  # (world, local, ...)
        local_sizes = [s // world for s in global_sizes]
        pieces = [torch.split(g[r], local_sizes, dim=0) for r in range(world)]
        joined = torch.cat([torch.cat([pieces[r][i] for r in range(world)], 0) for i in range(len(local_sizes))], 0)
        return joined.movedim(0, dim)

    for key, value in local.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in ("in_proj.weight", "in_proj.bias"):
            full[key] = join(value, sizes["in"], 0)
        elif name in ("conv1d.weight", "conv1d.bias"):
            full[key] = join(value, sizes["conv"], 0)
        elif name == "out_proj.weight":
            full[key] = join(value, sizes["out"], 1)
        elif name in ("dt_bias", "A_log", "D", "norm.weight"):
            full[key] = join(value, [value.shape[0] * world], 0)
        else:
            full[key] = value
    return full
