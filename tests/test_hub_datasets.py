"""A Hugging Face Hub dataset id as --data (owner/name, owner/name/config): the train split's .parquet files of the
config are fetched (list_repo_files and hf_hub_download, faked here from folders the tests write) into a folder of
their own, read as the same records and text as the files themselves."""
import re
import shutil

import pytest

from tritongpt.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


class GatedRepoError(Exception):  # huggingface_hub's, by name
    pass


class RepositoryNotFoundError(Exception):
    pass


class OfflineModeIsEnabled(ConnectionError):  # HF_HUB_OFFLINE=1
    pass


class LocalEntryNotFoundError(Exception):
    pass


def write_parquet(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]), path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub's dataset repos as folders hub/owner/name; downloads land in a snapshot folder of the cache, as
    huggingface_hub's do (with a test split `datasets` fetched there before: no part of --data's folder). While a
    file hub/OFFLINE exists the Hub cannot be reached, and the cache answers what it holds.
    -> (hub folder, cache folder, the files fetched)."""
    import huggingface_hub
    from huggingface_hub import constants

    hub, cache = tmp_path / "hub", tmp_path / "cache"
    fetched = []

    def snapshot_of(repo, cache_dir):
        return (cache_dir or cache) / ("datasets--" + repo.replace("/", "--")) / "snapshots" / "abc"

    def repo_folder(repo, repo_type):
        assert repo_type == "dataset"
        if (hub / "OFFLINE").exists():
            raise OfflineModeIsEnabled(repo)
        if repo == "owner/gated":
            raise GatedRepoError(repo)
        if not (hub / repo).is_dir():
            raise RepositoryNotFoundError(repo)
        return hub / repo

    def fake_list(repo, repo_type=None, **kwargs):
        folder = repo_folder(repo, repo_type)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def fake_snapshot(repo, repo_type=None, cache_dir=None, local_files_only=False, **kwargs):
        assert repo_type == "dataset" and local_files_only
        if not snapshot_of(repo, cache_dir).is_dir():
            raise LocalEntryNotFoundError(repo)
        return str(snapshot_of(repo, cache_dir))

    def fake_download(repo, filename, repo_type=None, cache_dir=None, **kwargs):
        snapshot = snapshot_of(repo, cache_dir)
        if (hub / "OFFLINE").exists() and (snapshot / filename).is_file():
            return str(snapshot / filename)  # the cache answers, as huggingface_hub's does offline
        src = repo_folder(repo, repo_type) / filename
        fetched.append((repo, filename))
        (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
        for other in src.parent.glob("test*.parquet"):  # what another tool fetched beside it
            shutil.copy(other, (snapshot / filename).parent / other.name)
        return str(shutil.copy(src, snapshot / filename))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # owner/name is no path from here (hub/owner/name is)
    return hub, cache, fetched


def chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def prefs(words):
    return [{"prompt": f"Say {w}.", "chosen": chat(f"Say {w}.", w), "rejected": chat(f"Say {w}.", w[::-1] + "?")}
            for w in words]


def test_a_sharded_preference_dataset_by_id_gives_its_train_files_pairs(hub, capsys):
    """data/train-0000{0,1}-of-00002.parquet beside data/test-*.parquet (and a README): the id gives the pairs of
    the two train shards, in order, and nothing of the test split (not fetched, not in the folder, though the
    cache's snapshot holds it); a bad record is named by its shard and row; a later revision with one shard
    leaves no stale shard in the folder."""
    from tritongpt.train.hub_datasets import hub_dataset_folder
    from tritongpt.train.preference import read_preference_file

    hub, cache, fetched = hub
    repo = hub / "owner" / "prefs"
    a = write_parquet(repo / "data" / "train-00000-of-00002.parquet", prefs(["hi", "yes", "no"]))
    b = write_parquet(repo / "data" / "train-00001-of-00002.parquet", prefs(["ok", "up"]))
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", prefs(["held", "out"]))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    folder = hub_dataset_folder("owner/prefs")
    assert folder == cache / "tritongpt-datasets" / "owner--prefs" / "default" / "train"
    assert f"owner/prefs: the Hugging Face Hub dataset's train split (2 .parquet file(s)), in {folder}" in \
        capsys.readouterr().err
    pairs = read_preference_file(folder)
    assert pairs == read_preference_file(a) + read_preference_file(b) and len(pairs) == 5
    assert sorted(f for _, f in fetched) == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert list((cache / "datasets--owner--prefs").rglob("test-*.parquet"))  # there, and not read
    assert sorted(p.name for p in folder.rglob("*.parquet")) == [a.name, b.name]
    with pytest.raises(UserError, match="mixes splits: test-00000-of-00001.parquet"):
        read_preference_file(repo / "data")  # the repo's own folder, both splits: refused

    bad = prefs(["ok", "up"])
    del bad[1]["rejected"]
    write_parquet(b, bad)
    with pytest.raises(UserError, match=r"train-00001-of-00002.parquet: record 1"):
        read_preference_file(hub_dataset_folder("owner/prefs"))
    b.unlink()
    a.rename(repo / "data" / "train-00000-of-00001.parquet")
    assert sorted(p.name for p in hub_dataset_folder("owner/prefs").rglob("*.parquet")) == \
        ["train-00000-of-00001.parquet"]


def test_a_config_is_named_as_a_third_part_and_several_are_refused_unnamed(hub):
    """gsm8k's layout: main/ and socratic/, each with train-* and test-*; owner/math/main is main's train split,
    owner/math alone (or an unknown config) is refused naming the configs. The converter's layout
    (<config>/train/0000.parquet) reads the same way."""
    from tritongpt.train.hub_datasets import hub_dataset_folder
    from tritongpt.train.sft import read_records

    hub, cache, fetched = hub
    repo = hub / "owner" / "math"
    main = [{"prompt": f"{i} + {i}?", "completion": str(2 * i)} for i in range(4)]
    socratic = [{"prompt": f"Why {i}?", "completion": f"Because {i}."} for i in range(3)]
    write_parquet(repo / "main" / "train-00000-of-00001.parquet", main)
    write_parquet(repo / "main" / "test-00000-of-00001.parquet", main[:1])
    write_parquet(repo / "socratic" / "train-00000-of-00001.parquet", socratic)
    write_parquet(repo / "socratic" / "test-00000-of-00001.parquet", socratic[:1])
    assert read_records(hub_dataset_folder("owner/math/main")) == read_records(
        repo / "main" / "train-00000-of-00001.parquet")
    assert hub_dataset_folder("owner/math/socratic") == cache / "tritongpt-datasets" / "owner--math" / "socratic" / \
        "train"
    assert len(read_records(hub_dataset_folder("owner/math/socratic"))) == 3
    with pytest.raises(UserError, match=r"has several configs \(main, socratic\): name one, as owner/math/main"):
        hub_dataset_folder("owner/math")
    with pytest.raises(UserError, match=r"has no config 'other' \(its configs: main, socratic\)"):
        hub_dataset_folder("owner/math/other")

    conv = hub / "owner" / "conv"
    write_parquet(conv / "default" / "train" / "0000.parquet", main[:2])
    write_parquet(conv / "default" / "train" / "0001.parquet", main[2:])
    write_parquet(conv / "default" / "validation" / "0000.parquet", socratic)
    assert read_records(hub_dataset_folder("owner/conv")) == read_records(
        repo / "main" / "train-00000-of-00001.parquet")


def test_a_repo_without_train_parquet_or_unreachable_is_named(hub, capsys):
    """No .parquet at all: its files named; parquet of other splits only: the splits named; gated and missing
    repos named as such (a missing one though the cache holds it)."""
    from tritongpt.train.hub_datasets import hub_dataset_folder

    hub, cache, fetched = hub
    (hub / "owner" / "raw").mkdir(parents=True)
    (hub / "owner" / "raw" / "data.jsonl").write_text('{"text": "hi"}\n')
    (hub / "owner" / "raw" / "README.md").write_text("# raw\n")
    with pytest.raises(UserError, match=r"'owner/raw' is no file or folder here, and as a Hugging Face Hub dataset: "
                                        r"the Hub dataset owner/raw has no .parquet files \(it has README.md, "
                                        r"data.jsonl\)"):
        hub_dataset_folder("owner/raw")
    write_parquet(hub / "owner" / "evalonly" / "data" / "test-00000-of-00001.parquet", [{"text": "x"}])
    with pytest.raises(UserError, match=r"\(config default\) has no train split of .parquet files \(its splits: test;"):
        hub_dataset_folder("owner/evalonly")
    with pytest.raises(UserError, match="the dataset owner/gated is gated on the Hugging Face Hub: accept its terms "
                                        "on https://huggingface.co/datasets/owner/gated"):
        hub_dataset_folder("owner/gated")
    # the Hub's answer stands though the cache holds the repo (its cache stands in only where the Hub cannot answer)
    write_parquet(cache / "datasets--owner--missing" / "snapshots" / "abc" / "data" / "train-00000-of-00001.parquet",
                  [{"text": "x"}])
    with pytest.raises(UserError, match="there is no dataset owner/missing on the Hugging Face Hub"):
        hub_dataset_folder("owner/missing")
    assert "could not list" not in capsys.readouterr().err
    assert not fetched


def test_what_is_a_hub_dataset_id(tmp_path, monkeypatch):
    """owner/name and owner/name/config that are no path here; not a path whose first folder is here (a typo),
    a data file's name, or more parts."""
    from tritongpt.train.hub_datasets import is_hub_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert is_hub_dataset("openai/gsm8k") and is_hub_dataset("openai/gsm8k/main")
    assert is_hub_dataset("trl-lib/ultrafeedback_binarized")
    assert not is_hub_dataset("data/missing")
    assert not is_hub_dataset("owner/train.jsonl") and not is_hub_dataset("owner/name/x.parquet")
    assert not is_hub_dataset("a/b/c/d") and not is_hub_dataset("pydoc") and not is_hub_dataset(None)


def test_sft_data_from_a_hub_id_end_to_end(hub, tmp_path, capsys):
    """`sft --data owner/name`: fetched, noted, trained on its train split (8 records, not the test split's 2)."""
    from tritongpt.cli import main

    hub, cache, _ = hub
    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "up", "go", "on", "in")]
    write_parquet(hub / "owner" / "says" / "data" / "train-00000-of-00001.parquet", recs)
    write_parquet(hub / "owner" / "says" / "data" / "test-00000-of-00001.parquet", recs[:2])
    assert main(["sft", "--init", "tiny", "--tokenizer", "default", "--data", "owner/says", "--batch-size", "2",
                 "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0", "--device", "cpu", "--kernels",
                 "reference", "--max-steps", "1", "--val-fraction", "0.3", "--out-dir", str(tmp_path / "run")]) == 0
    folder = cache / "tritongpt-datasets" / "owner--says" / "default" / "train"
    err = capsys.readouterr().err
    assert f"owner/says: the Hugging Face Hub dataset's train split (1 .parquet file(s)), in {folder}" in err
    assert f"sft: {folder}: 8 records" in err


