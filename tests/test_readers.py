"""A cloud's own data in every supported shape, bad files as counted skips, and the held-out split."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fedjet.data.batches import BatchSampler
from fedjet.data.packing import pack_documents
from fedjet.data.readers import read_documents, split_held_out
from fedjet.data.tokenizer import ByteTokenizer
from fedjet.errors import ConfigError, DataError


def test_text_and_markdown_directory_is_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b.md").write_text("# second\nbody")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden.txt").write_text("never read")
    found = read_documents(tmp_path)
    assert found.docs == ["first", "# second\nbody", "third"]
    assert found.files == ("a.txt", "b.md", "sub/c.txt")
    assert found.sample_count == 3 and found.skipped == {} and found.kind == "files"


def test_jsonl_lines_are_documents_and_blank_lines_are_skipped(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"}), json.dumps({"text": " "})]
    (tmp_path / "part.jsonl").write_text("\n".join(lines) + "\n")
    found = read_documents(tmp_path / "part.jsonl")
    assert found.docs == ["one", "two"] and found.kind == "jsonl"
    assert found.skipped == {"empty document": 1}


def test_jsonl_line_without_text_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:3: line has no 'text' field"):
        read_documents(tmp_path)
    (tmp_path / "a.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: not a JSON object"):
        read_documents(tmp_path)


def test_empty_binary_and_latin1_files_are_counted_skips_not_crashes(tmp_path):
    (tmp_path / "good.txt").write_text("café au lait", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    found = read_documents(tmp_path)
    assert found.docs == ["café au lait"] and found.files == ("good.txt",)
    assert found.skipped == {"empty file": 2, "binary file": 1, "not UTF-8": 1, "unsupported suffix": 1}


def test_nothing_usable_is_a_data_error_listing_the_skips(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("é".encode("latin-1"))
    with pytest.raises(DataError, match=r"no usable documents.*1 empty file, 1 not UTF-8"):
        read_documents(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "missing")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"expected \.txt"):
        read_documents(tmp_path / "table.csv")


def test_wikitext_directory_gives_its_articles_training_on_valid_when_train_is_missing(data_dir):
    found = read_documents(data_dir)
    assert found.kind == "wikitext" and found.files == ("wiki.valid.tokens",)
    assert found.sample_count == 60 and found.docs[0].startswith(" = Homarus gammarus = ")


def test_saved_dataset_directory_reads_the_text_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    found = read_documents(tmp_path / "ds")
    assert found.docs == ["alpha", "beta"] and found.kind == "datasets"


def test_saved_dataset_without_datasets_installed_says_to_install_the_hub_extra(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"fedjet\[hub\]"):
        read_documents(tmp_path)


def test_held_out_split_is_deterministic_disjoint_and_never_empty():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_held_out(docs, 0.05, seed=3)
    assert (train, held) == split_held_out(docs, 0.05, seed=3)
    assert len(held) == 2 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert split_held_out(docs, 0.05, seed=4)[1] != held
    assert [len(part) for part in split_held_out(["a", "b"], 0.05, seed=0)] == [1, 1]
    assert [len(part) for part in split_held_out(["a", "b", "c"], 0.9, seed=0)] == [1, 2]
    assert split_held_out(["only"], 0.05, seed=0) == (["only"], [])
    with pytest.raises(ConfigError):
        split_held_out(docs, 1.0, seed=0)


def test_packing_separates_documents_with_eos_and_feeds_the_batch_sampler():
    tok = ByteTokenizer()
    packed = pack_documents(["ab", "  ", "cde"], tok, seq_len=4)
    assert packed.ids.dtype == np.uint16
    assert packed.ids.tolist() == [97, 98, 256, 99, 100, 101, 256]
    assert (packed.documents, packed.tokens) == (2, 7)
    batch = BatchSampler(packed.ids, seq_len=4, batch_size=3, seed=0).next_batch()
    assert batch.shape == (3, 5)
    with pytest.raises(DataError, match="fewer than one training window"):
        pack_documents(["ab"], tok, seq_len=4)
