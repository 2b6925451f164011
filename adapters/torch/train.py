"""``ssmcore train``: byte-level language-model training with ssmcore's own kernels.

    ssmcore train --corpus python-stdlib --config tiny --arch mamba --steps 2000 --device cuda --out runs/tiny

The model is :class:`~.models.MambaLMHeadModel` (Mamba-1 or Mamba-2 blocks, whose forward and
backward run the ``ssmcore::`` custom ops: Numba kernels on CPU tensors, CuPy kernels on CUDA
tensors) over a 256-token byte vocabulary (:class:`~.tokenizer.ByteTokenizer`), so no tokenizer
is downloaded. Training: AdamW on float32 parameters (the master weights; on CUDA the forward
and backward run under bf16 autocast), weight decay on matrices only, gradient-norm clipping,
linear warmup then cosine decay of the learning rate to 10 % of its peak.

The output folder ``--out`` holds, after every ``--save-every`` steps and at the end:

- ``config.json`` + ``model.safetensors``: the model (``MambaLMHeadModel.from_pretrained(out)``),
  in ``--save-dtype``;
- ``training_state.pt``: float32 weights, optimizer state, step, random-number states and the loss
  history, read by ``--resume`` (training continues exactly where it stopped);
- ``loss_curve.png``: train loss per step and held-out validation loss (matplotlib when it is
  installed, else drawn by a small built-in PNG writer);
- ``train_metrics.json``: command, steps, tokens, wall time, final train and validation loss.

Corpus: ``python-stdlib`` is the ``.py`` files of the running Python's standard library (text
every Python installation has); otherwise a text file or a folder of text files (read
recursively). Files are read in sorted path order and joined with the end-of-text byte; files
that are not UTF-8 text (or contain NUL) are skipped. With 50 files or more, every 50th file is
held out for validation; with fewer, the last 5 % of the text is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import struct
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .inference import InferenceParams
from .models import MambaConfig, MambaLMHeadModel
from .tokenizer import ByteTokenizer

STATE_NAME = "training_state.pt"
PLOT_NAME = "loss_curve.png"
METRICS_NAME = "train_metrics.json"

# Model shapes and training defaults per preset. tiny trains in minutes on a laptop CPU and is
# the shipped default model's shape; small (~3.4 M parameters, under 10 MB as bfloat16) and base
# (~mamba-130m without its large vocabulary) are for a GPU.
CONFIGS = {
    "tiny": {
        "d_model": 128, "n_layer": 4, "batch_size": 8, "seq_len": 256, "lr": 3e-3,
        "mamba": {"d_state": 16, "expand": 2},
        "mamba2": {"d_state": 32, "expand": 2, "headdim": 32, "chunk_size": 64},
    },
    "small": {
        "d_model": 256, "n_layer": 8, "batch_size": 32, "seq_len": 512, "lr": 2e-3,
        "mamba": {"d_state": 16, "expand": 2},
        "mamba2": {"d_state": 64, "expand": 2, "headdim": 64, "chunk_size": 128},
    },
    "base": {
        "d_model": 768, "n_layer": 24, "batch_size": 32, "seq_len": 1024, "lr": 6e-4,
        "mamba": {"d_state": 16, "expand": 2},
        "mamba2": {"d_state": 128, "expand": 2, "headdim": 64, "chunk_size": 256},
    },
}
ARCHS = {"mamba": "Mamba1", "mamba2": "Mamba2"}
VAL_EVERY_NTH_FILE = 50  # with this many files or more, every n-th file is validation text
VAL_TAIL_FRACTION = 0.05  # else the last 5 % of the text


def model_config(preset: str, arch: str) -> MambaConfig:
    """The MambaConfig of a preset ("tiny", "small", "base") and architecture ("mamba", "mamba2")."""
    if preset not in CONFIGS:
        raise ValueError(f"config: expected one of {', '.join(CONFIGS)}, got {preset!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    spec = CONFIGS[preset]
    return MambaConfig(d_model=spec["d_model"], n_layer=spec["n_layer"], vocab_size=ByteTokenizer.vocab_size,
                       ssm_cfg={"layer": ARCHS[arch], **spec[arch]}, rms_norm=True, residual_in_fp32=True,
                       fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)


# ---------------------------------------------------------------------------------- corpus


def _corpus_files(corpus: str) -> list[Path]:
    if corpus == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "__pycache__"}
        return sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
                      key=lambda p: p.relative_to(root).as_posix())
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                      key=lambda p: p.relative_to(path).as_posix())
    raise FileNotFoundError(f"corpus: expected 'python-stdlib', a text file or a folder of text files; "
                            f"{corpus!r} does not exist")


def _read_text_bytes(path: Path):
    """The bytes of a UTF-8 text file, or None for a file that is not one."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if b"\0" in data else data


