"""A cloud's private shard: which articles the partition deals each cloud."""

from __future__ import annotations

from collections.abc import Sequence

from fedjet.data.partition import deal_fixed, deal_noniid
from fedjet.data.wikitext import Article


def deal(articles: Sequence[Article], clouds: int, scheme: str, *, alpha: float, seed: int) -> list[list[int]]:
    sizes = [len(a.text.encode("utf-8")) for a in articles]
    if scheme == "noniid":
        return deal_noniid(sizes, clouds, alpha, seed)
    return deal_fixed(sizes, clouds)  # "fixed" and "dynamic" deal alike; dynamic moves work, not text
