"""lm-evaluation-harness model type ``ssmcore`` (adapters/torch/lm_eval_model.py).

The numbers lm-eval reports are checked against our model computed directly: a log-likelihood is
the sum of log-softmax over the continuation's tokens, a rolling log-likelihood the same over the
whole text after the end-of-text token, and generate_until the greedy continuation cut at the stop
string. The end-to-end test runs the documented command offline on the small local tasks in
tests/data/lm_eval/ with the shipped model.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from ssmcore.adapters.torch.lm_eval_model import SSMCoreLM  # noqa: E402
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ssmcore" / "models" / "default"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A small random byte-level model (vocab 256 padded to 264) saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=256, pad_vocab_size_multiple=12,
                                         ssm_cfg={"d_state": 8}))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions: greedy text is not all one byte
    model.save_pretrained(folder)
    return folder


def _logp(model, ids):
    """(L, V) float64 log-softmax of our model's logits, vocabulary rows only."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, :model.config.vocab_size]
    return torch.log_softmax(logits.double(), dim=-1)


def _direct_ll(model, context_ids, continuation_ids):
    ids = context_ids + continuation_ids
    logp = _logp(model, ids[:-1])
    n = len(context_ids)
    rows = logp[n - 1:]
    target = torch.tensor(continuation_ids)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _greedy(model, prompt, n):
    out = model.generate(torch.tensor([list(prompt.encode())]), max_length=len(prompt.encode()) + n,
                         eos_token_id=0, vocab_size=256)
    ids = out[0, len(prompt.encode()):].tolist()
    if 0 in ids:
        ids = ids[:ids.index(0)]
    return bytes(ids).decode("utf-8", errors="replace")


def test_loglikelihood_matches_direct_computation_and_batching(tiny_dir):
    pairs = [("def f(x):", " return x"), ("import", " os"), ("", "hello"), ("a" * 40, "b"), ("xyz ", "é!")]
    lms = [SSMCoreLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=b) for b in (1, 3)]
    model = lms[0].model
    results = [lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True) for lm in lms]
    for (context, continuation), got, got_batched in zip(pairs, *results):
        # lm-eval moves the context's trailing spaces into the continuation; an empty context is the eot token
        stripped = context.rstrip()
        moved = context[len(stripped):]
        ctx_ids = list(stripped.encode()) if stripped else [0]
        want_ll, want_greedy = _direct_ll(model, ctx_ids, list((moved + continuation).encode()))
        assert got[0] == pytest.approx(want_ll, abs=1e-4)
        assert got[1] == want_greedy
        assert got_batched[0] == pytest.approx(got[0], abs=1e-4)
        assert got_batched[1] == got[1]
    assert all(ll < 0 for ll, _ in results[0])


def test_loglikelihood_rolling(tiny_dir):
    texts = ["def main():\n    print('hi')\n", "x", "ünï ∑"]
    lm = SSMCoreLM(pretrained=str(tiny_dir), device="cpu", batch_size=2)
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got):
        ids = list(text.encode())
        want, _ = _direct_ll(lm.model, [0], ids)
        assert value == pytest.approx(want, abs=1e-4)
    # a context window shorter than the text: several windows, every token scored once
    short = SSMCoreLM(pretrained=str(tiny_dir), device="cpu", max_length=8)
    windowed = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(texts[0],)]), disable_tqdm=True)[0]
    ids = list(texts[0].encode())
    want = 0.0
    for j in range(len(ids)):  # token j sees the window that lm-eval's rolling windows give it
        if j < 8:
            context = [0] + ids[:j]
        else:
            end = min(8 + ((j - 8) // 8 + 1) * 8, len(ids))
            context = ids[end - 8 - 1:j]
        want += _direct_ll(short.model, context, [ids[j]])[0]
    assert windowed == pytest.approx(want, abs=1e-3)
    assert windowed != pytest.approx(got[0], abs=1e-3)


def test_generate_until_stops_and_matches_greedy(tiny_dir):
    lm = SSMCoreLM(pretrained=str(tiny_dir), device="cpu", batch_size=3)
    prompts = ["def f(x):", "import os\n", "class A", "a"]
    full = [_greedy(lm.model, p, 16) for p in prompts]
    got = lm.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 16}) for p in prompts]),
                            disable_tqdm=True)
    assert got == full
    # stop strings taken from inside each greedy text: the answer is the text up to the stop string
    stops = [t[5:7] for t in full]
    args = [(p, {"until": [s, "never-there"], "max_gen_toks": 16, "do_sample": False}) for p, s in zip(prompts, stops)]
    got = lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert got == [t.split(s)[0] for t, s in zip(full, stops)]
    assert all(len(g) <= 5 for g in got)
    # max_gen_toks and its alias; a string `until`
    got = lm.generate_until(_requests("generate_until", [(prompts[0], {"until": "\x01", "max_new_tokens": 4})]),
                            disable_tqdm=True)
    assert got == [_greedy(lm.model, prompts[0], 4)]


