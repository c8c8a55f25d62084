"""Read a cloud's own text, whatever shape it is kept in, as a list of documents.

``read_documents(PATH)`` accepts a directory of ``.txt`` / ``.md`` files (one document per file),
``.jsonl`` files (a ``text`` field per line), a WikiText directory (``wiki.*.tokens``), a
directory written by 🤗 ``datasets`` ``save_to_disk``, or one file of those kinds. Files are
visited in sorted order so every run over the same data sees the same documents in the same
order. A file that cannot be text (empty, binary, not UTF-8) is a counted, logged skip, never a
crash; a structural mistake the owner must fix (a JSONL line without ``text``) is a
``DataError`` naming the file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedjet.data.wikitext import SPLIT_FILES, read_split
from fedjet.errors import ConfigError, DataError
from fedjet.log import get_logger

log = get_logger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_HINT = "install the hub extra (pip install 'fedjet[hub]') to read a directory written by datasets.save_to_disk"


@dataclass(frozen=True, kw_only=True)
class Documents:
    """The documents found under one path, and what was left out and why."""

    docs: list[str]
    source: str
    kind: str
    files: tuple[str, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def sample_count(self) -> int:
        return len(self.docs)


class _Skip(Exception):
    """A file that holds no usable text; its ``reason`` becomes a counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_documents(path: str | Path) -> Documents:
    """All documents under ``path``; ``DataError`` when it holds none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            found = _read_saved_dataset(path)
        elif any((path / name).is_file() for name in SPLIT_FILES.values()):
            found = _read_wikitext_dir(path)
        else:
            found = _read_file_tree(path)
    else:
        found = _read_single_file(path)
    if not found.docs:
        raise DataError(f"--data {path}: no usable documents (skipped: {_describe(found.skipped)})")
    return found


def _read_file_tree(root: Path) -> Documents:
    docs: list[str] = []
    files: list[str] = []
    skipped: Counter[str] = Counter()
    for file in sorted(_visible_files(root), key=lambda p: p.relative_to(root).as_posix()):
        if file.suffix.lower() not in (*TEXT_SUFFIXES, JSONL_SUFFIX):
            skipped["unsupported suffix"] += 1
            continue
        found, file_skips = _read_one(file)
        skipped.update(file_skips)
        if found:
            docs.extend(found)
            files.append(file.relative_to(root).as_posix())
    return Documents(docs=docs, source=str(root), kind="files", files=tuple(files), skipped=dict(skipped))


def _visible_files(root: Path) -> list[Path]:
    """Regular files below ``root``, leaving out hidden files and folders (``.git``, editor state)."""
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def _read_single_file(file: Path) -> Documents:
    suffix = file.suffix.lower()
    if file.name in SPLIT_FILES.values():
        docs = _wikitext_docs(file)
        return Documents(docs=docs, source=str(file), kind="wikitext", files=(file.name,))
    if suffix not in (*TEXT_SUFFIXES, JSONL_SUFFIX):
        raise DataError(f"--data {file}: expected .txt, .md, .jsonl, wiki.*.tokens or a directory")
    docs, skipped = _read_one(file)
    kind = "jsonl" if suffix == JSONL_SUFFIX else "files"
    return Documents(docs=docs, source=str(file), kind=kind, files=(file.name,) if docs else (), skipped=skipped)


def _read_one(file: Path) -> tuple[list[str], dict[str, int]]:
    """Documents of one text or JSONL file, or a counted skip with a logged reason."""
    try:
        text = _decode(file)
    except _Skip as skip:
        log.warning("data_file_skipped", file=str(file), reason=skip.reason)
        return [], {skip.reason: 1}
    if file.suffix.lower() == JSONL_SUFFIX:
        docs, empty = _jsonl_docs(text, file)
        return docs, ({"empty document": empty} if empty else {})
    return [text], {}


def _decode(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {file}: {e}") from e
    if not raw.strip():
        raise _Skip("empty file")
    if b"\x00" in raw:
        raise _Skip("binary file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip("not UTF-8") from e


def _jsonl_docs(text: str, file: Path) -> tuple[list[str], int]:
    """The ``text`` field of every line; blank lines are skipped, empty texts counted."""
    docs: list[str] = []
    empty = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e.msg})") from e
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{where}: line has no 'text' field")
        value = record["text"]
        if not isinstance(value, str):
            raise DataError(f"{where}: 'text' is {type(value).__name__}, not a string")
        if value.strip():
            docs.append(value)
        else:
            empty += 1
    return docs, empty


def _read_wikitext_dir(root: Path) -> Documents:
    """Train split when present, else valid: a worker trains on what it has and holds out its own slice."""
    split = "train" if (root / SPLIT_FILES["train"]).is_file() else "valid"
    file = root / SPLIT_FILES[split]
    if not file.is_file():
        raise DataError(f"{root}: a WikiText directory needs {SPLIT_FILES['train']} or {SPLIT_FILES['valid']}")
    return Documents(docs=_wikitext_docs(file), source=str(root), kind="wikitext", files=(file.name,))


def _wikitext_docs(file: Path) -> list[str]:
    return [a.text for a in read_split(file) if a.text.strip()]


def _read_saved_dataset(root: Path) -> Documents:
    """A ``save_to_disk`` directory: its ``train`` split when it is a DatasetDict, ``text`` column."""
    try:
        import datasets  # type: ignore[import-not-found]  # optional hub extra
    except ImportError as e:
        raise DataError(f"{root} was written by datasets.save_to_disk; {HUB_HINT}") from e
    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as e:
        raise DataError(f"{root}: datasets.load_from_disk failed: {e}") from e
    split = "data"
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        loaded = loaded[split]
    if "text" not in loaded.column_names:
        raise DataError(f"{root}: dataset has no 'text' column (columns: {loaded.column_names})")
    texts = [t for t in loaded["text"] if isinstance(t, str)]
    docs = [t for t in texts if t.strip()]
    skipped = {"empty document": len(loaded) - len(docs)} if len(docs) < len(loaded) else {}
    return Documents(docs=docs, source=str(root), kind="datasets", files=(split,), skipped=skipped)


def split_held_out(docs: Sequence[str], fraction: float = 0.05, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split by document; each side gets one document or more when there are two.

    A held-out slice by whole documents keeps a worker's evaluation text unseen by its training,
    and the seed makes the same data split the same way on every restart.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in (0, 1), got {fraction}")
    count = len(docs)
    if count < 2:
        return list(docs), []
    held = min(count - 1, max(1, round(count * fraction)))
    order = np.random.default_rng(seed).permutation(count)
    held_idx = set(order[:held].tolist())
    train = [d for i, d in enumerate(docs) if i not in held_idx]
    held_out = [d for i, d in enumerate(docs) if i in held_idx]
    return train, held_out


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "nothing"
