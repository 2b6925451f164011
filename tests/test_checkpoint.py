"""Checkpoints of the torch adapter's language model: save/load round trips (safetensors, .bin,
sharded), the reference package's and transformers' layouts, dtype/device on load, the
weights_only guard, and the errors for Hub ids that cannot be fetched."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys

import pytest
import torch

from ssmcore.adapters.torch import checkpoint
from ssmcore.adapters.torch.checkpoint import from_pretrained, load_config, save_pretrained
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel

pytest.importorskip("safetensors")

CONFIGS = {
    "mamba1": MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg=dict(d_state=4, d_conv=3)),
    "hybrid": MambaConfig(d_model=16, n_layer=3, d_intermediate=24, vocab_size=37, tie_embeddings=False,
                          ssm_cfg=dict(layer="Mamba2", d_state=4, headdim=8, chunk_size=8, dt_limit=(0.0, 5.0)),
                          attn_layer_idx=[1], attn_cfg=dict(num_heads=2, causal=True, rotary_emb_dim=4)),
}


def make_model(name, seed=0):
    torch.manual_seed(seed)
    model = MambaLMHeadModel(CONFIGS[name])
    with torch.no_grad():  # move every parameter off its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def logits_of(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(loaded, original):
    assert loaded.config == original.config
    want = original.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(logits_of(loaded), logits_of(original))
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == original.config.tie_embeddings


@pytest.mark.parametrize("name", list(CONFIGS))
def test_safetensors_round_trip(tmp_path, name):
    model = make_model(name)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(
        dataclasses.asdict(model.config)))
    loaded = MambaLMHeadModel.from_pretrained(str(tmp_path))
    assert not loaded.training
    assert_same_model(loaded, model)
    # flags the optimiser grouping relies on survive the load
    mixer = loaded.backbone.layers[0].mixer
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bin_round_trip_reads_with_weights_only(tmp_path, name, monkeypatch):
    model = make_model(name)
    save_pretrained(model, tmp_path, save_bin=True)
    (tmp_path / "model.safetensors").unlink()
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same_model(from_pretrained(tmp_path), model)
    assert calls == [True]


class _Payload:
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = dict(model.state_dict())
    state["evil"] = _Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        from_pretrained(tmp_path)


def test_sharded_safetensors_with_index(tmp_path):
    from safetensors.torch import save_file

    model = make_model("hybrid")
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_model(from_pretrained(tmp_path), model)


def test_dtype_and_device_on_load(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        want = torch.float32 if name.endswith(("A_log", ".D")) else torch.bfloat16
        assert p.dtype == want and p.device.type == "cpu", name
        torch.testing.assert_close(p, model.get_parameter(name).to(want), rtol=0, atol=0)
    logits = logits_of(loaded)
    want = logits_of(model)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - want).norm() / want.norm() < 0.05
    assert torch.equal(logits_of(from_pretrained(tmp_path, dtype="bfloat16")), logits)
    with pytest.raises(TypeError, match=r"^dtype:"):
        from_pretrained(tmp_path, dtype="int8")


def test_missing_or_unexpected_keys_fail(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path, save_bin=True)
    (tmp_path / "model.safetensors").unlink()
    state = model.state_dict()
    state.pop("backbone.layers.1.mixer.D")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="backbone.layers.1.mixer.D"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ transformers layout


def _transformers_checkpoint(tmp_path, model, raw_config):
    """Write ``model``'s weights the way transformers' Mamba(2)ForCausalLM saves them."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(raw_config))
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # transformers drops tied weights
        state[key.replace("backbone.embedding.", "backbone.embeddings.")] = value.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))


def test_transformers_mamba_checkpoint_loads(tmp_path):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=48, pad_vocab_size_multiple=1,
                      ssm_cfg=dict(d_state=4, d_conv=3, expand=2, dt_rank=2, conv_bias=True, bias=False))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    raw = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 16, "state_size": 4,
           "num_hidden_layers": 2, "vocab_size": 48, "expand": 2, "conv_kernel": 3, "use_bias": False,
           "use_conv_bias": True, "time_step_rank": 2, "residual_in_fp32": True, "tie_word_embeddings": True,
           "layer_norm_epsilon": 1e-5, "hidden_act": "silu", "intermediate_size": 32}
    _transformers_checkpoint(tmp_path, model, raw)
    loaded = from_pretrained(tmp_path)
    assert loaded.config.ssm_cfg["layer"] == "Mamba1" and loaded.config.ssm_cfg["dt_rank"] == 2
    assert loaded.backbone.embedding.weight.shape == (48, 16)
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_transformers_mamba2_checkpoint_loads(tmp_path):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=40, pad_vocab_size_multiple=1, tie_embeddings=False,
                      ssm_cfg=dict(layer="Mamba2", d_state=8, d_conv=4, headdim=8, ngroups=2, chunk_size=16,
                                   dt_limit=(0.0, 10.0)))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    raw = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 16, "state_size": 8,
           "num_hidden_layers": 2, "vocab_size": 40, "expand": 2, "conv_kernel": 4, "num_heads": 4,
           "head_dim": 8, "n_groups": 2, "chunk_size": 16, "time_step_limit": [0.0, 10.0], "use_bias": False,
           "use_conv_bias": True, "rms_norm": True, "residual_in_fp32": True, "tie_word_embeddings": False}
    _transformers_checkpoint(tmp_path, model, raw)
    loaded = from_pretrained(tmp_path)
    assert loaded.config.ssm_cfg["ngroups"] == 2 and loaded.config.ssm_cfg["dt_limit"] == (0.0, 10.0)
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_reference_config_with_extra_keys_warns_and_loads(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = ["MambaLMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="architectures"):
        assert load_config(tmp_path) == model.config


# ------------------------------------------------------------------------------------ Hub ids


def test_offline_hub_id_error_names_id_cache_and_local_option(tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub-cache"
    with pytest.raises(FileNotFoundError) as info:
        from_pretrained("state-spaces/mamba-130m", cache_dir=cache, local_files_only=True)
    message = str(info.value)
    assert message.startswith("path_or_hub_id:")
    assert "'state-spaces/mamba-130m'" in message and str(cache) in message and "local folder" in message


def test_hub_id_in_offline_mode_uses_the_error_too(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"^path_or_hub_id: 'state-spaces/mamba2-130m'"):
        from_pretrained("state-spaces/mamba2-130m", cache_dir=tmp_path)


def test_hub_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        from_pretrained("state-spaces/mamba-130m")
    message = str(info.value)
    assert "'state-spaces/mamba-130m'" in message and "pip install huggingface_hub" in message
    assert str(tmp_path / "cache") in message and "local folder" in message


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^path_or_hub_id: .*config\.json"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dataclasses.asdict(CONFIGS["mamba1"])))
    with pytest.raises(FileNotFoundError, match=r"^path_or_hub_id: .*no weights"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^path_or_hub_id: expected a checkpoint folder"):
        from_pretrained(tmp_path / "file.bin")
    with pytest.raises(TypeError, match=r"^path_or_hub_id:"):
        from_pretrained(123)
    with pytest.raises(TypeError, match=r"^model:"):
        checkpoint.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
