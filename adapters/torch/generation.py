"""Text generation with a language model that keeps an inference cache (mamba-ssm's ``generate``).

``generate(model, input_ids, max_length, ...)`` runs the prompt through the model once (the
prefill, which fills each layer's cache), then feeds one token at a time (the decode steps,
each a ``step()`` of every mixer), choosing each new token greedily or by sampling. The model is
any module called as ``model(input_ids (B, L), inference_params=..., num_last_tokens=1)``
returning an object with ``.logits`` (B, 1, V) that keeps its state in an
:class:`~.inference.InferenceParams`, such as :class:`~.models.MambaLMHeadModel`.

Prompts of different lengths (a list of prompts, or a left- or right-padded batch with an
``attention_mask``) never run padding through the model: rows with equally long prompts are
prefilled together from their real tokens only, each group in a cache of its own, and the
groups' caches are then copied into the rows of the batch's cache. Every row therefore starts
decoding from exactly the state it would have had alone, and greedy decoding gives each row the
tokens it gets when generated alone. Attention layers then read their cache at each row's own
length (``InferenceParams.lengths_per_sample``); Mamba layers keep no position at all.

With ``cg=True`` on a CUDA model the decode step is captured once per (batch, max_length) in a
``torch.cuda.CUDAGraph`` (kept on the model, reused by later calls) and replayed for every
token, which removes the per-kernel launch cost that dominates the decoding of small models.

Glossary: B batch, L prompt length (padded), V vocabulary (logits' last dimension).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ssmcore._checks import check_bool, check_finite_float, check_int

from .inference import InferenceParams

# Attribute of a model holding its captured decode graphs, (batch, max_length, device, dtype) -> graph.
_GRAPHS_ATTR = "_ssmcore_decode_graphs"


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns.

    sequences: (B, L + T) prompts followed by the T generated tokens (the layout of the reference's
        ``GenerateDecoderOnlyOutput.sequences``; a list of prompts comes back left-padded).
    scores: one (B, V) float tensor of logits per generated token (before repetition penalty,
        temperature and filtering), or None unless ``output_scores``.
    attention_mask: (B, L + T) bool, True at real tokens; None when every prompt fills its row.
    timings: {"prefill_s", "decode_s", "new_tokens"} with ``enable_timing``, else None.
    """

    sequences: Tensor
    scores: Optional[tuple] = None
    attention_mask: Optional[Tensor] = None
    timings: Optional[dict] = None


