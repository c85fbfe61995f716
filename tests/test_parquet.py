"""Parquet data (the Hugging Face Hub's datasets): records for sft, reward, dpo and rlhf, and text for pretrain, eval
and bpe, read as the same records and documents as the .jsonl holding them."""
import json
import sys

import pytest

from tritongpt.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_both(tmp_path, name, records, **parquet):
    """records as a .jsonl and as a .parquet (one table: a column per field, null where a record has none)."""
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    columns = list(dict.fromkeys(k for r in records for k in r))  # from_pylist would take the first row's alone
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
    pq.write_table(table, tmp_path / f"{name}.parquet", **parquet)
    return jsonl, tmp_path / f"{name}.parquet"


def test_sft_records_read_alike_from_parquet(tmp_path):
    """Alpaca records (one without "input": null in the table, left out again), chats (a list of structs) and
    prompt-completion records, as Hub datasets hold them."""
    from tritongpt.train.sft import read_records

    alpaca = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
              {"instruction": "Name a colour.", "output": "Red — or ünïcode 🙂"},
              {"instruction": "Sort these.", "input": "b a c", "output": "a b c"}]
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    completions = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Water is", "completion": " wet."}]
    for name, records in (("alpaca", alpaca), ("chats", chats), ("completions", completions)):
        jsonl, parquet = write_both(tmp_path, name, records)
        assert read_records(parquet) == read_records(jsonl), name


def test_preference_pairs_read_alike_from_parquet(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's shape: a prompt string, chosen and rejected as whole chats (the
    prompt's user message and the answer; the string prompt beside them was refused before), and scores."""
    from tritongpt.train.preference import read_preference_file

    def chat(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    records = [{"prompt": q, "chosen": chat(q, good), "rejected": chat(q, bad), "score_chosen": 8.0,
                "score_rejected": 3.5} for q, good, bad in (("What is 7*6?", "42", "41"),
                                                            ("Capital of France?", "Paris.", "Lyon."),
                                                            ("Say hi.", "Hi!", "No."))]
    jsonl, parquet = write_both(tmp_path, "prefs", records)
    pairs = read_preference_file(parquet)
    assert pairs == read_preference_file(jsonl) and len(pairs) == 3 and pairs[0].format == "chat"
    assert pairs[1].prompt.messages == ({"role": "user", "content": "Capital of France?"},)
    assert (pairs[1].chosen, pairs[1].rejected) == ("Paris.", "Lyon.")
    # text pairs mixing the prompt and instruction forms: each row's null column is no field of its record
    mixed = [{"prompt": "Q: 1+1?", "chosen": "2", "rejected": "3"},
             {"instruction": "Spell cat.", "input": "", "chosen": "c-a-t", "rejected": "k-a-t"}]
    jsonl, parquet = write_both(tmp_path, "mixed", mixed)
    assert read_preference_file(parquet) == read_preference_file(jsonl)
    # the string prompt is checked against the chats it stands beside
    records[2]["prompt"] = "Say bye."
    _, parquet = write_both(tmp_path, "other", records)
    with pytest.raises(UserError, match=r"other.parquet: record 2: field 'prompt' is not the chats' last user message"):
        read_preference_file(parquet)


def test_pretraining_text_streams_from_a_parquet_column(tmp_path):
    """A batch of rows at a time across row groups, in order; --text-field names another column; a missing column
    and a null or non-string value are named with the file and row."""
    from tritongpt.train.data import check_text_field, load_documents
    from tritongpt.train.parquet import parquet_texts

    docs = [f"document {i}: " + "naïve words " * (i % 5) + "🙂" * (i % 3) for i in range(23)]
    records = [{"id": i, "text": d, "body": d.upper()} for i, d in enumerate(docs)]
    jsonl, parquet = write_both(tmp_path, "corpus", records, row_group_size=4)
    assert pq.ParquetFile(parquet).num_row_groups == 6
    assert load_documents(str(parquet)) == load_documents(str(jsonl)) == docs
    assert [v for _, v in parquet_texts(parquet, "text", batch_rows=3)] == docs
    assert load_documents(str(parquet), "body") == [d.upper() for d in docs]
    check_text_field(str(parquet), "body")  # a .parquet's column may be named
    with pytest.raises(UserError, match=r"corpus.parquet: no column 'txt' \(found \['id', 'text', 'body'\]\); "
                                        r"name the right one with --text-field"):
        load_documents(str(parquet), "txt")
    with pytest.raises(UserError, match=r"row 0: column 'id' is a int, expected a string"):
        load_documents(str(parquet), "id")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), tmp_path / "nulls.parquet")
    with pytest.raises(UserError, match=r"nulls.parquet: row 1: column 'text' is null, expected a string"):
        load_documents(str(tmp_path / "nulls.parquet"))