def test_pretrain_and_eval_text_from_a_hub_id(hub, corpus, tmp_path, capsys, one_thread):
    """A text corpus as two train shards of a Hub dataset (a `text` column): pretrain reads the same tokens as from
    the text file, and eval, given the run alone, scores the run's own data (the fetched folder)."""
    from tritongpt.cli import main
    from tritongpt.train.data import load_documents

    hub, cache, _ = hub
    text = corpus.text.read_text()
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    local = tmp_path / "local.txt"
    local.write_text("<|endoftext|>".join(docs))
    assert load_documents(str(local)) == docs and len(docs) > 2
    half = len(docs) // 2
    data = hub / "owner" / "corpus" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", [{"text": d} for d in docs[:half]])
    write_parquet(data / "train-00001-of-00002.parquet", [{"text": d} for d in docs[half:]])
    write_parquet(data / "validation-00000-of-00001.parquet", [{"text": "held out"}])

    def pretrain(data, out):
        assert main(["pretrain", "--data", data, "--tokenizer", str(corpus.tok), "--cache-dir", str(tmp_path / "tc"),
                     "--out-dir", str(out), "--device", "cpu", "--kernels", "reference", "--block-size", "32",
                     "--batch-size", "4", "--sample-tokens", "0", "--log-every", "0", "--eval-every", "0",
                     "--max-steps", "1"]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]

    want = pretrain(str(local), tmp_path / "local")
    got = pretrain("owner/corpus", tmp_path / "hub")
    folder = cache / "tritongpt-datasets" / "owner--corpus" / "default" / "train"
    assert len(want) == 1 and got == [want[0].replace(str(local), str(folder))]
    assert main(["eval", "--weights", str(tmp_path / "hub"), "--cache-dir", str(tmp_path / "tc"), "--device", "cpu",
                 "--kernels", "reference"]) == 0
    out = capsys.readouterr()
    assert str(folder) in out.out + out.err
    assert main(["eval", "--weights", str(tmp_path / "hub"), "--data", "owner/corpus", "--cache-dir",
                 str(tmp_path / "tc"), "--device", "cpu", "--kernels", "reference"]) == 0