# ---------------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Penalise tokens already in a row (CTRL, arXiv:1909.05858), as the reference does.

    logits: (B, V); seen: (B, V) bool, True for tokens of the row's prompt or output so far.
    A seen logit s becomes s / penalty when s >= 0 and s * penalty when s < 0. Returns a new tensor.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Logits below each row's k-th largest set to -inf (ties with the k-th are kept). (B, V) -> new (B, V)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: per row, keep the most probable tokens until their probability reaches top_p.

    A token is removed when the tokens ranked above it already hold at least top_p of the
    probability (the reference's rule), so the top token always stays. top_p <= 0 or >= 1: no-op.
    (B, V) -> new (B, V).
    """
    if top_p <= 0.0 or top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    remove = torch.empty_like(mass_above, dtype=torch.bool).scatter_(-1, order, mass_above >= top_p)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p filter (standard form): per row, keep tokens whose probability is at least min_p times
    the row's largest probability. Computed on logits: l >= max(l) + log(min_p).
    min_p <= 0: no-op. (B, V) -> new (B, V).

    The reference compares raw logits with min_p times the first logit instead, which is not min-p.
    """
    if min_p <= 0.0:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sampling_probs(logits: Tensor, top_k: int = 0, top_p: float = 0.0, min_p: float = 0.0,
                   temperature: float = 1.0) -> Tensor:
    """The distribution a sampled token is drawn from: (B, V) logits -> (B, V) float32 probabilities.

    Order (as transformers applies them): logits / temperature, then top-k, top-p and min-p
    filters, each on what the previous left, then softmax.
    """
    scaled = logits.float() / temperature
    return torch.softmax(min_p_filter(top_p_filter(top_k_filter(scaled, top_k), top_p), min_p), dim=-1)


def sample(logits: Tensor, top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0, temperature: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row: (B, V) logits -> (B,) int64.

    top_k == 1 or temperature == 0: greedy (argmax). Otherwise a draw from
    :func:`sampling_probs` (top_k == 0: no top-k limit), with ``generator`` (on the logits'
    device) for reproducible draws.
    """
    if top_k == 1 or temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, top_k, top_p, min_p, temperature)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------- prompts


@dataclass
class _Prompts:
    """The batch as generate sees it: the output layout and each row's real tokens."""

    input_ids: Tensor        # (B, L) prompts as they appear in the output (padding included)
    mask: Optional[Tensor]   # (B, L) bool, True at real tokens; None when every row is all real
    lengths: list            # real tokens per row


def _as_prompts(input_ids, attention_mask, pad_id: int, device) -> _Prompts:
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask: must be None when input_ids is a list of prompts "
                             "(each prompt's length is its own)")
        if len(input_ids) == 0:
            raise ValueError("input_ids: expected at least one prompt, got an empty list")
        rows = []
        for i, prompt in enumerate(input_ids):
            row = torch.as_tensor(prompt, device=device)
            if row.dim() != 1 or row.numel() == 0 or row.is_floating_point() or row.is_complex():
                raise ValueError(f"input_ids: prompt {i} must be a non-empty 1-D sequence of token ids, "
                                 f"got shape {tuple(row.shape)} dtype {row.dtype}")
            rows.append(row.long())
        lengths = [r.numel() for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            ids[i, width - row.numel():] = row
            mask[i, width - row.numel():] = True
        return _Prompts(ids, None if min(lengths) == width else mask, lengths)

    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids: expected a (B, L) tensor of token ids or a list of prompts, "
                        f"got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape (B, L) with B, L >= 1, got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return _Prompts(ids, None, [ids.shape[1]] * ids.shape[0])
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask: expected a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device) != 0
    lengths = mask.sum(dim=1).tolist()
    if min(lengths) == 0:
        raise ValueError(f"attention_mask: every row needs at least one real token, row {lengths.index(0)} has none")
    return _Prompts(ids, None if min(lengths) == ids.shape[1] else mask, lengths)


def _check_token_range(name: str, ids: Tensor, vocab: Optional[int]) -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab if vocab is not None else 'V'}), "
                         f"got values in [{low}, {high}]")


def _embedding_rows(model) -> Optional[int]:
    embedding = getattr(getattr(model, "backbone", None), "embedding", None)
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def _prompt_tokens(prompts: _Prompts, batch: int, vocab: int) -> Tensor:
    """(B, V + 1) bool, True at each row's real prompt tokens; padding and ids >= V land in the
    spare last column, which no logit reads."""
    ids = prompts.input_ids if prompts.mask is None else prompts.input_ids.masked_fill(~prompts.mask, vocab)
    seen = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids.clamp(max=vocab), True)


# ---------------------------------------------------------------------------------- prefill


def _last_logits(model, input_ids: Tensor, inference_params: InferenceParams) -> Tensor:
    """(B, V) logits of the last position, through the cache."""
    return model(input_ids, inference_params=inference_params, num_last_tokens=1).logits[:, -1]


def _new_cache(model, batch: int, max_length: int) -> dict:
    if hasattr(model, "allocate_inference_cache"):
        return model.allocate_inference_cache(batch, max_length)
    return {}  # the layers allocate on first use


