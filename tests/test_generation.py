"""Generation: cache steps vs full forwards, chunked prefill, generate() against loops over full
forwards written here, batched prompts of different lengths, the sampling filters against NumPy,
eos / teacher forcing / scores / streamer, and the generate and bench-generate commands.

Models are tiny, random, float64 (so greedy choices never hinge on rounding) and deliberately
non-degenerate: untied, unit-variance lm_head and amplified projections, so the argmax moves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np

import pytest

torch = pytest.importorskip("torch")

from ssmcore.adapters.torch import cli_generate  # noqa: E402
from ssmcore.adapters.torch.generation import (  # noqa: E402
    GenerateOutput,
    apply_repetition_penalty,
    generate,
    min_p_filter,
    sample,
    sampling_probs,
    top_k_filter,
    top_p_filter,
)
from ssmcore.adapters.torch.inference import InferenceParams  # noqa: E402
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel  # noqa: E402

VOCAB = 60  # padded to 64 in the embedding: logits beyond 60 exist and must never be chosen
MAMBA2_CFG = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}
CONFIGS = {
    "mamba1": dict(d_model=32, n_layer=2, ssm_cfg={"d_state": 8}),
    "mamba2": dict(d_model=32, n_layer=2, ssm_cfg=MAMBA2_CFG),
    # Mamba-2, attention (grouped KV heads, rotary, qkv conv), Mamba-2, each with a gated MLP.
    "hybrid": dict(d_model=32, n_layer=3, ssm_cfg=MAMBA2_CFG, d_intermediate=48, attn_layer_idx=[1],
                   attn_cfg={"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "causal": True, "rotary_emb_dim": 4,
                             "d_conv": 4}),
}
KINDS = list(CONFIGS)


def make_model(kind, seed=0, dtype=torch.float64, vocab_size=VOCAB):
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=vocab_size, tie_embeddings=False, **CONFIGS[kind])
    model = MambaLMHeadModel(config, dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight")):
                p.mul_(3.0)
    return model


_MODELS = {}


@pytest.fixture(params=KINDS)
def model(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = make_model(request.param)
    return _MODELS[request.param]


def full_logits(model, ids):
    """(B, L, V) logits of a forward without any cache."""
    with torch.no_grad():
        return model(ids).logits


def greedy_loop(model, ids, new_tokens, vocab=VOCAB, repetition_penalty=1.0):
    """Argmax over full forwards of the growing sequence (no cache), optionally with the CTRL penalty."""
    seq = ids.clone()
    for _ in range(new_tokens):
        logits = full_logits(model, seq)[:, -1, :vocab].clone()
        if repetition_penalty != 1.0:
            for b in range(seq.shape[0]):
                for tok in set(seq[b].tolist()):
                    s = logits[b, tok]
                    logits[b, tok] = s * repetition_penalty if s < 0 else s / repetition_penalty
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def random_ids(shape, seed, high=VOCAB):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, high, size=shape))


# ---------------------------------------------------------------------------------- cache vs full forward


def test_step_by_step_equals_full_forward(model):
    ids = random_ids((2, 10), 1)
    expected = full_logits(model, ids)
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    got = []
    with torch.no_grad():
        for t in range(10):  # t == 0: a one-token prompt; then decode steps through step()
            got.append(model(ids[:, t:t + 1], inference_params=params).logits[:, -1])
            params.seqlen_offset += 1
    np.testing.assert_allclose(torch.stack(got, 1).numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)


def test_prefill_then_steps_equal_full_forward(model):
    ids = random_ids((3, 11), 2)
    expected = full_logits(model, ids)
    params = InferenceParams(max_seqlen=11, max_batch_size=3)
    with torch.no_grad():
        prefill = model(ids[:, :7], inference_params=params).logits
        params.seqlen_offset = 7
        steps = []
        for t in range(7, 11):
            steps.append(model(ids[:, t:t + 1], inference_params=params, num_last_tokens=1).logits[:, -1])
            params.seqlen_offset += 1
    np.testing.assert_allclose(prefill.numpy(), expected[:, :7].numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(torch.stack(steps, 1).numpy(), expected[:, 7:].numpy(), rtol=1e-9, atol=1e-9)


def test_chunked_prefill_equals_one_prefill(model):
    ids = random_ids((2, 13), 3)
    one = InferenceParams(max_seqlen=14, max_batch_size=2)
    chunked = InferenceParams(max_seqlen=14, max_batch_size=2)
    with torch.no_grad():
        logits_one = model(ids, inference_params=one).logits
        pieces = []
        for start, stop in ((0, 5), (5, 6), (6, 13)):  # a 1-token chunk goes through step()
            pieces.append(model(ids[:, start:stop], inference_params=chunked).logits)
            chunked.seqlen_offset = stop
        one.seqlen_offset = 13
        nxt = random_ids((2, 1), 4)
        after_one = model(nxt, inference_params=one).logits
        after_chunked = model(nxt, inference_params=chunked).logits
    np.testing.assert_allclose(torch.cat(pieces, 1).numpy(), logits_one.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(after_chunked.numpy(), after_one.numpy(), rtol=1e-9, atol=1e-9)
    for layer_idx, states in one.key_value_memory_dict.items():
        for a, b in zip(states, chunked.key_value_memory_dict[layer_idx]):
            if a is not None:
                np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- greedy generate


def test_greedy_generate_equals_argmax_loop(model):
    ids = random_ids((2, 6), 5)
    expected = greedy_loop(model, ids, 9)
    got = generate(model, ids, 15, vocab_size=VOCAB)
    assert got.shape == (2, 15)
    assert torch.equal(got, expected)
    assert not torch.equal(got[:, 6:], got[:, 6:7].expand(-1, 9)), "degenerate model: the test could not fail"
    assert torch.equal(model.generate(ids, 15, vocab_size=VOCAB), expected)  # the model's method delegates


def test_generate_zero_and_one_new_tokens(model):
    ids = random_ids((2, 4), 6)
    assert torch.equal(generate(model, ids, 4), ids)
    assert torch.equal(generate(model, ids, 5, vocab_size=VOCAB), greedy_loop(model, ids, 1))


def _solo_new_tokens(model, prompts, new_tokens, **kwargs):
    return [generate(model, p[None], p.numel() + new_tokens, vocab_size=VOCAB, **kwargs)[0, p.numel():]
            for p in prompts]


def test_batched_prompts_of_different_lengths_equal_one_by_one(model):
    lengths = [3, 7, 5, 7, 1]
    prompts = [random_ids((n,), 10 + i) for i, n in enumerate(lengths)]
    new_tokens = 6
    solo = _solo_new_tokens(model, prompts, new_tokens)
    for row, p in zip(solo, prompts):  # solo generation itself is right
        assert torch.equal(row, greedy_loop(model, p[None], new_tokens)[0, p.numel():])

    out = generate(model, prompts, max(lengths) + new_tokens, vocab_size=VOCAB, return_dict_in_generate=True)
    width = max(lengths)
    assert out.sequences.shape == (5, width + new_tokens)
    for i, p in enumerate(prompts):
        assert torch.equal(out.sequences[i, width - p.numel():width], p)
        assert torch.equal(out.sequences[i, width:], solo[i])
        assert out.attention_mask[i].sum() == p.numel() + new_tokens
        assert not out.attention_mask[i, :width - p.numel()].any()

    # The same batch as a left-padded tensor with a mask, and right-padded (padding ids are junk).
    left = torch.full((5, width), 13, dtype=torch.long)
    right = torch.full((5, width), 17, dtype=torch.long)
    left_mask, right_mask = torch.zeros(5, width, dtype=torch.long), torch.zeros(5, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        left[i, width - p.numel():], left_mask[i, width - p.numel():] = p, 1
        right[i, :p.numel()], right_mask[i, :p.numel()] = p, 1
    for ids, mask in ((left, left_mask), (right, right_mask)):
        seq = generate(model, ids, width + new_tokens, vocab_size=VOCAB, attention_mask=mask)
        assert torch.equal(seq[:, :width], ids)
        for i in range(5):
            assert torch.equal(seq[i, width:], solo[i])


def test_batched_prompts_with_repetition_penalty_ignore_padding():
    model = _MODELS.setdefault("mamba1", make_model("mamba1"))
    prompts = [random_ids((n,), 20 + n) for n in (2, 6, 4)]
    solo = [greedy_loop(model, p[None], 5, repetition_penalty=3.0)[0, p.numel():] for p in prompts]
    # Pad with row 0's first choice: penalising the padding would change that choice.
    pad = int(solo[0][0])
    assert pad not in prompts[0].tolist()
    width = 6
    ids = torch.full((3, width), pad, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():], mask[i, width - p.numel():] = p, 1
    seq = generate(model, ids, width + 5, vocab_size=VOCAB, attention_mask=mask, repetition_penalty=3.0)
    for i in range(3):
        assert torch.equal(seq[i, width:], solo[i])
    plain = generate(model, ids, width + 5, vocab_size=VOCAB, attention_mask=mask)
    assert not torch.equal(plain, seq), "the penalty changed nothing: the test could not fail"


# ---------------------------------------------------------------------------------- filters vs NumPy


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_top_k_keep(logits, k):
    return np.stack([row >= np.sort(row)[::-1][k - 1] for row in logits])


def np_top_p_keep(logits, p):
    keep = np.zeros(logits.shape, dtype=bool)
    for b, row in enumerate(logits):
        probs = np_softmax(row)
        mass = 0.0
        for i in np.argsort(-row, kind="stable"):
            if mass >= p:
                break
            keep[b, i] = True
            mass += probs[i]
    return keep


def np_min_p_keep(logits, min_p):
    probs = np_softmax(logits)
    return probs >= min_p * probs.max(axis=-1, keepdims=True)


HAND_LOGITS = np.array([
    [2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.5, 1.5],
    [-0.3, -0.2, 4.0, 3.9, -5.0, 0.1, 0.2, 2.2],
    [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35],
])


def _kept(filtered):
    return np.isfinite(filtered.numpy())


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_top_k_filter_matches_numpy(k):
    got = top_k_filter(torch.tensor(HAND_LOGITS), k)
    keep = np_top_k_keep(HAND_LOGITS, k)
    assert (_kept(got) == keep).all()
    np.testing.assert_array_equal(got.numpy()[keep], HAND_LOGITS[keep])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.75, 0.9, 0.99])
def test_top_p_filter_matches_numpy(p):
    got = top_p_filter(torch.tensor(HAND_LOGITS), p)
    assert (_kept(got) == np_top_p_keep(HAND_LOGITS, p)).all()
    assert (_kept(top_p_filter(torch.tensor(HAND_LOGITS), 0.0))).all()
    assert (_kept(top_p_filter(torch.tensor(HAND_LOGITS), 1.0))).all()


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_min_p_filter_matches_numpy(min_p):
    got = min_p_filter(torch.tensor(HAND_LOGITS), min_p)
    assert (_kept(got) == np_min_p_keep(HAND_LOGITS, min_p)).all()


def test_min_p_is_relative_to_each_rows_top_probability():
    # The threshold follows each row's own top probability (the reference compares logits with min_p).
    logits = torch.tensor([[10.0, 9.0, 0.0, -3.0], [0.1, 0.0, -0.1, -8.0]])
    kept = _kept(min_p_filter(logits, 0.3))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_numpy(penalty):
    seen = np.zeros(HAND_LOGITS.shape, dtype=bool)
    seen[0, [0, 3, 6]] = True
    seen[1, [1, 2]] = True
    got = apply_repetition_penalty(torch.tensor(HAND_LOGITS), torch.tensor(seen), penalty).numpy()
    expected = HAND_LOGITS.copy()
    for b, i in zip(*np.nonzero(seen)):
        s = HAND_LOGITS[b, i]
        expected[b, i] = s * penalty if s < 0 else s / penalty
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [
    (0, 0.0, 0.0, 1.0), (0, 0.0, 0.0, 0.5), (3, 0.0, 0.0, 2.0), (0, 0.8, 0.0, 0.7), (0, 0.0, 0.2, 1.5),
    (5, 0.9, 0.05, 0.8),
])
def test_sampling_probs_match_numpy(top_k, top_p, min_p, temperature):
    scaled = HAND_LOGITS / temperature
    keep = np.ones(scaled.shape, dtype=bool)
    if top_k > 0:
        keep &= np_top_k_keep(scaled, top_k)
    masked = np.where(keep, scaled, -np.inf)
    if top_p > 0:
        keep &= np_top_p_keep(masked, top_p)
    masked = np.where(keep, scaled, -np.inf)
    if min_p > 0:
        keep &= np_min_p_keep(masked, min_p)
    expected = np_softmax(np.where(keep, scaled, -np.inf))
    got = sampling_probs(torch.tensor(HAND_LOGITS), top_k, top_p, min_p, temperature).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_sample_draws_from_the_filtered_distribution_reproducibly():
    logits = torch.tensor(HAND_LOGITS[:1]).expand(40000, -1)
    draw = lambda seed: sample(logits, top_k=0, top_p=0.9, temperature=0.8,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    tokens = draw(0)
    assert torch.equal(tokens, draw(0))
    assert not torch.equal(tokens, draw(1))
    expected = sampling_probs(torch.tensor(HAND_LOGITS[:1]), 0, 0.9, 0.0, 0.8)[0].numpy()
    freq = np.bincount(tokens.numpy(), minlength=8) / tokens.numel()
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_allclose(freq, expected, atol=0.01)
    assert torch.equal(sample(logits[:3], top_k=1), logits[:3].argmax(-1))
    assert torch.equal(sample(logits[:3], top_k=0, temperature=0.0), logits[:3].argmax(-1))


def test_sampled_generate_is_reproducible_with_a_generator(model):
    ids = random_ids((2, 4), 7)
    run = lambda seed: generate(model, ids, 12, top_k=0, temperature=1.5, vocab_size=VOCAB,  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    first = run(3)
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))
    assert int(first.max()) < VOCAB


# ---------------------------------------------------------------------------------- eos, teacher, scores, streamer


def test_eos_stops_rows_and_generation():
    model = _MODELS.setdefault("mamba2", make_model("mamba2"))
    ids = random_ids((3, 5), 8)
    free = generate(model, ids, 15, vocab_size=VOCAB)
    eos = int(free[0, 7])  # row 0 produces it at its third new token
    out = generate(model, ids, 15, vocab_size=VOCAB, eos_token_id=eos)
    for b in range(3):
        row = free[b, 5:].tolist()
        stop = row.index(eos) if eos in row else None
        if stop is None:
            assert torch.equal(out[b, 5:], free[b, 5:out.shape[1]])
        else:
            assert out[b, 5:5 + stop + 1].tolist() == row[:stop + 1]
            assert (out[b, 5 + stop:] == eos).all()
    # Every row finished: generation stops there, sequences are shorter than max_length.
    eos_all = int(free[0, 5])
    single = generate(model, ids[:1], 15, vocab_size=VOCAB, eos_token_id=eos_all)
    assert single.shape == (1, 6) and int(single[0, 5]) == eos_all


def test_teacher_outputs_force_tokens_then_greedy_continues(model):
    ids = random_ids((2, 4), 9)
    teacher = torch.cat([ids, random_ids((2, 3), 10)], dim=1)  # forces new positions 4, 5, 6
    out = generate(model, ids, 10, vocab_size=VOCAB, teacher_outputs=teacher, output_scores=True,
                   return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :7], teacher)
    assert torch.equal(out.sequences, greedy_loop(model, teacher, 3))
    expected_scores = full_logits(model, out.sequences)[:, 3:9, :VOCAB]
    np.testing.assert_allclose(torch.stack(out.scores, 1).numpy(), expected_scores.numpy(), rtol=1e-9, atol=1e-9)


def test_output_scores_and_return_dict(model):
    ids = random_ids((2, 5), 11)
    out = generate(model, ids, 11, vocab_size=VOCAB, output_scores=True, return_dict_in_generate=True)
    assert isinstance(out, GenerateOutput)
    assert torch.equal(out.sequences, generate(model, ids, 11, vocab_size=VOCAB))
    assert len(out.scores) == 6 and all(s.shape == (2, VOCAB) for s in out.scores)
    expected = full_logits(model, out.sequences)[:, 4:10, :VOCAB]
    np.testing.assert_allclose(torch.stack(out.scores, 1).numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)
    assert out.attention_mask is None and out.timings is None
    plain = generate(model, ids, 11, vocab_size=VOCAB, return_dict_in_generate=True)
    assert plain.scores is None
    timed = generate(model, ids, 11, vocab_size=VOCAB, return_dict_in_generate=True, enable_timing=True)
    assert timed.timings["new_tokens"] == 6 and timed.timings["prefill_s"] > 0 and timed.timings["decode_s"] > 0
    # Without vocab_size the padded rows of the vocabulary are scored too.
    assert generate(model, ids, 7, output_scores=True, return_dict_in_generate=True).scores[0].shape == (2, 64)


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, tokens):
        assert self.ended == 0
        self.puts.append(tokens.clone())

    def end(self):
        self.ended += 1


def test_streamer_receives_prompt_then_each_token():
    model = _MODELS.setdefault("mamba1", make_model("mamba1"))
    ids = random_ids((2, 5), 12)
    streamer = RecordingStreamer()
    out = generate(model, ids, 12, vocab_size=VOCAB, streamer=streamer)
    assert streamer.ended == 1
    assert torch.equal(streamer.puts[0], ids)
    assert len(streamer.puts) == 8 and all(p.shape == (2, 1) and p.device.type == "cpu" for p in streamer.puts[1:])
    assert torch.equal(torch.cat(streamer.puts, dim=1), out)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(max_length=3), ValueError, "max_length"),
    (dict(cg=True), ValueError, "cg"),
    (dict(attention_mask=torch.ones(2, 4)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), ValueError, "attention_mask"),
    (dict(input_ids=torch.zeros(2, 5)), TypeError, "input_ids"),
    (dict(input_ids=torch.full((2, 5), 64)), ValueError, "input_ids"),
    (dict(input_ids=[[1, 2], []]), ValueError, "input_ids"),
    (dict(teacher_outputs=torch.zeros(3, 8, dtype=torch.long)), ValueError, "teacher_outputs"),
    (dict(streamer=object()), TypeError, "streamer"),
])
def test_errors_name_the_argument(kwargs, error, name):
    model = _MODELS.setdefault("mamba1", make_model("mamba1"))
    args = dict(input_ids=random_ids((2, 5), 13), max_length=8)
    args.update(kwargs)
    with pytest.raises(error, match=rf"^{name}:"):
        generate(model, **args)


# ---------------------------------------------------------------------------------- command line


def _byte_model_dir(tmp_path):
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 8})
    folder = tmp_path / "byte_model"
    MambaLMHeadModel(config).save_pretrained(folder)
    return folder


def _parse(add_arguments, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_generate_streams_text_and_prints_tokens_per_second(tmp_path, capsys):
    folder = _byte_model_dir(tmp_path)
    args = _parse(cli_generate.add_arguments_generate,
                  ["--prompt", "def f(x):", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "12",
                   "--top-k", "1"])
    assert cli_generate.run_generate(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f(x):")
    assert "tokens/s" in err.strip().splitlines()[-1]
    model = MambaLMHeadModel.from_pretrained(folder)
    prompt = torch.tensor([list(b"def f(x):")])
    expected = generate(model, prompt, prompt.shape[1] + 12, vocab_size=256, eos_token_id=0)
    text = bytes(t for t in expected[0].tolist() if 0 < t < 256).decode("utf-8", errors="replace")
    assert out.rstrip("\n") == text


def test_cli_generate_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_generate, "default_model_dir", lambda: tmp_path / "missing")
    args = _parse(cli_generate.add_arguments_generate, ["--prompt", "hi", "--device", "cpu"])
    assert cli_generate.run_generate(args) == 2
    assert "--model" in capsys.readouterr().err
    folder = _byte_model_dir(tmp_path)
    monkeypatch.setattr(cli_generate, "default_model_dir", lambda: folder)
    args = _parse(cli_generate.add_arguments_generate,
                  ["--prompt", "hi", "--device", "cpu", "--max-new-tokens", "3", "--top-k", "0", "--seed", "1"])
    assert cli_generate.run_generate(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hi") and "tokens/s" in err


def test_cli_bench_generate_random_config(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(d_model=32, n_layer=2, vocab_size=300, ssm_cfg=MAMBA2_CFG)))
    args = _parse(cli_generate.add_arguments_bench,
                  ["--config", str(config), "--device", "cpu", "--promptlen", "6", "--genlen", "5", "--batch", "2",
                   "--repeats", "1", "--topk", "0", "--topp", "0.9", "--minp", "0.05", "--temperature", "0.9",
                   "--repetition-penalty", "1.1"])
    assert cli_generate.run_bench(args) == 0
    out = capsys.readouterr().out
    assert "prompt processing (prefill + first token):" in out
    assert "decoding 4 steps:" in out
    assert "tokens/s (2 x 5 generated tokens)" in out
    args = _parse(cli_generate.add_arguments_bench, ["--config", "mamba-9b", "--device", "cpu"])
    assert cli_generate.run_bench(args) == 2
    assert "--config" in capsys.readouterr().err


def test_bench_presets_have_the_published_shapes():
    shapes = {name: (p["d_model"], p["n_layer"], p["ssm_cfg"].get("layer", "Mamba1"))
              for name, p in cli_generate.PRESETS.items()}
    assert shapes["mamba-130m"] == (768, 24, "Mamba1")
    assert shapes["mamba-2.8b"] == (2560, 64, "Mamba1")
    assert shapes["mamba2-2.7b"] == (2560, 64, "Mamba2")


# ---------------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_decoding_equals_eager(kind):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    if kind != "mamba1" and importlib.util.find_spec("ssmcore.backends.cupy.state_space_duality") is None:
        pytest.skip("the CuPy backend has no ssd kernel yet (Mamba-2 prefill on the GPU, issue 4)")
    from ssmcore.adapters.torch.generation import _GRAPHS_ATTR, clear_decode_graphs

    model = make_model(kind, dtype=torch.float32).cuda()
    ids = random_ids((3, 7), 14).cuda()
    eager = generate(model, ids, 40, vocab_size=VOCAB)
    graphed = generate(model, ids, 40, vocab_size=VOCAB, cg=True)
    assert torch.equal(graphed, eager)
    graph = getattr(model, _GRAPHS_ATTR)[(3, 40, ids.device, torch.float32)]
    other = random_ids((3, 7), 15).cuda()
    assert torch.equal(generate(model, other, 40, vocab_size=VOCAB, cg=True), generate(model, other, 40,
                                                                                         vocab_size=VOCAB))
    assert getattr(model, _GRAPHS_ATTR)[(3, 40, ids.device, torch.float32)] is graph  # captured once, reused
    prompts = [random_ids((n,), 16 + n).cuda() for n in (2, 7, 4)]
    assert torch.equal(generate(model, prompts, 30, vocab_size=VOCAB, cg=True),
                       generate(model, prompts, 30, vocab_size=VOCAB))
    clear_decode_graphs(model)
    assert not hasattr(model, _GRAPHS_ATTR)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_constants_follow_parameter_changes(kind, dtype):
    """step() keeps -exp(A_log), D, dt_bias and the conv weight/bias as float32 between steps; a change of the
    parameters (in place, as an optimizer does, or by load_state_dict) must be seen by the next step."""
    from ssmcore.adapters.torch.modules import Mamba, Mamba2

    torch.manual_seed(0)
    make = (lambda: Mamba(32, d_state=8, layer_idx=0, dtype=dtype)) if kind == "mamba" else \
        (lambda: Mamba2(64, d_state=16, headdim=16, chunk_size=16, layer_idx=0, dtype=dtype))
    m = make()
    initial = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 1, m.d_model, dtype=dtype)

    def one_step(module):
        conv, ssm = module.allocate_inference_cache(2, 4)
        conv.copy_(torch.randn(conv.shape, generator=torch.Generator().manual_seed(1)).to(conv.dtype))
        ssm.copy_(torch.randn(ssm.shape, generator=torch.Generator().manual_seed(2)).to(ssm.dtype))
        with torch.no_grad():
            return module.step(x, conv, ssm)[0]

    first = one_step(m)
    assert torch.equal(one_step(m), first)  # the cached constants give the same step
    with torch.no_grad():
        m.A_log.add_(0.25)
        m.D.mul_(-1.5)
        (m.dt_proj.bias if kind == "mamba" else m.dt_bias).add_(0.5)
    changed_ssm = one_step(m)
    with torch.no_grad():
        m.conv1d.weight.mul_(-0.5)
        m.conv1d.bias.add_(0.25)
    changed = one_step(m)
    assert not torch.equal(changed, changed_ssm)
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(changed, one_step(fresh))
    assert not torch.equal(changed, first)
    m.load_state_dict(initial)  # back to the initial weights through load_state_dict
    assert torch.equal(one_step(m), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_weights_follow_parameter_changes(dtype):
    """The norms keep their weights as float32 between no-grad calls; an in-place change must be seen."""
    from ssmcore.adapters.torch.modules import RMSNorm, RMSNormGated

    torch.manual_seed(0)
    x = torch.randn(3, 32, dtype=dtype)
    z = torch.randn(3, 32, dtype=dtype)
    for norm, call in ((RMSNorm(32, dtype=dtype), lambda n: n(x)),
                       (RMSNormGated(32, group_size=16, dtype=dtype), lambda n: n(x, z))):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(32))
            first = call(norm)
            assert torch.equal(call(norm), first)
            norm.weight.mul_(-2.0)
            changed = call(norm)
        fresh = type(norm)(32, dtype=dtype) if isinstance(norm, RMSNorm) else RMSNormGated(32, group_size=16,
                                                                                          dtype=dtype)
        fresh.load_state_dict(norm.state_dict())
        with torch.no_grad():
            assert torch.equal(changed, call(fresh))
        assert not torch.equal(changed, first)
