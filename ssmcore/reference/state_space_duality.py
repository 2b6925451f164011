"""Float64 references for the Mamba-2 SSD op family (state space duality).

Glossary: b batch, l length, h heads, p head dim, g groups, n state size,
s sequences of a packed batch. Two independent ways to compute the same thing:

- ``ssd``: the token-by-token recurrence, with every option of the op
  (h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t).
- ``ssd_minimal_discrete`` / ``ssd_minimal``: the chunked algorithm of the
  Mamba-2 paper (Dao & Gu 2024, Listing 1): quadratic "attention" form inside
  each chunk, a linear recurrence over chunk states between chunks.

Agreement of the two is the evidence that both are right.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _softplus(v):
    """log(1 + e^v), and v itself above 20 (the threshold of the reference package)."""
    return np.where(v <= 20.0, np.log1p(np.exp(np.minimum(v, 20.0))), v)


def effective_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt' = clamp(softplus(dt + dt_bias) or dt + dt_bias, *dt_limit), float64, shape of dt (b, l, h).

    The clamp applies only when dt_limit differs from (0, inf), as in the reference package.
    """
    dt = _f64(dt)
    if dt_bias is not None:
        dt = dt + _f64(dt_bias)
    if dt_softplus:
        dt = _softplus(dt)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != (0.0, float("inf")):
        dt = np.clip(dt, lo, hi)
    return dt