def test_eval_scores_a_parquet_corpus_as_its_jsonl(tmp_path, capsys):
    """The CLI end to end (tokenised, cached and windowed as any corpus): the same figures from either file."""
    from tritongpt import cli
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    records = [{"text": f"The cat number {i} sat on the mat and looked at {i * 3} birds."} for i in range(40)]
    jsonl, parquet = write_both(tmp_path, "corpus", records)
    weights = tmp_path / "m.safetensors"
    GPTModel(GPTConfig(vocab_size=4096, context_length=32, n_embd=32, n_layer=1, n_head=2)).save(weights)
    results = []
    for data in (jsonl, parquet):
        assert cli.main(["eval", "--weights", str(weights), "--data", str(data), "--split", "all", "--tokenizer",
                         "default", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["tokens"] == results[1]["tokens"] > 100 and results[0]["loss"] == results[1]["loss"]


def test_what_cannot_be_read_is_named(tmp_path, monkeypatch):
    from tritongpt.train.sft import read_records

    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(UserError, match=r"broken.parquet is not a readable Parquet file \("):
        read_records(bad)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(UserError, match="empty.parquet: no records"):
        read_records(tmp_path / "empty.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    _, parquet = write_both(tmp_path, "ok", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match=r"ok.parquet: reading .parquet files needs pyarrow: pip install pyarrow"):
        read_records(parquet)


def test_a_folder_of_parquet_shards_is_one_corpus_of_one_split(tmp_path):
    """FineWeb's sample folders: every shard in name order (nested folders too), --text-field naming the column;
    a folder that mixes a held-out split's shards with the training ones, or .txt with .parquet, is refused."""
    from tritongpt.train.data import check_text_field, iter_documents, load_documents, prepare_tokens
    from tritongpt.train.tokenizer import get_tokenizer

    docs = [f"shard text {i} with words and numbers {i * i}" for i in range(15)]
    folder = tmp_path / "fineweb"
    (folder / "sub").mkdir(parents=True)
    shards = (("000_00000", docs[:6]), ("000_00001", docs[6:11]), ("sub/001_00000", docs[11:]))
    for k, (name, part) in enumerate(shards):
        pq.write_table(pa.Table.from_pylist([{"text": d, "url": f"u{k}"} for d in part]), folder / f"{name}.parquet")
    assert load_documents(str(folder)) == docs
    check_text_field(str(folder), "url")
    assert list(iter_documents(str(folder), "url")) == ["u0"] * 6 + ["u1"] * 5 + ["u2"] * 4
    td = prepare_tokens({"source": str(folder), "text_field": "text"}, get_tokenizer("default"),
                        cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert len(td.train) + len(td.val) > 100
    hub = tmp_path / "data"
    hub.mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist([{"text": split}]), hub / f"{split}-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"folder .*data mixes splits: test-00000-of-00001.parquet is held-out data "
                                        r"beside train-00000-of-00001.parquet"):
        load_documents(str(hub))
    (hub / "test-00000-of-00001.parquet").unlink()
    assert load_documents(str(hub)) == ["train"]
    (hub / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds both .txt and .parquet files"):
        load_documents(str(hub))


def test_a_folder_of_parquet_shards_is_one_list_of_records(tmp_path):
    """Records (sft, reward, dpo, rlhf) from a folder of shards: every shard in path order (nested folders too), a
    record named by its shard and row; a folder mixing splits, or holding no .parquet, is refused by name."""
    from tritongpt.train.preference import read_preference_file
    from tritongpt.train.sft import read_json_records, read_records

    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "up", "go", "on")]
    folder = tmp_path / "data"
    (folder / "x").mkdir(parents=True)
    for name, part in (("train-00001-of-00003", recs[3:5]), ("train-00000-of-00003", recs[:3]),
                       ("x/train-00002-of-00003", recs[5:])):
        write_both(folder, name, part)
    for p in folder.rglob("*.jsonl"):
        p.unlink()
    assert read_records(folder) == read_records(write_both(tmp_path, "all", recs)[0])
    where = [w for w, _ in read_json_records(folder)]
    assert where[3] == f"{folder / 'train-00001-of-00003.parquet'}: record 0"
    assert where[-1] == f"{folder / 'x' / 'train-00002-of-00003.parquet'}: record 1"
    write_both(folder, "test-00000-of-00001", recs[:1])[0].unlink()
    with pytest.raises(UserError, match=r"data mixes splits: test-00000-of-00001.parquet is held-out data beside"):
        read_preference_file(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"preference file .*empty is a folder with no .parquet files"):
        read_preference_file(tmp_path / "empty")


def test_a_file_damaged_past_its_footer_is_named_with_the_row_it_stopped_at(tmp_path):
    """Bytes damaged inside a file whose footer still reads (a bad copy or download): the file and the row it
    stopped at are named, not pyarrow's OSError from inside the read."""
    from tritongpt.train.parquet import parquet_texts
    from tritongpt.train.sft import read_records

    docs = [f"document {i} " + "words " * 10 for i in range(40)]
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"prompt": docs, "completion": docs}), path, row_group_size=10)
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset  # rows 20-29's first page
    raw = bytearray(path.read_bytes())
    raw[page:page + 64] = b"\xff" * 64
    path.write_bytes(raw)
    read = []
    with pytest.raises(UserError, match=r"damaged.parquet: its data cannot be read from row 20 on \(.+\); the file "
                                        r"is damaged or in a form this pyarrow cannot read: fetch or write it again"):
        for _, value in parquet_texts(path, "prompt", batch_rows=10):
            read.append(value)
    assert read == docs[:20]
    with pytest.raises(UserError, match=r"damaged.parquet: its data cannot be read \(.+\); the file is damaged"):
        read_records(path)


