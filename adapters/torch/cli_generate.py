"""``ssmcore generate`` and ``ssmcore bench-generate``: text generation from the command line.

    ssmcore generate --prompt "def fib(n):" [--model PATH_OR_HUB_ID] [--device cpu] [--max-new-tokens 200]
    ssmcore bench-generate --config mamba-130m --device cpu --promptlen 32 --genlen 64

``generate`` streams the text to stdout as tokens are produced (the prompt first) and ends with a
tokens/s line on stderr. Without ``--model`` it loads the model shipped in
``ssmcore/models/default/``. ``bench-generate`` takes the arguments of the reference package's
``benchmarks/benchmark_generation_mamba_simple.py`` and prints prompt-processing latency,
decoding latency and tokens/s; ``--config`` builds a model of a published shape with random
weights (no download).

Tokenizers: models with a byte vocabulary (vocab_size <= 256, ssmcore's own models) use
:class:`~.tokenizer.ByteTokenizer`; others use transformers' ``AutoTokenizer`` (the checkpoint's
own tokenizer files, else its Hub id, else GPT-NeoX's for the 50277-token Mamba vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Published shapes (state-spaces/* config.json), built with random weights by --config.
_MAMBA1_SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
_MAMBA2_SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
PRESETS = {
    **{f"mamba-{size}": dict(d_model=d, n_layer=n, vocab_size=50277, ssm_cfg={}, pad_vocab_size_multiple=8)
       for size, (d, n) in _MAMBA1_SHAPES.items()},
    **{f"mamba2-{size}": dict(d_model=d, n_layer=n, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                              pad_vocab_size_multiple=16)
       for size, (d, n) in _MAMBA2_SHAPES.items()},
}
# The tokenizer of the state-spaces Mamba checkpoints, which ship none of their own.
_NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
_NEOX_VOCAB_SIZES = (50277, 50280, 50288)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CliError(Exception):
    """A usage error: printed as one line, exit status 2."""


def default_model_dir() -> Path:
    """Where the shipped default model lives: ``ssmcore/models/default/``."""
    import ssmcore

    return Path(ssmcore.__file__).resolve().parent / "models" / "default"


# ---------------------------------------------------------------------------------- shared pieces


def _device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device: {name} was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device: expected cpu or cuda, got {name}")
    return device


def _dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _load_model(name_or_path, device, dtype):
    from .models import MambaLMHeadModel

    try:
        return MambaLMHeadModel.from_pretrained(name_or_path, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise CliError(f"--model: {err}") from err


def _random_model(config_name, device, dtype, seed):
    """A model of a preset shape, or of a config.json file's, with random weights."""
    from .checkpoint import config_from_dict
    from .models import MambaConfig, MambaLMHeadModel

    if config_name in PRESETS:
        config = MambaConfig(**PRESETS[config_name])
    else:
        path = Path(config_name)
        if not path.is_file():
            raise CliError(f"--config: expected one of {', '.join(PRESETS)} or a config.json file, got {config_name!r}")
        config = config_from_dict(json.loads(path.read_text()))
    torch.manual_seed(seed)
    return MambaLMHeadModel(config, device=device, dtype=dtype).eval()


def _auto_tokenizer(names):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CliError("--model: this model's vocabulary is not bytes, so it needs a subword tokenizer: install "
                       "transformers (pip install transformers), or use --tokenizer byte with a byte-level model") \
            from None
    errors = []
    for name in names:
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as err:  # missing files, no network: try the next candidate
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise CliError("--tokenizer: no tokenizer could be loaded; tried " + "; ".join(errors))


def load_tokenizer(model, model_name=None, tokenizer_name=None):
    """The tokenizer for ``model``: ``tokenizer_name`` ('byte' or an AutoTokenizer name) when given,
    else bytes for a vocabulary of <= 256 tokens, else the checkpoint's own / GPT-NeoX's."""
    from .tokenizer import ByteTokenizer

    if tokenizer_name == "byte" or (tokenizer_name is None and model.config.vocab_size <= ByteTokenizer.vocab_size):
        return ByteTokenizer()
    if tokenizer_name is not None:
        return _auto_tokenizer([tokenizer_name])
    candidates = [str(model_name)] if model_name is not None else []
    if model.config.vocab_size in _NEOX_VOCAB_SIZES:
        candidates.append(_NEOX_TOKENIZER)
    if not candidates:
        raise CliError("--tokenizer: this model has no byte vocabulary; name its tokenizer with --tokenizer")
    return _auto_tokenizer(candidates)


