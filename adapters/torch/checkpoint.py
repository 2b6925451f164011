"""Reading and writing language-model checkpoints.

A checkpoint is a folder with ``config.json`` and the weights as ``model.safetensors`` or
``pytorch_model.bin`` (either may be sharded, with a ``*.index.json`` weight map). Two layouts
are read:

- the reference package's (mamba-ssm, the ``state-spaces/mamba-*`` repos): its
  ``MambaConfig`` fields in config.json, its state-dict names;
- Hugging Face transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (the ``-hf`` repos):
  ``model_type`` "mamba" / "mamba2" in config.json, ``backbone.embeddings`` instead of
  ``backbone.embedding``; the config is translated and the names mapped on load.

``.bin`` files are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
A name that is not a local folder is a Hub id, downloaded with ``huggingface_hub`` (an optional
dependency) into its cache; offline, the cached copy is used, and without one the error says
which id, which cache folder, and that a local folder path works too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from .models import MambaConfig, MambaLMHeadModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
# Weight files in the order they are looked for.
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json", BIN_NAME, BIN_NAME + ".index.json")

_HF_PREFIX_MAP = {"backbone.embeddings.": "backbone.embedding."}


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be loaded: malformed config, unreadable weights, or weights that do not
    fit the model. The message lists everything found wrong. (A RuntimeError too, as torch's
    ``load_state_dict`` errors are.)"""


class UnsafeCheckpointError(pickle.UnpicklingError, CheckpointError):
    """A ``.bin`` file holding objects other than tensors and plain containers: refused, never executed."""


# ---------------------------------------------------------------------------------- validation

# MambaConfig fields and the JSON types they take (bool is not an int here).
_CONFIG_TYPES = {"d_model": int, "d_intermediate": int, "n_layer": int, "vocab_size": int, "ssm_cfg": dict,
                 "attn_layer_idx": list, "attn_cfg": dict, "rms_norm": bool, "residual_in_fp32": bool,
                 "fused_add_norm": bool, "pad_vocab_size_multiple": int, "tie_embeddings": bool}
_CONFIG_MIN = {"d_model": 1, "d_intermediate": 0, "n_layer": 0, "vocab_size": 1, "pad_vocab_size_multiple": 1}
# transformers layout: keys that must be there, with their types.
_HF_REQUIRED = {"hidden_size": 1, "num_hidden_layers": 0, "vocab_size": 1}


def _type_problem(key, value, kind, minimum=None):
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} must be an integer, got {type(value).__name__} {value!r}"
        if minimum is not None and value < minimum:
            return f"{key} must be >= {minimum}, got {value}"
        return None
    if not isinstance(value, kind):
        return f"{key} must be a JSON {'object' if kind is dict else kind.__name__}, got {type(value).__name__} {value!r}"
    return None