def _prefill(model, prompts: _Prompts, inference_params: InferenceParams) -> Tensor:
    """Fill ``inference_params``' cache with every row's real prompt tokens; (B, V) last-token logits.

    Rows with the same number of real tokens run together; unless that is the whole batch, each
    group runs in a cache of its own, which is then copied into its rows of the batch's cache, so
    padding never enters any state.
    """
    ids, mask, lengths = prompts.input_ids, prompts.mask, prompts.lengths
    if mask is None:
        return _last_logits(model, ids, inference_params)
    batch = ids.shape[0]
    logits = None
    for length in sorted(set(lengths)):
        rows = [i for i in range(batch) if lengths[i] == length]
        rows_t = torch.tensor(rows, device=ids.device)
        group_ids = ids[rows_t][mask[rows_t]].view(len(rows), length)
        group = InferenceParams(max_seqlen=inference_params.max_seqlen, max_batch_size=len(rows),
                                key_value_memory_dict=_new_cache(model, len(rows), inference_params.max_seqlen))
        group_logits = _last_logits(model, group_ids, group)
        if logits is None:
            logits = group_logits.new_empty((batch, group_logits.shape[-1]))
        logits[rows_t] = group_logits
        cache = inference_params.key_value_memory_dict
        for layer_idx, group_states in group.key_value_memory_dict.items():
            if layer_idx not in cache:  # a layer that allocates lazily: give it batch-sized zeros
                cache[layer_idx] = tuple(None if s is None else s.new_zeros((batch, *s.shape[1:]))
                                         for s in group_states)
            for state, group_state in zip(cache[layer_idx], group_states):
                if state is not None:
                    state[rows_t] = group_state
    return logits


# ---------------------------------------------------------------------------------- CUDA graphs


