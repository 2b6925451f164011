"""`ssmcore convert`: our checkpoints <-> transformers' MambaForCausalLM / Mamba2ForCausalLM.

Logits are compared with transformers' own implementation (its PyTorch path on the CPU) in
float32; a round trip must give back bitwise-equal tensors.
"""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from ssmcore.adapters.torch.hf_convert import (SSMCORE_CONFIG_KEY, convert, convert_from_hf,  # noqa: E402
                                               convert_to_hf, to_transformers_config)
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel  # noqa: E402
from ssmcore.cli import main as cli_main  # noqa: E402

ATOL = 2e-5

CONFIGS = {
    # vocab 61 padded to 64: the transformers vocab_size is the padded one.
    "mamba1": MambaConfig(d_model=24, n_layer=2, vocab_size=61, pad_vocab_size_multiple=8,
                          ssm_cfg={"d_state": 8, "expand": 2, "d_conv": 3}),
    "mamba1_untied": MambaConfig(d_model=20, n_layer=2, vocab_size=37, pad_vocab_size_multiple=1, tie_embeddings=False,
                                 ssm_cfg={"d_state": 5, "dt_rank": 3, "bias": True}),
    "mamba2": MambaConfig(d_model=32, n_layer=2, vocab_size=50, pad_vocab_size_multiple=16,
                          ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 5}),
    "mamba2_untied": MambaConfig(d_model=24, n_layer=3, vocab_size=45, pad_vocab_size_multiple=1, tie_embeddings=False,
                                 ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 12, "ngroups": 1,
                                          "chunk_size": 4, "d_conv": 2}),
}


def _perturbed(model, seed):
    """Move every parameter off its initial value (zero biases, ones norms) so names can't hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _hf_class(config_dict):
    return transformers.MambaForCausalLM if config_dict["model_type"] == "mamba" else transformers.Mamba2ForCausalLM


def _load_hf(folder):
    raw = json.loads((folder / "config.json").read_text())
    model, info = _hf_class(raw).from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


def _ids(vocab, seed, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_to_hf_logits_match_transformers(tmp_path, name):
    config = CONFIGS[name]
    torch.manual_seed(1)
    ours = _perturbed(MambaLMHeadModel(config).eval(), 2)
    ours.save_pretrained(tmp_path / "ours")
    convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf")
    assert hf.config.vocab_size == ours.lm_head.weight.shape[0]
    assert (hf.config.model_type == "mamba2") == (config.ssm_cfg.get("layer") == "Mamba2")
    ids = _ids(config.vocab_size, 3, (3, 13))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=ATOL, rtol=1e-5), (got - expected).abs().max()
    # the untied head really is separate in the file, and a tied one is stored once
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "backbone.embeddings.weight" in names and "backbone.embedding.weight" not in names
    assert ("lm_head.weight" in names) == (not config.tie_embeddings)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_hf_to_ours_logits_match_transformers(tmp_path, kind):
    torch.manual_seed(4)
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=53, hidden_size=24, state_size=6, num_hidden_layers=2,
                                       conv_kernel=3, time_step_rank=5, tie_word_embeddings=False)
        hf = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=40, hidden_size=16, state_size=8, num_hidden_layers=2, num_heads=4,
                                        head_dim=8, n_groups=2, chunk_size=3, tie_word_embeddings=True)
        hf = transformers.Mamba2ForCausalLM(cfg)
    hf = _perturbed(hf.float().eval(), 5)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.save_pretrained(str(tmp_path / "hf"))
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "d_model" in raw and "model_type" not in raw
    ours = MambaLMHeadModel.from_pretrained(tmp_path / "ours")
    assert ours.config.tie_embeddings == cfg.tie_word_embeddings
    ids = _ids(cfg.vocab_size, 6)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
        direct = MambaLMHeadModel.from_pretrained(tmp_path / "hf")(ids).logits  # checkpoint.py reads -hf too
    assert torch.allclose(got, expected, atol=ATOL, rtol=1e-5), (got - expected).abs().max()
    assert torch.equal(got, direct)


@pytest.mark.parametrize("name", ["mamba1", "mamba2_untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise(tmp_path, name, dtype):
    config = CONFIGS[name]
    torch.manual_seed(7)
    model = _perturbed(MambaLMHeadModel(config), 8).to(dtype)
    model.save_pretrained(tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "b", "ssmcore")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == \
        json.loads((tmp_path / "b" / "config.json").read_text())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    # HF -> ours -> HF keeps the tensors too
    convert(tmp_path / "b", tmp_path / "hf2", "hf")
    h1 = load_file(str(tmp_path / "hf" / "model.safetensors"))
    h2 = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert h1.keys() == h2.keys() and all(torch.equal(h1[k], h2[k]) for k in h1)


def test_without_ssmcore_key_the_padded_vocab_becomes_the_vocab(tmp_path):
    config = CONFIGS["mamba1"]
    torch.manual_seed(9)
    MambaLMHeadModel(config).save_pretrained(tmp_path / "a")
    convert_to_hf(tmp_path / "a", tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    del raw[SSMCORE_CONFIG_KEY]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    convert_from_hf(tmp_path / "hf", tmp_path / "b")
    back = json.loads((tmp_path / "b" / "config.json").read_text())
    assert back["vocab_size"] == 64 and back["pad_vocab_size_multiple"] == 1


def test_cli_convert_and_tokenizer_files_travel(tmp_path, capsys):
    torch.manual_seed(10)
    MambaLMHeadModel(CONFIGS["mamba2"]).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    assert cli_main(["convert", "--to", "hf", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    assert "transformers layout" in capsys.readouterr().out
    # DST already holds a checkpoint: refused without --overwrite
    assert cli_main(["convert", "--to", "hf", str(tmp_path / "a"), str(tmp_path / "hf")]) == 2
    assert "dst:" in capsys.readouterr().err
    assert cli_main(["convert", "--to", "hf", "--overwrite", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    # wrong direction for the source
    assert cli_main(["convert", "--to", "hf", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2
    assert "already a transformers checkpoint" in capsys.readouterr().err
    assert cli_main(["convert", "--to", "ssmcore", str(tmp_path / "a"), str(tmp_path / "x")]) == 2
    assert "is not a transformers checkpoint" in capsys.readouterr().err
    assert cli_main(["convert", "--to", "ssmcore", str(tmp_path / "hf"), str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("change, match", [
    (dict(d_intermediate=16), "d_intermediate"),
    (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 2}), "attn_layer_idx"),
    (dict(rms_norm=False), "rms_norm"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 8, "D_has_hdim": True}), "D_has_hdim"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 8, "norm_before_gate": True}), "norm_before_gate"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 8, "d_ssm": 32}), "d_ssm"),
    (dict(ssm_cfg={"layer": "Mamba3"}), "layer"),
    (dict(ssm_cfg={"no_such_arg": 1}), "no_such_arg"),
])
def test_inexpressible_configs_are_refused(change, match):
    base = dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={})
    with pytest.raises(ValueError, match=match):
        to_transformers_config(MambaConfig(**{**base, **change}))


def test_hf_config_that_we_cannot_express_is_refused(tmp_path):
    torch.manual_seed(11)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=20, hidden_size=16, state_size=4,
                                                                num_hidden_layers=1, layer_norm_epsilon=1e-6))
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        convert_from_hf(tmp_path / "hf", tmp_path / "b")
    with pytest.raises(TypeError, match="config"):
        to_transformers_config({"d_model": 4})
    with pytest.raises(ValueError, match="to:"):
        convert(tmp_path / "hf", tmp_path / "b", "onnx")