def test_a_split_named_in_a_repo_of_one_config_and_a_repo_fetched_before_read_offline(hub, capsys):
    """HuggingFaceH4/ultrafeedback_binarized's layout (train_prefs, train_sft, test_prefs: no `train`): refused
    naming its splits, read by owner/name/train_prefs. Offline, a repo fetched before reads from the cache (noted);
    one never fetched names the Hub's error."""
    from tritongpt.train.hub_datasets import hub_dataset_folder
    from tritongpt.train.preference import read_preference_file

    hub, cache, fetched = hub
    data = hub / "owner" / "uf" / "data"
    train = write_parquet(data / "train_prefs-00000-of-00001.parquet", prefs(["hi", "yes"]))
    write_parquet(data / "train_sft-00000-of-00001.parquet", prefs(["sft"]))
    write_parquet(data / "test_prefs-00000-of-00001.parquet", prefs(["held"]))
    with pytest.raises(UserError, match=r"has no train split of .parquet files \(its splits: test_prefs, "
                                        r"train_prefs, train_sft; name one as owner/uf/train_prefs;"):
        hub_dataset_folder("owner/uf")
    folder = hub_dataset_folder("owner/uf/train_prefs")
    assert folder == cache / "tritongpt-datasets" / "owner--uf" / "default" / "train_prefs"
    assert read_preference_file(folder) == read_preference_file(train)
    capsys.readouterr()
    fetched.clear()
    (hub / "OFFLINE").touch()
    assert read_preference_file(hub_dataset_folder("owner/uf/train_prefs")) == read_preference_file(train)
    assert "owner/uf: the Hugging Face Hub could not list its files (OfflineModeIsEnabled); reading those of its " \
           "snapshot in the local Hub cache" in capsys.readouterr().err and not fetched
    write_parquet(hub / "owner" / "new" / "data" / "train-00000-of-00001.parquet", prefs(["x"]))
    with pytest.raises(UserError, match=r"could not fetch the dataset owner/new from the Hugging Face Hub "
                                        r"\(offline\?\): OfflineModeIsEnabled"):
        hub_dataset_folder("owner/new")


