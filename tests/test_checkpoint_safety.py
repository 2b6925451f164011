"""Loading a hostile or broken checkpoint: nothing is ever unpickled beyond tensors, and every
malformed piece gives one CheckpointError (a ValueError) that lists everything that is wrong."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from ssmcore.adapters.torch.checkpoint import (CheckpointError, UnsafeCheckpointError, from_pretrained, load_config,
                                               save_pretrained)
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel

pytest.importorskip("safetensors")

CONFIG = MambaConfig(d_model=16, n_layer=2, vocab_size=40, ssm_cfg=dict(d_state=4, d_conv=3))
MARKER_ENV = "SSMCORE_TEST_PAYLOAD_MARKER"


def _write_marker(path):
    """Stand-in for an attacker's code: leaves a file behind if it ever runs."""
    with open(path, "w") as f:
        f.write("ran")
    return 0


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class _OsPayload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ssmcore_pwned_by_checkpoint",))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MambaLMHeadModel(CONFIG).eval()
    save_pretrained(model, tmp_path)
    return tmp_path, model


def _bin_only(folder, state):
    (folder / "model.safetensors").unlink(missing_ok=True)
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("where", ["value", "nested", "top"])
def test_malicious_pickle_is_refused_and_never_runs(saved, tmp_path_factory, where):
    folder, model = saved
    marker = tmp_path_factory.mktemp("marker") / "ran.txt"
    state = dict(model.state_dict())
    if where == "value":
        state["backbone.norm_f.weight"] = _Payload(str(marker))
    elif where == "nested":
        state["extra"] = {"a": [1, 2, _Payload(str(marker))]}
    else:
        state = _Payload(str(marker))
    _bin_only(folder, state)
    with pytest.raises(UnsafeCheckpointError) as info:
        from_pretrained(folder)
    msg = str(info.value)
    assert msg.startswith("path_or_hub_id:") and "pytorch_model.bin" in msg and "refused" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists(), "the payload ran"


def test_os_system_payload_in_legacy_pickle_never_runs(saved):
    folder, model = saved
    target = "/tmp/ssmcore_pwned_by_checkpoint"
    if os.path.exists(target):
        os.unlink(target)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:  # a plain (non-zip) pickle, protocol 2
        pickle.dump({"x": _OsPayload()}, f, protocol=2)
    with pytest.raises((UnsafeCheckpointError, CheckpointError)):
        from_pretrained(folder)
    assert not os.path.exists(target), "the payload ran"


def test_sharded_bin_with_payload_in_second_shard(saved, tmp_path_factory):
    folder, model = saved
    marker = tmp_path_factory.mktemp("marker") / "ran.txt"
    (folder / "model.safetensors").unlink()
    state = model.state_dict()
    keys = list(state)
    torch.save({k: state[k] for k in keys[:3]}, folder / "pytorch_model-1.bin")
    torch.save({**{k: state[k] for k in keys[3:]}, "evil": _Payload(str(marker))}, folder / "pytorch_model-2.bin")
    weight_map = {k: "pytorch_model-1.bin" for k in keys[:3]} | {k: "pytorch_model-2.bin" for k in keys[3:]}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model-2.bin"):
        from_pretrained(folder)
    assert not marker.exists()


def test_shard_names_cannot_leave_the_folder(saved):
    folder, model = saved
    (folder / "model.safetensors").unlink()
    weight_map = {k: "../../etc/passwd" for k in model.state_dict()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        from_pretrained(folder)


def test_plain_bin_still_loads(saved):
    folder, model = saved
    _bin_only(folder, model.state_dict())
    loaded = from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("text", ['{"d_model": 16,', "", "not json", '{"d_model": 16} trailing', "\udcff"])
def test_config_that_is_not_json(saved, text):
    folder, _ = saved
    (folder / "config.json").write_text(text, errors="surrogateescape")
    with pytest.raises(CheckpointError, match=r"^config: .*config\.json is not valid JSON"):
        load_config(folder)
    with pytest.raises(CheckpointError):
        from_pretrained(folder)


@pytest.mark.parametrize("raw", [[1, 2], "str", 3, None])
def test_config_that_is_not_an_object(saved, raw):
    folder, _ = saved
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"^config: expected a JSON object"):
        from_pretrained(folder)


def test_config_with_wrong_types_lists_all_of_them(saved):
    folder, _ = saved
    raw = json.loads((folder / "config.json").read_text())
    raw.update(d_model="16", n_layer=-1, vocab_size=True, ssm_cfg=[1], rms_norm="yes", attn_layer_idx=[1.5])
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    msg = str(info.value)
    assert msg.startswith("config:")
    for key in ("d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "attn_layer_idx"):
        assert key in msg, (key, msg)


def test_transformers_config_missing_required_keys(saved):
    folder, _ = saved
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 16.5}))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    msg = str(info.value)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        assert key in msg, msg


def test_unknown_config_keys_warn_but_load(saved):
    folder, model = saved
    raw = json.loads((folder / "config.json").read_text())
    raw["totally_unknown"] = 1
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="totally_unknown"):
        from_pretrained(folder)


# --------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("keep", [0, 7, 100, -50, -1])
def test_truncated_safetensors(saved, keep):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match=r"^path_or_hub_id: .*model\.safetensors is not a readable"):
        from_pretrained(folder)


def test_safetensors_with_garbage_header(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        from_pretrained(folder)


def test_truncated_bin(saved):
    folder, model = saved
    _bin_only(folder, model.state_dict())
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"^path_or_hub_id: .*pytorch_model\.bin"):
        from_pretrained(folder)


def test_bin_that_is_not_a_dict(saved):
    folder, _ = saved
    _bin_only(folder, [torch.zeros(3)])
    with pytest.raises(CheckpointError, match="expected a state dict"):
        from_pretrained(folder)


def test_every_missing_unexpected_and_misshaped_key_is_listed(saved):
    from safetensors.torch import save_file

    folder, model = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = ["backbone.layers.0.mixer.D", "backbone.layers.1.mixer.A_log", "backbone.norm_f.weight"]
    for k in missing:
        del state[k]
    state["backbone.layers.9.mixer.D"] = torch.zeros(3)
    state["something.else"] = torch.zeros(1)
    misshaped = ["backbone.layers.0.mixer.conv1d.weight", "backbone.layers.1.mixer.dt_proj.bias"]
    for k in misshaped:
        state[k] = torch.zeros(tuple(state[k].shape) + (1,))
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    msg = str(info.value)
    assert msg.startswith("path_or_hub_id:")
    for k in missing + ["backbone.layers.9.mixer.D", "something.else"] + misshaped:
        assert k in msg, (k, msg)
    assert "3 missing keys" in msg and "2 unexpected keys" in msg and "2 shape mismatches" in msg
    assert isinstance(info.value, RuntimeError)  # as torch's load_state_dict errors are


def test_missing_embedding_with_tied_head_is_listed(saved):
    from safetensors.torch import save_file

    folder, model = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k not in ("lm_head.weight", "backbone.embedding.weight")}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="backbone.embedding.weight"):
        from_pretrained(folder)
