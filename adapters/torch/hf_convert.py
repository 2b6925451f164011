"""Checkpoint conversion between ssmcore (the reference package's layout) and Hugging Face transformers.

``ssmcore convert --to hf SRC DST`` writes a folder that ``transformers.MambaForCausalLM`` /
``Mamba2ForCausalLM.from_pretrained(DST)`` loads; ``ssmcore convert --to ssmcore SRC DST`` writes
one in the reference layout (``config.json`` with MambaConfig fields, ``model.safetensors``).

Only the names and the config change: tensors are copied as they are (same dtype, same bits), so
a round trip gives back bitwise-equal tensors. The two layouts differ in

- weight names: transformers' ``backbone.embeddings.weight`` is our ``backbone.embedding.weight``
  (every other name is the same); a tied ``lm_head.weight`` is stored once, under the embedding;
- the config: transformers' ``vocab_size`` is the number of embedding rows, which is our
  vocab_size rounded up to ``pad_vocab_size_multiple``. The HF config.json gets an extra key
  ``ssmcore_config`` (our config as written by ``save_pretrained``; transformers ignores it) so
  that converting back restores vocab_size and pad_vocab_size_multiple exactly.

What transformers' classes cannot express is refused with a ValueError: gated MLPs
(d_intermediate > 0), attention layers, LayerNorm instead of RMSNorm, and for Mamba-2 ``d_ssm``
other than expand * d_model, ``D_has_hdim``, ``rmsnorm=False`` and ``norm_before_gate=True``.
In the other direction, a norm epsilon other than 1e-5 or an activation other than SiLU.
transformers itself is not needed to convert.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
from pathlib import Path

from .checkpoint import (CONFIG_NAME, SAFETENSORS_NAME, _checkpoint_files, _is_transformers_config,
                         _read_weights, config_from_dict, config_from_transformers,
                         convert_transformers_state_dict)
from .models import MambaConfig
from .modules import Mamba, Mamba2

# Key under which the HF config.json keeps our own config, for an exact way back.
SSMCORE_CONFIG_KEY = "ssmcore_config"
# Tokenizer files copied along with the weights, in either direction.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
# transformers' defaults for keys that a transformers config.json may leave out where they differ from
# what checkpoint.config_from_transformers assumes (Mamba2Config: n_groups 8, untied embeddings).
_HF_DEFAULTS = {
    "mamba": {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5, "hidden_act": "silu"},
    "mamba2": {"tie_word_embeddings": False, "n_groups": 8, "layer_norm_epsilon": 1e-5, "hidden_act": "silu",
               "state_size": 128, "head_dim": 64, "expand": 2, "chunk_size": 256},
}
_EMBED_OURS, _EMBED_HF = "backbone.embedding.", "backbone.embeddings."


def _mixer_kwargs(cls, ssm_cfg: dict) -> dict:
    """The mixer's keyword arguments: its signature's defaults updated with ssm_cfg."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: p.default for name, p in params.items()
              if p.default is not inspect.Parameter.empty and name not in ("device", "dtype", "layer_idx")}
    unknown = sorted(set(ssm_cfg) - set(kwargs))
    if unknown:
        raise ValueError(f"config: ssm_cfg has keys that {cls.__name__} does not take: {unknown}")
    kwargs.update(ssm_cfg)
    return kwargs


