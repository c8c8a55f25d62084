"""A cloud's training text, turned into a token stream and a held-out slice.

Two sources: the cloud's own files (``fedjet worker --data PATH``: txt/md, jsonl, WikiText,
``datasets.save_to_disk``), which is the production shape; or its share of one corpus dealt
by the job's ``--partition`` (``fedjet up``'s demo, ``--deal``). Either way documents are split
into train and held-out by whole documents, tokenized, separated by EOS and packed; only
counts and losses ever leave the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedjet.data.batches import BatchSampler, Tokenizer, eval_windows
from fedjet.data.packing import pack_documents
from fedjet.data.readers import read_documents, split_held_out
from fedjet.data.shards import deal
from fedjet.data.wikitext import load_corpus
from fedjet.errors import DataError
from fedjet.spec import JobSpec

HELD_OUT_FRACTION = 0.05
HELD_OUT_TOKENS = 4096  # per evaluation: a number in each update, cheap to compute


@dataclass(frozen=True)
class LocalData:
    train: np.ndarray  # packed token stream
    heldout: np.ndarray | None  # fixed evaluation windows, or None when the cloud has one document
    documents: int
    tokens: int
    source: str
    note: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def samples(self, seq_len: int) -> int:
        """Training windows this cloud holds: its n_i in formula 1."""
        return max(1, self.tokens // (seq_len + 1))


def cloud_data(path: str | None, tokenizer: Tokenizer, spec: JobSpec, cloud: str, *, deal: bool) -> LocalData:
    """This cloud's data, dealt (``--deal``) or its own: what every rank of the cloud reads."""
    return dealt_share(path, tokenizer, spec, cloud) if deal else own_data(path, tokenizer, spec)


def cloud_sampler(data: LocalData, spec: JobSpec, cloud: str, world: int) -> BatchSampler:
    """The cloud's global batches (``world`` ranks of ``batch_size``), seeded per cloud: every
    rank draws the same ones and keeps its own rows."""
    train = spec.config.train
    seed = spec.config.seed * 1000 + spec.cloud_index(cloud)
    return BatchSampler(data.train, train.seq_len, train.batch_size * world, seed=seed)


def own_data(path: str | None, tokenizer: Tokenizer, spec: JobSpec) -> LocalData:
    if path is None:
        raise DataError("give this cloud's data with --data PATH (a folder of .txt/.md/.jsonl, WikiText, ...)")
    documents = read_documents(path)
    return _packed(documents.docs, tokenizer, spec, documents.source, None, documents.skipped)


def dealt_share(path: str | None, tokenizer: Tokenizer, spec: JobSpec, cloud: str) -> LocalData:
    """This cloud's share of one corpus, dealt as every other cloud deals it (the demo)."""
    corpus = load_corpus(path)
    job = spec.config
    shares = deal(corpus.train, len(spec.clouds), job.partition.scheme, alpha=job.partition.alpha, seed=job.seed)
    docs = [corpus.train[i].text for i in shares[spec.cloud_index(cloud)]]
    return _packed(docs, tokenizer, spec, corpus.source, corpus.note, {})


def _packed(
    docs: list[str], tokenizer: Tokenizer, spec: JobSpec, source: str, note: str | None, skipped: dict[str, int]
) -> LocalData:
    seq_len = spec.config.train.seq_len
    train_docs, held_docs = split_held_out(docs, HELD_OUT_FRACTION, seed=spec.config.seed)
    packed = pack_documents(train_docs, tokenizer, seq_len)
    heldout = None
    if held_docs:
        try:
            held = pack_documents(held_docs, tokenizer, seq_len)
            heldout = eval_windows(held.ids, seq_len, HELD_OUT_TOKENS)
        except DataError:
            heldout = None  # a held-out slice shorter than one window: no number this time
    return LocalData(packed.ids, heldout, len(train_docs), packed.tokens, source, note, skipped)
