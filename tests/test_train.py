"""``ssmcore train`` (adapters/torch/train.py), the byte tokenizer and the shipped default model.

Training runs use the tiny preset shrunk further (d_model 32, 2 layers, 4 x 32 bytes per step)
on a small text corpus, so the whole file runs in well under two minutes on a 2-core CPU.
"""

import argparse
import shutil
import struct
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import ssmcore  # noqa: E402
from ssmcore.adapters.torch import MambaLMHeadModel  # noqa: E402
from ssmcore.adapters.torch import train as train_mod  # noqa: E402
from ssmcore.adapters.torch.tokenizer import ByteTokenizer  # noqa: E402

DEFAULT_MODEL = Path(ssmcore.__file__).parent / "models" / "default"
MINI = {
    "d_model": 32, "n_layer": 2, "batch_size": 4, "seq_len": 32, "lr": 1e-2,
    "mamba": {"d_state": 8, "expand": 2},
    "mamba2": {"d_state": 16, "expand": 2, "headdim": 16, "chunk_size": 16},
}
SNIPPET = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.count

'''


@pytest.fixture
def mini(monkeypatch):
    monkeypatch.setitem(train_mod.CONFIGS, "tiny", MINI)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SNIPPET * 40)
    return path


def make_args(corpus, out, steps, **overrides):
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    argv = ["--corpus", str(corpus), "--config", "tiny", "--steps", str(steps), "--device", "cpu",
            "--out", str(out), "--quiet", "--eval-every", "10", "--eval-windows", "4", "--warmup", "3"]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def png_pixels(path):
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG, checking the signature and every chunk CRC."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert pos == len(data) and b"IEND" in chunks
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color, interlace) == (8, 2, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[y * stride] == 0 for y in range(height))  # filter type None on every row
    return width, height, [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]


# ---------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.vocab_size == 256 and tok.eos_token_id == 0
    assert tok.eos_token_id not in tok.encode("any text file content\t\n")


def test_byte_tokenizer_decode_skips_padding_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([104, 300, 105, 256, 511]) == "hi"
    cut = "é".encode("utf-8")[:1]
    assert tok.decode([*b"a", *cut, *b"b"]) == "a\ufffdb"
    with pytest.raises(TypeError, match=r"^text:"):
        tok.encode(b"bytes")


# ---------------------------------------------------------------------------------- pieces


def test_lr_schedule_warmup_then_cosine_to_floor():
    peak, total, warmup = 1e-3, 100, 10
    lrs = [train_mod.lr_at(s, total, peak, warmup) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert train_mod.lr_at(total, total, peak, warmup) == pytest.approx(0.1 * peak)
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(peak * (0.1 + 0.9 * 0.5))


def test_corpus_folder_split_skips_non_text(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}\n" * 10)
    (tmp_path / "binary.bin").write_bytes(b"abc\0def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden").write_text("hidden\n")
    train, val, _ = train_mod.load_corpus(str(tmp_path), seq_len=8)
    docs = [f"file {i}\n".encode() * 10 + b"\0" for i in range(60)]
    assert bytes(val.tolist()) == docs[25]  # every 50th file, starting at the 25th
    assert bytes(train.tolist()) == b"".join(d for i, d in enumerate(docs) if i != 25)


def test_corpus_single_file_tail_split(corpus):
    train, val, _ = train_mod.load_corpus(str(corpus), seq_len=32)
    text = (SNIPPET * 40).encode() + b"\0"
    assert bytes(train.tolist()) + bytes(val.tolist()) == text
    assert len(val) == int(len(text) * 0.05)


def test_corpus_python_stdlib_lists_sorted_stdlib_modules():
    files = train_mod._corpus_files("python-stdlib")
    names = {p.name for p in files}
    assert {"os.py", "functools.py", "ast.py"} <= names
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_write_png_round_trip(tmp_path):
    pixels = bytearray([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30, 1, 2, 3, 4, 5, 6])
    train_mod.write_png(tmp_path / "x.png", pixels, 3, 2)
    width, height, rows = png_pixels(tmp_path / "x.png")
    assert (width, height) == (3, 2)
    assert b"".join(rows) == bytes(pixels)


# ---------------------------------------------------------------------------------- training


def test_train_loss_drops_checkpoint_reloads_identically(mini, corpus, tmp_path):
    out = tmp_path / "run"
    model = train_mod.train(make_args(corpus, out, steps=25))
    state = train_mod.load_training_state(out)
    losses = [v for _, v in state["history"]["train"]]
    assert len(losses) == 25 and state["step"] == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses
    assert state["history"]["val"][-1][1] < losses[0] - 1.0

    reloaded = MambaLMHeadModel.from_pretrained(out)
    assert reloaded.config.d_model == 32 and reloaded.config.vocab_size == 256
    ids = torch.tensor([ByteTokenizer().encode("def add(a, b):\n    return")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)

    try:  # plot_losses draws with matplotlib when it is installed, else with the built-in PNG writer
        import matplotlib.image
    except ImportError:
        width, height, rows = png_pixels(out / train_mod.PLOT_NAME)
        rows = [bytes(r) for r in rows]
    else:
        image = matplotlib.image.imread(out / train_mod.PLOT_NAME)
        height, width = image.shape[:2]
        rows = [r.tobytes() for r in image]
    assert width >= 100 and height >= 100
    assert len(set(rows)) > 10  # something is drawn

    # sample(): the cached decode picks the same bytes as greedy decoding by full forwards
    text = train_mod.sample(reloaded, "def ", max_new_tokens=12, temperature=0.0)
    ids = ByteTokenizer().encode("def ")
    with torch.no_grad():
        for _ in range(12):
            nxt = int(reloaded(torch.tensor([ids])).logits[0, -1, :256].argmax())
            if nxt == 0:
                break
            ids.append(nxt)
    assert text == ByteTokenizer().decode(ids)


def test_resume_continues_at_the_right_step_and_matches_an_uninterrupted_run(mini, corpus, tmp_path, monkeypatch):
    straight = train_mod.train(make_args(corpus, tmp_path / "straight", steps=8, save_every=4))

    class Interrupted(Exception):
        pass

    real_save = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train_mod.train(make_args(corpus, tmp_path / "resumed", steps=8, save_every=4))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert train_mod.load_training_state(tmp_path / "resumed")["step"] == 4

    resumed = train_mod.train(make_args(corpus, tmp_path / "resumed", steps=8, save_every=4, resume=True))
    state = train_mod.load_training_state(tmp_path / "resumed")
    assert state["step"] == 8
    assert [s for s, _ in state["history"]["train"]] == list(range(1, 9))
    reference = train_mod.load_training_state(tmp_path / "straight")
    assert state["history"]["train"] == reference["history"]["train"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_mamba2_arch_trains(mini, corpus, tmp_path):
    model = train_mod.train(make_args(corpus, tmp_path / "m2", steps=3, arch="mamba2", save_dtype="bfloat16"))
    assert model.config.ssm_cfg["layer"] == "Mamba2"
    reloaded = MambaLMHeadModel.from_pretrained(tmp_path / "m2")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m2" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["backbone.embedding.weight"] == "BF16"
    assert all(v == "F32" for k, v in dtypes.items() if k.endswith(("A_log", ".D")))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, reloaded(ids).logits, atol=0.1)


def test_errors_name_the_argument(mini, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^corpus:"):
        train_mod.train(make_args(tmp_path / "missing.txt", tmp_path / "o", steps=1))
    with pytest.raises(ValueError, match=r"^steps:"):
        train_mod.train(make_args(corpus, tmp_path / "o", steps=0))
    with pytest.raises(ValueError, match=r"^lr:"):
        train_mod.train(make_args(corpus, tmp_path / "o", steps=1, lr=-1))
    with pytest.raises(FileNotFoundError, match=r"^resume:"):
        train_mod.train(make_args(corpus, tmp_path / "o", steps=1, resume=True))
    with pytest.raises(ValueError, match=r"^corpus:"):
        train_mod.train(make_args(corpus, tmp_path / "o", steps=1, seq_len=100000))
    with pytest.raises(ValueError, match=r"^device:"):
        train_mod.train(make_args(corpus, tmp_path / "o", steps=1, device="tpu"))


# ---------------------------------------------------------------------------------- shipped model


def test_default_model_ships_and_writes_text():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert sum(files.values()) <= 10 * 2**20
    model = MambaLMHeadModel.from_pretrained(DEFAULT_MODEL)
    assert model.config.vocab_size == 256
    ids = torch.tensor([ByteTokenizer().encode("def main(")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 256)
    assert torch.isfinite(logits).all()
    text = train_mod.sample(model, "def ", max_new_tokens=40, temperature=0.0)
    continuation = text[len("def "):]
    assert any(c.isascii() and c.isalpha() for c in continuation), repr(continuation)