def padded_vocab_size(config: MambaConfig) -> int:
    """The number of embedding rows: vocab_size rounded up to pad_vocab_size_multiple."""
    multiple = config.pad_vocab_size_multiple
    return -(-config.vocab_size // multiple) * multiple


def to_transformers_config(config: MambaConfig, dtype: str | None = None) -> dict:
    """transformers' config.json (``MambaConfig`` or ``Mamba2Config``) for one of our configs.

    Raises ValueError for what transformers' Mamba classes cannot express (see the module docstring).
    """
    if not isinstance(config, MambaConfig):
        raise TypeError(f"config: expected a MambaConfig, got {type(config).__name__}")
    if config.d_intermediate:
        raise ValueError(f"config: d_intermediate={config.d_intermediate}: transformers' Mamba models have no MLP")
    if config.attn_layer_idx:
        raise ValueError(f"config: attn_layer_idx={config.attn_layer_idx}: transformers' Mamba models have no "
                         "attention layers")
    if not config.rms_norm:
        raise ValueError("config: rms_norm=False (LayerNorm): transformers' Mamba models use RMSNorm")
    ssm_cfg = dict(config.ssm_cfg)
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"config: ssm_cfg['layer'] must be 'Mamba1' or 'Mamba2', got {layer!r}")
    d_model = config.d_model
    common = {
        "hidden_size": d_model, "num_hidden_layers": config.n_layer, "vocab_size": padded_vocab_size(config),
        "layer_norm_epsilon": 1e-5, "hidden_act": "silu", "residual_in_fp32": bool(config.residual_in_fp32),
        "tie_word_embeddings": bool(config.tie_embeddings), "pad_token_id": 0, "bos_token_id": 0,
        "eos_token_id": 0, "use_cache": True,
    }
    if layer == "Mamba1":
        kw = _mixer_kwargs(Mamba, ssm_cfg)
        dt_rank = math.ceil(d_model / 16) if kw["dt_rank"] == "auto" else int(kw["dt_rank"])
        raw = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
               "state_size": kw["d_state"], "expand": kw["expand"], "intermediate_size": int(kw["expand"] * d_model),
               "conv_kernel": kw["d_conv"], "use_bias": bool(kw["bias"]), "use_conv_bias": bool(kw["conv_bias"]),
               "time_step_rank": dt_rank, "time_step_scale": kw["dt_scale"], "time_step_min": kw["dt_min"],
               "time_step_max": kw["dt_max"], "time_step_init_scheme": kw["dt_init"],
               "time_step_floor": kw["dt_init_floor"]}
    else:
        kw = _mixer_kwargs(Mamba2, ssm_cfg)
        d_inner = int(kw["expand"] * d_model)
        if kw["d_ssm"] is not None and kw["d_ssm"] != d_inner:
            raise ValueError(f"config: d_ssm={kw['d_ssm']} != expand * d_model = {d_inner}: not expressible in "
                             "transformers' Mamba2Config")
        for name, bad in (("D_has_hdim", True), ("rmsnorm", False), ("norm_before_gate", True)):
            if bool(kw[name]) == bad:
                raise ValueError(f"config: ssm_cfg {name}={kw[name]} is not expressible in transformers' Mamba2")
        if d_inner % kw["headdim"]:
            raise ValueError(f"config: expand * d_model = {d_inner} is not a multiple of headdim={kw['headdim']}")
        raw = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **common,
               "state_size": kw["d_state"], "expand": kw["expand"], "conv_kernel": kw["d_conv"],
               "num_heads": d_inner // kw["headdim"], "head_dim": kw["headdim"], "n_groups": kw["ngroups"],
               "chunk_size": kw["chunk_size"], "use_bias": bool(kw["bias"]), "use_conv_bias": bool(kw["conv_bias"]),
               "time_step_rank": math.ceil(d_model / 16), "time_step_min": kw["dt_min"],
               "time_step_max": kw["dt_max"], "time_step_floor": kw["dt_init_floor"],
               "time_step_limit": [float(v) for v in kw["dt_limit"]]}
    if dtype is not None:
        raw["dtype"] = dtype
    return raw


def _hf_raw_with_defaults(raw: dict) -> dict:
    """A transformers config dict with transformers' own defaults filled in for the keys that matter."""
    model_type = raw.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"config: expected a transformers config with model_type 'mamba' or 'mamba2', "
                         f"got {model_type!r}")
    full = {**_HF_DEFAULTS[model_type], **raw}
    if full["hidden_act"] not in ("silu", "swish"):
        raise ValueError(f"config: hidden_act={full['hidden_act']!r}: ssmcore's Mamba uses SiLU")
    if not math.isclose(float(full["layer_norm_epsilon"]), 1e-5, rel_tol=1e-9):
        raise ValueError(f"config: layer_norm_epsilon={full['layer_norm_epsilon']}: ssmcore's models use 1e-5")
    return full


def from_transformers_config(raw: dict) -> MambaConfig:
    """Our MambaConfig of a transformers config.json. When it carries ``ssmcore_config`` (written by
    :func:`convert_to_hf`) and that config describes the same shapes, that config is returned."""
    full = _hf_raw_with_defaults(raw)
    stored = raw.get(SSMCORE_CONFIG_KEY)
    if isinstance(stored, dict):
        try:
            config = config_from_dict(stored)
            expected = to_transformers_config(config)
        except (TypeError, ValueError):
            expected = None
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand",
                "conv_kernel", "num_heads", "head_dim", "n_groups", "tie_word_embeddings", "use_bias",
                "use_conv_bias", "time_step_rank")
        if expected is not None and all(expected.get(k) == full.get(k) for k in keys if k in expected):
            return config
    return config_from_transformers(full)


def _write_safetensors(tensors: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAFETENSORS_NAME),
              metadata={"format": "pt"})


