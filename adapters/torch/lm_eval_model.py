"""ssmcore language models in EleutherAI's lm-evaluation-harness (model type ``ssmcore``).

lm-eval 0.4.13 finds model types in its own registry only (it reads no plugin entry points; the
``lm_eval.models`` entry point in pyproject.toml is for later versions), so ``lm_eval --model ssmcore``
works once this module is imported. Three ways that do:

    python -m ssmcore.adapters.torch.lm_eval_model --model ssmcore \\
        --model_args pretrained=PATH_OR_HUB_ID,dtype=float32,device=cpu --tasks TASKS [lm_eval options]
    ssmcore eval --model ssmcore --model_args ... --tasks ...      (the same; all arguments are lm_eval's)
    import ssmcore.adapters.torch.lm_eval_model; lm_eval.simple_evaluate(model="ssmcore", ...)

``--model_args`` keys: ``pretrained`` (a checkpoint folder in either layout or a Hub id; default:
the shipped byte-level model), ``dtype`` (float32 / bfloat16 / float16 / float64; default float32 on
the CPU, bfloat16 on CUDA), ``device`` (cpu / cuda / cuda:N), ``tokenizer`` ('byte' or a transformers
tokenizer name), ``max_length`` (context window for truncation and rolling windows, default 2048),
``max_gen_toks`` (default 256). ``--batch_size N`` batches requests; ``auto`` uses ``max_batch_size``
(default 16) without probing memory.

Tokenizer: 'byte' (:class:`~.tokenizer.ByteTokenizer`) for a model whose vocabulary is <= 256
tokens, unless the model folder has its own tokenizer files (then ``transformers.AutoTokenizer``);
other models use AutoTokenizer as ``ssmcore generate`` does.

Scores: log-softmax over the first ``config.vocab_size`` logits (the padding rows of the
embedding are not tokens), computed in float32. Requests are right-padded into batches: a causal
model's outputs at real positions never see the padding. Generation is :func:`.generation.generate`
(prompts of different lengths never see padding either), greedy unless ``do_sample`` is set, and
stops per request at the first ``until`` string, the end-of-text token, or ``max_gen_toks``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .checkpoint import _torch_dtype
from .generation import generate
from .models import MambaLMHeadModel
from .tokenizer import ByteTokenizer

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class _StopGeneration(Exception):
    """Raised by the streamer once every row has hit a stop condition."""


class _StopStrings:
    """A streamer for :func:`generate` that collects new tokens and stops when every row is done."""

    def __init__(self, decode, until, eos_token_id, batch):
        self.decode, self.until, self.eos = decode, [s for s in until if s], eos_token_id
        self.tokens = [[] for _ in range(batch)]
        self.done = [False] * batch
        self._prompt_seen = False

    def put(self, tokens):
        if not self._prompt_seen:  # the first call is the (B, L) prompt
            self._prompt_seen = True
            return
        for i, token in enumerate(tokens[:, 0].tolist()):
            if self.done[i]:
                continue
            self.tokens[i].append(token)
            if token == self.eos or (self.until and any(s in self.decode(self.tokens[i]) for s in self.until)):
                self.done[i] = True
        if all(self.done):
            raise _StopGeneration

    def end(self):
        pass


def _batch_size(value, max_batch_size) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return int(max_batch_size)
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size: expected a positive int or 'auto', got {value!r}")
    return size


def _register(cls):
    # lm-eval fills its registry with its own model types only when the registry is empty: import them
    # first so that registering ours does not hide them. Run as a script (python -m), this file is
    # __main__ and main() registers the class of the importable module instead.
    if __name__ == "__main__":
        return cls
    import lm_eval.models  # noqa: F401

    return register_model("ssmcore")(cls)


@_register
class SSMCoreLM(TemplateLM):
    """lm-eval's ``LM`` interface over a :class:`~.models.MambaLMHeadModel` (see the module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # --model_args win over lm_eval's own --device / --batch_size when both are given.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(self, pretrained=None, dtype=None, device=None, batch_size=1, max_batch_size=16,
                 max_length=2048, max_gen_toks=256, tokenizer=None, trust_remote_code=None, **kwargs):
        super().__init__()
        if kwargs:
            lm_utils.eval_logger.warning(f"ssmcore: ignoring model_args {sorted(kwargs)}")
        from .cli_generate import CliError, default_model_dir, load_tokenizer

        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype is None or dtype == "auto":
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        dtype = _torch_dtype(dtype)
        name = pretrained if pretrained not in (None, "", "default") else str(default_model_dir())
        if isinstance(name, MambaLMHeadModel):
            self.model, name = name, None
            self._device = next(self.model.parameters()).device
        else:
            self.model = MambaLMHeadModel.from_pretrained(name, device=self._device, dtype=dtype)
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        self.pretrained = name

        try:
            if tokenizer is None and name is not None and Path(name).is_dir() \
                    and any((Path(name) / f).is_file() for f in _HF_TOKENIZER_FILES):
                tokenizer = str(name)
            self.tokenizer = load_tokenizer(self.model, name, tokenizer)
        except CliError as err:
            raise ValueError(f"tokenizer: {err}") from err
        self._byte = isinstance(self.tokenizer, ByteTokenizer)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self._eot = int(eos) if eos is not None else 0
        bos = None if self._byte else getattr(self.tokenizer, "bos_token_id", None)
        self._prefix = int(bos) if bos is not None else self._eot

        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"max_length / max_gen_toks: expected >= 2 / >= 1, got {max_length} / {max_gen_toks}")

    # ------------------------------------------------------------------ tokenization

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return "byte" if self._byte else getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list:
        if self._byte:
            ids = self.tokenizer.encode(string)
        else:
            ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"tokenizer: {self.tokenizer_name} gave token id {max(ids)}, outside the model's "
                             f"vocabulary of {self.vocab_size}; pass model_args tokenizer=NAME")
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return list(ids)

    def tok_decode(self, tokens) -> str:
        if self._byte:
            return self.tokenizer.decode(tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _score_batch(self, items):
        """items: [(input_ids, continuation)] -> [(sum of log p, is_greedy)], one right-padded forward."""
        width = max(len(inp) for inp, _ in items)
        ids = torch.full((len(items), width), self._eot, dtype=torch.long)
        for i, (inp, _) in enumerate(items):
            ids[i, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = self.model(ids.to(self._device)).logits[..., :self.vocab_size]
        out = []
        for i, (inp, cont) in enumerate(items):
            n, k = len(inp), len(cont)
            logp = F.log_softmax(logits[i, n - k:n].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            out.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """requests: [(cache_key, context_enc, continuation_enc)] -> [(logprob, is_greedy)] in order."""
        items = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("continuation: encodes to no tokens")
            full = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            items.append((full[:-1], list(continuation_enc)[-(len(full) - 1):]))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results = [None] * len(items)
        bs = override_bs or self.batch_size
        for start in tqdm(range(0, len(order), bs), disable=disable_tqdm or len(order) <= bs,
                          desc="ssmcore loglikelihood"):
            chunk = order[start:start + bs]
            for i, answer in zip(chunk, self._score_batch([items[j] for j in chunk])):
                results[i] = answer
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, pred))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _generate_batch(self, contexts, kwargs):
        until = [s for s in kwargs.get("until", []) if isinstance(s, str)]
        max_gen = int(kwargs["max_gen_toks"])
        budget = max(self.max_length - max_gen, 1)
        prompts = [self.tok_encode(c)[-budget:] or [self.prefix_token_id] for c in contexts]
        sampling = dict(top_k=1, temperature=1.0, top_p=0.0)
        if kwargs.get("do_sample"):
            sampling = dict(top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 0.0) or 0.0),
                            temperature=float(kwargs.get("temperature", 1.0)))
        streamer = _StopStrings(self.tok_decode, until, self._eot, len(prompts))
        try:
            with torch.inference_mode():
                generate(self.model, prompts, max_length=max(map(len, prompts)) + max_gen,
                         eos_token_id=self._eot, vocab_size=self.vocab_size, streamer=streamer, **sampling)
        except _StopGeneration:
            pass
        texts = []
        for tokens in streamer.tokens:
            if self._eot in tokens:
                tokens = tokens[:tokens.index(self._eot)]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def _gen_kwargs(self, gen_kwargs: dict) -> dict:
        """until as a list, max_gen_toks from it or its aliases, do_sample as a bool."""
        kwargs = dict(gen_kwargs)
        until = kwargs.get("until") or []
        kwargs["until"] = [until] if isinstance(until, str) else list(until)
        budget = [kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs]
        kwargs["max_gen_toks"] = int(budget[0]) if budget and budget[0] is not None else self.max_gen_toks
        if kwargs["max_gen_toks"] < 1:
            raise ValueError(f"max_gen_toks: expected >= 1, got {kwargs['max_gen_toks']}")
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        kwargs["do_sample"] = bool(kwargs.get("do_sample", temperature > 0.0)) and temperature != 0.0 \
            if "temperature" in kwargs else bool(kwargs.get("do_sample", False))
        return kwargs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        groups = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"gen_kwargs: expected a dict, got {type(gen_kwargs).__name__}")
            kwargs = self._gen_kwargs(gen_kwargs)
            key = json.dumps(kwargs, sort_keys=True, default=str)
            groups.setdefault(key, (kwargs, []))[1].append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="ssmcore generate_until")
        for kwargs, members in groups.values():
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = self._generate_batch([requests[i].args[0] for i in chunk], kwargs)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results


def main(argv=None) -> int:
    """lm-eval's command line with the ``ssmcore`` model type registered."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    finally:
        sys.argv = saved
    return 0


__all__ = ["SSMCoreLM", "main"]


if __name__ == "__main__":
    from ssmcore.adapters.torch.lm_eval_model import main as _main  # registers "ssmcore"

    sys.exit(_main())
