"""The byte-level tokenizer of ssmcore's own language models: one token per UTF-8 byte.

No vocabulary file and no download: token ``i`` (0..255) is the byte ``i``. Token 0 (the NUL
byte) is the end-of-text token: text files never contain NUL, and ``ssmcore train`` skips any
corpus file that does, so it only appears where the trainer puts it, between documents.
"""

from __future__ import annotations


class ByteTokenizer:
    """Text <-> UTF-8 byte ids.

    vocab_size: 256. eos_token_id: 0 (NUL), written between documents during training; a
    generator stops when the model emits it.
    """

    vocab_size = 256
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 256)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """The text of a sequence of ids (ints or a 1-D tensor/array). Ids >= 256 (padding rows
        of the model's vocabulary) and negative ids are skipped; bytes that are not valid UTF-8
        (a sequence cut inside a multi-byte character) become U+FFFD."""
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


__all__ = ["ByteTokenizer"]