def _encode(tokenizer, text):
    ids = tokenizer.encode(text)
    if len(ids) == 0:
        raise CliError("--prompt: encodes to no tokens; give a non-empty prompt")
    return ids


class _TextStream:
    """A generate() streamer writing the decoded text of row 0 as it grows.

    Decodes the whole output each time and writes the new suffix, holding back a trailing
    U+FFFD (a multi-byte character cut in the middle) until its last byte arrives, and leaves
    the end-of-text token out. Records when
    the first generated token arrived, which is the end of the prefill.
    """

    def __init__(self, tokenizer, out, eos_token_id=None, echo_prompt=True):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.out = out
        self.echo_prompt = echo_prompt
        self.prompt = None
        self.ids = []
        self.written = 0
        self.first_token_time = None

    def put(self, tokens):
        row = tokens[0].tolist()
        if self.prompt is None:
            self.prompt = row
            if self.echo_prompt:
                self._write(self.tokenizer.decode(row))
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids.extend(t for t in row if t != self.eos_token_id)
        self._flush(final=False)

    def end(self):
        self._flush(final=True)
        self._write("\n")

    def _flush(self, final):
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            text = text[:-1]
        if len(text) > self.written:
            self._write(text[self.written:])
            self.written = len(text)

    def _write(self, text):
        self.out.write(text)
        self.out.flush()


def _add_sampling(parser, names, temperature=1.0, top_k_default=1):
    """The sampling options, under the spellings each command uses (generate: --top-k; bench: --topk)."""
    top_k, top_p, min_p = names
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"logits / temperature (0: greedy; default {temperature})")
    parser.add_argument(top_k, type=int, default=top_k_default,
                        help=f"1: greedy; 0: sample the whole vocabulary; k: the k best (default {top_k_default})")
    parser.add_argument(top_p, type=float, default=0.0, help="nucleus threshold in [0, 1] (0 or 1: off)")
    parser.add_argument(min_p, type=float, default=0.0,
                        help="keep tokens with probability >= min_p * the top probability (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")


# ---------------------------------------------------------------------------------- ssmcore generate