def _seq_idx_from_cu_seqlens(cu_seqlens, length):
    """Sequence id of every position of a packed row: (1, l)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu)).reshape(1, length)


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False, state_dtype=None):
    """The SSD recurrence, one token at a time, in float64.

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p);
    z: (b, l, h, p); dt_bias: (h,); initial_states: (b, h, p, n); seq_idx: (b, l);
    cu_seqlens: (s+1,) with b == 1. chunk_size and state_dtype are accepted for the
    signature's sake and ignored (the recurrence has no chunks; results are float64).

    Returns out (b, l, h, p), plus final_states (b, h, p, n) and/or varlen_states
    (s, h, p, n) as asked, like the op.
    """
    x, A, B, C = _f64(x), _f64(A), _f64(B), _f64(C)
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    # Every head reads the B and C of its group.
    B_h = np.repeat(B, heads_per_group, axis=2)  # (b, l, h, n)
    C_h = np.repeat(C, heads_per_group, axis=2)
    dt_eff = effective_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h)
    decay = np.exp(dt_eff * A)  # (b, l, h)
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, length)

    state = np.zeros((batch, nheads, headdim, B.shape[3]))
    if initial_states is not None:
        state = _f64(initial_states).copy()
    ends = [] if cu_seqlens is None else [int(e) - 1 for e in np.asarray(cu_seqlens)[1:]]
    varlen_states = []
    y = np.empty_like(x)
    for t in range(length):
        if seq_idx is not None and t > 0:
            new_sequence = np.asarray(seq_idx)[:, t] != np.asarray(seq_idx)[:, t - 1]
            state[new_sequence] = 0.0
        # h_t = exp(dt A) h_{t-1} + dt x_t B_t^T
        state = (decay[:, t, :, None, None] * state
                 + (dt_eff[:, t, :, None] * x[:, t])[..., None] * B_h[:, t, :, None, :])
        # y_t = h_t C_t
        y[:, t] = np.einsum("bhpn,bhn->bhp", state, C_h[:, t])
        if t in ends:
            varlen_states.append(state[0].copy())
    if D is not None:
        D = _f64(D)
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        z = _f64(z)
        y = y * z / (1.0 + np.exp(-z))

    extra = []
    if return_final_states:
        extra.append(state)
    if return_varlen_states:
        extra.append(np.stack(varlen_states))
    return (y, *extra) if extra else y


def segsum(x):
    """Segment sums of the last axis: out[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above.

    exp(segsum(a)) is the lower-triangular decay matrix of a scalar recurrence
    (entry (i, j) = how much of step j survives at step i). Summing each segment
    directly, instead of subtracting two cumulative sums, keeps it accurate when
    the cumulative sums are large. x: (..., t) -> (..., t, t).
    """
    x = _f64(x)
    t = x.shape[-1]
    # terms[..., k, j] = x[..., k] when k > j: the steps after j ...
    terms = np.where(np.tril(np.ones((t, t), dtype=bool), k=-1), x[..., :, None], 0.0)
    # ... summed up to row i.
    sums = np.cumsum(terms, axis=-2)
    return np.where(np.tril(np.ones((t, t), dtype=bool)), sums, -np.inf)


def discretize(x, dt, A):
    """Continuous -> discrete parameters: (x * dt, A * dt).

    x: (b, l, h, p), dt: (b, l, h), A: (h,) -> X (b, l, h, p), A_bar (b, l, h) (log of the decay).
    """
    x, dt, A = _f64(x), _f64(dt), _f64(A)
    return x * dt[..., None], A * dt


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """The chunked SSD algorithm of the Mamba-2 paper (Listing 1), in NumPy float64.

    X: (b, l, h, p) already multiplied by dt; A: (b, l, h) already multiplied by dt
    (log-decays); B, C: (b, l, h, n); l a multiple of block_len; initial_states
    (b, h, p, n) or None. Returns (Y (b, l, h, p), final_state (b, h, p, n)).
    """
    X, A, B, C = _f64(X), _f64(A), _f64(B), _f64(C)
    b, l, h, p = X.shape
    n = B.shape[-1]
    if l % block_len:
        raise ValueError(f"l: expected a multiple of block_len={block_len}, got {l}")
    c = l // block_len
    # Split the length into c chunks of block_len steps (index t inside a chunk).
    X = X.reshape(b, c, block_len, h, p)
    B = B.reshape(b, c, block_len, h, n)
    C = C.reshape(b, c, block_len, h, n)
    A = A.reshape(b, c, block_len, h).transpose(0, 3, 1, 2)  # (b, h, c, t)
    A_cumsum = np.cumsum(A, axis=-1)

    # 1. Inside each chunk: the quadratic (attention-like) form, y = (C B^T * decay) X.
    decay_in_chunk = np.exp(segsum(A))  # (b, h, c, t, s)
    Y_diag = np.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", C, B, decay_in_chunk, X, optimize=True)

    # 2. The state each chunk leaves behind when it starts from zero.
    decay_to_chunk_end = np.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, t)
    chunk_states = np.einsum("bcthn,bhct,bcthp->bchpn", B, decay_to_chunk_end, X, optimize=True)

    # 3. Recurrence over chunks: the true state entering each chunk.
    if initial_states is None:
        initial_states = np.zeros((b, h, p, n))
    states = np.concatenate([_f64(initial_states)[:, None], chunk_states], axis=1)  # (b, c+1, h, p, n)
    chunk_log_decay = np.pad(A_cumsum[..., -1], [(0, 0), (0, 0), (1, 0)])  # (b, h, c+1)
    decay_between_chunks = np.exp(segsum(chunk_log_decay))  # (b, h, c+1, c+1)
    entering = np.einsum("bhzc,bchpn->bzhpn", decay_between_chunks, states, optimize=True)
    states, final_state = entering[:, :-1], entering[:, -1]

    # 4. What the entering state contributes to each output of the chunk.
    decay_from_chunk_start = np.exp(A_cumsum)  # (b, h, c, t)
    Y_off = np.einsum("bcthn,bchpn,bhct->bcthp", C, states, decay_from_chunk_start, optimize=True)

    return (Y_diag + Y_off).reshape(b, l, h, p), final_state


def ssd_minimal(x, dt, A, B, C, chunk_size, D=None, initial_states=None):
    """The chunked algorithm on the op's continuous parameters, with groups and any length.

    x: (b, l, h, p); dt: (b, l, h) (used as given: no bias, softplus or clamp);
    A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p); initial_states (b, h, p, n).
    Pads l up to a multiple of chunk_size with zero steps (dt = 0: no decay and no
    input, so the state passes through unchanged). Returns (out (b, l, h, p),
    final_state (b, h, p, n)).
    """
    x, dt, A, B, C = _f64(x), _f64(dt), _f64(A), _f64(B), _f64(C)
    length, nheads = x.shape[1], x.shape[2]
    heads_per_group = nheads // B.shape[2]
    B = np.repeat(B, heads_per_group, axis=2)
    C = np.repeat(C, heads_per_group, axis=2)
    pad = (-length) % chunk_size

    def pad_length(a):
        return np.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    X, A_bar = discretize(pad_length(x), pad_length(dt), A)
    Y, final_state = ssd_minimal_discrete(X, A_bar, pad_length(B), pad_length(C), chunk_size, initial_states)
    out = Y[:, :length]
    if D is not None:
        D = _f64(D)
        out = out + (D[:, None] if D.ndim == 1 else D) * x
    return out, final_state
