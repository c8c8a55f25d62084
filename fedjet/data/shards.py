"""A cloud's private shard: the articles the partition deals it, as one token stream."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedjet.data.batches import Tokenizer, encode_articles
from fedjet.data.partition import deal_fixed, deal_noniid
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import Article
from fedjet.errors import ConfigError


def make_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return ByteTokenizer()
    raise ConfigError(f"unknown tokenizer {name!r} (this build has: bytes)")


def deal(articles: Sequence[Article], clouds: int, scheme: str, *, alpha: float, seed: int) -> list[list[int]]:
    sizes = [len(a.text.encode("utf-8")) for a in articles]
    if scheme == "noniid":
        return deal_noniid(sizes, clouds, alpha, seed)
    return deal_fixed(sizes, clouds)  # "fixed" and "dynamic" deal alike; dynamic moves work, not text


def shard_tokens(
    articles: Sequence[Article],
    tokenizer: Tokenizer,
    *,
    clouds: int,
    index: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> np.ndarray:
    shares = deal(articles, clouds, scheme, alpha=alpha, seed=seed)
    return encode_articles([articles[i] for i in shares[index]], tokenizer)