def _prepare_dst(dst, overwrite: bool) -> Path:
    folder = Path(dst).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"dst: {folder} is a file, expected a folder")
    if (folder / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"dst: {folder} already holds a {CONFIG_NAME}; pass overwrite=True (--overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _copy_tokenizer(src_config: Path, dst: Path) -> list:
    copied = []
    for name in TOKENIZER_FILES:
        path = src_config.parent / name
        if path.is_file() and path.resolve() != (dst / name).resolve():
            shutil.copyfile(path, dst / name)
            copied.append(name)
    return copied


def _dtype_name(state_dict: dict) -> str:
    weight = state_dict.get(_EMBED_OURS + "weight")
    return str(weight.dtype).removeprefix("torch.") if weight is not None else "float32"


def convert_to_hf(src, dst, *, overwrite: bool = False) -> Path:
    """Write our checkpoint ``src`` (folder or Hub id) as a transformers checkpoint folder ``dst``.

    Returns the folder. The tensors are the same bits; a tied lm_head is stored once.
    """
    config_path, files = _checkpoint_files(src)
    raw = json.loads(config_path.read_text())
    if _is_transformers_config(raw):
        raise ValueError(f"src: {src} is already a transformers checkpoint (model_type {raw.get('model_type')!r})")
    config = config_from_dict(raw)
    state_dict = _read_weights(config_path.parent, files)
    hf_config = to_transformers_config(config, dtype=_dtype_name(state_dict))
    tensors = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # transformers ties it to the embedding on load
        if key.startswith(_EMBED_OURS):
            key = _EMBED_HF + key[len(_EMBED_OURS):]
        tensors[key] = value
    if not config.tie_embeddings and "lm_head.weight" not in tensors:
        raise ValueError(f"src: {src} has untied embeddings but no lm_head.weight")
    hf_config[SSMCORE_CONFIG_KEY] = dataclasses.asdict(config)
    folder = _prepare_dst(dst, overwrite)
    _write_safetensors(tensors, folder)
    (folder / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
    _copy_tokenizer(config_path, folder)
    return folder


def convert_from_hf(src, dst, *, overwrite: bool = False) -> Path:
    """Write the transformers checkpoint ``src`` (MambaForCausalLM / Mamba2ForCausalLM; folder or Hub id)
    in our layout to the folder ``dst``. Returns the folder."""
    config_path, files = _checkpoint_files(src)
    raw = json.loads(config_path.read_text())
    if not _is_transformers_config(raw):
        raise ValueError(f"src: {src} is not a transformers checkpoint (its config.json has no model_type "
                         "'mamba' / 'mamba2')")
    config = from_transformers_config(raw)
    state_dict = convert_transformers_state_dict(_read_weights(config_path.parent, files))
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)  # stored once, under the embedding, as save_pretrained does
    elif "lm_head.weight" not in state_dict:
        raise ValueError(f"src: {src} has untied embeddings (tie_word_embeddings false) but no lm_head.weight")
    rows = state_dict[_EMBED_OURS + "weight"].shape[0]
    if rows != padded_vocab_size(config):
        raise ValueError(f"src: the embedding has {rows} rows but the config's padded vocabulary is "
                         f"{padded_vocab_size(config)}")
    folder = _prepare_dst(dst, overwrite)
    _write_safetensors(state_dict, folder)
    (folder / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=4))
    _copy_tokenizer(config_path, folder)
    return folder


def convert(src, dst, to: str, *, overwrite: bool = False) -> Path:
    """``to="hf"``: :func:`convert_to_hf`; ``to="ssmcore"``: :func:`convert_from_hf`."""
    if to == "hf":
        return convert_to_hf(src, dst, overwrite=overwrite)
    if to == "ssmcore":
        return convert_from_hf(src, dst, overwrite=overwrite)
    raise ValueError(f"to: expected 'hf' or 'ssmcore', got {to!r}")


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("--to", required=True, choices=("hf", "ssmcore"),
                        help="hf: write a transformers MambaForCausalLM / Mamba2ForCausalLM folder; "
                             "ssmcore: write the reference (mamba_ssm) layout")
    parser.add_argument("src", help="checkpoint folder or Hugging Face Hub id to read")
    parser.add_argument("dst", help="folder to write (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")


def run(args) -> int:
    import sys

    try:
        folder = convert(args.src, args.dst, args.to, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        print(f"ssmcore convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder} ({'transformers' if args.to == 'hf' else 'ssmcore'} layout)")
    return 0


__all__ = ["SSMCORE_CONFIG_KEY", "convert", "convert_from_hf", "convert_to_hf", "from_transformers_config",
           "padded_vocab_size", "to_transformers_config"]
