"""Corpus loading, the token memmap cache (reuse vs rebuild), and batch sampling."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritongpt.errors import UserError
from tritongpt.train import data
from tritongpt.train.data import EOT, check_text_field, get_batch, load_text, prepare_tokens, token_dtype
from tritongpt.train.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(load_text("pydoc")[:40_000], 400, name="tiny")


class CharTokenizer:
    """A stand-in with more than 65,536 ids, to exercise the uint32 file layout."""
    name, hash, vocab_size, eot_id = "chars", "c" * 64, 70_000, 69_999

    def encode_batch(self, texts, allowed_special="none_raise"):
        return [[60_000 + ord(c) for c in t] for t in texts]


# -- load_text ---------------------------------------------------------------------------------
def test_pydoc_corpus():
    from pydoc_data.topics import topics

    text = load_text()
    assert text == load_text("pydoc") == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000 and "assert" in text


def test_stdlib_corpus(monkeypatch):
    monkeypatch.setattr(data, "STDLIB_MAX_BYTES", 30_000)
    text = load_text("stdlib")
    assert "def " in text and EOT in text
    docs = text.split(EOT)
    assert sum(map(len, docs[:-1])) < 30_000 <= sum(map(len, docs))    # stops at the cap


def test_text_file_folder_and_jsonl(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(str(f)) == "héllo\nworld\n"

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "skip.md").write_text("not text", encoding="utf-8")
    assert load_text(folder) == EOT.join(["ay", "bee", "sea"])

    j = tmp_path / "rows.jsonl"
    j.write_text('{"text": "first", "id": 1}\n\n{"text": "second"}\n', encoding="utf-8")
    assert load_text(j) == f"first{EOT}second"
    j.write_text('{"body": "x"}\n', encoding="utf-8")
    assert load_text(j, text_field="body") == "x"


def test_load_text_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(UserError, match=r"nodocs has no .txt or .parquet files$"):  # and no word of token ids
        load_text(tmp_path / "nodocs")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(UserError, match="bin.txt: not UTF-8"):
        load_text(tmp_path / "bin.txt")
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_text(j)
    j.write_text('{"text": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    # names the flag every command that reads .jsonl text has (it said "the text field option")
    with pytest.raises(UserError, match=r"bad.jsonl:3: no field 'text'.*body.*--text-field"):
        load_text(j)
    j.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'text' is a int"):
        load_text(j)
    j.write_text('{"text": " "}\n{"text": "\\n"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_text(j)
    (tmp_path / "only-eot.txt").write_text(f"{EOT}\n{EOT}", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_text(tmp_path / "only-eot.txt")
    # a folder named like a text file, and a link to nothing: named, not a traceback
    (tmp_path / "odd" / "sub.txt").mkdir(parents=True)
    (tmp_path / "odd" / "a.txt").write_text("text", encoding="utf-8")
    assert load_text(tmp_path / "odd") == "text"
    (tmp_path / "odd" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(UserError, match="gone.txt: a broken link"):
        load_text(tmp_path / "odd")


def test_a_broken_link_among_token_shards_is_named_as_a_text_folders_is(tmp_path):
    """A token shard's link to nothing failed is_file() and was left out of the data without a word (8 tokens of
    16 read), a nanoGPT folder's val.bin too (the training tail held out instead); a text folder's is refused by
    name. So is a loop of links (a -> b -> a), said as one: its target is no missing file."""
    from types import SimpleNamespace

    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "s0.npy", np.arange(1, 9, dtype=np.uint16))
    (shards / "s1.npy").symlink_to(tmp_path / "moved.npy")
    ids = SimpleNamespace(name="ids", hash="i" * 64, vocab_size=100)  # (shards are read, not tokenized)
    with pytest.raises(UserError, match=r"s1.npy: a broken link \(its target does not exist\)"):
        prepare_tokens(str(shards), ids, val_fraction=0.0)
    (shards / "s1.npy").unlink()
    (shards / "s1.npy").symlink_to("s2.npy")
    (shards / "s2.npy").symlink_to("s1.npy")
    with pytest.raises(UserError, match=r"s1.npy: a broken link \(a loop of links: it never reaches a file\)"):
        prepare_tokens(str(shards), ids, val_fraction=0.0)
    # nanoGPT's val.bin too: its training tail was held out in its place
    nano = tmp_path / "nano"
    nano.mkdir()
    np.arange(1, 41, dtype=np.uint16).tofile(nano / "train.bin")
    (nano / "val.bin").symlink_to(tmp_path / "moved.bin")
    with pytest.raises(UserError, match=r"val.bin: a broken link \(its target does not exist\)"):
        prepare_tokens(str(nano), ids)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("ay", encoding="utf-8")
    (docs / "b.txt").symlink_to("c.txt")
    (docs / "c.txt").symlink_to("b.txt")
    with pytest.raises(UserError, match=r"b.txt: a broken link \(a loop of links"):
        load_text(docs)


def test_a_folder_reads_each_file_once_its_links_to_its_own_files_too(tmp_path):
    """A text folder's link to another of its own files was listed by rglob as a file of its own and read twice as
    one source, drawn from twice as often, never said: it is dropped. A folder of token shards too."""
    import os
    from types import SimpleNamespace

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "b.txt").symlink_to(folder / "a.txt")
    (folder / "e.txt").symlink_to("b.txt")  # (a chain of links within the folder: a.txt's too)
    assert load_text(folder) == EOT.join(["ay", "sea"])
    assert sorted(p.name for p, _ in data.files_read(str(folder)).values()) == ["a.txt", "c.txt"]
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "s0.npy", np.arange(1, 9, dtype=np.uint16))
    np.save(shards / "s2.npy", np.arange(9, 17, dtype=np.uint16))
    (shards / "s1.npy").symlink_to(shards / "s0.npy")
    ids = SimpleNamespace(name="ids", hash="i" * 64, vocab_size=100)  # (shards are read, not tokenized)
    td = prepare_tokens(str(shards), ids, val_fraction=0.0)
    assert np.array_equal(np.asarray(td.train), np.arange(1, 17))  # s0 and s2, each once
    # a hard link is a name of equal standing, as dedup tools make of equal files: read, as `datasets` reads it
    os.link(folder / "c.txt", folder / "d.txt")
    assert load_text(folder) == EOT.join(["ay", "sea", "sea"])


def test_names_that_share_a_stored_file_without_naming_each_other_are_each_read(tmp_path):
    """Only a link to another of the folder's own names is dropped. A Hub snapshot's shards are links into its
    blobs/, and two shards of equal bytes share one blob: distinct shards, each read, as `datasets.load_dataset`
    reads them (it yields both shards' rows); they were read once. A token folder's val shard linking a train shard
    is the validation split, not a repeat (dropped, validation silently became the training tail); a held-out
    name linking a training shard still mixes splits."""
    from types import SimpleNamespace

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot" / "data"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "h1").write_text("one", encoding="utf-8")
    (blobs / "h2").write_text("two", encoding="utf-8")
    for name, blob in (("train-0.txt", "h1"), ("train-1.txt", "h2"), ("train-2.txt", "h1")):
        (snap / name).symlink_to(Path("../../blobs") / blob)  # (as the Hub cache links them: relative)
    assert load_text(snap) == EOT.join(["one", "two", "one"])
    linked = tmp_path / "fetched"  # hub_datasets' own folder: a link to each snapshot file
    linked.mkdir()
    for p in sorted(snap.iterdir()):
        (linked / p.name).symlink_to(p)
    assert load_text(linked) == EOT.join(["one", "two", "one"])

    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "train_0.npy", np.arange(1, 9, dtype=np.uint16))
    (shards / "val_0.npy").symlink_to(shards / "train_0.npy")
    ids = SimpleNamespace(name="ids", hash="i" * 64, vocab_size=100)
    td = prepare_tokens(str(shards), ids)
    assert np.array_equal(np.asarray(td.train), np.arange(1, 9)) and np.array_equal(np.asarray(td.val),
                                                                                     np.arange(1, 9))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train-0.parquet").write_bytes(b"not read")  # (refused before any is read)
    (mixed / "test-0.parquet").symlink_to(mixed / "train-0.parquet")
    with pytest.raises(UserError, match="mixes splits: test-0.parquet is held-out data beside train-0.parquet"):
        data.parquet_shards(mixed)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(["a", "é", "猫", "\r\n", "\r", "\n", " ", EOT, "<|", "endoftext", "|>", "<"]),
                      max_size=40), bom=st.booleans(), piece=st.integers(1, 17))
def test_a_text_file_read_in_pieces_splits_as_the_whole_text(tmp_path_factory, parts, bom, piece):
    """A text file is read a few characters at a time, and its documents are still exactly those of
    the whole text split at <|endoftext|>, markers straddling two pieces included, with
    read_text's universal newlines and byte-order mark."""
    path = tmp_path_factory.mktemp("pieces") / "t.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(parts).encode("utf-8"))
    old, data.READ_CHARS = data.READ_CHARS, piece
    try:
        assert list(data._split_eot(path)) == path.read_text(encoding="utf-8-sig").split(EOT)
    finally:
        data.READ_CHARS = old


def test_a_bad_byte_is_named_by_its_place_in_the_file(tmp_path, monkeypatch):
    """The byte named is counted from the file's start, across the pieces it is read in (a reader's
    own error counts from its buffer)."""
    monkeypatch.setattr(data, "READ_CHARS", 1000)
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" + "é".encode() * 2500 + b"ok\xff")  # 5003 good bytes; bytes 999-1000 are one letter
    with pytest.raises(UserError, match=r"t.txt: not UTF-8 text \(byte 5003: invalid start byte\)"):
        load_text(path)


@pytest.mark.parametrize("layout", ["txt", "jsonl", "folder"])
def test_tokenising_a_corpus_holds_one_group_of_documents_not_the_corpus(tmp_path, layout, monkeypatch):
    """prepare_tokens reads the source twice, a document at a time (one pass names it, one
    tokenises it): 16 MB of text is tokenised under tracemalloc with a peak of a few MB (holding it
    whole, and joined for its hash, took over 32 MB), and the tokens are those of every document."""
    import tracemalloc

    class Fast:  # tokenising is not what is measured: one id per character, made in numpy
        name, hash, vocab_size, eot_id = "fast", "f" * 64, 300, 299

        def encode_batch(self, texts, allowed_special="none_raise"):
            return [np.full(len(t), 7, dtype=np.uint16) for t in texts]

    monkeypatch.setattr(data, "READ_CHARS", 2**16)
    doc, n = "x" * 2047 + "\n", 8192
    if layout == "txt":
        src = tmp_path / "c.txt"
        src.write_text(EOT.join([doc] * n))
    elif layout == "jsonl":
        src = tmp_path / "c.jsonl"
        src.write_text((json.dumps({"text": doc}) + "\n") * n)
    else:
        src = tmp_path / "docs"
        src.mkdir()
        for i in range(8):
            (src / f"{i}.txt").write_text(EOT.join([doc] * (n // 8)))
    tracemalloc.start()
    try:
        td = prepare_tokens(str(src), Fast(), tmp_path / "cache", val_fraction=0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(td.train) == n * len(doc) + n - 1 and td.meta["documents"] == n and td.meta["chars"] == n * len(doc)
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MB"


def test_what_a_document_is(tmp_path, tok):
    """Records and files are documents; within a .txt file, literal <|endoftext|> separates them
    (GPT-2-style dumps); inside a .jsonl record that spelling is text, not a separator."""
    j = tmp_path / "rows.jsonl"
    j.write_text(json.dumps({"text": f"the token {EOT} ends a doc"}) + "\n" + json.dumps({"text": "second"}) + "\n",
                 encoding="utf-8")
    assert data.load_documents(j) == [f"the token {EOT} ends a doc", "second"]
    t = tmp_path / "dump.txt"
    t.write_text(f"one{EOT}two", encoding="utf-8")
    assert data.load_documents(t) == ["one", "two"]
    ids = np.asarray(prepare_tokens(str(j), tok, cache_dir=tmp_path / "c1", val_fraction=0.0).train).tolist()
    assert ids.count(tok.eot_id) == 1, "two records, one separator"
    assert tok.decode(ids) == f"the token {EOT} ends a doc{EOT}second"
    # the same characters, other documents: another corpus, not the cached tokens
    a = prepare_tokens(str(t), tok, cache_dir=tmp_path / "c2", val_fraction=0.0)
    j.write_text(json.dumps({"text": f"one{EOT}two"}) + "\n", encoding="utf-8")
    b = prepare_tokens(str(j), tok, cache_dir=tmp_path / "c2", val_fraction=0.0)
    assert a.meta["source_hash"] != b.meta["source_hash"] and b.meta["documents"] == 1
    assert np.asarray(b.train).tolist().count(tok.eot_id) == 0
    # a byte-order mark (Windows editors write one) is not text
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello".encode("utf-8"))
    assert load_text(bom) == "hello"
    bom.write_bytes(("\ufeff" + json.dumps({"text": "hi"})).encode("utf-8"))
    assert data.load_documents(bom.rename(tmp_path / "bom.jsonl")) == ["hi"]


# -- prepare_tokens -------------------------------------------------------------------------------
def test_dtype_choice():
    assert token_dtype(4096) == token_dtype(50257) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_tokens_layout_and_split(tmp_path, tok):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("The first document. " * 30, encoding="utf-8")
    (src / "b.txt").write_text(f"Second one, with a literal {EOT} inside? No: a separator.", encoding="utf-8")
    td = prepare_tokens(str(src), tok, tmp_path / "cache", val_fraction=0.25)
    assert isinstance(td.train, np.memmap) and td.train.dtype == np.uint16
    all_ids = np.concatenate([td.train, td.val])
    docs = load_text(str(src)).split(EOT)
    want = tok.encode(docs[0]) + [tok.eot_id] + tok.encode(docs[1]) + [tok.eot_id] + tok.encode(docs[2])
    assert all_ids.tolist() == want
    n = len(want)
    assert len(td.val) == round(n * 0.25) and td.meta["split"] == len(td.train)
    meta = json.loads((tmp_path / "cache" / "tokens.json").read_text())
    assert meta["n_tokens"] == n and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["tokenizer_hash"] == tok.hash and meta["eot_id"] == tok.eot_id
    assert (tmp_path / "cache" / "tokens.bin").stat().st_size == 2 * n


def test_prepare_tokens_uint32(tmp_path):
    (tmp_path / "t.txt").write_text("abc", encoding="utf-8")
    td = prepare_tokens(str(tmp_path / "t.txt"), CharTokenizer(), tmp_path / "c", val_fraction=0.0)
    assert td.train.dtype == np.uint32 and td.train.tolist() == [60_097, 60_098, 60_099] and len(td.val) == 0
    assert td.meta["dtype"] == "uint32"


def test_documents_past_a_tokenising_group_are_still_separated(tmp_path):
    """Documents are tokenised 256 at a time: 300 documents need 299 separators, including the
    one between the first group's last document and the second group's first."""
    tok = CharTokenizer()
    docs = [f"d{i}" for i in range(300)]
    (tmp_path / "docs.txt").write_text(EOT.join(docs), encoding="utf-8")
    td = prepare_tokens(str(tmp_path / "docs.txt"), tok, tmp_path / "c", val_fraction=0.0)
    ids = td.train.tolist()
    assert ids.count(tok.eot_id) == 299, f"{ids.count(tok.eot_id)} separators for 300 documents"
    want = []
    for i, d in enumerate(docs):
        want += ([tok.eot_id] if i else []) + [60_000 + ord(c) for c in d]
    assert ids == want


def test_cache_reuse_and_rebuild(tmp_path, tok, monkeypatch):
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("alpha beta gamma delta " * 50, encoding="utf-8")
    writes = []
    real_write = data._write_tokens
    monkeypatch.setattr(data, "_write_tokens", lambda *a: writes.append(1) or real_write(*a))

    first = prepare_tokens(str(src), tok, cache).train.tolist()
    assert len(writes) == 1
    assert prepare_tokens(str(src), tok, cache).train.tolist() == first and len(writes) == 1     # reused
    again = prepare_tokens(str(src), tok, cache, val_fraction=0.5)      # a new split needs no re-tokenising
    n = again.meta["n_tokens"]
    assert len(writes) == 1 and len(again.val) == round(n * 0.5) and len(again.train) == n - round(n * 0.5)
    assert len(first) == n - round(n * 0.1)

    src.write_text("alpha beta gamma delta " * 49 + "epsilon", encoding="utf-8")
    changed = prepare_tokens(str(src), tok, cache)                       # source changed
    assert len(writes) == 2 and changed.meta["source_hash"] != again.meta["source_hash"]
    assert np.concatenate([changed.train, changed.val]).tolist() == tok.encode(src.read_text())

    other = BPETokenizer.train(load_text("pydoc")[:20_000], 300)          # different tokenizer
    assert prepare_tokens(str(src), other, cache).meta["vocab_size"] == 300 and len(writes) == 3
    prepare_tokens(str(src), tok, cache)
    assert len(writes) == 4

    with open(cache / "tokens.bin", "r+b") as f:                          # truncated file
        f.truncate(10)
    assert np.concatenate([(td := prepare_tokens(str(src), tok, cache)).train, td.val]).tolist() == \
        tok.encode(src.read_text())
    assert len(writes) == 5
    (cache / "tokens.json").write_text("{broken")                         # damaged meta
    prepare_tokens(str(src), tok, cache)
    assert len(writes) == 6
    prepare_tokens(str(src), tok, cache)
    assert len(writes) == 6

    def cut_short(docs, tokenizer, bin_path, dtype):                    # killed once tokens.bin is replaced
        bin_path.write_bytes(b"\0\0" * 7)
        raise KeyboardInterrupt
    src.write_text("zeta " * 40, encoding="utf-8")
    monkeypatch.setattr(data, "_write_tokens", cut_short)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(str(src), tok, cache)
    assert not (cache / "tokens.json").exists()                          # no meta names the new file as the old


def test_prepare_tokens_errors(tmp_path, tok):
    with pytest.raises(UserError, match="val_fraction"):
        prepare_tokens("pydoc", tok, tmp_path, val_fraction=1.0)
    with pytest.raises(UserError, match="not found"):
        prepare_tokens(str(tmp_path / "nope.txt"), tok, tmp_path)


def test_a_token_file_is_read_in_place_as_nanogpts_bin(tmp_path, tok):
    """A .bin of uint16 ids (nanoGPT's train.bin) is the token array itself: memmapped where it
    lies (no cache written), split at its last val_fraction, named by the hash of its bytes."""
    import hashlib

    ids = np.random.default_rng(3).integers(0, tok.vocab_size, size=1001).astype(np.uint16)
    ids[17] = tok.vocab_size - 1  # the largest id the tokenizer has is fine
    path = tmp_path / "train.bin"
    ids.tofile(path)
    td = prepare_tokens(str(path), tok, tmp_path / "cache", val_fraction=0.1)
    assert not (tmp_path / "cache").exists()
    assert isinstance(td.tokens, np.memmap) and td.path == path
    assert len(td.train) == 901 and len(td.val) == 100  # 1001 - round(100.1)
    assert td.train.tolist() == ids[:901].tolist() and td.val.tolist() == ids[901:].tolist()
    assert td.meta["source_hash"] == hashlib.sha256(ids.tobytes()).hexdigest()
    assert td.meta["n_tokens"] == 1001 and td.meta["split"] == 901 and td.meta["tokenizer_hash"] == tok.hash
    for n in (None, 5, 901, 950, 5000):           # eval --split all --max-tokens: a view of the file, no copy
        assert td.head(n).tolist() == ids[:n].tolist() and np.shares_memory(td.head(n), td.tokens)
    # the form pretrain and eval pass, with the text field beside the source
    again = prepare_tokens({"source": str(path), "text_field": "text"}, tok, None, val_fraction=0.0)
    assert len(again.train) == 1001 and len(again.val) == 0
    x, y = get_batch(td.train, 3, 8, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and int(x.max()) < tok.vocab_size and torch.equal(x[:, 1:], y[:, :-1])


def test_a_token_file_the_tokenizer_cannot_read_is_refused(tmp_path, tok):
    """An id past the tokenizer's, an odd or empty size, or ids too wide for uint16 are named
    before any step (an out-of-range id would fail in the embedding steps later)."""
    path = tmp_path / "train.bin"
    np.array([5, tok.vocab_size, 5], dtype=np.uint16).tofile(path)  # (any piece: the next test)
    with pytest.raises(UserError, match=rf"train.bin: token id {tok.vocab_size} is past the tiny tokenizer's "
                                        rf"{tok.vocab_size} ids \(pass the tokenizer that wrote the file"):
        prepare_tokens(str(path), tok)
    for raw in (b"", b"\x01\x00\x02"):
        path.write_bytes(raw)
        with pytest.raises(UserError, match=rf"{len(raw)} bytes is not a whole, non-zero number of uint16"):
            prepare_tokens(str(path), tok)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(UserError, match="the chars tokenizer's 70000 ids do not fit"):
        prepare_tokens(str(path), CharTokenizer())
    with pytest.raises(UserError, match="holds token ids .nanoGPT's .bin., not text"):
        load_text(str(path))



def _nanogpt_folder(folder, tok, n_train=701, n_val=83, seed=5):
    """What nanoGPT's prepare.py leaves: train.bin, val.bin and the text they came from."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    train = rng.integers(0, tok.vocab_size, size=n_train).astype(np.uint16)
    val = rng.integers(0, tok.vocab_size, size=n_val).astype(np.uint16)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    (folder / "input.txt").write_text("the text they were made from", encoding="utf-8")
    return train, val


def test_a_nanogpt_folder_reads_its_val_bin_as_the_validation_split(tmp_path, tok, capsys):
    """A folder holding train.bin: train.bin is the training split and val.bin (when there) the
    validation split, both memmapped where they lie; the name covers both files; the text files
    beside them are not read (and the user is told so)."""
    folder = tmp_path / "shakespeare"
    train, val = _nanogpt_folder(folder, tok)
    td = prepare_tokens(str(folder), tok, tmp_path / "cache")
    assert "shakespeare: reading its token ids (train.bin); its .txt files are not read" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and td.path == folder and td.tokens is None
    assert isinstance(td.train, np.memmap) and isinstance(td.val, np.memmap)
    assert td.train.tolist() == train.tolist() and td.val.tolist() == val.tolist()
    assert td.meta["n_tokens"] == 784 and td.meta["split"] == 701 and td.meta["tokenizer_hash"] == tok.hash
    # the first n tokens of train then val, as a flat file's head
    both = np.concatenate([train, val]).tolist()
    for n in (None, 5, 701, 702, 784, 10_000):
        assert td.head(n).tolist() == both[:n]
    # either file changed is other data; the files swapped are too
    first = td.meta["source_hash"]
    val[3] ^= 1
    val.tofile(folder / "val.bin")
    assert prepare_tokens(str(folder), tok).meta["source_hash"] != first
    (folder / "train.bin").rename(tmp_path / "t")
    (folder / "val.bin").rename(folder / "train.bin")
    (tmp_path / "t").rename(folder / "val.bin")
    assert len({first, prepare_tokens(str(folder), tok).meta["source_hash"],
                prepare_tokens({"source": str(folder), "text_field": "text"}, tok).meta["source_hash"]}) == 2


def test_a_nanogpt_folder_without_val_bin_is_its_train_bin(tmp_path, tok, capsys):
    """Only train.bin: the same data as that file passed alone (same name, same tail split), and
    no word of a val.bin not read."""
    import hashlib

    folder = tmp_path / "owt"
    train, _ = _nanogpt_folder(folder, tok)
    (folder / "val.bin").unlink()
    for fraction in (None, 0.25):
        td = prepare_tokens(str(folder), tok, val_fraction=fraction)
        alone = prepare_tokens(str(folder / "train.bin"), tok, val_fraction=fraction)
        assert td.meta["source_hash"] == alone.meta["source_hash"] == hashlib.sha256(train.tobytes()).hexdigest()
        assert td.val.tolist() == alone.val.tolist() == train[701 - round(701 * (fraction or 0.1)):].tolist()
    assert "val.bin" not in capsys.readouterr().err


def test_a_nanogpt_folder_refuses_what_would_be_read_wrongly(tmp_path, tok, capsys):
    """--val-fraction beside a val.bin would be ignored; a val.bin id past the tokenizer's is
    named; nanoGPT's character-level meta.pkl (65 ids) means ids no BPE tokenizer decodes; a
    meta.pkl that names a class is not unpickled (no code runs); train.bin alone beside a val.bin
    says val.bin is not read; a tokenizer trainer is told the folder's ids are not text."""
    import collections
    import pickle

    folder = tmp_path / "data"
    _nanogpt_folder(folder, tok)
    with pytest.raises(UserError, match=r"data has its own validation split \(val.bin\): --val-fraction does not "
                                        r"apply \(leave it out, or pass .*train.bin alone"):
        prepare_tokens(str(folder), tok, val_fraction=0.1)
    prepare_tokens(str(folder / "train.bin"), tok)
    assert "val.bin is not read: the validation split is train.bin's tail (pass the folder" in capsys.readouterr().err
    prepare_tokens(str(folder / "val.bin"), tok)                          # a file not named train.bin: no word
    assert "is not read" not in capsys.readouterr().err
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": tok.vocab_size, "itos": {0: "a"}}))
    assert prepare_tokens(str(folder), tok).meta["split"] == 701           # the tokenizer's own size: fine
    for vocab in (65, tok.vocab_size + 1):
        (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab, "stoi": {"a": 0}, "itos": {0: "a"}}))
        with pytest.raises(UserError, match=rf"meta.pkl: the ids are a vocabulary of {vocab} \(nanoGPT's character-"
                                            r"level data\); the tiny tokenizer has 400 and could not decode them"):
            prepare_tokens(str(folder), tok)
    (folder / "meta.pkl").write_bytes(pickle.dumps([tok.vocab_size + 1]))   # no dict: no vocabulary said
    assert prepare_tokens(str(folder), tok).meta["split"] == 701
    for cut in (b"", pickle.dumps({"vocab_size": 65})[:-3], b"not a pickle"):
        (folder / "meta.pkl").write_bytes(cut)
        with pytest.raises(UserError, match=r"meta.pkl: not nanoGPT's meta.pkl, a pickle of plain data \("):
            prepare_tokens(str(folder), tok)
    (folder / "meta.pkl").write_bytes(pickle.dumps(collections.OrderedDict(vocab_size=400)))
    with pytest.raises(UserError, match=r"meta.pkl: not nanoGPT's meta.pkl, a pickle of plain data "
                                        r"\(it names collections.OrderedDict\)"):
        prepare_tokens(str(folder), tok)
    (folder / "meta.pkl").unlink()
    np.array([1, tok.vocab_size], dtype=np.uint16).tofile(folder / "val.bin")
    with pytest.raises(UserError, match=rf"val.bin: token id {tok.vocab_size} is past"):
        prepare_tokens(str(folder), tok)
    (folder / "input.txt").unlink()
    with pytest.raises(UserError, match=r"has no .txt or .parquet files \(its train.bin holds token ids: pretrain "
                                        r"and eval"):
        load_text(str(folder))


# -- get_batch ----------------------------------------------------------------------------------------
def test_batches_are_shifted_windows():
    tokens = (np.arange(1000) * 7 % 65_521).astype(np.uint16)     # distinct values: a position is known
    x, y = get_batch(tokens, 8, 33, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 33) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = tokens.tolist().index(row_x[0])
        assert row_x == tokens[start:start + 33].tolist() and row_y == tokens[start + 1:start + 34].tolist()
    xt, yt = get_batch(torch.from_numpy(tokens.astype(np.int64)), 8, 33, torch.Generator().manual_seed(0))
    assert torch.equal(xt, x) and torch.equal(yt, y)                # tensors and memmaps sample alike


def test_batches_are_deterministic_and_resumable():
    tokens = np.arange(5000, dtype=np.uint16)
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    a = [get_batch(tokens, 4, 16, g1)[0] for _ in range(3)]
    b = [get_batch(tokens, 4, 16, g2)[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], get_batch(tokens, 4, 16, torch.Generator().manual_seed(43))[0])
    state = g1.get_state()
    nxt = get_batch(tokens, 4, 16, g1)[0]
    g1.set_state(state)
    assert torch.equal(get_batch(tokens, 4, 16, g1)[0], nxt)


def test_every_start_position_is_reachable():
    tokens = np.arange(6, dtype=np.uint16)                          # block 4: starts 0 and 1 only
    x, _ = get_batch(tokens, 64, 4, torch.Generator().manual_seed(1))
    assert set(x[:, 0].tolist()) == {0, 1}


def test_get_batch_errors():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(UserError, match="context longer than the data"):
        get_batch(tokens, 2, 10, torch.Generator())
    x, y = get_batch(tokens, 2, 9, torch.Generator())                # exactly block_size + 1 fits
    assert x[0].tolist() == list(range(9)) and y[0].tolist() == list(range(1, 10))
    with pytest.raises(UserError, match="context longer than the data"):
        get_batch(np.zeros(0, dtype=np.uint16), 1, 4, torch.Generator())
    with pytest.raises(UserError, match="batch_size"):
        get_batch(tokens, 0, 4, torch.Generator())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_get_batch_to_cuda():
    tokens = np.arange(500, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 32, torch.Generator().manual_seed(3), device="cuda")
    xc, yc = get_batch(tokens, 4, 32, torch.Generator().manual_seed(3))
    assert x.device.type == "cuda" and x.dtype == torch.int64
    assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)


# -- mutation pass: corpus reading, the cache key, the split ---------------------------------------
def test_stdlib_walk_order_skips_and_cap(tmp_path, monkeypatch):
    """The stdlib corpus reads .py files in sorted walk order (a folder's files, then its sorted
    subfolders), never installed packages or caches, skips files that are not UTF-8, and stops
    at the first file that brings it to STDLIB_MAX_BYTES characters."""
    root = tmp_path / "lib"
    for rel, text in {"b.py": "bb", "a.py": "a", "z/c.py": "ccc", "m/d.py": "dddd", "notes.txt": "no",
                      "site-packages/s.py": "s", "dist-packages/t.py": "t", "__pycache__/u.py": "u",
                      "m/site-packages/v.py": "v"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "bad.py").write_bytes(b"\xff\xfe")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    assert data.load_documents("stdlib") == ["a", "bb", "dddd", "ccc"]
    monkeypatch.setattr(data, "STDLIB_MAX_BYTES", 3)                 # "a" + "bb" reach it exactly
    assert data.load_documents("stdlib") == ["a", "bb"]
    monkeypatch.setattr(data, "STDLIB_MAX_BYTES", 4)
    assert data.load_documents("stdlib") == ["a", "bb", "dddd"]


def test_jsonl_rows_that_are_not_text_are_named(tmp_path):
    j = tmp_path / "rows.jsonl"
    for body, msg in (('{"text": "a"}\n5\n', r"rows.jsonl:2: no field 'text' \(found int\)"),
                      ('{"text": ["a", "b"]}\n', r"rows.jsonl:1: field 'text' is a list, expected a string"),
                      ('{"text": null}\n', r"rows.jsonl:1: field 'text' is a NoneType")):
        j.write_text(body, encoding="utf-8")
        with pytest.raises(UserError, match=msg):
            load_text(j)
    j.write_bytes(b'{"text": "caf\xe9"}\n')                           # Latin-1, not UTF-8
    with pytest.raises(UserError, match="rows.jsonl: not UTF-8 text"):
        load_text(j)


def test_a_blank_document_beside_others_is_not_an_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("text", encoding="utf-8")
    assert data.load_documents(tmp_path) == ["  \n", "text"]


def test_the_documents_hash_tells_where_documents_end():
    assert data.documents_hash(["ab", "c"]) != data.documents_hash(["a", "bc"])
    assert data.documents_hash(["ab", ""]) != data.documents_hash(["ab"])
    assert data.documents_hash(["ab", "c"]) == data.documents_hash(["ab", "c"])


def test_the_val_split_is_the_rounded_fraction(tmp_path):
    """val is round(n * val_fraction) tokens, the last ones; train the rest; meta records both."""
    tok = CharTokenizer()
    src = tmp_path / "t.txt"
    src.write_text("abcdefghijklmnopq", encoding="utf-8")                # 17 tokens
    for fraction, n_val in ((0.1, 2), (0.25, 4), (0.5, 8), (0.0, 0)):    # 1.7, 4.25, 8.5, 0
        td = prepare_tokens(str(src), tok, tmp_path / "c", val_fraction=fraction)
        assert len(td.val) == n_val and len(td.train) == 17 - n_val, fraction
        assert td.val.tolist() == [60_000 + ord(c) for c in "abcdefghijklmnopq"[17 - n_val:]]
        assert td.tokens.tolist() == td.train.tolist() + td.val.tolist()
        assert td.meta["split"] == 17 - n_val and td.meta["val_fraction"] == fraction
    src.write_text("abcdefghijklmno", encoding="utf-8")                  # 15 tokens: 1.5 -> 2 (13.5 would be 14)
    td = prepare_tokens(str(src), tok, tmp_path / "c", val_fraction=0.1)
    assert len(td.val) == 2 and len(td.train) == 13
    # another fraction with the same split is still recorded as the one asked for
    td = prepare_tokens(str(src), tok, tmp_path / "c", val_fraction=0.12)   # 1.8 -> 2
    assert td.meta["split"] == 13 and td.meta["val_fraction"] == 0.12
    assert json.loads((tmp_path / "c" / "tokens.json").read_text())["val_fraction"] == 0.12


def test_the_cache_is_rebuilt_for_another_tokenizer_of_the_same_size(tmp_path, tok):
    """Same vocabulary size, other merges: the cached ids are not its ids."""
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    other = BPETokenizer.train("delta gamma beta alpha " * 50 + load_text("pydoc")[:20_000], tok.vocab_size)
    assert other.vocab_size == tok.vocab_size and other.hash != tok.hash
    prepare_tokens(str(src), tok, cache)
    td = prepare_tokens(str(src), other, cache)
    assert np.concatenate([td.train, td.val]).tolist() == other.encode(src.read_text())
    assert td.meta["tokenizer_hash"] == other.hash


def test_the_cache_is_rebuilt_when_its_meta_or_file_do_not_add_up(tmp_path, tok):
    """A meta file without a token count or that is no JSON object, or a tokens.bin longer than the
    count says, is rebuilt."""
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    want = tok.encode(src.read_text())
    prepare_tokens(str(src), tok, cache)
    meta = json.loads((cache / "tokens.json").read_text())
    del meta["n_tokens"]
    (cache / "tokens.json").write_text(json.dumps(meta))
    td = prepare_tokens(str(src), tok, cache)
    assert np.concatenate([td.train, td.val]).tolist() == want
    for damaged in ("[1, 2]", "null", '"tokens"'):                        # JSON, but not an object
        (cache / "tokens.json").write_text(damaged)
        td = prepare_tokens(str(src), tok, cache)
        assert np.concatenate([td.train, td.val]).tolist() == want and td.meta["n_tokens"] == len(want)
    with open(cache / "tokens.bin", "ab") as f:                         # two stray tokens at the end
        f.write(np.array([1, 2], dtype=np.uint16).tobytes())
    td = prepare_tokens(str(src), tok, cache)
    assert np.concatenate([td.train, td.val]).tolist() == want
    assert (cache / "tokens.bin").stat().st_size == 2 * len(want)


def test_meta_records_the_corpus(tmp_path, tok):
    """documents: how many; joined_hash: sha256 of the documents joined with <|endoftext|> (how a
    corpus was named before documents were hashed apart)."""
    import hashlib

    src = tmp_path / "d.txt"
    src.write_text(f"one{EOT}two{EOT}three", encoding="utf-8")
    meta = prepare_tokens(str(src), tok, tmp_path / "c", val_fraction=0.0).meta
    assert meta["documents"] == 3 and meta["chars"] == len("onetwothree")
    assert meta["joined_hash"] == hashlib.sha256(f"one{EOT}two{EOT}three".encode()).hexdigest()


def test_a_corpus_that_tokenises_to_nothing_is_named(tmp_path):
    class Silent(CharTokenizer):
        def encode_batch(self, texts, allowed_special="none_raise"):
            return [[] for _ in texts]

    (tmp_path / "t.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(UserError, match="tokenised to zero tokens"):
        prepare_tokens(str(tmp_path / "t.txt"), Silent(), tmp_path / "c")


def test_batches_need_a_block_and_are_int64_from_any_tensor():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(UserError, match="block_size must be >= 1"):
        get_batch(tokens, 2, 0, torch.Generator())
    for dtype in (torch.int32, torch.uint8, torch.int16):
        x, y = get_batch(torch.arange(10, dtype=dtype), 3, 4, torch.Generator().manual_seed(0))
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


# -- mutation pass: the streaming reader, the token file, the cache ---------------------------------
def test_a_bad_byte_after_a_letter_split_between_pieces_is_named_where_it_is(tmp_path, monkeypatch):
    """A letter's first byte read at a piece's end waits for the next piece: a bad byte in that
    next piece is still counted from the file's start (the waiting byte is not counted twice)."""
    monkeypatch.setattr(data, "READ_CHARS", 3)
    path = tmp_path / "t.txt"
    for raw, bad in ((b"ab\xc3(", 2),                 # "\xc3" waits; "(" cannot follow it: the letter at 2
                     (b"a\xc3\xa9\xff", 3),           # "é" split 1 | 2; 0xff is byte 3
                     (b"ab\xc3\xa9\xa9x", 4)):        # "é" split 2 | 3; a stray continuation byte at 4
        path.write_bytes(raw)
        with pytest.raises(UserError, match=rf"t.txt: not UTF-8 text \(byte {bad}: "):
            load_text(path)
    monkeypatch.setattr(data, "READ_CHARS", 1000)
    path.write_bytes(b"a" + "é".encode() * 2500 + b"ok\xff")  # 5003 good bytes; letters straddle every 1000
    with pytest.raises(UserError, match=r"t.txt: not UTF-8 text \(byte 5003: invalid start byte\)"):
        load_text(path)
    # past the reader's own buffer (8 KB): its error counts from that buffer, the byte named from the file
    path.write_bytes(b"a" * 99_999 + "é".encode() + b"\xff")
    with pytest.raises(UserError, match=r"t.txt: not UTF-8 text \(byte 100001: invalid start byte\)"):
        load_text(path)


def test_a_letter_cut_off_at_the_end_of_the_file_is_named_at_its_first_byte(tmp_path, monkeypatch):
    """A file ending part-way through a letter: the byte named is that letter's first, inside
    the file (it was the file's length, a byte past its end)."""
    path = tmp_path / "t.txt"
    for piece in (3, 4, 2**22):
        monkeypatch.setattr(data, "READ_CHARS", piece)
        for raw, bad in ((b"ok\xc3", 2), (b"abc\xe6\x97", 3), (b"\xe6", 0)):
            path.write_bytes(raw)
            with pytest.raises(UserError, match=rf"t.txt: not UTF-8 text \(byte {bad}: unexpected end of data\)"):
                load_text(path)


def test_meta_counts_characters_not_bytes(tmp_path):
    """chars is the corpus's characters (as len(str)): é and 猫 are one each, not their UTF-8 bytes."""
    src = tmp_path / "d.txt"
    src.write_text(f"café{EOT}猫猫", encoding="utf-8")
    meta = prepare_tokens(str(src), CharTokenizer(), tmp_path / "c", val_fraction=0.0).meta
    assert meta["chars"] == 6 and meta["documents"] == 2


def test_the_documents_hash_is_not_the_joined_texts():
    """One document holding the marker's spelling and two documents around it are other corpora."""
    assert data.documents_hash([f"a{EOT}b"]) != data.documents_hash(["a", "b"])
    stats = data.CorpusStats()
    for d in ("a", "b"):
        stats.add(d)
    assert stats.source_hash == data.documents_hash(["a", "b"]) != stats.joined_hash


def test_a_token_file_is_split_at_the_rounded_fraction(tmp_path):
    """As a text corpus: the last round(n * val_fraction) ids are val (17 x 0.1 = 1.7: 2, not 1)."""
    path = tmp_path / "train.bin"
    np.arange(17, dtype=np.uint16).tofile(path)
    tok = CharTokenizer()
    tok.vocab_size = 2**16   # every uint16 id is one of its ids (a 65,536-id tokenizer still fits uint16)
    for fraction, n_val in ((0.1, 2), (0.25, 4), (0.5, 8), (0.0, 0)):
        td = prepare_tokens(str(path), tok, tmp_path / "c", val_fraction=fraction)
        assert td.val.tolist() == list(range(17 - n_val, 17)) and td.train.tolist() == list(range(17 - n_val))
        assert td.meta["split"] == 17 - n_val and td.meta["val_fraction"] == fraction


def test_a_token_files_hash_is_kept_while_its_size_and_time_stand(tmp_path, tok, monkeypatch):
    """The hash and largest id of a token file are kept beside its size, modification time and a
    sample of its bytes: a later start with all unchanged takes them without reading the ids (as
    for text); a file changed since, even at its size with its time put back, is read again, and
    checked again; a record from before the sample is taken on size and time, and given the sample;
    an unwritable cache only costs the next start its pass."""
    import hashlib
    import json
    import os

    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    ids = np.random.default_rng(4).integers(0, tok.vocab_size, size=777).astype(np.uint16)
    path = tmp_path / "train.bin"
    ids.tofile(path)
    real = hashlib.sha256(ids.tobytes()).hexdigest()
    assert prepare_tokens(str(path), tok, val_fraction=0.1).meta["source_hash"] == real
    records = list((tmp_path / "cache" / "ids").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    st = path.stat()
    sample = hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()  # a small file: all of it
    assert record == {"stat": [str(path.resolve()), st.st_size, st.st_mtime_ns, sample], "sha256": real,
                      "max_id": int(ids.max())}
    for broken in (dict(record, max_id=None), dict(record, sha256=None)):  # not a record's shape: read again
        records[0].write_text(json.dumps(broken))
        assert prepare_tokens(str(path), tok, val_fraction=0.1).meta["source_hash"] == real
        assert json.loads(records[0].read_text()) == record
    # a record from before the sample ([path, size, time]): trusted while those stand, and given the sample
    records[0].write_text(json.dumps(dict(record, stat=record["stat"][:3], sha256="e" * 64)))
    assert prepare_tokens(str(path), tok, val_fraction=0.1).meta["source_hash"] == "e" * 64
    assert json.loads(records[0].read_text()) == dict(record, sha256="e" * 64)
    records[0].write_text(json.dumps(dict(record, sha256="f" * 64)))  # trusted while the stat stands
    assert prepare_tokens(str(path), tok, val_fraction=0.1).meta["source_hash"] == "f" * 64
    ids[5] = tok.vocab_size  # same size, its time put back (touch -r): read, hashed and checked again
    ids.tofile(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(UserError, match=rf"token id {tok.vocab_size} is past"):
        prepare_tokens(str(path), tok)
    assert json.loads(records[0].read_text())["max_id"] == tok.vocab_size  # the refusal is kept too
    with pytest.raises(UserError, match=rf"token id {tok.vocab_size} is past"):
        prepare_tokens(str(path), tok)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later time: read again
    with pytest.raises(UserError, match=rf"token id {tok.vocab_size} is past"):
        prepare_tokens(str(path), tok)
    ids[5] = 1
    ids.tofile(path)
    (tmp_path / "blocked").write_text("a file where the cache's folder would be")
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "blocked"))
    assert prepare_tokens(str(path), tok).meta["source_hash"] == hashlib.sha256(ids.tobytes()).hexdigest()
    # shards: each keeps its own record, and the folder's hash is made of theirs
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "shards").mkdir()
    for name in ("data_train_000000.npy", "data_train_000001.npy", "data_val_000000.npy"):
        np.save(tmp_path / "shards" / name, ids[:100 + len(name)])
    first = prepare_tokens(str(tmp_path / "shards"), tok).meta["source_hash"]
    assert len(list((tmp_path / "cache2" / "ids").glob("*.json"))) == 3
    assert prepare_tokens(str(tmp_path / "shards"), tok).meta["source_hash"] == first


def test_each_eot_opens_a_document():
    from tritongpt.train.data import document_ids

    x = torch.tensor([[9, 1, 2, 9, 9, 3], [1, 2, 3, 4, 5, 9]])
    assert document_ids(x, 9).tolist() == [[1, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 1]]


def test_a_token_file_is_read_whole_across_its_pieces(tmp_path, tok):
    """A file over one 2**25-id piece: its hash is that of all its bytes, and an id past the
    tokenizer's is found in any piece: the first's first and last ids, and the last piece's."""
    import hashlib

    path = tmp_path / "train.bin"
    ids = np.full(2**25 + 50, 5, dtype=np.uint16)
    ids[2**25 - 1] = 7
    ids.tofile(path)
    td = prepare_tokens(str(path), tok, val_fraction=0.0)
    assert td.meta["n_tokens"] == 2**25 + 50 and td.meta["source_hash"] == hashlib.sha256(ids.tobytes()).hexdigest()
    for where in (2**25 - 1, 0, 2**25 + 47):
        ids[:] = 5
        ids[where] = tok.vocab_size
        ids.tofile(path)
        with pytest.raises(UserError, match=rf"train.bin: token id {tok.vocab_size} is past"):
            prepare_tokens(str(path), tok)


def test_the_cache_is_rebuilt_when_its_token_file_is_gone_or_its_meta_is_not_text(tmp_path, tok):
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    want = tok.encode(src.read_text())
    prepare_tokens(str(src), tok, cache)
    (cache / "tokens.bin").unlink()                                      # meta left, tokens gone
    td = prepare_tokens(str(src), tok, cache)
    assert np.concatenate([td.train, td.val]).tolist() == want
    (cache / "tokens.json").write_bytes(b"\xff\xfe{")                    # meta that is not UTF-8
    td = prepare_tokens(str(src), tok, cache)
    assert np.concatenate([td.train, td.val]).tolist() == want
    assert json.loads((cache / "tokens.json").read_text())["n_tokens"] == len(want)


def test_a_token_file_under_home_is_read_in_place(tmp_path, tok, monkeypatch):
    """~ in a .bin path is the home folder, as for text sources (not text to read)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "train.bin")
    td = prepare_tokens("~/train.bin", tok, tmp_path / "cache", val_fraction=0.0)
    assert td.path == tmp_path / "train.bin" and td.train.tolist() == list(range(20))


def test_the_default_cache_folder_is_named_by_the_source_and_the_tokenizer(tmp_path, tok, monkeypatch):
    """Two tokenizers on one source each keep their own cache: switching back re-tokenises nothing."""
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    writes = []
    real_write = data._write_tokens
    monkeypatch.setattr(data, "_write_tokens", lambda *a: writes.append(1) or real_write(*a))
    src = tmp_path / "corpus.txt"
    src.write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    a = prepare_tokens(str(src), tok)
    b = prepare_tokens(str(src), CharTokenizer())
    assert prepare_tokens(str(src), tok).path == a.path != b.path and len(writes) == 2
    assert a.path.parent.parent == tmp_path / "cache" / "tokens"


def test_a_corpus_of_blank_documents_is_empty_to_tokenise(tmp_path, tok):
    """prepare_tokens refuses a corpus whose documents are all whitespace, and only that: a blank
    document before or after a real one is a document."""
    src = tmp_path / "t.txt"
    for text in ("  \n", f" {EOT}\n{EOT}\t"):
        src.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=r"t.txt: the corpus is empty"):
            prepare_tokens(str(src), tok, tmp_path / "c")
    for text in (f"words{EOT}  \n", f"  {EOT}words"):
        src.write_text(text, encoding="utf-8")
        assert prepare_tokens(str(src), tok, tmp_path / "c").meta["documents"] == 2


def test_a_source_unchanged_on_disk_is_not_read_again(tmp_path, tok, monkeypatch):
    """A start whose text source has the files, sizes and modification times its cache recorded
    reads none of it (a 10 GB corpus was read and hashed in full at every start, by every DDP
    rank); any file grown, touched, added or renamed, or another .jsonl field, is read and
    named again, and so is an edit that keeps the size and puts the time back (`touch -r`): the
    record holds a sample of each file's bytes (a small file's all). A cache from before the record
    is read once, then recorded."""
    import os

    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    reads = []
    real = data.iter_documents
    monkeypatch.setattr(data, "iter_documents", lambda *a, **k: reads.append(1) or real(*a, **k))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    (folder / "b.txt").write_text("one two three four " * 20, encoding="utf-8")

    def prepared(cache=None, source=str(folder), **kw):
        reads.clear()
        td = prepare_tokens(source, tok, cache, **kw)
        return td, len(reads)

    for cache in (None, tmp_path / "mine"):
        first, n = prepared(cache)
        assert n == 2                                                      # named, then tokenised
        again, n = prepared(cache, val_fraction=0.3)
        assert n == 0 and again.path == first.path and again.meta["source_hash"] == first.meta["source_hash"]
        assert again.tokens.tolist() == first.tokens.tolist() and len(again.val) == round(len(first.tokens) * 0.3)
    a = folder / "a.txt"
    when = a.stat().st_mtime_ns
    for change in (lambda: a.write_text("alpha beta gamma delta " * 21, encoding="utf-8"),   # grown
                   lambda: os.utime(a, ns=(when, when + 10**9)),                             # touched
                   lambda: (folder / "c.txt").write_text("more", encoding="utf-8"),         # added
                   lambda: (folder / "c.txt").rename(folder / "d.txt")):                    # renamed
        change()
        assert prepared()[1] >= 1
        assert prepared()[1] == 0
    st = a.stat()                                                          # grown, its time put back
    a.write_text(a.read_text() + "epsilon", encoding="utf-8")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepared()[1] >= 1
    # the same files named another way: relative to the working folder, or under ~
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert prepared(source="texts")[1] == prepared(source="~/texts")[1] == 0
    # the same size and time back on other text (`touch -r`): its sample differs, so it is read again and its new
    # tokens used, not the old ones
    st = a.stat()
    a.write_text("ALPHA" + a.read_text()[5:], encoding="utf-8")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    td, n = prepared()
    assert n >= 1 and td.tokens.tolist()[:len(tok.encode("ALPHA"))] == tok.encode("ALPHA")
    assert prepared()[1] == 0
    # a .jsonl's other field is another source
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "alpha beta gamma", "body": "one two three"}\n' * 30, encoding="utf-8")
    for field in ("text", "body"):
        assert prepared(source={"source": str(rows), "text_field": field})[1] == 2
    td, n = prepared(source={"source": str(rows), "text_field": "text"})
    assert n == 0 and td.tokens.tolist() == tok.encode(("alpha beta gamma<|endoftext|>" * 30)[:-13],
                                                       allowed_special="all")
    # a cache made before sources were recorded: read once more, then recorded
    meta_path = td.path.parent / "tokens.json"
    meta = json.loads(meta_path.read_text())
    del meta["source_stat"]
    meta_path.write_text(json.dumps(meta))
    assert prepared(source={"source": str(rows), "text_field": "text"})[1] == 1   # named; its tokens reused
    assert prepared(source={"source": str(rows), "text_field": "text"})[1] == 0


def test_a_cache_keyed_before_the_sample_is_reused_and_given_it(tmp_path, tok, monkeypatch):
    """A cache whose record holds each file's [path, size, time] alone (written before the sample was kept) is
    reused while those stand, reading no text, and its record gains the sample; a same-size edit with the time
    put back is then seen."""
    import os

    (tmp_path / "texts").mkdir()
    a, b = tmp_path / "texts" / "a.txt", tmp_path / "texts" / "b.txt"
    a.write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    b.write_text("one two three four " * 20, encoding="utf-8")
    first = prepare_tokens(str(tmp_path / "texts"), tok, tmp_path / "c")
    meta_path = tmp_path / "c" / "tokens.json"
    meta = json.loads(meta_path.read_text())
    new = meta["source_stat"]
    assert [len(f) for f in new["files"]] == [4, 4]
    meta_path.write_text(json.dumps(dict(meta, source_stat=dict(new, files=[f[:3] for f in new["files"]]))))
    real, reads = data.iter_documents, []
    monkeypatch.setattr(data, "iter_documents", lambda *a, **k: reads.append(1) or real(*a, **k))
    monkeypatch.setattr(data, "_write_tokens", lambda *a: pytest.fail("an old-format cache was tokenised again"))
    td = prepare_tokens(str(tmp_path / "texts"), tok, tmp_path / "c")
    assert reads == [] and td.tokens.tolist() == first.tokens.tolist()
    assert json.loads(meta_path.read_text())["source_stat"] == new
    # an old record with another size is not taken
    meta_path.write_text(json.dumps(dict(meta, source_stat=dict(new, files=[[f[0], f[1] + 1, f[2]] for f in
                                                                            new["files"]]))))
    assert prepare_tokens(str(tmp_path / "texts"), tok, tmp_path / "c").tokens.tolist() == first.tokens.tolist()
    assert reads == [1]  # named (the same text: its tokens reused), then keyed again
    assert json.loads(meta_path.read_text())["source_stat"] == new
    monkeypatch.undo()
    st = a.stat()
    a.write_text("ALPHA" + a.read_text()[5:], encoding="utf-8")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepare_tokens(str(tmp_path / "texts"), tok, tmp_path / "c").tokens.tolist()[:len(tok.encode("ALPHA"))] \
        == tok.encode("ALPHA")


def test_an_unwritable_cache_keyed_before_the_sample_is_still_reused(tmp_path, tok):
    """A cache whose record predates the sample, in a folder this start cannot write (a shared cache mounted
    read-only), is reused as it was before the sample was kept: its record is not rewritten, and no error (the
    record's upgrade was a write where a start reusing it wrote nothing)."""
    import os

    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 20, encoding="utf-8")
    first = prepare_tokens(str(tmp_path / "a.txt"), tok, tmp_path / "c")
    meta_path = tmp_path / "c" / "tokens.json"
    meta = json.loads(meta_path.read_text())
    old = dict(meta, source_stat=dict(meta["source_stat"], files=[f[:3] for f in meta["source_stat"]["files"]]))
    meta_path.write_text(json.dumps(old))
    # (root writes past a folder's permissions: the temporary file's name taken by a folder fails the write alike)
    (tmp_path / "c" / f".tokens.json.{os.getpid()}.tmp").mkdir()
    assert prepare_tokens(str(tmp_path / "a.txt"), tok, tmp_path / "c").tokens.tolist() == first.tokens.tolist()
    assert json.loads(meta_path.read_text()) == old
    with pytest.raises(OSError):  # another split is a new record: not written, said
        prepare_tokens(str(tmp_path / "a.txt"), tok, tmp_path / "c", val_fraction=0.5)


def test_quick_stat_samples_at_most_64_kib_from_first_block_to_last(tmp_path, monkeypatch):
    """quick_stat hashes a file of up to SAMPLE_BLOCKS blocks whole, and of a larger one SAMPLE_BLOCKS blocks
    spread from its first byte to its last: an edit in one is seen; one between them is not (the README says so)."""
    block, blocks = data.SAMPLE_BLOCK, data.SAMPLE_BLOCKS
    assert (block, blocks) == (4096, 16)  # (the README's "16 blocks of 4 KiB", at most 64 KiB read a file)
    path = tmp_path / "big.txt"
    size = block * blocks * 3 + 12345
    content = bytearray(np.random.default_rng(5).integers(0, 256, size=size, dtype=np.uint8).tobytes())
    path.write_bytes(content)
    before = data.quick_stat(path)
    assert before[:3] == [str(path), size, path.stat().st_mtime_ns]
    reads = []
    real_open = open

    class Counted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, at):
            return self.f.seek(at)

        def read(self, n=-1):
            got = self.f.read(n)
            reads.append(len(got))
            return got

    # _sample_hash's open, found in the module's globals before the builtins
    monkeypatch.setattr(data, "open", lambda *a, **k: Counted(real_open(*a, **k)), raising=False)
    assert data.quick_stat(path) == before
    monkeypatch.undo()
    assert sum(reads) == block * blocks and len(reads) == blocks
    seventh = (size - block) * 7 // (blocks - 1)
    for at, seen in ((0, True), (size - 1, True), (seventh + 5, True), (block + 3, False)):
        edited = bytearray(content)
        edited[at] ^= 0xFF
        path.write_bytes(edited)
        assert (data.quick_stat(path)[3] != before[3]) == seen, at
    small = tmp_path / "small.txt"  # up to blocks * block bytes: all of it
    small.write_bytes(bytes(content[:block * blocks]))
    first = data.quick_stat(small)[3]
    small.write_bytes(bytes(content[:block * blocks - 1]) + bytes([content[block * blocks - 1] ^ 1]))
    assert data.quick_stat(small)[3] != first


# -- token shards: build-nanogpt's .npy, llm.c's .bin ---------------------------------------------------
def _llmc_shard(path, ids, version=1, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (data.LLMC_MAGIC, version, len(ids) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(ids, dtype="<u2").tobytes())


def _shards(a):
    """The memmaps a split reads: a ShardedTokens' shards, or the array itself."""
    return list(a.shards) if isinstance(a, data.ShardedTokens) else [a]


def test_sharded_tokens_read_as_their_concatenation():
    """Indexing across shard ends, views of views, and copies give what the joined array gives."""
    rng = np.random.default_rng(7)
    shards = [rng.integers(0, 500, size=n).astype(np.uint16) for n in (5, 1, 13, 8)]
    joined = np.concatenate(shards)
    a = data.ShardedTokens(shards)
    assert len(a) == 27 and np.array_equal(np.asarray(a), joined) and a.astype(np.int64).dtype == np.int64
    idx = rng.integers(0, 27, size=(6, 9))
    assert np.array_equal(a[idx], joined[idx])
    for b, e in ((0, 27), (3, 20), (5, 6), (6, 19), (26, 27), (9, 9), (20, 99)):
        view = a[b:e]
        assert np.array_equal(np.asarray(view), joined[b:e]), (b, e)
        if len(view) > 2:
            assert np.array_equal(view[np.array([0, len(view) - 1])], joined[b:e][[0, -1]])
            assert np.array_equal(np.asarray(view[1:-1]), joined[b:e][1:-1])
    with pytest.raises(IndexError):
        a[3:10][np.array([7])]
    windows, want = get_batch(a, 4, 6, torch.Generator().manual_seed(1)), get_batch(joined, 4, 6,
                                                                                     torch.Generator().manual_seed(1))
    assert all(torch.equal(w, v) for w, v in zip(windows, want))


def test_a_folder_of_token_shards_is_its_train_and_val_shards(tmp_path, tok, capsys):
    """build-nanogpt's .npy shards (and llm.c's .bin ones, header and all): the shards named val are
    the validation split, the rest train, in name order, each read in place; without a val shard
    the tail is held out; one shard alone is read as a .bin is."""
    rng = np.random.default_rng(8)
    ids = {name: rng.integers(0, tok.vocab_size, size=n).astype(np.uint16)
           for name, n in (("edu_train_000001", 300), ("edu_train_000002", 41), ("edu_val_000000", 120))}
    folder = tmp_path / "edu_fineweb10B"
    folder.mkdir()
    for name, a in ids.items():
        np.save(folder / f"{name}.npy", a)
    (folder / "notes.txt").write_text("how the shards were made")
    td = prepare_tokens(str(folder), tok, tmp_path / "cache")
    assert "reading its token shards; its .txt files are not read" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # read in place
    assert all(isinstance(s, np.memmap) for s in _shards(td.train) + _shards(td.val))  # each memmapped, none copied
    train = np.concatenate([ids["edu_train_000001"], ids["edu_train_000002"]])
    assert np.array_equal(np.asarray(td.train), train) and np.array_equal(np.asarray(td.val), ids["edu_val_000000"])
    assert td.meta["n_tokens"] == 461 and td.meta["split"] == 341
    assert np.array_equal(np.asarray(td.head(400)), np.concatenate([train, ids["edu_val_000000"][:59]]))
    assert td.tokens is None  # two arrays, as nanoGPT's train.bin and val.bin: eval scores the val shards
    # as a nanoGPT folder: to a tokenizer trainer a folder with .txt files is still those files
    assert load_text(str(folder)) == "how the shards were made"
    # the same ids as llm.c shards: the same splits and the same hash (the ids are hashed, not the header)
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    for name, a in ids.items():
        _llmc_shard(llmc / f"{name}.bin", a)
    again = prepare_tokens(str(llmc), tok)
    assert np.array_equal(np.asarray(again.train), train) and again.meta["source_hash"] == td.meta["source_hash"]
    # no val shard: the last --val-fraction of the training shards
    (folder / "edu_val_000000.npy").unlink()
    td = prepare_tokens(str(folder), tok, val_fraction=0.25)
    assert len(td.train) == 256 and np.array_equal(np.asarray(td.val), train[256:])
    # td.tokens: train then val as one array, the run's own split found in it by eval (a val
    # shard folder has none: the val shards are its held-out split whatever the run's fraction)
    assert np.array_equal(np.asarray(td.tokens), train)
    # one llm.c shard alone: its ids, not its header
    one = prepare_tokens(str(llmc / "edu_train_000002.bin"), tok, val_fraction=0.0)
    assert np.array_equal(np.asarray(one.train), ids["edu_train_000002"])
    with pytest.raises(UserError, match="holds token ids .token shards., not text"):
        load_text(str(llmc))


def test_token_shards_that_would_be_read_wrongly_are_refused(tmp_path, tok):
    folder = tmp_path / "shards"
    folder.mkdir()
    good = np.arange(1, 50, dtype=np.uint16)
    np.save(folder / "a_train_0.npy", good)
    np.save(folder / "a_val_0.npy", good)
    with pytest.raises(UserError, match="has its own validation shards .a_val_0.npy.: --val-fraction does not apply"):
        prepare_tokens(str(folder), tok, val_fraction=0.1)
    for bad, said in ((good.astype(np.int64), "must be a non-empty 1-D uint16 array .* got int64 of shape"),
                      (good.reshape(7, 7), r"got uint16 of shape \(7, 7\)"),
                      (good[:0], r"must be a non-empty 1-D uint16 array .* got uint16 of shape \(0,\)"),
                      (np.array([3, tok.vocab_size], dtype=np.uint16), f"token id {tok.vocab_size} is past")):
        np.save(folder / "a_train_0.npy", bad)
        with pytest.raises(UserError, match=said):
            prepare_tokens(str(folder), tok)
    (folder / "a_train_0.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="a_train_0.npy: not a readable .npy array"):
        prepare_tokens(str(folder), tok)
    (folder / "a_train_0.npy").unlink()
    with pytest.raises(UserError, match="every token shard is a validation one .a_val_0.npy.: no training shard"):
        prepare_tokens(str(folder), tok)
    # the header alone (1024 bytes, counting 0 tokens) is an llm.c shard with no tokens, not 512 bare ids
    for ids, version, count, extra in ((good, 2, 49, 0), (good, 1, 50, 0), (good, 1, 49, 1), (good[:0], 1, 0, 0)):
        path = tmp_path / "x_train.bin"
        _llmc_shard(path, ids, version=version, count=count)
        if extra:
            path.write_bytes(path.read_bytes() + b"\x00\x00")
        with pytest.raises(UserError, match=rf"an llm.c token shard \(magic 20240520\) whose header says version "
                                            rf"{version} and {count} tokens"):
            prepare_tokens(str(path), tok)


def test_sharded_tokens_refuse_what_they_would_read_wrongly():
    """A slice with a step, and an index out of a view (a negative one included: numpy counts it
    from the end; here it would read the tokens before the view) are refused, not answered; a
    slice that ends before it starts is empty, as numpy's is."""
    rng = np.random.default_rng()
    shards = [rng.integers(1, 500, size=n).astype(np.uint16) for n in (4, 9, 6)]
    a = data.ShardedTokens(shards)
    for b, e in ((10, 5), (19, 0), (7, 6)):
        assert len(a[b:e]) == 0 and np.asarray(a[b:e]).size == 0, (b, e)
    for step in (2, -1):
        with pytest.raises(ValueError, match="step 1 only"):
            a[::step]
    view = a[3:15]
    # no index, no tokens; and the tokens' own dtype (get_batch widens each window once)
    assert view[np.array([], dtype=np.int64)].shape == (0,) and view[np.array([[0, 11]])].dtype == np.uint16
    for bad in ([-1], [0, -3], [12], [11, 12]):
        with pytest.raises(IndexError, match=r"token index out of range \[0, 12\)"):
            view[np.array(bad)]


def test_token_shards_are_named_by_every_shard_and_read_in_name_order(tmp_path, tok):
    """The folder's name (source_hash) covers each shard's name and ids, val shards included: a
    val shard changed, or a shard renamed from train to val (other splits of the same ids), is
    other data. The val shards are read in name order too; "val" is a word of the name, in any
    case; without val shards the default holds out the rounded last tenth."""
    rng = np.random.default_rng()
    folder = tmp_path / "shards"
    folder.mkdir()
    ids = {name: rng.integers(1, tok.vocab_size, size=n).astype(np.uint16)
           for name, n in (("interval_train_000000", 300), ("survival_000001", 47), ("TS_VAL_000001", 30),
                           ("ts_val_000002", 20), ("ts_val_000004", 60))}
    for name, a in ids.items():
        np.save(folder / f"{name}.npy", a)
    td = prepare_tokens(str(folder), tok)
    train = np.concatenate([ids["interval_train_000000"], ids["survival_000001"]])
    assert np.array_equal(np.asarray(td.train), train)  # "val" inside a word is no val shard
    assert np.array_equal(np.asarray(td.val), np.concatenate([ids[k] for k in ("TS_VAL_000001", "ts_val_000002",
                                                                               "ts_val_000004")]))
    first = td.meta["source_hash"]
    changed = ids["ts_val_000004"].copy()
    changed[7] = changed[7] % (tok.vocab_size - 1) + 1  # another id, still the tokenizer's
    np.save(folder / "ts_val_000004.npy", changed)
    assert prepare_tokens(str(folder), tok).meta["source_hash"] != first
    np.save(folder / "ts_val_000004.npy", ids["ts_val_000004"])
    assert prepare_tokens(str(folder), tok).meta["source_hash"] == first
    # the same ids, in the same name order, now validation
    (folder / "survival_000001.npy").rename(folder / "survival_val_000001.npy")
    moved = prepare_tokens(str(folder), tok)
    assert len(moved.train) == 300 and moved.meta["source_hash"] != first
    # no val shard: the default tail is round(347 * 0.1) = 35 ids (34.7), as a token file's
    for p in folder.glob("*_[vV][aA][lL]_*"):
        p.unlink()
    np.save(folder / "survival_000001.npy", ids["survival_000001"])
    td = prepare_tokens(str(folder), tok)
    assert len(td.train) == 312 and np.array_equal(np.asarray(td.val), train[312:])
    assert td.meta["split"] == 312


def test_validation_shards_may_spell_it_out(tmp_path, tok):
    """"val", "valid" or "validation" as a word of a shard's name marks a validation shard (a
    "fineweb_validation_000000.npy" read as training would be trained on, and its tail held out);
    within a word ("valley", "intervals") it marks none."""
    rng = np.random.default_rng()
    folder = tmp_path / "shards"
    folder.mkdir()
    names = ("fineweb_train_000000", "valley_000001", "intervals_000002", "fineweb_val_000003",
             "fineweb_valid_000004", "fineweb_validation_000005", "Validation-000006")
    ids = {name: rng.integers(1, tok.vocab_size, size=rng.integers(20, 60)).astype(np.uint16) for name in names}
    for name, a in ids.items():
        np.save(folder / f"{name}.npy", a)
    td = prepare_tokens(str(folder), tok)
    want_val = ["Validation-000006", "fineweb_val_000003", "fineweb_valid_000004", "fineweb_validation_000005"]
    assert np.array_equal(np.asarray(td.val), np.concatenate([ids[n] for n in want_val]))
    assert np.array_equal(np.asarray(td.train), np.concatenate([ids[n] for n in sorted(set(names) - set(want_val))]))


# -- BOS before each document, for tokenizers that prepend one (Gemma's, Llama's) -----------------
@pytest.fixture(scope="module")
def bos_toks():
    """(a Llama 2-style HFTokenizer whose post-processor prepends <s>, the same tokenizer.json without
    the post-processor, the tokenizers.Tokenizer itself): the two share HFTokenizer.hash."""
    pytest.importorskip("tokenizers")
    from test_hf_tokenizer import build_tokenizer
    from tritongpt.train.hf_tokenizer import HFTokenizer

    raw = build_tokenizer("sentencepiece")
    spec = json.loads(raw.to_str())
    with_bos = HFTokenizer(spec, eos_token="</s>", bos_token="<s>", name="llama2ish")
    plain = HFTokenizer(dict(spec, post_processor=None), eos_token="</s>", bos_token="<s>", name="plain")
    assert with_bos.prepended_bos_id == 1 and plain.prepended_bos_id is None
    return with_bos, plain, raw


def _random_docs(seed, n=7):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while 42 dogs ran past naïve café it's".split()
    return [" ".join(rng.choice(words, int(rng.integers(1, 15)))) for _ in range(n)]


def test_each_document_starts_with_bos_where_the_tokenizer_prepends_one(tmp_path, bos_toks):
    """The token file is transformers' tokenizer(doc) (BOS added by the tokenizer's own pipeline) + EOS,
    document after document, the last without an EOS; the meta records the BOS. A tokenizer that
    prepends none writes each document's ids alone."""
    tok, plain, raw = bos_toks
    docs = _random_docs(np.random.SeedSequence().entropy % 2**32)
    (tmp_path / "d.txt").write_text(EOT.join(docs), encoding="utf-8")
    td = prepare_tokens(str(tmp_path / "d.txt"), tok, tmp_path / "c", val_fraction=0.0)
    want = []
    for i, d in enumerate(docs):
        want += ([tok.eot_id] if i else []) + raw.encode(d, add_special_tokens=True).ids
    assert want.count(1) == len(docs) and td.tokens.tolist() == want
    assert td.meta["bos_id"] == 1 and td.meta["n_tokens"] == len(want)
    td = prepare_tokens(str(tmp_path / "d.txt"), plain, tmp_path / "c2", val_fraction=0.0)
    assert td.meta["bos_id"] is None and 1 not in td.tokens.tolist()
    assert td.tokens.tolist() == [i for i in want if i != 1]


def test_a_cache_written_without_bos_is_rebuilt_for_a_tokenizer_that_prepends_one(tmp_path, bos_toks, monkeypatch):
    """HFTokenizer.hash leaves the post-processor out (it decides no text's ids), so a tokenizer.json
    with and without the BOS-prepending post-processor have one hash: the cache's bos_id tells them
    apart, in a given folder, found by the source's size and time, and in the default folders (each
    its own, so switching back re-tokenises nothing). A cache from before bos_id was recorded has
    none: rebuilt for the BOS tokenizer."""
    tok, plain, _ = bos_toks
    assert tok.hash == plain.hash
    writes = []
    real_write = data._write_tokens
    monkeypatch.setattr(data, "_write_tokens", lambda *a: writes.append(a[1].name) or real_write(*a))
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text(EOT.join(_random_docs(3)), encoding="utf-8")
    bos_count = src.read_text().count(EOT) + 1

    def ids(t, cache_dir=cache):
        return prepare_tokens(str(src), t, cache_dir, val_fraction=0.0).tokens.tolist()

    assert ids(plain).count(1) == 0 and ids(plain).count(1) == 0 and writes == ["plain"]
    assert ids(tok).count(1) == bos_count and writes == ["plain", "llama2ish"]   # not the cache without BOS
    assert ids(tok).count(1) == bos_count and len(writes) == 2                  # reused
    assert ids(plain).count(1) == 0 and len(writes) == 3
    # a cache from before bos_id was recorded (written without BOS): reused for the plain tokenizer only
    meta = json.loads((cache / "tokens.json").read_text())
    del meta["bos_id"]
    (cache / "tokens.json").write_text(json.dumps(meta))
    assert ids(plain).count(1) == 0 and len(writes) == 3
    assert "bos_id" not in json.loads((cache / "tokens.json").read_text())
    assert ids(tok).count(1) == bos_count and len(writes) == 4
    # the default folders, found by the source's size and time: one each
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "default"))
    writes.clear()
    for t in (tok, plain, tok, plain):
        assert ids(t, None).count(1) == (bos_count if t is tok else 0)
    assert writes == ["llama2ish", "plain"]
    folders = sorted(p.name for p in (tmp_path / "default" / "tokens").iterdir())
    assert len(folders) == 2 and sum(f.endswith("-bos1") for f in folders) == 1


def test_a_gpt2_style_token_file_is_unchanged(tmp_path, tok, monkeypatch):
    """Our BPE prepends nothing: the file's bytes are the documents' ids joined by EOS alone, as before
    BOS was written anywhere, and a cache from before bos_id was recorded is still reused."""
    docs = _random_docs(np.random.SeedSequence().entropy % 2**32)
    (tmp_path / "d.txt").write_text(EOT.join(docs), encoding="utf-8")
    td = prepare_tokens(str(tmp_path / "d.txt"), tok, tmp_path / "c")
    want = []
    for i, d in enumerate(docs):
        want += ([tok.eot_id] if i else []) + tok.encode(d)
    assert (tmp_path / "c" / "tokens.bin").read_bytes() == np.array(want, dtype=np.uint16).tobytes()
    assert td.meta["bos_id"] is None
    meta = json.loads((tmp_path / "c" / "tokens.json").read_text())
    del meta["bos_id"], meta["source_stat"]
    (tmp_path / "c" / "tokens.json").write_text(json.dumps(meta))
    monkeypatch.setattr(data, "_write_tokens", lambda *a: pytest.fail("a GPT-2-style cache was rebuilt"))
    assert prepare_tokens(str(tmp_path / "d.txt"), tok, tmp_path / "c").tokens.tolist() == want


def test_with_bos_each_document_is_bos_to_eos():
    """bos_id: the BOS opens a document (its position 0) and the EOS closes the one before, so each
    document is BOS ... EOS; a window cut mid-document starts in document 0. Without it, the EOS opens."""
    from tritongpt.train.data import document_ids

    B, E = 1, 2
    x = torch.tensor([[5, 6, E, B, 7, 8, E, B, E, B, 9],    # ... EOS | BOS doc EOS | BOS (empty) EOS | BOS 9
                      [E, B, 7, 7, 7, 7, 7, 7, 7, E, B]])   # the window opens on the EOS before a BOS
    assert document_ids(x, E, B).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]
    assert document_ids(x, E).tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]]
    # random "BOS doc EOS" files: every BOS is its document's first token, every EOS its last
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    ids = torch.randint(3, 50, (4, 64), generator=g)
    ids[torch.rand(4, 64, generator=g) < 0.1] = E
    ids[:, 1:][ids[:, :-1] == E] = B   # an EOS is followed by a BOS, as _write_tokens writes them
    ids[:, 1:][(ids[:, :-1] != E) & (ids[:, 1:] == B)] = 7
    doc = document_ids(ids, E, B)
    opens = torch.ones_like(doc, dtype=torch.bool)
    opens[:, 1:] = doc[:, 1:] != doc[:, :-1]
    assert torch.equal(opens[:, 1:], ids[:, 1:] == B)
    assert (doc[:, 1:][ids[:, :-1] == E] != doc[:, :-1][ids[:, :-1] == E]).all()