def test_offline_a_snapshot_holding_part_of_a_split_is_refused_not_read_as_all_of_it(hub):
    """A fetch cut short after the first of 3 shards leaves a snapshot holding 1: offline, its listing is all that
    is known, and the shards' -of-00003 names say what is missing. Online the Hub's listing fetches the rest."""
    from tritongpt.train.hub_datasets import hub_dataset_folder
    from tritongpt.train.sft import read_records

    hub, cache, fetched = hub
    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "up", "go")]
    data = hub / "owner" / "three" / "data"
    for i in range(3):
        write_parquet(data / f"train-0000{i}-of-00003.parquet", recs[2 * i:2 * i + 2])
    snapshot = cache / "datasets--owner--three" / "snapshots" / "abc"
    write_parquet(snapshot / "data" / "train-00000-of-00003.parquet", recs[:2])  # what the cut-short fetch left
    (hub / "OFFLINE").touch()
    with pytest.raises(UserError, match=r"'owner/three' is no file or folder here, and as a Hugging Face Hub dataset: "
                                        r"the local Hub cache's snapshot \S+abc holds part of its train split: 2 "
                                        r"shard\(s\) missing \(data/train-00001-of-00003.parquet, "
                                        r"data/train-00002-of-00003.parquet\), never fetched"):
        hub_dataset_folder("owner/three")
    (hub / "OFFLINE").unlink()
    assert read_records(hub_dataset_folder("owner/three")) == read_records(write_parquet(hub / "all.parquet", recs))
    (hub / "OFFLINE").touch()  # now fetched whole: it reads offline
    assert len(read_records(hub_dataset_folder("owner/three"))) == 6