def test_bad_arguments(tiny_dir):
    with pytest.raises(ValueError, match="batch_size"):
        SSMCoreLM(pretrained=str(tiny_dir), device="cpu", batch_size=0)
    with pytest.raises(TypeError, match="dtype"):
        SSMCoreLM(pretrained=str(tiny_dir), device="cpu", dtype="int8")
    lm = SSMCoreLM(pretrained=str(tiny_dir), device="cpu", batch_size="auto", max_batch_size=5)
    assert lm.batch_size == 5
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until(_requests("generate_until", [("a", {"max_gen_toks": 0})]))
    # lm-eval's registry finds the type, and still finds its own
    from lm_eval.api.registry import get_model

    assert get_model("ssmcore") is SSMCoreLM
    assert get_model("dummy").__name__ == "DummyLM"


def _samples(out_dir, task):
    (path,) = glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_lm_eval_cli_offline_with_shipped_model(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ssmcore.adapters.torch.lm_eval_model", "--model", "ssmcore",
           "--model_args", f"pretrained={DEFAULT_MODEL},dtype=float32,device=cpu",
           "--tasks", "ssmcore_tiny_mc,ssmcore_tiny_ppl,ssmcore_tiny_gen", "--include_path", ".",
           "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_path).read_text())["results"]

    model = MambaLMHeadModel.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    # multiple choice: each choice's log-likelihood, and acc from their argmax
    docs = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()]
    samples = sorted(_samples(out, "ssmcore_tiny_mc"), key=lambda s: s["doc_id"])
    correct = 0
    for doc, sample in zip(docs, samples, strict=True):
        lls = [float(r[0][0]) for r in sample["resps"]]
        for choice, ll in zip(doc["choices"], lls, strict=True):
            assert ll == pytest.approx(_direct_ll(model, list(doc["question"].encode()), list(choice.encode()))[0],
                                       abs=2e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    assert results["ssmcore_tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    # rolling log-likelihood: the whole text after the eot token
    texts = [json.loads(line)["text"] for line in (DATA / "tiny_text.jsonl").read_text().splitlines()]
    samples = sorted(_samples(out, "ssmcore_tiny_ppl"), key=lambda s: s["doc_id"])
    total_ll, total_bytes = 0.0, 0
    for text, sample in zip(texts, samples, strict=True):
        want = _direct_ll(model, [0], list(text.encode()))[0]
        assert float(sample["resps"][0][0]) == pytest.approx(want, abs=2e-4)
        total_ll, total_bytes = total_ll + want, total_bytes + len(text.encode())
    import math

    assert results["ssmcore_tiny_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_bytes),
                                                                               rel=1e-4)
    # generation: greedy, at most max_gen_toks bytes, cut at the first stop string
    docs = [json.loads(line) for line in (DATA / "tiny_gen.jsonl").read_text().splitlines()]
    samples = sorted(_samples(out, "ssmcore_tiny_gen"), key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples, strict=True):
        want = _greedy(model, doc["prompt"], 8)
        for stop in ("\n", "("):
            want = want.split(stop)[0]
        assert sample["resps"][0][0] == want
    assert any(s["resps"][0][0] != _greedy(model, d["prompt"], 8) for d, s in zip(docs, samples))  # a stop hit


def test_model_folder_with_its_own_tokenizer_uses_autotokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    corpus = ["def f(x): return x + 1", "import os, sys", "for i in range(10): print(i)"] * 5
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(3)
    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=len(fast), ssm_cfg={"d_state": 4})).save_pretrained(
        tmp_path)
    fast.save_pretrained(str(tmp_path))
    lm = SSMCoreLM(pretrained=str(tmp_path), device="cpu", batch_size=2)
    assert isinstance(lm.tokenizer, transformers.PreTrainedTokenizerBase)
    assert lm.eot_token_id == fast.eos_token_id
    pairs = [("def f(x):", " return x"), ("import", " os, sys")]
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (ll, _) in zip(pairs, got):
        whole = fast.encode(context + continuation, add_special_tokens=False)
        ctx = fast.encode(context, add_special_tokens=False)
        assert ll == pytest.approx(_direct_ll(lm.model, ctx, whole[len(ctx):])[0], abs=1e-4)
    text = lm.generate_until(_requests("generate_until", [("import", {"until": [], "max_gen_toks": 3})]),
                             disable_tqdm=True)[0]
    assert isinstance(text, str)


def test_ssmcore_eval_passes_arguments_to_lm_eval(capsys):
    from ssmcore.cli import main as cli_main

    assert cli_main(["eval", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model_args" in out and "--include_path" in out


def test_tokens_outside_the_vocabulary_are_an_error(tmp_path):
    torch.manual_seed(4)
    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=100, ssm_cfg={"d_state": 4})).save_pretrained(
        tmp_path)
    lm = SSMCoreLM(pretrained=str(tmp_path), device="cpu")
    assert lm.loglikelihood(_requests("loglikelihood", [("ab", "c")]), disable_tqdm=True)[0][0] < 0
    with pytest.raises(ValueError, match="tokenizer: byte gave token id 122"):
        lm.loglikelihood(_requests("loglikelihood", [("ab", "z")]), disable_tqdm=True)


def test_entry_point_names_the_model_class():
    import importlib

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["lm_eval.models"]["ssmcore"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is SSMCoreLM