def test_running_out_of_memory_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """pyarrow's ArrowMemoryError is a MemoryError: the file is not damaged, and fetching it again would not help."""
    from tritongpt.train.parquet import parquet_texts
    from tritongpt.train.sft import read_records

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c"], "completion": ["d", "e"]}), path)

    def no_memory(*args, **kwargs):
        raise pa.ArrowMemoryError("malloc of size 1099511627776 failed")

    def batches(*args, **kwargs):  # a generator, as pyarrow's: the error comes with the first batch
        yield no_memory()

    monkeypatch.setattr(pq.ParquetFile, "read", no_memory)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)
    with pytest.raises(MemoryError, match="malloc of size"):
        read_records(path)
    with pytest.raises(MemoryError, match="malloc of size"):
        list(parquet_texts(path, "prompt"))


def test_two_columns_of_one_name_are_refused(tmp_path):
    """pyarrow writes them; read back, text would take the first and a record the last: neither is guessed at."""
    from tritongpt.train.data import load_documents
    from tritongpt.train.sft import read_records

    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a b"]), pa.array(["c d"]), pa.array(["e"])],
                                        names=["text", "text", "prompt"]), twice)
    for read_it in (lambda: load_documents(str(twice)), lambda: read_records(twice)):
        with pytest.raises(UserError, match=r"twice.parquet: several columns are named 'text': which one holds"):
            read_it()
    # text read from one column: two of another name beside it leave nothing to guess, as before; records take both
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a b", "c"]), pa.array([1, 2]), pa.array([3, 4])],
                                        names=["text", "id", "id"]), meta)
    assert load_documents(str(meta)) == ["a b", "c"]
    with pytest.raises(UserError, match=r"meta.parquet: several columns are named 'id'"):
        read_records(meta)


def test_a_string_column_holding_bytes_that_are_not_utf8_is_named_by_row_and_column(tmp_path):
    """pyarrow checks no string's UTF-8 on reading (a writer that checked none wrote them): its
    UnicodeDecodeError from inside to_pylist is named as a text file's is, with the row and the column."""
    from tritongpt.train.data import load_documents
    from tritongpt.train.parquet import parquet_texts
    from tritongpt.train.sft import read_records

    good = pa.array(["one", "two", "three", "four", "five"])
    bad = pa.array([b"one", b"two", b"three", b"fo\xffur", b"five"], pa.binary()).view(pa.string())
    path = tmp_path / "latin.parquet"
    pq.write_table(pa.table({"prompt": good, "completion": bad}), path)
    assert [v for _, v in parquet_texts(path, "prompt", batch_rows=2)] == good.to_pylist()
    with pytest.raises(UserError, match=r"latin.parquet: row 3: column 'completion' is not UTF-8 text \(its byte 2: "
                                        r"invalid start byte\)"):
        list(parquet_texts(path, "completion", batch_rows=2))
    with pytest.raises(UserError, match=r"latin.parquet: row 3: column 'completion' is not UTF-8 text"):
        load_documents(str(path), "completion")
    with pytest.raises(UserError, match=r"latin.parquet: row 3: column 'completion' is not UTF-8 text"):
        read_records(path)