def add_arguments_generate(parser: argparse.ArgumentParser) -> None:
    """The options of ``ssmcore generate``."""
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or Hugging Face Hub id (default: the shipped model in "
                             "ssmcore/models/default/)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a transformers tokenizer name (default: chosen from the model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    # Sampling by default (seeded, so runs repeat): greedy decoding of a small model loops.
    _add_sampling(parser, ("--top-k", "--top-p", "--min-p"), temperature=0.7, top_k_default=40)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--cg", action="store_true", help="decode with a CUDA graph (cuda only)")


def run_generate(args) -> int:
    """``ssmcore generate``: stream the continuation of --prompt to stdout, tokens/s to stderr."""
    try:
        return _run_generate(args)
    except CliError as err:
        print(f"ssmcore generate: {err}", file=sys.stderr)
        return 2


def _run_generate(args) -> int:
    from .generation import generate

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
    model_name = args.model
    if model_name is None:
        folder = default_model_dir()
        if not (folder / "config.json").is_file():
            raise CliError(f"--model: no model given and no default model is shipped at {folder}; pass --model with "
                           "a checkpoint folder or a Hugging Face Hub id")
        model_name = str(folder)
    model = _load_model(model_name, device, dtype)
    tokenizer = load_tokenizer(model, model_name, args.tokenizer)
    prompt_ids = _encode(tokenizer, args.prompt)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    stream = _TextStream(tokenizer, sys.stdout, eos_token_id)
    start = time.perf_counter()
    try:
        sequences = generate(
            model, input_ids, input_ids.shape[1] + args.max_new_tokens, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
            eos_token_id=eos_token_id, vocab_size=model.config.vocab_size, cg=args.cg,
            streamer=stream, generator=generator)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err
    total_s = time.perf_counter() - start
    new_tokens = sequences.shape[1] - input_ids.shape[1]
    prefill_s = (stream.first_token_time or time.perf_counter()) - start
    decode_s = total_s - prefill_s
    decode_rate = f", decoding {(new_tokens - 1) / decode_s:.1f} tokens/s" if new_tokens > 1 and decode_s > 0 else ""
    print(f"{new_tokens} tokens in {total_s:.2f} s: {new_tokens / total_s:.1f} tokens/s "
          f"(prompt {input_ids.shape[1]} tokens in {prefill_s * 1000:.0f} ms{decode_rate}; "
          f"{device.type}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- ssmcore bench-generate


def add_arguments_bench(parser: argparse.ArgumentParser) -> None:
    """The options of ``ssmcore bench-generate`` (the reference benchmark script's, plus a few)."""
    parser.add_argument("--model-name", default="state-spaces/mamba-130m",
                        help="checkpoint folder or Hub id (ignored with --config)")
    parser.add_argument("--config", default=None,
                        help=f"random weights of a published shape ({', '.join(PRESETS)}) or of a config.json file")
    parser.add_argument("--prompt", default=None, help="text prompt (default: random token ids, --promptlen of them)")
    parser.add_argument("--promptlen", type=int, default=100)
    parser.add_argument("--genlen", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    _add_sampling(parser, ("--topk", "--topp", "--minp"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--cg", action="store_true", help="decode with a CUDA graph (cuda only)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run (median reported)")
    parser.add_argument("--seed", type=int, default=0)


def run_bench(args) -> int:
    """``ssmcore bench-generate``: prompt-processing latency, decoding latency and tokens/s."""
    try:
        return _run_bench(args)
    except CliError as err:
        print(f"ssmcore bench-generate: {err}", file=sys.stderr)
        return 2


def _run_bench(args) -> int:
    from .generation import generate

    for name in ("promptlen", "genlen", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    if args.config is not None:
        model, label = _random_model(args.config, device, dtype, args.seed), f"{args.config} (random weights)"
    else:
        model, label = _load_model(args.model_name, device, dtype), args.model_name
    if args.prompt is not None:
        tokenizer = load_tokenizer(model, None if args.config else args.model_name)
        prompt = _encode(tokenizer, args.prompt)
        input_ids = torch.tensor([prompt] * args.batch, dtype=torch.long, device=device)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        high = min(1000, model.config.vocab_size)
        input_ids = torch.randint(min(1, high - 1), high, (args.batch, args.promptlen), generator=generator).to(device)
    promptlen = input_ids.shape[1]
    sampling = dict(top_k=args.topk, top_p=args.topp, min_p=args.minp, temperature=args.temperature,
                    repetition_penalty=args.repetition_penalty, vocab_size=model.config.vocab_size, cg=args.cg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{label}: {n_params / 1e6:.1f}M parameters, {device.type} {str(dtype).removeprefix('torch.')}, "
          f"batch {args.batch}, prompt {promptlen} + {args.genlen} new tokens, cg={args.cg}")

    def timed(new_tokens):
        generator = torch.Generator(device=device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            out = generate(model, input_ids, promptlen + new_tokens, generator=generator, **sampling)
        except (ValueError, TypeError) as err:
            raise CliError(str(err)) from err
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out.shape[1] - promptlen

    timed(args.genlen)  # warm-up: kernel compiles, graph capture, allocator
    prefill_s = statistics.median(timed(1)[0] for _ in range(args.repeats))
    cpu_start = time.process_time()
    runs = [timed(args.genlen) for _ in range(args.repeats)]
    cpu_s = (time.process_time() - cpu_start) / args.repeats
    total_s = statistics.median(t for t, _ in runs)
    generated = runs[0][1]
    decode_s = max(total_s - prefill_s, 0.0)
    print(f"prompt processing (prefill + first token): {prefill_s * 1000:.1f} ms "
          f"({args.batch * promptlen / prefill_s:.0f} prompt tokens/s)")
    if generated > 1:
        print(f"decoding {generated - 1} steps: {decode_s * 1000:.1f} ms "
              f"({decode_s * 1000 / (generated - 1):.2f} ms/step, "
              f"{args.batch * (generated - 1) / decode_s if decode_s > 0 else float('inf'):.1f} tokens/s)")
    print(f"prompt processing + decoding: {total_s * 1000:.1f} ms; "
          f"{args.batch * generated / total_s:.1f} tokens/s ({args.batch} x {generated} generated tokens)")
    # On a shared machine wall time includes waiting for a core; CPU time (all threads) does not.
    print(f"process CPU time per run: {cpu_s * 1000:.1f} ms ({cpu_s * 1000 / generated:.2f} ms per generated token)")
    return 0


__all__ = ["PRESETS", "add_arguments_bench", "add_arguments_generate", "default_model_dir", "load_tokenizer",
           "run_bench", "run_generate"]


def main(argv=None) -> int:
    """Run either command without the ssmcore CLI: ``python -m ssmcore.adapters.torch.cli_generate generate ...``."""
    parser = argparse.ArgumentParser(prog="ssmcore")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments_generate(sub.add_parser("generate", help="stream a model's continuation of a prompt"))
    add_arguments_bench(sub.add_parser("bench-generate", help="generation latency and tokens/s"))
    args = parser.parse_args(argv)
    return run_generate(args) if args.command == "generate" else run_bench(args)


if __name__ == "__main__":
    sys.exit(main())