def load_corpus(corpus: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, validation bytes, description) of a corpus, as uint8 tensors.

    Documents are joined with the end-of-text byte after each one. Every 50th file is held
    out for validation (50 files or more), else the last 5 % of the text; both parts hold at
    least one window of seq_len + 1 bytes.
    """
    eos = bytes([ByteTokenizer.eos_token_id])
    docs = [d for d in (_read_text_bytes(p) for p in _corpus_files(corpus)) if d]
    if not docs:
        raise ValueError(f"corpus: {corpus!r} holds no UTF-8 text files")
    if len(docs) >= VAL_EVERY_NTH_FILE:
        is_val = [i % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE // 2 for i in range(len(docs))]
        train = b"".join(d + eos for d, v in zip(docs, is_val) if not v)
        val = b"".join(d + eos for d, v in zip(docs, is_val) if v)
        how = f"every {VAL_EVERY_NTH_FILE}th file held out"
    else:
        text = b"".join(d + eos for d in docs)
        cut = len(text) - max(int(len(text) * VAL_TAIL_FRACTION), seq_len + 1)
        train, val = text[:cut], text[cut:]
        how = f"last {len(val):,} bytes held out"
    for name, part in (("train", train), ("validation", val)):
        if len(part) < seq_len + 1:
            raise ValueError(f"corpus: the {name} part of {corpus!r} has {len(part)} bytes, fewer than "
                             f"seq_len + 1 = {seq_len + 1}; use a larger corpus or a smaller --seq-len")
    description = f"{corpus}: {len(docs)} files, {len(train):,} train / {len(val):,} validation bytes ({how})"
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), description


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """(inputs, targets), each (batch_size, seq_len) int64: random windows of data and the same shifted by one."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def validation_windows(data: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """(n, seq_len + 1) int64: up to ``count`` windows spread evenly over the validation bytes."""
    last = len(data) - seq_len - 1
    n = max(1, min(count, last // (seq_len + 1) + 1))
    starts = np.linspace(0, last, n).astype(np.int64)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


# ---------------------------------------------------------------------------------- training pieces


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine
    decay from ``peak`` to ``floor * peak`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on weight matrices only (not on norms, biases, A_log, D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **fast)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy (nats), computed in float32."""
    logits = model(inputs).logits[..., :ByteTokenizer.vocab_size]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean validation loss over fixed windows (n, seq_len + 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size].to(device)
        with _autocast(device):
            loss = lm_loss(model, chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample(model, prompt: str, max_new_tokens: int = 200, temperature: float = 0.7, top_k: int = 40,
           seed: int = 0) -> str:
    """The prompt and its continuation, decoded token by token with the model's inference cache.

    temperature 0 is greedy; else the next byte is drawn from the top_k most likely (0: all) at
    that temperature. Stops at the end-of-text byte.
    """
    tokenizer = ByteTokenizer()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    params = InferenceParams(max_seqlen=ids.shape[1] + max_new_tokens, max_batch_size=1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = []
    logits = model(ids, inference_params=params, num_last_tokens=1).logits[0, -1]
    params.seqlen_offset += ids.shape[1]
    for _ in range(max_new_tokens):
        logits = logits[:tokenizer.vocab_size].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k:
                cutoff = torch.topk(logits, min(top_k, len(logits))).values[-1]
                logits = logits.masked_fill(logits < cutoff, -math.inf)
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        logits = model(step_ids, inference_params=params).logits[0, -1]
        params.seqlen_offset += 1
    model.train(was_training)
    return prompt + tokenizer.decode(new)


# ---------------------------------------------------------------------------------- loss-curve PNG


def write_png(path, pixels: bytearray, width: int, height: int) -> None:
    """Write an 8-bit RGB image (``pixels``: width * height * 3 bytes, row by row) as a PNG file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = width * 3
    raw = b"".join(b"\x00" + bytes(pixels[y * stride:(y + 1) * stride]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


# 3x5 glyphs (rows of 3 bits) for the labels of the built-in plot.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    "a": "000011101101011", "e": "111101111100111", "i": "010000010010010", "l": "010010010010010",
    "n": "000110101101101", "o": "000111101101111", "p": "000111101111100", "r": "000111100100100",
    "s": "000111100001111", "t": "010111010010011", "v": "000101101101010",
}


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * k / steps), round(y0 + (y1 - y0) * k / steps), color)

    def text(self, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
        for c in text:
            bits = _GLYPHS.get(c, _GLYPHS[" "])
            for r in range(5):
                for col in range(3):
                    if bits[r * 3 + col] == "1":
                        for dy in range(scale):
                            for dx in range(scale):
                                self.dot(x + col * scale + dx, y + r * scale + dy, color)
            x += 4 * scale


def _plot_builtin(path, train_points: list, val_points: list) -> None:
    width, height, left, right, top, bottom = 640, 400, 60, 20, 20, 40
    canvas = _Canvas(width, height)
    points = train_points + val_points
    x_max = max(s for s, _ in points) or 1
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def px(step, value):
        return (left + round(step / x_max * (width - left - right)),
                top + round((y_hi - value) / (y_hi - y_lo) * (height - top - bottom)))

    black, blue, red = (0, 0, 0), (31, 119, 180), (214, 39, 40)
    canvas.line(left, top, left, height - bottom, black)
    canvas.line(left, height - bottom, width - right, height - bottom, black)
    for value in (y_lo, (y_lo + y_hi) / 2, y_hi):
        _, y = px(0, value)
        canvas.line(left - 4, y, left, y, black)
        canvas.text(4, y - 5, f"{value:.2f}")
    canvas.text(width - right - 8 * len(str(x_max)), height - bottom + 8, str(x_max))
    canvas.text(left, height - bottom + 8, "0")
    canvas.text(width // 2 - 16, height - bottom + 22, "step")
    for series, color in ((train_points, blue), (val_points, red)):
        for (s0, v0), (s1, v1) in zip(series, series[1:]):
            canvas.line(*px(s0, v0), *px(s1, v1), color)
        for s, v in series if series is val_points else ():
            x, y = px(s, v)
            for d in range(-2, 3):
                canvas.line(x - 2, y + d, x + 2, y + d, color)
    for i, (label, color) in enumerate((("train loss", blue), ("val loss", red))):
        y = top + 8 + 16 * i
        canvas.line(width - right - 150, y + 4, width - right - 125, y + 4, color)
        canvas.line(width - right - 150, y + 5, width - right - 125, y + 5, color)
        canvas.text(width - right - 118, y, label)
    write_png(path, canvas.pixels, width, height)


def plot_losses(path, train_points: list, val_points: list) -> None:
    """Write the loss curve (train loss per step, validation loss points) as a PNG file.

    train_points, val_points: lists of (step, loss). Uses matplotlib when it is installed, else the
    built-in writer (axes, value labels and the two curves; no dependency beyond zlib).
    """
    if not train_points and not val_points:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_builtin(path, train_points, val_points)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train_points:
        ax.plot(*zip(*train_points), color="C0", lw=0.8, label="train loss")
    if val_points:
        ax.plot(*zip(*val_points), "o-", color="C3", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------- checkpoints


def save_model(model: MambaLMHeadModel, out: Path, dtype: str) -> None:
    """config.json + model.safetensors in ``dtype`` (A_log and D stay float32, as the reference keeps them)."""
    if dtype == "float32":
        model.save_pretrained(out)
        return
    with torch.device("meta"):
        copy = MambaLMHeadModel(model.config)
    copy.to_empty(device="cpu")
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    copy.tie_weights()
    for name, p in copy.named_parameters():
        if name.rsplit(".", 1)[-1] not in ("A_log", "D"):
            p.data = p.data.to(getattr(torch, dtype))
    copy.save_pretrained(out)


def _rng_state() -> dict:
    """Every random-number state, as types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, data_rng: torch.Generator, step: int, settings: dict,
                    history: dict, elapsed: float, tokens: int, save_dtype: str) -> None:
    """Model files, training state (written atomically), loss curve."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, save_dtype)
    state = {
        "step": step, "settings": settings, "config": dataclasses.asdict(model.config),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "rng": _rng_state(), "data_rng": data_rng.get_state(),
        "history": history, "elapsed": elapsed, "tokens": tokens,
    }
    tmp = out / (STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_NAME)
    plot_losses(out / PLOT_NAME, history["train"], history["val"])


def load_training_state(out: Path) -> dict:
    path = out / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} does not exist; train without --resume first")
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: runs no code


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ssmcore train`` options to a (sub)parser."""
    parser.add_argument("--corpus", default=None,
                        help="'python-stdlib' (the .py files of this Python's standard library), a text file "
                             "or a folder of text files (default: python-stdlib)")
    parser.add_argument("--config", default=None, choices=sorted(CONFIGS), help="model size preset (default: tiny)")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS), help="Mamba-1 or Mamba-2 blocks "
                                                                            "(default: mamba)")
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps (default: 1000)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--out", required=True, help="output folder (model, training state, loss curve)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: per config)")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default: per config)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per config)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: min(200, steps // 10))")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--seed", type=int, default=None, help="seed of initialisation and batches (default: 0)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from {STATE_NAME} in --out (its settings apply unless given again; the "
                             "learning-rate schedule follows this run's --steps)")
    parser.add_argument("--save-every", type=int, default=500, help="save every N steps (0: only at the end)")
    parser.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0: at the end)")
    parser.add_argument("--eval-windows", type=int, default=64, help="validation sequences per evaluation")
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of model.safetensors (training is float32 either way)")
    parser.add_argument("--sample-prompt", default="def main(", help="prompt of the sample printed at the end")
    parser.add_argument("--sample-tokens", type=int, default=200, help="bytes of that sample (0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or sample")


