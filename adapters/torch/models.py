"""The Mamba language model (mamba-ssm's ``MambaLMHeadModel``), its backbone and config.

``MambaLMHeadModel(config)`` is embedding -> n_layer blocks (Mamba, Mamba2 or, at
``attn_layer_idx``, attention; each optionally followed by a gated MLP) -> final norm ->
lm_head, with the reference's state-dict names (``backbone.embedding``, ``backbone.layers.N.
{norm,mixer,norm2,mlp}``, ``backbone.norm_f``, ``lm_head``) and initialisation, so a
reference checkpoint loads with ``strict=True``. Checkpoint files: :mod:`.checkpoint`.
"""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from .functional import layer_norm_fn
from .modules import MHA, Block, GatedMLP, Mamba, Mamba2, RMSNorm, _norm_params

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


@dataclass
class MambaConfig:
    """The reference's model config (``config.json`` of its checkpoints), field for field.

    ssm_cfg: keyword arguments of the mixer, with ``"layer": "Mamba1"`` (default) or ``"Mamba2"``.
    attn_layer_idx / attn_cfg: layers that are attention (:class:`MHA`) and its arguments.
    d_intermediate: hidden width of a gated MLP after each mixer (0: none).
    pad_vocab_size_multiple: the embedding has vocab_size rounded up to this multiple.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


def create_block(d_model, d_intermediate, ssm_cfg=None, attn_layer_idx=None, attn_cfg=None, norm_epsilon=1e-5,
                 rms_norm=False, residual_in_fp32=False, fused_add_norm=False, layer_idx=None, device=None,
                 dtype=None):
    """One :class:`Block` of the backbone: its mixer, norm and optional MLP chosen from the config."""
    ssm_cfg = copy.deepcopy(ssm_cfg) if ssm_cfg is not None else {}
    attn_layer_idx = attn_layer_idx if attn_layer_idx is not None else []
    attn_cfg = attn_cfg if attn_cfg is not None else {}
    factory_kwargs = {"device": device, "dtype": dtype}
    if layer_idx not in attn_layer_idx:
        ssm_layer = ssm_cfg.pop("layer", "Mamba1")
        if ssm_layer not in ("Mamba1", "Mamba2"):
            raise ValueError(f"ssm_cfg: 'layer' must be 'Mamba1' or 'Mamba2', got {ssm_layer!r}")
        mixer_cls = partial(Mamba2 if ssm_layer == "Mamba2" else Mamba, layer_idx=layer_idx, **ssm_cfg,
                            **factory_kwargs)
    else:
        mixer_cls = partial(MHA, layer_idx=layer_idx, **attn_cfg, **factory_kwargs)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory_kwargs)
    if d_intermediate == 0:
        mlp_cls = nn.Identity
    else:
        mlp_cls = partial(GatedMLP, hidden_features=d_intermediate, out_features=d_model, **factory_kwargs)
    block = Block(d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True, n_residuals_per_layer=1):
    """The reference's (GPT-2 style) initialisation, applied with ``model.apply``.

    Linear biases become 0 (except those marked ``_no_reinit``, the dt_proj bias), embeddings
    N(0, initializer_range), and the projections that write into the residual stream
    (``out_proj``, ``fc2``) are re-drawn with PyTorch's default and scaled by
    1/sqrt(n_residuals_per_layer * n_layer).
    """
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    """Embedding -> blocks -> final norm: input_ids (B, L) -> hidden states (B, L, D)."""

    def __init__(self, d_model: int, n_layer: int, d_intermediate: int, vocab_size: int, ssm_cfg=None,
                 attn_layer_idx=None, attn_cfg=None, norm_epsilon: float = 1e-5, rms_norm: bool = False,
                 initializer_cfg=None, fused_add_norm=False, residual_in_fp32=False, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.embedding = nn.Embedding(vocab_size, d_model, **factory_kwargs)
        self.fused_add_norm = fused_add_norm
        self.layers = nn.ModuleList([
            create_block(d_model, d_intermediate=d_intermediate, ssm_cfg=ssm_cfg, attn_layer_idx=attn_layer_idx,
                         attn_cfg=attn_cfg, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                         residual_in_fp32=residual_in_fp32, fused_add_norm=fused_add_norm, layer_idx=i,
                         **factory_kwargs)
            for i in range(n_layer)
        ])
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **factory_kwargs)
        self.apply(partial(_init_weights, n_layer=n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=1 if d_intermediate == 0 else 2))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """layer_idx -> that layer's cache tensors, for ``InferenceParams.key_value_memory_dict``."""
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params,
                                            **mixer_kwargs)
        if not self.fused_add_norm:
            residual = hidden_states + residual if residual is not None else hidden_states
            return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
        return layer_norm_fn(hidden_states, *_norm_params(self.norm_f), eps=self.norm_f.eps,
                             residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32,
                             is_rms_norm=isinstance(self.norm_f, RMSNorm))


class MambaLMHeadModel(nn.Module):
    """Mamba language model: input_ids (B, L) -> CausalLMOutput(logits (B, L, V)), V the padded vocabulary.

    ``MambaLMHeadModel.from_pretrained(path_or_hub_id, device=None, dtype=None)`` and
    ``model.save_pretrained(folder)`` read and write checkpoints (see :mod:`.checkpoint`).
    """

    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None) -> None:
        self.config = config
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        vocab_size = config.vocab_size
        if vocab_size % config.pad_vocab_size_multiple != 0:
            vocab_size += config.pad_vocab_size_multiple - vocab_size % config.pad_vocab_size_multiple
        self.backbone = MixerModel(
            d_model=config.d_model, n_layer=config.n_layer, d_intermediate=config.d_intermediate,
            vocab_size=vocab_size, ssm_cfg=config.ssm_cfg, attn_layer_idx=config.attn_layer_idx,
            attn_cfg=config.attn_cfg, rms_norm=config.rms_norm, initializer_cfg=initializer_cfg,
            fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32, **factory_kwargs)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False, **factory_kwargs)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        """input_ids: (B, L) int. position_ids: accepted for transformers-style callers, unused.
        num_last_tokens > 0: logits of the last that many positions only."""
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden_states))

    # --- generation (adapters/torch/generation.py) ---
    def generate(self, input_ids, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                 return_dict_in_generate=False, output_scores=False, **kwargs):
        """Token ids (B, L) or a list of prompts -> sequences (B, max_length); see :func:`.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, max_length, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                        return_dict_in_generate=return_dict_in_generate, output_scores=output_scores, **kwargs)
    # --- end generation ---

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs):
        """A model from a checkpoint folder or Hugging Face Hub id; see :func:`.checkpoint.from_pretrained`."""
        from .checkpoint import from_pretrained

        return from_pretrained(pretrained_model_name, device=device, dtype=dtype, **kwargs)

    def save_pretrained(self, save_directory, save_bin=False):
        """Write config.json + model.safetensors (+ pytorch_model.bin with ``save_bin``) to a folder."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, save_bin=save_bin)


__all__ = ["CausalLMOutput", "MambaConfig", "MambaLMHeadModel", "MixerModel", "create_block"]