class _DecodeGraph:
    """The decode step of one (batch, max_length), captured in a CUDA graph.

    Owns its cache (``inference_params``, with per-row ``lengths_per_sample``), the static input
    token buffer and the static logits the replay writes. Prefill writes into the same cache
    tensors in place, so the graph reads what the prompt left there.
    """

    def __init__(self, model, batch: int, max_length: int, device: torch.device, n_warmups: int = 2):
        cache = _new_cache(model, batch, max_length)
        self.inference_params = InferenceParams(
            max_seqlen=max_length, max_batch_size=batch, key_value_memory_dict=cache,
            lengths_per_sample=torch.zeros(batch, dtype=torch.int32, device=device))
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        params = self.inference_params
        # Any offset > 0 selects the decode path; attention reads lengths_per_sample, not this number.
        params.seqlen_offset = max(max_length - 1, 1)
        params.lengths_per_sample.fill_(max_length - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy allocations, kernel compiles)
            for _ in range(n_warmups):
                _last_logits(model, self.input_ids, params)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _last_logits(model, self.input_ids, params)
        params.reset(max_length, batch)

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (B,) -> (B, V) logits (valid until the next replay)."""
        self.input_ids.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


def _decode_graph(model, batch: int, max_length: int, device: torch.device) -> _DecodeGraph:
    graphs = getattr(model, _GRAPHS_ATTR, None)
    if graphs is None:
        graphs = {}
        setattr(model, _GRAPHS_ATTR, graphs)
    dtype = next(model.parameters()).dtype
    key = (batch, max_length, device, dtype)
    if key not in graphs:
        graphs[key] = _DecodeGraph(model, batch, max_length, device)
    return graphs[key]


def clear_decode_graphs(model) -> None:
    """Drop the CUDA graphs (and their caches) that ``generate(..., cg=True)`` kept on ``model``."""
    if hasattr(model, _GRAPHS_ATTR):
        delattr(model, _GRAPHS_ATTR)


# ---------------------------------------------------------------------------------- generate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model: has no parameters to tell its device") from None


def _check_sampling(top_k, top_p, min_p, temperature, repetition_penalty) -> tuple:
    top_k = check_int("top_k", top_k, minimum=0)
    top_p = check_finite_float("top_p", top_p)
    min_p = check_finite_float("min_p", min_p)
    temperature = check_finite_float("temperature", temperature)
    repetition_penalty = check_finite_float("repetition_penalty", repetition_penalty, positive=True)
    for name, value in (("top_p", top_p), ("min_p", min_p)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1], got {value}")
    if temperature < 0.0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature}")
    return top_k, top_p, min_p, temperature, repetition_penalty


@torch.inference_mode()
def generate(model, input_ids: Union[Tensor, Sequence], max_length: int, top_k: int = 1, top_p: float = 0.0,
             min_p: float = 0.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: Optional[int] = None, teacher_outputs: Optional[Tensor] = None,
             vocab_size: Optional[int] = None, cg: bool = False, enable_timing: bool = False,
             output_scores: bool = False, return_dict_in_generate: bool = False, streamer=None,
             attention_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
    """Generate up to ``max_length - L`` tokens after each prompt, greedily or by sampling.

    Prompts of different lengths: rows are prefilled from their real tokens only, rows of equal
    length together, so padding never enters a recurrent state or an attention cache, and greedy
    tokens equal those of generating each prompt alone.

    Args:
        model: a language model with an inference cache (see the module docstring), in eval mode.
        input_ids: (B, L) integer token ids, or a list of B prompts (1-D tensors or lists of ints)
            of any lengths, which come back left-padded with ``eos_token_id`` (0 when None).
        max_length: the length of the returned sequences, prompt (padded, L) included; T =
            max_length - L >= 0 tokens are generated per row (fewer when every row stops at eos).
        top_k: 1 is greedy; 0 samples from the whole vocabulary; k > 1 from the k most likely tokens.
        top_p: nucleus sampling threshold in [0, 1] (0 or 1: off). Used when top_k != 1.
        min_p: in [0, 1]: keep tokens with probability >= min_p * the row's top probability
            (0: off). Standard min-p; the reference compares logits instead.
        temperature: >= 0; logits are divided by it before the filters (0: greedy).
        repetition_penalty: > 0; logits of tokens already in the row (its real prompt tokens and
            its output) are divided by it when positive, multiplied when negative (1: off).
        eos_token_id: a row that produces it is finished: its later tokens are eos_token_id too;
            generation stops when every row is finished.
        teacher_outputs: (B, T') token ids in the layout of the returned sequences: position t of
            the output is teacher_outputs[:, t] while t < T' (forced decoding, for tests).
        vocab_size: only the first vocab_size logits count (a padded vocabulary's extra rows never
            come out).
        cg: capture the decode step in a CUDA graph once per (B, max_length) and replay it (CUDA
            models only). Tokens equal the eager ones.
        enable_timing: time prefill and decoding (synchronising the GPU), print the total as the
            reference does, and return the times in ``GenerateOutput.timings``.
        output_scores: keep each step's (B, V) logits (before penalty and filters).
        return_dict_in_generate: return a :class:`GenerateOutput` instead of the sequences.
        streamer: an object with ``put(tokens)`` and ``end()`` (transformers' ``TextStreamer``
            works): it gets the prompt (B, L) on the CPU, then each step's (B, 1) tokens as they
            are chosen, then ``end()``.
        attention_mask: (B, L), nonzero at real tokens; a row's prompt is its real tokens in order
            (left or right padding). Padding never enters the model: see the module docstring.
        generator: a ``torch.Generator`` on the model's device for reproducible sampling.

    Returns:
        sequences (B, max_length) int64 (shorter if every row stopped at eos), or a
        :class:`GenerateOutput` with ``return_dict_in_generate``.
    """
    device = _model_device(model)
    max_length = check_int("max_length", max_length, minimum=1)
    top_k, top_p, min_p, temperature, repetition_penalty = _check_sampling(top_k, top_p, min_p, temperature,
                                                                           repetition_penalty)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, minimum=0)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    cg = check_bool("cg", cg)
    enable_timing = check_bool("enable_timing", enable_timing)
    output_scores = check_bool("output_scores", output_scores)
    return_dict_in_generate = check_bool("return_dict_in_generate", return_dict_in_generate)
    if cg and device.type != "cuda":
        raise ValueError(f"cg: CUDA graphs need a model on a CUDA device, got one on {device}")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise TypeError(f"streamer: expected an object with put() and end(), got {type(streamer).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")

    prompts = _as_prompts(input_ids, attention_mask, eos_token_id if eos_token_id is not None else 0, device)
    batch, prompt_len = prompts.input_ids.shape
    embedding_rows = _embedding_rows(model)
    real_ids = prompts.input_ids if prompts.mask is None else prompts.input_ids[prompts.mask]
    _check_token_range("input_ids", real_ids, embedding_rows)
    if max_length < prompt_len:
        raise ValueError(f"max_length: must be at least the prompt length L={prompt_len}, got {max_length}")
    if teacher_outputs is not None:
        if not isinstance(teacher_outputs, Tensor):
            raise TypeError(f"teacher_outputs: expected a tensor or None, got {type(teacher_outputs).__name__}")
        if teacher_outputs.dim() != 2 or teacher_outputs.shape[0] != batch or teacher_outputs.is_floating_point():
            raise ValueError(f"teacher_outputs: expected a ({batch}, T) integer tensor, got shape "
                             f"{tuple(teacher_outputs.shape)} dtype {teacher_outputs.dtype}")
        teacher_outputs = teacher_outputs.to(device=device, dtype=torch.long)
    new_tokens = max_length - prompt_len

    if streamer is not None:
        streamer.put(prompts.input_ids.cpu())
    graph = None
    if cg and new_tokens > 1:
        graph = _decode_graph(model, batch, max_length, device)
        params = graph.inference_params
        params.reset(max_length, batch)
    else:
        params = InferenceParams(max_seqlen=max_length, max_batch_size=batch,
                                 key_value_memory_dict=_new_cache(model, batch, max_length))
    seen = None  # (B, V + 1) bool: tokens already in each row, for the repetition penalty
    finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos_token_id is not None else None

    lengths = torch.tensor(prompts.lengths, dtype=torch.int32, device=device)
    if enable_timing:
        _sync(device)
    start = time.perf_counter()
    prefill_s = None
    scores, tokens = [], []
    token = None
    for t in range(new_tokens):
        if t == 0:
            # Prefill without per-row lengths and decode with them, graph or not, so that eager and
            # graph decoding run the same attention path and agree token for token.
            graph_lengths, params.lengths_per_sample = params.lengths_per_sample, None
            logits = _prefill(model, prompts, params)
            params.seqlen_offset = max(prompts.lengths)
            params.lengths_per_sample = lengths if graph is None else graph_lengths.copy_(lengths)
        else:
            logits = graph.step(token) if graph is not None else _last_logits(model, token[:, None], params)
            params.seqlen_offset += 1
            if params.lengths_per_sample is not None:
                params.lengths_per_sample += 1
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        if output_scores:
            scores.append(logits.clone())
        if repetition_penalty != 1.0 and seen is None:
            seen = _prompt_tokens(prompts, batch, logits.shape[-1])
        position = prompt_len + t
        if teacher_outputs is not None and position < teacher_outputs.shape[1]:
            token = teacher_outputs[:, position]
        else:
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen[:, :-1], repetition_penalty)
            token = sample(logits, top_k, top_p, min_p, temperature, generator)
        if finished is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        if seen is not None:
            seen.scatter_(1, token[:, None].clamp(max=seen.shape[1] - 1), True)
        tokens.append(token)
        if streamer is not None:
            streamer.put(token[:, None].cpu())
        if t == 0 and enable_timing:
            _sync(device)
            prefill_s = time.perf_counter() - start
        if finished is not None and bool(finished.all()):
            break
    if streamer is not None:
        streamer.end()

    timings = None
    if enable_timing:
        _sync(device)
        total_s = time.perf_counter() - start
        timings = {"prefill_s": prefill_s or 0.0, "decode_s": total_s - (prefill_s or 0.0),
                   "new_tokens": len(tokens)}
        print(f"Prompt processing + decoding time: {total_s * 1000:.0f}ms", file=sys.stderr)

    generated = torch.stack(tokens, dim=1) if tokens else prompts.input_ids.new_empty((batch, 0))
    sequences = torch.cat([prompts.input_ids, generated], dim=1)
    if not return_dict_in_generate:
        return sequences
    mask = None
    if prompts.mask is not None:
        mask = torch.cat([prompts.mask, torch.ones_like(generated, dtype=torch.bool)], dim=1)
    return GenerateOutput(sequences=sequences, scores=tuple(scores) if output_scores else None,
                          attention_mask=mask, timings=timings)


__all__ = ["GenerateOutput", "apply_repetition_penalty", "clear_decode_graphs", "generate", "min_p_filter",
           "sample", "sampling_probs", "top_k_filter", "top_p_filter"]
