"""WikiText loading, the byte tokenizer, partitioning and batches on the real shared text."""

from __future__ import annotations

import numpy as np
import pytest

from fedjet.data.batches import BatchSampler, encode_articles, eval_windows
from fedjet.data.partition import deal_fixed, deal_noniid, split_steps
from fedjet.data.shards import deal
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.data.wikitext import load_corpus, load_directory, split_articles
from fedjet.errors import ConfigError, DataError


def test_shared_copy_trains_on_valid_and_evaluates_on_test(data_dir):
    corpus = load_directory(data_dir)
    assert (corpus.train_split, corpus.eval_split) == ("valid", "test")
    assert len(corpus.train) == 60 and len(corpus.eval) == 62
    assert corpus.train[0].title == "Homarus gammarus"
    assert "training on valid" in corpus.note


def test_standard_layout_with_train_split_uses_it(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text(f" = {split.title()} = \n\n text of {split} \n")
    corpus = load_directory(tmp_path)
    assert corpus.train[0].title == "Train" and corpus.eval[0].title == "Valid" and corpus.note is None


def test_missing_data_is_a_clear_error_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDJET_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data DIR"):
        load_corpus(None, allow_download=False)
    with pytest.raises(DataError, match="not a directory"):
        load_corpus(tmp_path / "nope")


def test_section_headings_do_not_split_articles():
    lines = [" = A = \n", " = = Section = = \n", "body\n", " = B = \n", "more\n"]
    articles = split_articles(lines)
    assert [a.title for a in articles] == ["A", "B"]
    assert "Section" in articles[0].text


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("café = 1", eos=True)
    assert ids[-1] == tok.eos_id and tok.decode(ids) == "café = 1"


def test_fixed_deal_is_even_and_disjoint():
    sizes = [50, 40, 30, 20, 10, 10, 5, 5]
    shares = deal_fixed(sizes, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes) // 2


def test_noniid_deal_gives_unequal_nonempty_shares(data_dir):
    articles = load_directory(data_dir).train
    shares = deal(articles, 3, "noniid", alpha=0.3, seed=1)
    sizes = [sum(len(articles[i].text) for i in s) for s in shares]
    assert all(shares) and sorted(i for s in shares for i in s) == list(range(len(articles)))
    assert max(sizes) > 1.5 * min(sizes)
    with pytest.raises(ConfigError):
        deal_noniid([1, 2, 3], 3, alpha=0.0, seed=0)


def test_split_steps_follows_throughput_and_keeps_the_total():
    steps = split_steps({"aws": 3.0, "gcp": 3.0, "azure": 1.0}, total_steps=60)
    assert sum(steps.values()) == 60
    assert steps["azure"] < min(steps["aws"], steps["gcp"]) and abs(steps["aws"] - steps["gcp"]) <= 1
    assert steps["azure"] == pytest.approx(60 / 7, abs=1.5)


def test_batches_are_shifted_windows_and_eval_windows_are_fixed(data_dir):
    tokens = encode_articles(load_directory(data_dir).train[:3], ByteTokenizer())
    batch = BatchSampler(tokens, seq_len=16, batch_size=4, seed=0).next_batch()
    assert batch.shape == (4, 17) and batch.dtype == np.int64
    a, b = eval_windows(tokens, 16, 320), eval_windows(tokens, 16, 320)
    assert a.shape == (20, 17) and np.array_equal(a, b)
