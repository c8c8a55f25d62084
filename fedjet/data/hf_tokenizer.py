"""A checkpoint's own tokenizer behind the project's ``Tokenizer`` protocol, and its identity.

Every cloud tokenizes its private text locally, so the clouds must hold byte-identical tokenizer
files: the job spec carries ``tokenizer_files_sha256`` and a worker whose copy differs refuses
to start (``check_tokenizer``). ``transformers`` is imported only when a tokenizer is loaded, so
the hash and the byte tokenizer stay cheap to import.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fedjet.data.tokenizer import ByteTokenizer
from fedjet.errors import ConfigError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
)
BYTES_EOS = "<|endoftext|>"


class HFTokenizer:
    """``AutoTokenizer`` output as ids, with the end-of-document token appended on request."""

    def __init__(self, tokenizer: Any, *, sha256: str) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the checkpoint's tokenizer has no EOS token; fedjet separates documents with it")
        self._tok = tokenizer
        self.sha256 = sha256
        self.name = f"hf:{sha256[:12]}"
        self.eos_id = int(tokenizer.eos_token_id)
        self.vocab_size = len(tokenizer)

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = Path(path)
        sha = tokenizer_files_sha256(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the tokenizer in {path}: {e}") from e
        return cls(tokenizer, sha256=sha)

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``transformers`` tokenizer (for ``generate`` and export)."""
        return self._tok

    def encode(self, text: str, *, eos: bool = True) -> np.ndarray:
        # The backend skips transformers' per-call length warnings: documents are longer than a window.
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            ids = backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False)
        out = np.asarray(ids, dtype=np.int64)
        return np.append(out, self.eos_id) if eos else out

    def encode_batch(self, texts: list[str], *, eos: bool = True) -> list[np.ndarray]:
        """Many documents at once: the Rust backend spreads them over the CPU cores."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return [self.encode(t, eos=eos) for t in texts]
        tail = [self.eos_id] if eos else []
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray([*e.ids, *tail], dtype=np.int64) for e in encodings]

    def decode(self, ids: np.ndarray | list[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files a directory holds, in the fixed hashing order."""
    path = Path(path)
    return [path / name for name in sorted(TOKENIZER_FILES) if (path / name).is_file()]


def tokenizer_files_sha256(path: str | Path) -> str:
    """SHA-256 over the sorted names and contents of the tokenizer files present."""
    files = tokenizer_files(path)
    if not files:
        raise ConfigError(f"{path} holds no tokenizer files (any of {', '.join(TOKENIZER_FILES)})")
    digest = hashlib.sha256()
    for file in files:
        content = file.read_bytes()
        digest.update(file.name.encode() + b"\0")
        digest.update(len(content).to_bytes(8, "big"))
        digest.update(content)
    return digest.hexdigest()


def check_tokenizer(path: str | Path, expected_sha256: str) -> str:
    """This cloud's tokenizer hash, or ``ConfigError`` when it is not the job's tokenizer."""
    actual = tokenizer_files_sha256(path)
    if actual != expected_sha256:
        raise ConfigError(
            f"the tokenizer in {path} (sha256 {actual[:16]}…) differs from the job's (sha256 "
            f"{expected_sha256[:16]}…): give this worker byte-identical tokenizer files, or its token "
            "ids would not mean what the other clouds' ids mean"
        )
    return actual


def load_tokenizer(name_or_path: str | Path) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer for ``bytes`` and preset names; a checkpoint directory's own tokenizer otherwise.

    A checkpoint directory without tokenizer files (a model trained with the byte tokenizer and
    saved without one) gets the byte tokenizer too; ``initial_model`` checks the vocabulary fits.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return HFTokenizer.from_dir(path) if tokenizer_files(path) else ByteTokenizer()
    text = str(name_or_path)
    if text == "bytes" or ("/" not in text and "\\" not in text and not text.startswith(".")):
        return ByteTokenizer()  # a preset name: the model loader rejects unknown ones
    raise ConfigError(f"--model {text}: no such checkpoint directory")


def byte_level_hf_tokenizer() -> Any:
    """A ``transformers`` tokenizer that gives exactly ``ByteTokenizer``'s ids (bytes 0..255, EOS 256).

    Exports of models trained with the byte tokenizer carry it, so ``AutoTokenizer`` loads them
    like any other checkpoint. (One difference: the literal text ``<|endoftext|>`` becomes the
    EOS id rather than 13 byte ids.)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BYTES_EOS, bos_token=BYTES_EOS)
    assert tokenizer.eos_token_id == ByteTokenizer.eos_id, tokenizer.eos_token_id
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable character table, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