def test_offline_a_whole_split_whose_shards_are_numbered_from_1_or_unpadded_is_read_not_called_short(hub):
    """Shard names are not all datasets' train-00000-of-00003: some count from 1 (train-1-of-2, train-2-of-2), some
    do not pad (train-9-of-11, train-10-of-11). A snapshot holding every one of them is the whole split offline."""
    from tritongpt.train.hub_datasets import _missing_shards, hub_dataset_folder
    from tritongpt.train.sft import read_records

    hub, cache, fetched = hub
    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok")]
    for i in (1, 2):  # counted from 1, unpadded
        write_parquet(hub / "owner" / "fromone" / "data" / f"train-{i}-of-2.parquet", recs[2 * i - 2:2 * i])
    hub_dataset_folder("owner/fromone")  # fetched whole, then read offline from the snapshot
    (hub / "OFFLINE").touch()
    assert read_records(hub_dataset_folder("owner/fromone")) == read_records(write_parquet(hub / "all.parquet", recs))
    unpadded = [f"data/train-{i}-of-11.parquet" for i in range(11)]
    assert _missing_shards(unpadded) == []
    assert _missing_shards(unpadded[:9] + unpadded[10:]) == ["data/train-9-of-11.parquet"]
    assert _missing_shards([f"train-{i:05d}-of-00012.parquet" for i in range(1, 13)]) == []


def test_a_damaged_download_in_the_hub_cache_is_named_where_it_lies(hub):
    """The dataset's folder links each shard to the Hub cache's copy: a copy cut short (or damaged) is named there
    too, the file to delete so that the next run fetches it again."""
    from tritongpt.train.data import load_documents
    from tritongpt.train.hub_datasets import hub_dataset_folder

    hub, cache, fetched = hub
    write_parquet(hub / "owner" / "cut" / "data" / "train-00000-of-00001.parquet", [{"text": "some words"}] * 5)
    folder = hub_dataset_folder("owner/cut")
    blob = cache / "datasets--owner--cut" / "snapshots" / "abc" / "data" / "train-00000-of-00001.parquet"
    if not (folder / "data" / "train-00000-of-00001.parquet").is_symlink():
        pytest.skip("this system makes no links: the folder holds copies")
    blob.write_bytes(blob.read_bytes()[:40])
    with pytest.raises(UserError, match=rf"train-00000-of-00001.parquet \(a link to {re.escape(str(blob.resolve()))}\) "
                                        r"is not a readable Parquet file"):
        load_documents(str(folder))


def test_an_id_the_hub_would_refuse_is_named_as_such_not_as_offline(hub, monkeypatch):
    """owner/a..b passes the shape of an id here, but huggingface_hub refuses it before any request (its
    HFValidationError): named as an invalid id, not "could not fetch (offline?)"."""
    import huggingface_hub
    from huggingface_hub.utils import validate_repo_id

    from tritongpt.train.hub_datasets import hub_dataset_folder, is_hub_dataset

    real_list = huggingface_hub.list_repo_files
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, **kw: validate_repo_id(repo) or real_list(repo, **kw))
    assert is_hub_dataset("owner/a..b")
    with pytest.raises(UserError, match=r"'owner/a..b' is no file or folder here, nor a valid Hugging Face Hub "
                                        r"dataset id: .*'owner/a\.\.b'"):
        hub_dataset_folder("owner/a..b")