def _check_positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _resolve_settings(args, saved: dict | None) -> dict:
    """Run settings: given on the command line, else from the resumed run, else the defaults."""
    saved = saved or {}

    def pick(name, default):
        given = getattr(args, name)
        return given if given is not None else saved.get(name, default)

    settings = {"corpus": pick("corpus", "python-stdlib"), "config": pick("config", "tiny"),
                "arch": pick("arch", "mamba"), "seed": pick("seed", 0)}
    preset = CONFIGS[settings["config"]]
    settings.update(batch_size=pick("batch_size", preset["batch_size"]), seq_len=pick("seq_len", preset["seq_len"]),
                    lr=pick("lr", preset["lr"]), warmup=pick("warmup", min(200, max(1, args.steps // 10))))
    return settings


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


class _Progress:
    """tqdm when installed, else a plain line every few seconds."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.last_print = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(fields, refresh=False)
        elif time.monotonic() - self.last_print > 5 or step == self.total:
            self.last_print = time.monotonic()
            print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(args) -> MambaLMHeadModel:
    """Train as ``args`` (from :func:`add_arguments`) says; returns the trained model (float32, train mode)."""
    for name in ("steps", "batch_size", "seq_len", "eval_windows"):
        _check_positive(name, getattr(args, name))
    for name in ("save_every", "eval_every", "sample_tokens", "seed"):
        _check_positive(name, getattr(args, name), minimum=0)
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"lr: must be > 0, got {args.lr}")
    for name in ("grad_clip", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(args, name)}")
    device = _device(args.device)
    out = Path(args.out)
    state = load_training_state(out) if args.resume else None
    settings = _resolve_settings(args, state["settings"] if state else None)
    log = _Progress(args.steps, state["step"] if state else 0, not args.quiet)

    train_data, val_data, description = load_corpus(settings["corpus"], settings["seq_len"])
    val_windows = validation_windows(val_data, settings["seq_len"], args.eval_windows)
    log.write(description)

    torch.manual_seed(settings["seed"])
    if state:
        from .checkpoint import config_from_dict

        config = config_from_dict(state["config"])
    else:
        config = model_config(settings["config"], settings["arch"])
    model = MambaLMHeadModel(config, device=device)
    optimizer = make_optimizer(model, settings["lr"], args.weight_decay, device)
    data_rng = torch.Generator(device="cpu").manual_seed(settings["seed"])
    history = {"train": [], "val": []}
    step, elapsed, tokens = 0, 0.0, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_rng.set_state(state["data_rng"])
        _set_rng_state(state["rng"])
        step, history, elapsed, tokens = state["step"], state["history"], state["elapsed"], state["tokens"]
        log.write(f"resumed from {out / STATE_NAME} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log.write(f"model: {settings['config']} {settings['arch']}, d_model {config.d_model}, {config.n_layer} layers, "
              f"{n_params:,} parameters; {settings['batch_size']} x {settings['seq_len']} bytes per step on {device}")

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter() - elapsed
    window_start, window_tokens = time.perf_counter(), 0
    saved_step = step if state else -1
    while step < args.steps:
        lr = lr_at(step, args.steps, settings["lr"], settings["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_data, settings["batch_size"], settings["seq_len"], data_rng)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device):
            loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else None
        optimizer.step()
        step += 1
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss: became {loss_value} at step {step}; lower --lr or check the corpus")
        tokens += inputs.numel()
        window_tokens += inputs.numel()
        history["train"].append((step, loss_value))
        now = time.perf_counter()
        fields = {"loss": f"{loss_value:.3f}", "lr": f"{lr:.2e}",
                  "tok/s": f"{window_tokens / max(now - window_start, 1e-9):,.0f}"}
        if grad_norm is not None:
            fields["gnorm"] = f"{float(grad_norm):.2f}"
        if now - window_start > 30:  # tokens/s over the last ~30 s
            window_start, window_tokens = now, 0
        log.update(step, fields)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            val_loss = evaluate(model, val_windows, settings["batch_size"], device)
            history["val"].append((step, val_loss))
            log.write(f"step {step}: train loss {loss_value:.4f}, validation loss {val_loss:.4f}")
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            save_checkpoint(out, model, optimizer, data_rng, step, settings, history,
                            time.perf_counter() - started, tokens, args.save_dtype)
            saved_step = step
    log.close()
    if saved_step != step:  # resumed at or past --steps: refresh the files
        save_checkpoint(out, model, optimizer, data_rng, step, settings, history,
                        time.perf_counter() - started, tokens, args.save_dtype)
    elapsed = time.perf_counter() - started

    recent = [v for _, v in history["train"][-50:]]
    metrics = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings, "steps": step, "tokens": tokens, "wall_time_s": round(elapsed, 1),
        "final_train_loss_mean_last_50": round(sum(recent) / len(recent), 4) if recent else None,
        "final_val_loss": round(history["val"][-1][1], 4) if history["val"] else None,
        "parameters": n_params, "device": str(device),
    }
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    if not args.quiet:
        print(f"saved {out} after {step} steps, {tokens:,} tokens, {elapsed:.0f} s; "
              f"train loss {metrics['final_train_loss_mean_last_50']}, validation loss {metrics['final_val_loss']}")
        if args.sample_tokens:
            print("sample (temperature 0.7, top-k 40):")
            print(sample(model, args.sample_prompt, args.sample_tokens))
    return model


def run(args) -> int:
    """``ssmcore train``: :func:`train`, exit status 0."""
    train(args)
    return 0


__all__ = ["CONFIGS", "add_arguments", "load_corpus", "lr_at", "model_config", "plot_losses", "run", "sample",
           "train", "write_png"]


def main(argv=None) -> int:
    """``python -m ssmcore.adapters.torch.train ...``: the same as ``ssmcore train ...``."""
    parser = argparse.ArgumentParser(prog="ssmcore train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