def test_check_text_field_reads_no_folder_for_a_named_corpus_or_the_default_field(tmp_path, monkeypatch):
    """No --data (the pydoc corpus) or a named one is no path: it was read as Path(''), the working directory,
    walked whole for .parquet files on every pretrain/eval/bpe start (minutes from a home folder; a FileNotFoundError
    when another process's temporary folder vanished mid-walk), and a working directory holding a .parquet file
    let --text-field pass over the pydoc corpus, ignored. The default field reads nothing at all."""
    (tmp_path / "shard.parquet").write_bytes(b"not read")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.parquet").write_bytes(b"not read")
    monkeypatch.chdir(tmp_path)
    walked = []
    real = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: walked.append(str(self)) or real(self, pattern))
    for source in (None, "", "pydoc", "stdlib", "data", str(tmp_path / "data")):
        check_text_field(source, "text")
        check_text_field(source, None)
    assert walked == []
    for source, named in ((None, "the pydoc corpus"), ("pydoc", "the pydoc corpus"), ("stdlib", "the standard library")):
        with pytest.raises(UserError, match=f"--text-field applies to .jsonl.*; {named} is read as plain text"):
            check_text_field(source, "body")
    assert walked == []
    check_text_field(str(tmp_path / "data"), "body")  # (a folder of .parquet shards: a column)
    check_text_field("data", "body")
    assert walked == [str(tmp_path / "data"), "data"]