def _check_raw_config(raw) -> None:
    """Raise one CheckpointError listing every wrong type/value in config.json's contents."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"config: expected a JSON object in {CONFIG_NAME}, got {type(raw).__name__}")
    problems = []
    if _is_transformers_config(raw):
        for key, minimum in _HF_REQUIRED.items():
            if key not in raw:
                problems.append(f"{key} is missing")
            else:
                problems.append(_type_problem(key, raw[key], int, minimum))
    else:
        for key, kind in _CONFIG_TYPES.items():
            if key in raw:
                problems.append(_type_problem(key, raw[key], kind, _CONFIG_MIN.get(key)))
        idx = raw.get("attn_layer_idx")
        if isinstance(idx, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            problems.append(f"attn_layer_idx must be a list of integers, got {idx!r}")
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"config: {CONFIG_NAME} has {len(problems)} bad value(s): " + "; ".join(problems))


def _read_config_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"config: {path} is not valid JSON ({err})") from None
    _check_raw_config(raw)
    return raw


def _check_state_dict(model, state_dict: dict) -> None:
    """Raise one CheckpointError listing all missing keys, unexpected keys and shape mismatches."""
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state_dict.items()
                   if k in want and not isinstance(v, torch.Tensor)]
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(want[k].shape)}" for k, v in state_dict.items()
              if k in want and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(want[k].shape)]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("values that are not tensors", not_tensors), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {title}: " + ", ".join(items))
    if parts:
        raise CheckpointError("path_or_hub_id: the weights do not fit the model of config.json: " + "; ".join(parts))


# ---------------------------------------------------------------------------------- configs


def _is_transformers_config(raw: dict) -> bool:
    return raw.get("model_type") in ("mamba", "mamba2") or ("hidden_size" in raw and "d_model" not in raw)


def _json_float(value) -> float:
    """A float from config.json; transformers 5 writes inf as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def config_from_transformers(raw: dict) -> MambaConfig:
    """The MambaConfig of a transformers ``MambaConfig`` / ``Mamba2Config`` (config.json as a dict)."""
    mamba2 = raw.get("model_type") == "mamba2" or "num_heads" in raw
    d_model = raw["hidden_size"]
    ssm_cfg = {
        "d_state": raw.get("state_size", 128 if mamba2 else 16),
        "d_conv": raw.get("conv_kernel", 4),
        "expand": raw.get("expand", 2),
        "bias": raw.get("use_bias", False),
        "conv_bias": raw.get("use_conv_bias", True),
        "dt_min": raw.get("time_step_min", 0.001),
        "dt_max": raw.get("time_step_max", 0.1),
        "dt_init_floor": raw.get("time_step_floor", 1e-4),
    }
    if mamba2:
        headdim = raw.get("head_dim", 64)
        num_heads = raw.get("num_heads", ssm_cfg["expand"] * d_model // headdim)
        if num_heads * headdim != ssm_cfg["expand"] * d_model:
            raise ValueError(f"config: num_heads * head_dim = {num_heads * headdim} must equal expand * hidden_size "
                             f"= {ssm_cfg['expand'] * d_model}")
        ssm_cfg.update(layer="Mamba2", headdim=headdim, ngroups=raw.get("n_groups", 1),
                       chunk_size=raw.get("chunk_size", 256),
                       dt_limit=tuple(_json_float(v) for v in raw.get("time_step_limit", (0.0, math.inf))))
    else:
        rank = raw.get("time_step_rank", "auto")
        ssm_cfg.update(layer="Mamba1", dt_rank=rank if rank == "auto" else int(rank),
                       dt_scale=raw.get("time_step_scale", 1.0), dt_init=raw.get("time_step_init_scheme", "random"))
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        warnings.warn(f"config: layer_norm_epsilon={eps} is not representable in MambaConfig; using 1e-5",
                      stacklevel=3)
    return MambaConfig(
        d_model=d_model, d_intermediate=0, n_layer=raw["num_hidden_layers"], vocab_size=raw["vocab_size"],
        ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=raw.get("residual_in_fp32", True), fused_add_norm=True,
        pad_vocab_size_multiple=1, tie_embeddings=raw.get("tie_word_embeddings", True))


def config_from_dict(raw: dict) -> MambaConfig:
    """A MambaConfig from config.json's contents, in either layout. Unknown keys are ignored with a warning."""
    _check_raw_config(raw)
    if _is_transformers_config(raw):
        return config_from_transformers(raw)
    names = {f.name for f in dataclasses.fields(MambaConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        warnings.warn(f"config: ignoring keys that MambaConfig does not have: {unknown}", stacklevel=3)
    config = MambaConfig(**{k: v for k, v in raw.items() if k in names})
    # JSON has no tuples: pairs such as dt_limit and A_init_range come back as lists.
    config.ssm_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.ssm_cfg.items()}
    return config


# ---------------------------------------------------------------------------------- state dicts


def convert_transformers_state_dict(state_dict: dict) -> dict:
    """transformers' Mamba/Mamba2ForCausalLM names -> the reference package's (a new dict, same tensors)."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _HF_PREFIX_MAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def _read_weight_file(path: Path) -> dict:
    """A weight file's tensors. ``.bin`` files go through torch's weights-only unpickler: anything but
    tensors and plain containers is refused before it can run."""
    if not Path(path).is_file():
        raise CheckpointError(f"path_or_hub_id: the weight file {path} does not exist")
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: truncated header or data, bad JSON header
            raise CheckpointError(f"path_or_hub_id: {path} is not a readable safetensors file (truncated or "
                                  f"corrupt?): {type(err).__name__}: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if ln.strip()]
        first = [ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln] or lines[-1:]
        raise UnsafeCheckpointError(
            f"path_or_hub_id: {path} was refused: it holds Python objects other than tensors, and loading it "
            f"would run their code (only weights_only loading is done; nothing in it was executed). Convert it to "
            f"safetensors where you trust it. Details: {first[0] if first else type(err).__name__}"
        ) from None
    except Exception as err:  # truncated zip archive, not a torch file
        raise CheckpointError(f"path_or_hub_id: {path} is not a readable torch checkpoint (truncated or "
                              f"corrupt?): {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"path_or_hub_id: {path} holds a {type(state).__name__}, expected a state dict")
    return state


def _weight_map(path: Path) -> dict:
    """The weight map of a ``*.index.json``; shard names must be plain file names in the same folder."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"path_or_hub_id: {path} is not a valid index file (needs a JSON "
                              f"\"weight_map\"): {type(err).__name__}: {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"path_or_hub_id: {path}: weight_map must map names to shard file names")
    bad = sorted({v for v in weight_map.values()
                  if not v or v in (".", "..") or "/" in v or "\\" in v or os.path.isabs(v)})
    if bad:
        raise CheckpointError(f"path_or_hub_id: {path} names shards outside its folder: {bad}")
    return weight_map


def _read_weights(folder: Path, files: dict) -> dict:
    """The state dict of a checkpoint folder; ``files`` maps weight-file names to local paths."""
    for name in WEIGHT_FILES:
        if name not in files:
            continue
        path = files[name]
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        weight_map = _weight_map(path)
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(_read_weight_file(files.get(shard, path.parent / shard)))
        return state_dict
    raise FileNotFoundError(f"path_or_hub_id: {folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------- locating files


def _hub_errors():
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    return EntryNotFoundError, LocalEntryNotFoundError


def _hub_cache_dir(cache_dir) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def _unavailable(hub_id: str, cache_dir, reason: str) -> OSError:
    return FileNotFoundError(
        f"path_or_hub_id: {hub_id!r} is not a local folder, and it could not be fetched from the Hugging Face Hub "
        f"({reason}). It is not in the cache folder {_hub_cache_dir(cache_dir)} either. Download it once while "
        f"online (or copy it into that cache), or pass the path of a local folder holding config.json and "
        f"model.safetensors or pytorch_model.bin instead of the id."
    )


def _hub_files(hub_id: str, revision, cache_dir, local_files_only) -> tuple[Path, dict]:
    """Download (or find in the cache) config.json and the weights of a Hub repo."""
    try:
        import huggingface_hub
    except ImportError:
        raise _unavailable(hub_id, cache_dir, "huggingface_hub is not installed: pip install huggingface_hub") \
            from None
    EntryNotFoundError, LocalEntryNotFoundError = _hub_errors()

    def fetch(filename):
        try:
            return Path(huggingface_hub.hf_hub_download(hub_id, filename, revision=revision, cache_dir=cache_dir,
                                                        local_files_only=local_files_only))
        except LocalEntryNotFoundError as err:
            raise _unavailable(hub_id, cache_dir, "offline, or the Hub cannot be reached") from err
        except EntryNotFoundError:
            return None
        except Exception as err:  # unknown repo, gated repo, invalid id, network errors
            raise _unavailable(hub_id, cache_dir, f"{type(err).__name__}: {err}") from err

    config = fetch(CONFIG_NAME)
    if config is None:
        raise FileNotFoundError(f"path_or_hub_id: the Hub repo {hub_id!r} has no {CONFIG_NAME}")
    for name in WEIGHT_FILES:
        path = fetch(name)
        if path is None:
            continue
        files = {name: path}
        if name.endswith(".index.json"):
            for shard in sorted(set(_weight_map(path).values())):
                files[shard] = fetch(shard)
        return config, files
    raise FileNotFoundError(f"path_or_hub_id: the Hub repo {hub_id!r} has none of {', '.join(WEIGHT_FILES)}")


def _checkpoint_files(path_or_hub_id, revision=None, cache_dir=None, local_files_only=False) -> tuple[Path, dict]:
    """(config.json path, {weight file name: path}) of a local folder or a Hub id."""
    if not isinstance(path_or_hub_id, (str, os.PathLike)):
        raise TypeError(f"path_or_hub_id: expected a folder path or a Hub id string, "
                        f"got {type(path_or_hub_id).__name__}")
    folder = Path(path_or_hub_id).expanduser()
    if folder.is_dir():
        config = folder / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(f"path_or_hub_id: the folder {folder} has no {CONFIG_NAME}")
        return config, {name: folder / name for name in WEIGHT_FILES if (folder / name).is_file()}
    if folder.exists():
        raise ValueError(f"path_or_hub_id: expected a checkpoint folder, got the file {folder}")
    return _hub_files(str(path_or_hub_id), revision, cache_dir, local_files_only)


# ---------------------------------------------------------------------------------- public API


def load_config(path_or_hub_id, **hub_kwargs) -> MambaConfig:
    """The MambaConfig of a checkpoint folder or Hub id (either config layout)."""
    config_path, _ = _checkpoint_files(path_or_hub_id, **hub_kwargs)
    return config_from_dict(_read_config_json(config_path))


def _torch_dtype(dtype):
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float16"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise TypeError(f"dtype: expected a floating torch.dtype or its name such as 'bfloat16', got {dtype!r}")


def from_pretrained(path_or_hub_id, device=None, dtype=None, *, revision=None, cache_dir=None,
                    local_files_only=False) -> MambaLMHeadModel:
    """A :class:`MambaLMHeadModel` with a checkpoint's weights, loaded with ``strict=True``.

    Args:
        path_or_hub_id: a folder with config.json and model.safetensors / pytorch_model.bin (sharded or
            not, reference or transformers layout), or a Hugging Face Hub id such as
            "state-spaces/mamba-130m" (needs huggingface_hub; uses its cache when offline).
        device: where the parameters go (default CPU). dtype: the model dtype or its name (default
            float32); as in the reference, Mamba-1's A_log and D and Mamba-2's D stay float32.
        revision, cache_dir, local_files_only: passed to huggingface_hub for a Hub id.

    Returns:
        the model in eval mode.
    """
    dtype = _torch_dtype(dtype)
    config_path, files = _checkpoint_files(path_or_hub_id, revision, cache_dir, local_files_only)
    raw = _read_config_json(config_path)
    config = config_from_dict(raw)
    state_dict = _read_weights(config_path.parent, files)
    if _is_transformers_config(raw) or any(k.startswith("backbone.embeddings.") for k in state_dict):
        state_dict = convert_transformers_state_dict(state_dict)
    if config.tie_embeddings and "lm_head.weight" not in state_dict and "backbone.embedding.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["backbone.embedding.weight"]

    # Build without initialising (the checkpoint overwrites every parameter), then fill.
    with torch.device("meta"):
        model = MambaLMHeadModel(config, dtype=dtype)
    _check_state_dict(model, state_dict)
    flags = {name: {a: getattr(p, a) for a in ("_no_weight_decay", "_no_reinit") if hasattr(p, a)}
             for name, p in model.named_parameters()}
    model.to_empty(device=device if device is not None else "cpu")
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        for attr, value in flags.get(name, {}).items():
            setattr(p, attr, value)
    return model.eval()


def save_pretrained(model: MambaLMHeadModel, save_directory, *, save_bin: bool = False) -> None:
    """Write ``config.json`` and ``model.safetensors`` (and ``pytorch_model.bin`` with save_bin) to a folder.

    The safetensors file stores a tied lm_head once (under ``backbone.embedding.weight``); the .bin
    file holds the full state dict, as the reference writes it.
    """
    if not isinstance(model, MambaLMHeadModel):
        raise TypeError(f"model: expected a MambaLMHeadModel, got {type(model).__name__}")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model.config), indent=4))
    state_dict = model.state_dict()
    from safetensors.torch import save_file

    tied = model.lm_head.weight is model.backbone.embedding.weight
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    if save_bin:
        torch.save(state_dict, folder / BIN_NAME)


__all__ = ["CheckpointError", "UnsafeCheckpointError", "config_from_dict", "config_from_transformers", "convert_transformers_state_dict", "from_pretrained",
           "load_config", "save_pretrained"]
