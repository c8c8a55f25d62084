"""Load WikiText in its standard layout and split it into articles.

Search order for the data directory: ``--data DIR``, ``$FEDJET_DATA``, ``./data/wikitext-2``,
then WikiText-2 through 🤗 ``datasets`` (only when installed and the network allows). Where the
train split is missing (as in a copy holding only valid and test), we train on ``valid`` and
evaluate on ``test`` and say so in ``Corpus.note``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedjet.errors import DataError

SPLIT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
DEFAULT_DIR = Path("data/wikitext-2")
_TITLE = re.compile(r" = (?!=)(.*?[^=]) = ")

HOW_TO_GET = (
    "WikiText not found. Give a directory holding wiki.{train,valid,test}.tokens with --data DIR "
    "or FEDJET_DATA=DIR, put it at ./data/wikitext-2, or install the hub extra "
    "(pip install 'fedjet[hub]') on a machine with network access to fetch WikiText-2."
)


@dataclass(frozen=True)
class Article:
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Articles to train on and to evaluate on, with where they came from."""

    train: list[Article]
    eval: list[Article]
    source: str
    train_split: str
    eval_split: str
    note: str | None = None


def split_articles(lines: Iterable[str]) -> list[Article]:
    """Split WikiText lines into articles; a line ``" = Title = "`` starts a new one."""
    articles: list[Article] = []
    title: str | None = None
    body: list[str] = []
    for line in lines:
        match = _TITLE.fullmatch(line.rstrip("\n"))
        if match:
            if title is not None:
                articles.append(Article(title, "".join(body)))
            title, body = match.group(1), [line]
        elif title is not None:
            body.append(line)
    if title is not None:
        articles.append(Article(title, "".join(body)))
    return articles


def read_split(path: Path) -> list[Article]:
    try:
        with path.open(encoding="utf-8") as fh:
            articles = split_articles(fh)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    if not articles:
        raise DataError(f"{path} holds no WikiText articles (no ' = Title = ' lines)")
    return articles


def load_directory(directory: Path) -> Corpus:
    """Load a directory in the standard WikiText layout."""
    present = {s: directory / f for s, f in SPLIT_FILES.items() if (directory / f).is_file()}
    if "train" in present:
        train_split = "train"
        eval_split = "valid" if "valid" in present else "test"
        note = None
    elif "valid" in present and "test" in present:
        train_split, eval_split = "valid", "test"
        note = f"{SPLIT_FILES['train']} missing in {directory}: training on valid, evaluating on test"
    else:
        raise DataError(f"{directory} lacks the WikiText files needed. {HOW_TO_GET}")
    if eval_split not in present:
        raise DataError(f"{directory} has no evaluation split (valid or test). {HOW_TO_GET}")
    return Corpus(
        train=read_split(present[train_split]),
        eval=read_split(present[eval_split]),
        source=str(directory),
        train_split=train_split,
        eval_split=eval_split,
        note=note,
    )


def resolve_data_dir(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The first data directory that the search order names and that exists."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"--data {path}: not a directory. {HOW_TO_GET}")
        return path
    env = os.environ.get("FEDJET_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise DataError(f"FEDJET_DATA={path}: not a directory. {HOW_TO_GET}")
        return path
    return DEFAULT_DIR if DEFAULT_DIR.is_dir() else None


def load_corpus(explicit: str | os.PathLike[str] | None = None, *, allow_download: bool = True) -> Corpus:
    directory = resolve_data_dir(explicit)
    if directory is not None:
        return load_directory(directory)
    if allow_download:
        return _load_from_hub()
    raise DataError(HOW_TO_GET)


def _load_from_hub() -> Corpus:
    """WikiText-2 via 🤗 datasets, cached by datasets itself. Only a user's machine gets here."""
    try:
        import datasets  # type: ignore[import-not-found]  # optional extra
    except ImportError as e:
        raise DataError(HOW_TO_GET) from e
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-v1")
    except Exception as e:
        raise DataError(f"downloading WikiText-2 failed ({e}). {HOW_TO_GET}") from e
    return Corpus(
        train=split_articles(ds["train"]["text"]),
        eval=split_articles(ds["validation"]["text"]),
        source="huggingface:Salesforce/wikitext/wikitext-2-v1",
        train_split="train",
        eval_split="valid",
    )
