"""The decoding cache handed to a model's forward (mamba-ssm's ``InferenceParams``).

One ``InferenceParams`` travels through every layer of a model during generation: each
mixer keeps its own state in ``key_value_memory_dict[layer_idx]`` (Mamba: ``(conv_state,
ssm_state)``; attention: ``(kv_cache, conv_state)``), created on first use or up front by
``model.allocate_inference_cache``. ``seqlen_offset`` is the number of tokens already in
the cache: 0 means the next forward is a prompt (prefill, which fills the cache), more
than 0 means it continues from the cache (one token: a decode step; several: a chunked
prefill). The caller advances ``seqlen_offset`` after each forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class InferenceParams:
    """State of one generation: cache tensors per layer and how far the sequences have got.

    Fields (as in the reference package):
        max_seqlen: the longest sequence (prompt + new tokens) the caches must hold.
        max_batch_size: the most sequences decoded at once.
        seqlen_offset: tokens already in the cache (0 before the prompt).
        batch_size_offset: first cache row of this batch (attention caches only).
        key_value_memory_dict: layer_idx -> that layer's cache tensors.
        lengths_per_sample: (B,) int32 tokens already in the cache per sequence, or None to use
            seqlen_offset for every sequence (attention layers only).
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new generation with the same cache tensors (their contents are overwritten by the prompt)."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


__all__ = ["InferenceParams"]
