"""pretrain --data A --data B [--data-weights ...]: the rows' sources drawn by weight, windows within one source,
one --data unchanged, per-source val losses, resume, the refusals and the header's epochs note."""
import json
import math
import os
import random
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tritongpt.cli import fetch_hub_repos, main
from tritongpt.errors import UserError
from tritongpt.train import common, data
from tritongpt.train.pretrain import parse_args, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two corpora of distinguishable tokens (words of a's, words of z's) and a BPE trained on both."""
    from tritongpt.train.tokenizer import BPETokenizer

    d = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)

    def corpus(letter, words):
        docs = [" ".join(letter * rng.randint(1, 5) for _ in range(40)) for _ in range(words // 40)]
        return data.EOT.join(docs)

    (d / "aaa.txt").write_text(corpus("a", 4000))
    (d / "zzz.txt").write_text(corpus("z", 2000))
    (d / "tiny.txt").write_text("a a a a")
    BPETokenizer.train((d / "aaa.txt").read_text() + (d / "zzz.txt").read_text(), 270, name="az").save(d / "tok.json")
    return SimpleNamespace(a=d / "aaa.txt", z=d / "zzz.txt", tiny=d / "tiny.txt", tok=d / "tok.json", dir=d)


def argv(two, out, *extra, sources=None):
    srcs = [two.a, two.z] if sources is None else sources
    return ["--tokenizer", str(two.tok), "--cache-dir", str(two.dir / "cache"), "--out-dir", str(out),
            "--device", "cpu", "--kernels", "reference", "--block-size", "16", "--batch-size", "4",
            "--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", "--eval-batches", "2",
            *[a for s in srcs for a in ("--data", str(s))], *extra]


def rows_of(out):
    return common.MetricsLog(out / "metrics.jsonl").rows()


def losses(out):
    return [r["loss"] for r in rows_of(out) if "loss" in r]


# -- batches ---------------------------------------------------------------------------------------
def test_rows_drawn_by_weight_within_a_tight_bound_and_windows_stay_in_their_source():
    """Rows from source i with probability w_i: over N rows the fraction is within Hoeffding's bound (fails by
    chance < 1e-6); a weight 0 never draws its source; each window is a run of one source (A's ids 0..499, B's
    1000..1299, C's 5000..5099: consecutive, never crossing); y is x shifted by one."""
    arrays = [np.arange(500, dtype=np.uint16), np.arange(1000, 1300, dtype=np.uint16),
              np.arange(5000, 5100, dtype=np.uint16)]
    gen = torch.Generator().manual_seed(1)
    counts, n = torch.zeros(3), 0
    for _ in range(200):
        x, y, src = data.get_mixture_batch(arrays, [0.8, 0.2, 0.0], 100, 8, gen)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))  # contiguous windows
        lo = torch.tensor([0, 1000, 5000])[src]
        assert ((x >= lo[:, None]) & (y < lo[:, None] + torch.tensor([500, 300, 100])[src][:, None])).all()
        counts += torch.bincount(src, minlength=3)
        n += len(src)
    t = math.sqrt(math.log(2 / 1e-6) / (2 * n))  # P(|f - p| >= t) <= 2 exp(-2 n t^2) = 1e-6
    assert abs(counts[0] / n - 0.8) < t and abs(counts[1] / n - 0.2) < t, (counts, t)
    assert counts[2] == 0


def test_one_source_mixture_gives_get_batch_windows():
    """A mixture of one source draws nothing for the rows: the same windows as get_batch, generator in step."""
    tokens = np.arange(300, dtype=np.uint16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y, src = data.get_mixture_batch([tokens], [1.0], 4, 8, g1)
        x2, y2 = data.get_batch(tokens, 4, 8, g2)
        assert torch.equal(x, x2) and torch.equal(y, y2) and not src.any()


def test_document_ids_per_row_use_each_sources_marker():
    x = torch.tensor([[5, 1, 2, 5], [5, 9, 1, 2]])
    ids = data.document_ids_of_rows(x, torch.tensor([0, 1]), eot_id=5, bos_ids=[None, 9])
    assert ids.tolist() == [[1, 1, 1, 2], [0, 1, 1, 1]]
    assert torch.equal(data.document_ids_of_rows(x, torch.tensor([0, 0]), 5, [None]), data.document_ids(x, 5))


def test_source_names_short_unique_filesystem_safe(tmp_path):
    (tmp_path / "web text.jsonl").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "web text.jsonl").write_text("")
    hub = tmp_path / "tritongpt-datasets" / "HuggingFaceFW--fineweb" / "default" / "train"
    assert data.source_names([None, "stdlib", str(tmp_path / "web text.jsonl"), str(tmp_path / "b"), str(hub)]) == \
        ["pydoc", "stdlib", "web_text", "b", "HuggingFaceFW--fineweb"]
    assert data.source_names([str(tmp_path / "web text.jsonl"), str(tmp_path / "b" / "web text.jsonl")]) == \
        ["web_text_1", "web_text_2"]


def test_source_names_stay_unique_when_a_suffix_makes_another_label(tmp_path):
    # "part" twice takes _1 and _2, and part_2.txt is already "part_2": the val_loss_ columns and cache folders
    # of two sources would be one
    for f in ("a/part.txt", "b/part.txt", "part_2.txt"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text("x")
    names = data.source_names([str(tmp_path / f) for f in ("a/part.txt", "b/part.txt", "part_2.txt")])
    assert names == ["part_1", "part_2_2", "part_2_3"]


def test_hub_ids_in_a_repeated_data_are_each_fetched(monkeypatch):
    from tritongpt.train import hub_datasets

    monkeypatch.setattr(hub_datasets, "is_hub_dataset", lambda s: s.startswith("owner/"))
    monkeypatch.setattr(hub_datasets, "hub_dataset_folder", lambda s, split: f"/hub/{s.replace('/', '--')}/{split}")
    args = parse_args(["--data", "owner/a", "--data", "local.txt"])
    args.command = "pretrain"
    fetch_hub_repos(args)
    assert args.data == ["/hub/owner--a/train", "local.txt"]
    one = parse_args(["--data", "owner/b"])
    one.command = "pretrain"
    fetch_hub_repos(one)
    assert one.data == "/hub/owner--b/train"  # one --data: still a string
    assert parse_args(["--data", "a", "--data", "b", "--data", "c"]).data == ["a", "b", "c"]


# -- pretrain ------------------------------------------------------------------------------------------
def test_one_data_keeps_its_record_and_a_one_source_mixture_trains_the_same(two, tmp_path):
    """One --data parses as a string (the single-source path, its record and metrics keys unchanged); the mixture
    code with that one source gives the same losses, val losses and weights bit for bit."""
    args = parse_args(argv(two, tmp_path / "one", "--max-steps", "4", "--document-mask", sources=[two.a]))
    assert args.data == str(two.a)
    pretrain(args)
    mix = parse_args(argv(two, tmp_path / "mix", "--max-steps", "4", "--document-mask", sources=[two.a]))
    mix.data = [mix.data]
    pretrain(mix)
    assert losses(tmp_path / "one") == losses(tmp_path / "mix")
    one_row, mix_row = rows_of(tmp_path / "one")[-1], rows_of(tmp_path / "mix")[-1]
    assert one_row["val_loss"] == mix_row["val_loss"] == mix_row["val_loss_aaa"]
    assert not any(k.startswith("val_loss_") for r in rows_of(tmp_path / "one") for k in r)
    state = torch.load(tmp_path / "one" / "ckpt-0000004" / "state.pt", weights_only=False)
    assert "data_weights" not in state["args"] and "sources" not in state["data"][0]
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "ckpt-0000004" / "model.safetensors")
    w2 = load_file(tmp_path / "mix" / "ckpt-0000004" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_mixture_logs_each_sources_val_loss_equal_to_it_alone_and_resumes_exactly(two, tmp_path, capsys,
                                                                                   monkeypatch):
    """Weights 0.8/0.2: val_loss and val_loss_<name> each evaluation; at step 0 each source's equals the val_loss
    of a run on it alone (the same initial weights). 6 steps in one go = 3 + a resume to 6, bit for bit; a resume
    with other weights names --data-weights, one with other sources says the data differs."""
    full, half = tmp_path / "full", tmp_path / "half"
    plotted = []
    real_plot = common.plot_curves
    monkeypatch.setattr(common, "plot_curves", lambda rows, path, keys, title: plotted.append(keys) or
                        real_plot(rows, path, keys, title))
    configs = []  # the run's args as trackers (--report-to) get them: the sources and the weights given
    monkeypatch.setattr(common, "trackers_for", lambda args, config: configs.append(config))
    common_flags = ("--max-steps", "6", "--data-weights", "0.8", "0.2", "--eval-every", "3", "--ckpt-every", "3",
                    "--document-mask")
    assert main(["pretrain", *argv(two, full, *common_flags)]) == 0
    header = capsys.readouterr().out
    assert configs[0]["data"] == [str(two.a), str(two.z)] and configs[0]["data_weights"] == [0.8, 0.2]
    assert "a mixture of 2 sources" in header and "aaa: " in header and "weight 0.800" in header
    rows = rows_of(full)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all({"val_loss_aaa", "val_loss_zzz"} <= set(r) for r in evals)
    # a --cache-dir holds each source's tokens in a folder of its own (one folder: each overwriting the other's)
    assert all((two.dir / "cache" / name / "tokens.json").is_file() for name in ("aaa", "zzz"))
    assert (full / "loss.png").is_file() and plotted[-1] == ("loss", "val_loss", "val_loss_aaa", "val_loss_zzz")
    for src, name in ((two.a, "aaa"), (two.z, "zzz")):
        alone = tmp_path / f"alone-{name}"
        pretrain(parse_args(argv(two, alone, "--max-steps", "1", "--eval-every", "1", "--document-mask",
                                 sources=[src])))
        assert rows_of(alone)[0]["val_loss"] == evals[0][f"val_loss_{name}"]

    # interrupted at step 3: the run's folder as its step-3 checkpoint left it
    shutil.copytree(full, half)
    shutil.rmtree(half / "ckpt-0000006")
    capsys.readouterr()
    assert main(["pretrain", *argv(two, half, "--resume", *common_flags)]) == 0
    err = capsys.readouterr().err
    assert "resuming with" not in err and "different data" not in err
    assert losses(half) == losses(full)
    assert [r["val_loss_zzz"] for r in rows_of(half) if "val_loss" in r] == [r["val_loss_zzz"] for r in evals]

    assert main(["pretrain", *argv(two, half, "--max-steps", "8", "--resume", "--data-weights", "0.5", "0.5",
                                   "--eval-every", "0", "--document-mask")]) == 0
    err = capsys.readouterr().err
    assert "--data-weights [0.5, 0.5] ([0.8, 0.2])" in err, err
    assert main(["pretrain", *argv(two, half, "--max-steps", "9", "--resume", "--data-weights", "0.5", "0.5",
                                   "--document-mask", sources=[two.z, two.a])]) == 0
    err = capsys.readouterr().err
    assert "different data than the checkpoint's" in err and "--data [" in err, err
    # one --data after a mixture: its record names no sources' hashes, so the data is said to differ
    assert main(["pretrain", *argv(two, half, "--max-steps", "10", "--resume", "--document-mask",
                                   sources=[two.a])]) == 0
    assert "different data than the checkpoint's" in capsys.readouterr().err

    # eval of the run: a mixture has no one corpus of its own, so --data is asked for by name
    assert main(["eval", "--weights", str(full), "--device", "cpu"]) == 2
    assert "trained on a mixture of 2 sources" in capsys.readouterr().err
    assert main(["eval", "--weights", str(full), "--device", "cpu", "--data", str(two.z), "--cache-dir",
                 str(tmp_path / "ec")]) == 0  # scored as given


def test_default_weights_follow_the_tokens_and_the_header_notes_many_epochs(two, tmp_path, capsys):
    """No --data-weights: each source's share of the training tokens (the concatenation's odds); the header's
    epochs per source, and a note for one repeated more than 4 times."""
    out = tmp_path / "run"
    assert main(["pretrain", *argv(two, out, "--max-steps", "2")]) == 0
    state = torch.load(out / "ckpt-0000002" / "state.pt", weights_only=False)
    parts = state["data"][0]["sources"]
    assert [p["name"] for p in parts] == ["aaa", "zzz"]
    assert state["data"][0]["weights"] == state["args"]["data_weights"]
    total = sum(p["train_tokens"] for p in parts)
    assert state["args"]["data_weights"] == [p["train_tokens"] / total for p in parts]
    printed = capsys.readouterr().out
    assert "weight 0.6" in printed and "weight 0.3" in printed  # ~4000 and ~2000 words

    assert main(["pretrain", *argv(two, tmp_path / "run0", "--max-steps", "2", "--data-weights", "0", "1")]) == 0
    printed = capsys.readouterr().out
    zzz = next(line for line in printed.splitlines() if line.strip().startswith("zzz:"))
    aaa = next(line for line in printed.splitlines() if line.strip().startswith("aaa:"))
    assert "weight 0.000, 0.00 epochs" in aaa and "more than 4" not in aaa
    assert "weight 1.000" in zzz and "more than 4" not in zzz

    # a plan of 5 epochs of each: noted (the header's function, without 300 steps of training)
    from tritongpt.train.pretrain import print_mixture

    splits = {"sources": [{"name": n, "source": n, "train": p["train_tokens"] * [0], "val": [], "bos_id": None}
                          for n, p in zip(("aaa", "zzz"), parts)]}
    splits["weights"] = [p["train_tokens"] / total for p in parts]
    targs = SimpleNamespace(batch_size=4, grad_accum=1, max_steps=math.ceil(5 * total / 64))
    print_mixture(SimpleNamespace(document_mask=False), targs, SimpleNamespace(name="az"), 16, splits,
                  SimpleNamespace(world_size=1))
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and all("more than 4: repeated data is worth less" in line for line in lines), printed
    assert all(re.search(r"5\.0\d epochs", line) for line in lines)


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, sources, match", [
    (("--data-weights", "1"), "one", "--data-weights weighs the sources of a mixture: pass several --data"),
    (("--data-weights", "1", "2", "3"), None, "3 weights for 2 --data sources"),
    (("--data-weights", "1", "-1"), None, "must be finite numbers >= 0, got -1"),
    (("--data-weights", "1", "nan"), None, "must be finite numbers >= 0, got nan"),
    (("--data-weights", "inf", "1"), None, "must be finite numbers >= 0, got inf"),
    (("--data-weights", "0", "0"), None, "all 0: no source to draw"),
    ((), "tiny", r"--data .*tiny.txt: a block of 16 tokens needs at least 17 training tokens but it has"),
    (("--batch-size", "5000"), None, r"a batch of 5000 x 16 tokens is larger than the training data \(\d+ tokens in 2 "
     r"sources\)"),
])
def test_refusals_by_name(two, tmp_path, extra, sources, match):
    srcs = {"one": [two.a], "tiny": [two.a, two.tiny], None: None}[sources]
    with pytest.raises(UserError, match=match):
        pretrain(parse_args(argv(two, tmp_path / "r", "--max-steps", "1", *extra, sources=srcs)))


def test_a_source_given_twice_is_refused_naming_it_and_its_positions(two, tmp_path, monkeypatch):
    """The same file twice, however spelt (relative and ./, absolute), or a file inside a folder also given, would
    be read twice and drawn twice as often, silently: refused, naming it, both positions and --data-weights. A
    .jsonl inside a text folder is not read by the folder, so it mixes with it."""
    monkeypatch.chdir(two.dir)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text((two.a).read_text())
    (folder / "b.jsonl").write_text(json.dumps({"text": "z z"}))
    for sources, match in (([two.a, two.z, two.a], r"--data \S*aaa.txt is given twice \(sources 1 and 3"),
                           (["aaa.txt", "./aaa.txt"], r"--data ./aaa.txt is given twice \(sources 1 and 2"),
                           (["pydoc", two.z, "pydoc"], r"--data pydoc is given twice \(sources 1 and 3"),
                           ([folder / "a.txt", folder], r"--data \S*a.txt lies inside the folder --data \S*texts "
                                                        r"\(sources 1 and 2.*--data-weights gives a source more")):
        with pytest.raises(UserError, match=match):
            pretrain(parse_args(argv(two, tmp_path / "r", "--max-steps", "1", sources=sources)))
    from tritongpt.train.pretrain import check_repeated_sources

    check_repeated_sources([str(folder), str(folder / "b.jsonl"), "stdlib", "pydoc"])  # each read once


def test_a_repeat_is_what_the_sources_read_not_where_they_lie(tmp_path):
    """Two sources repeat each other where they read one file, as prepare_tokens picks a folder's files: a text
    folder's link to a file also given is refused (it was let through: resolved, the file lies outside the folder);
    a subfolder of a folder of token shards, or a nanoGPT folder's input.txt, is no file the folder reads (they
    were refused as read by it already)."""
    from tritongpt.train.pretrain import check_repeated_sources

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a b c")
    (tmp_path / "b.txt").write_text("d e f")
    (tmp_path / "texts" / "b.txt").symlink_to(tmp_path / "b.txt")
    # (numbered in the order they are named: texts is source 1)
    with pytest.raises(UserError, match=r"--data \S*texts and --data \S*b.txt \(sources 1 and 2 of the mixture\) both "
                                        r"read \S*b.txt: it would be drawn from twice as often"):
        check_repeated_sources([str(tmp_path / "texts"), str(tmp_path / "b.txt")])
    (tmp_path / "linked").mkdir()  # (the file given first, the folder's link to it second)
    (tmp_path / "linked" / "c.txt").symlink_to("../b.txt")  # (relative, as the Hub cache links)
    with pytest.raises(UserError, match=r"--data \S*b.txt and --data \S*linked \(sources 1 and 2 of the mixture\) "
                                        r"both read \S*/b.txt"):
        check_repeated_sources([str(tmp_path / "b.txt"), str(tmp_path / "linked")])
    shards = tmp_path / "shards"
    (shards / "notes").mkdir(parents=True)
    np.save(shards / "s0.npy", np.arange(1, 9, dtype=np.uint16))
    (shards / "notes" / "n.txt").write_text("g h i")
    (tmp_path / "ng").mkdir()
    np.arange(1, 9, dtype=np.uint16).tofile(tmp_path / "ng" / "train.bin")
    (tmp_path / "ng" / "input.txt").write_text("j k l")
    check_repeated_sources([str(shards), str(shards / "notes")])  # each read once
    check_repeated_sources([str(tmp_path / "ng"), str(tmp_path / "ng" / "input.txt")])
    with pytest.raises(UserError, match=r"s0.npy lies inside the folder --data \S*shards \(sources 1 and 2"):
        check_repeated_sources([str(shards / "s0.npy"), str(shards)])
    with pytest.raises(UserError, match=r"s0.npy lies inside the folder --data \S*shards \(sources 2 and 1 of"):
        check_repeated_sources([str(shards), str(shards / "s0.npy")])


def test_a_source_lies_inside_a_folder_by_its_own_name_not_its_links_target(tmp_path):
    """Where a source lies is where it is named: a link beside a folder to one of its files was said to lie inside
    the folder, and a Hub dataset folder's shard (a link to a blob of the Hub cache) to lie elsewhere."""
    from tritongpt.train.pretrain import check_repeated_sources

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a b c")
    (tmp_path / "beside.txt").symlink_to(tmp_path / "texts" / "a.txt")
    with pytest.raises(UserError, match=r"--data \S*beside.txt and --data \S*texts \(sources 1 and 2 of the mixture\) "
                                        r"both read \S*texts/a.txt"):
        check_repeated_sources([str(tmp_path / "beside.txt"), str(tmp_path / "texts")])
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "b1").write_text("d e f")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.txt").symlink_to(tmp_path / "blobs" / "b1")
    with pytest.raises(UserError, match=r"--data \S*hub/train.txt lies inside the folder --data \S*hub \(sources 2 "
                                        r"and 1 of the mixture\), which reads it already"):
        check_repeated_sources([str(tmp_path / "hub"), str(tmp_path / "hub" / "train.txt")])


def test_names_that_share_a_hub_blob_are_each_read_a_link_and_its_target_are_one(tmp_path):
    """Two Hub snapshot files of equal bytes are links to one blob (as are two repos' files, where the blob is hard
    linked): two files, each read, as `datasets.load_dataset` reads every file it is given (datasets 5.2.0 yields
    both files' rows; it reads a name given twice twice too, which a mixture refuses). They were refused as both
    reading the blob. The same name reached twice is still one file: a file and a folder holding it, a link and its
    target (the blob itself, or a snapshot file another link names)."""
    from tritongpt.train.pretrain import check_repeated_sources

    repo = tmp_path / "hub" / "datasets--o--n"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (repo / "blobs" / "h1").write_text("one two")
    for name in ("a.txt", "b.txt"):
        (snap / name).symlink_to("../../blobs/h1")  # (relative, as the Hub cache links them)
    other = tmp_path / "hub" / "datasets--o--m"  # another repo's snapshot, its blob a hard link of the first's
    (other / "blobs").mkdir(parents=True)
    (other / "snapshots" / "rev").mkdir(parents=True)
    os.link(repo / "blobs" / "h1", other / "blobs" / "h1")
    (other / "snapshots" / "rev" / "c.txt").symlink_to("../../blobs/h1")
    (tmp_path / "x.txt").symlink_to(snap / "a.txt")  # x -> a -> h1: names a.txt
    for sources in ([snap / "a.txt", snap / "b.txt"], [snap, other / "snapshots" / "rev"],
                    [tmp_path / "x.txt", snap / "b.txt"], [repo / "blobs" / "h1", other / "blobs" / "h1"],
                    [snap / "b.txt", other / "blobs" / "h1"]):
        check_repeated_sources([str(s) for s in sources])  # distinct names: each read
    both = r"\(sources 1 and 2 of the mixture\) both read \S*"
    for sources, match in (([repo / "blobs" / "h1", snap / "b.txt"], both + "datasets--o--n/blobs/h1: "),
                           ([snap / "a.txt", tmp_path / "x.txt"], both + "snapshots/rev/a.txt: "),
                           ([tmp_path / "x.txt", snap], both + "snapshots/rev/a.txt: "),
                           ([snap / "a.txt", snap], r"a.txt lies inside the folder --data \S*snapshots/rev \(sources 1 "
                                                    r"and 2 of the mixture\)")):
        with pytest.raises(UserError, match=match):
            check_repeated_sources([str(s) for s in sources])


def test_a_file_of_the_stdlib_corpus_given_beside_it_is_refused(tmp_path, monkeypatch):
    """--data stdlib reads the standard library's .py files up to its cap; one of those files given as another source
    was read twice, never said (a built-in corpus read no file as far as the check knew). The same name (or a link
    to it) is refused; a copy elsewhere, or a file past the cap that the corpus does not read, is a source of its
    own."""
    from tritongpt.train.pretrain import check_repeated_sources

    root = tmp_path / "lib"
    (root / "m").mkdir(parents=True)
    for rel, text in {"a.py": "a", "b.py": "bb", "m/d.py": "dddd"}.items():
        (root / rel).write_text(text, encoding="utf-8")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    monkeypatch.setattr(data, "STDLIB_MAX_BYTES", 3)  # a.py and b.py; m/d.py is past the cap
    assert data.load_documents("stdlib") == ["a", "bb"]
    (tmp_path / "copy.py").write_text("bb", encoding="utf-8")
    (tmp_path / "link.py").symlink_to(root / "b.py")
    for other in (root / "m" / "d.py", tmp_path / "copy.py", "pydoc"):
        check_repeated_sources(["stdlib", str(other)])
    for sources, match in ((["stdlib", root / "b.py"], r"--data \S*lib/b.py \(sources 2 and 1 of the mixture\) "
                                                        r"reads \S*lib/b.py, a file the standard library corpus "
                                                        r"\(--data stdlib\) reads already: it would be drawn from "
                                                        r"twice as often"),
                           ([tmp_path / "link.py", "stdlib"], r"--data \S*link.py \(sources 1 and 2 of the mixture\) "
                                                              r"reads \S*lib/b.py, a file the standard library")):
        with pytest.raises(UserError, match=match):
            check_repeated_sources([str(s) for s in sources])


def test_the_stdlib_corpus_is_read_by_the_check_only_beside_a_file_in_its_folder(tmp_path, monkeypatch):
    """Finding the stdlib corpus's files means reading it up to its cap; prepare_tokens reads it again. The check read
    it at every start of a mixture with stdlib (--data stdlib --data pydoc, or data elsewhere), where no other source
    can read one of its files: it is read only beside a source with a file (or a link's target) in its folder."""
    from tritongpt.train.pretrain import check_repeated_sources

    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.py").write_text("a", encoding="utf-8")
    (tmp_path / "web.txt").write_text("words", encoding="utf-8")
    (tmp_path / "to_lib.txt").symlink_to(root / "a.py")  # (its name is outside, its target inside)
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    walks = []
    stdlib_read = data._stdlib_read
    monkeypatch.setattr(data, "_stdlib_read", lambda *a: walks.append(a) or stdlib_read(*a))
    check_repeated_sources(["stdlib", "pydoc"])
    check_repeated_sources([str(tmp_path / "web.txt"), "stdlib"])
    assert walks == []
    with pytest.raises(UserError, match=r"to_lib.txt \(sources 2 and 1 of the mixture\) reads \S*lib/a.py"):
        check_repeated_sources(["stdlib", str(tmp_path / "to_lib.txt")])
    assert len(walks) == 1


def test_names_equal_but_for_case_are_one_file_where_they_are_one(tmp_path):
    """On a case-insensitive filesystem (macOS's, Windows' default) --data data/a.txt --data Data/a.txt name one file,
    and realpath keeps each spelling: compared by name (647fa4d) they were two files, each read, drawn from twice as
    often (keyed by (device, inode) before, refused). Stood in for here by a hard link whose name differs in case
    only: what such a filesystem shows, one file under two spellings. Two files whose names differ in case alone
    are two sources."""
    from tritongpt.train.pretrain import check_repeated_sources

    (tmp_path / "data").mkdir()
    (tmp_path / "Data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("one two")
    os.link(tmp_path / "data" / "a.txt", tmp_path / "Data" / "a.txt")
    (tmp_path / "to_a.txt").symlink_to(tmp_path / "Data" / "a.txt")
    (tmp_path / "data" / "b.txt").write_text("three")
    (tmp_path / "Data" / "B.txt").write_text("four")
    check_repeated_sources([str(tmp_path / "data" / "b.txt"), str(tmp_path / "Data" / "B.txt")])
    for sources in ([tmp_path / "data" / "a.txt", tmp_path / "Data" / "a.txt"],
                    [tmp_path / "Data" / "a.txt", tmp_path / "data"], [tmp_path / "data", tmp_path / "to_a.txt"]):
        with pytest.raises(UserError, match=r"\(sources 1 and 2 of the mixture\) both read \S*ata/a.txt: it would be "
                                            r"drawn from twice as often"):
            check_repeated_sources([str(s) for s in sources])


def test_files_without_inode_numbers_are_told_apart_by_path(tmp_path, monkeypatch):
    """On a filesystem that gives every file st_ino 0 (some FUSE and network mounts), keying a file by (device,
    inode) made every two files one: two unrelated sources were refused as reading one file. Such a file is its
    resolved path: unrelated files pass, a text folder's link to a file also given is still refused."""
    from tritongpt.train.pretrain import check_repeated_sources

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a b c")
    (tmp_path / "b.txt").write_text("d e f")
    real = os.stat

    def no_inode(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        return os.stat_result((st.st_mode, 0, *tuple(st)[2:]))

    monkeypatch.setattr(os, "stat", no_inode)
    assert os.stat(tmp_path / "b.txt").st_ino == 0
    check_repeated_sources([str(tmp_path / "texts"), str(tmp_path / "b.txt")])  # each its own file
    (tmp_path / "texts" / "b.txt").symlink_to(tmp_path / "b.txt")
    with pytest.raises(UserError, match=r"--data \S*texts and --data \S*b.txt \(sources 1 and 2 of the mixture\) both "
                                        r"read \S*b.txt"):
        check_repeated_sources([str(tmp_path / "texts"), str(tmp_path / "b.txt")])


def test_a_repeat_refused_at_a_resume_says_how_to_go_on(tmp_path):
    """A run started with a repeated source (before repeats were refused) is refused at --resume until the repeat
    is dropped: the refusal says so, with --data-weights to keep the shares (it named neither --resume nor what to
    do, and the checkpoint's record names the repeat)."""
    from tritongpt.train.pretrain import check_mixture, check_repeated_sources

    (tmp_path / "a.txt").write_text("a b c")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "b.txt").symlink_to(tmp_path / "a.txt")
    how = r".*--resume: a run started with the repeat goes on without it: drop it, with --data-weights to keep each " \
          r"source's share"
    with pytest.raises(UserError, match=r"is given twice" + how):  # --resume as the command line gives it
        check_mixture(parse_args(["--data", str(tmp_path / "a.txt")] * 2 + ["--resume"]))
    with pytest.raises(UserError, match=r"both read" + how):
        check_repeated_sources([str(tmp_path / "a.txt"), str(tmp_path / "texts")], resume="latest")
    for sources in ([tmp_path / "a.txt"] * 2, [tmp_path / "a.txt", tmp_path / "texts"]):
        with pytest.raises(UserError, match="drawn from twice as often") as e:  # without --resume: no word of it
            check_repeated_sources([str(s) for s in sources])
        assert "--resume" not in str(e.value)


def test_a_repeated_hub_dataset_is_named_as_typed(tmp_path, monkeypatch):
    """A Hub dataset id is fetched into a folder, which --data then holds: its repeat named that folder, not the id
    the user typed. Named as typed, the folder beside it; two spellings of one id (owner/a, owner/a/default) both."""
    from tritongpt.train import hub_datasets
    from tritongpt.train.pretrain import check_mixture

    def folder(spec, split):
        f = tmp_path / "hub" / "--".join(spec.split("/")[:2]) / split
        f.mkdir(parents=True, exist_ok=True)
        (f / "x.txt").write_text("a b c")
        return str(f)

    monkeypatch.setattr(hub_datasets, "is_hub_dataset", lambda s: s.startswith("owner/"))
    monkeypatch.setattr(hub_datasets, "hub_dataset_folder", folder)
    for given, match in ((["owner/a", "owner/b", "owner/a"], r"--data owner/a \(its files in \S*owner--a\S*\) is "
                                                              r"given twice \(sources 1 and 3 of the mixture\)"),
                         (["owner/a", "owner/a/default"], r"--data owner/a/default \(its files in \S*owner--a\S*\) is "
                                                          r"given twice \(sources 1 and 2 of the mixture, as owner/a "
                                                          r"and owner/a/default\)")):
        args = parse_args([a for s in given for a in ("--data", s)])
        args.command = "pretrain"
        fetch_hub_repos(args)
        with pytest.raises(UserError, match=match):
            check_mixture(args)


def test_token_ids_of_another_tokenizer_beside_text_refused(two, tmp_path):
    """A nanoGPT .bin (GPT-2's ids) mixed with text read by a 270-token BPE: the ids past its vocabulary are
    refused by name, before any step (the text sources' tokenizer is the run's one tokenizer)."""
    (tmp_path / "train.bin").write_bytes(np.array([50000, 1, 2] * 20, dtype=np.uint16).tobytes())
    with pytest.raises(UserError, match=r"train.bin: token id 50000 is past the az tokenizer.s 270 ids"):
        pretrain(parse_args(argv(two, tmp_path / "r", "--max-steps", "1", sources=[two.a, tmp_path / "train.bin"])))


def test_text_field_and_json_checks_per_source(two, tmp_path):
    with pytest.raises(UserError, match="--text-field applies to .jsonl"):
        pretrain(parse_args(argv(two, tmp_path / "r", "--text-field", "body")))
    rows = [json.dumps({"body": "z z"})] * 3
    (tmp_path / "x.jsonl").write_text("\n".join(rows))
    with pytest.raises(UserError, match=r"--text-field applies to .jsonl .*; \S*aaa.txt is read as plain text$"):
        pretrain(parse_args(argv(two, tmp_path / "r", "--text-field", "body", sources=[tmp_path / "x.jsonl", two.a])))


def test_a_source_whose_val_split_is_short_is_evaluated_on_its_training_windows(two, tmp_path, capsys):
    """Each source split on its own: one whose held-out tail is shorter than a block is noted and scored on its
    training windows (as one --data is); a .jsonl source read by its --text-field; the result counts every
    source's tokens."""
    (two.dir / "few.jsonl").write_text(json.dumps({"body": " ".join(["zz z"] * 30)}) + "\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": (two.a.read_text()[:3000])}) + "\n")
    r = pretrain(parse_args(argv(two, tmp_path / "r", "--max-steps", "1", "--text-field", "body",
                                 sources=[tmp_path / "x.jsonl", two.dir / "few.jsonl"])))
    err = capsys.readouterr().err
    assert re.search(r"--data \S*few.jsonl: its validation split \(\d+ tokens\) is shorter than one block of 16: "
                     "evaluating it on its training windows", err), err
    assert "x.jsonl: its validation" not in err
    row = rows_of(tmp_path / "r")[-1]
    assert math.isfinite(row["val_loss_few"]) and math.isfinite(row["val_loss_x"])
    state = torch.load(tmp_path / "r" / "ckpt-0000001" / "state.pt", weights_only=False)
    n = [p["train_tokens"] for p in state["data"][0]["sources"]]
    assert r["train_tokens"] == sum(n) and r["val_tokens"] > 0


def test_data_records_name_the_sources_and_what_a_resume_compares(two, tmp_path, monkeypatch, capsys):
    """The mixture's record: each source's absolute path, hash, tokens, BOS; a resume's note when a source, the
    tokenizer or the block differs; one --data's record compared with a mixture's is other data."""
    from tritongpt.train.pretrain import DataPosition, MixturePosition

    monkeypatch.chdir(two.dir)
    tok = SimpleNamespace(hash="t1")
    part = {"name": "aaa", "train": [0] * 50, "val": [0] * 5, "source_hash": "h", "joined_hash": "j", "bos_id": None}
    args = SimpleNamespace(data=["aaa.txt", "pydoc"], text_field="text", document_mask=False)
    mix = MixturePosition(args, tok, 16, {"sources": [part, dict(part, name="pydoc")], "weights": [0.5, 0.5]})
    state = mix.state_dict()
    assert [s["source"] for s in state["sources"]] == [str(two.a), "pydoc"] and state["train_tokens"] == 100
    mix.load_state_dict(state)
    assert "different data" not in capsys.readouterr().err
    for other in ({"tokenizer_hash": "t2"}, {"block_size": 8},
                  {"sources": [state["sources"][0], dict(state["sources"][1], source_hash="x")]}):
        mix.load_state_dict({**state, **other})
        assert "resuming on different data than the checkpoint's" in capsys.readouterr().err, other
    one = DataPosition(SimpleNamespace(data="aaa.txt", text_field="text", document_mask=False), tok, 16,
                       {**part, "train": [0] * 100})
    one.load_state_dict({**state, "bos_id": None})  # the same token count, tokenizer and block: still a mixture's
    assert "resuming on different data" in capsys.readouterr().err


def test_document_masks_per_source_when_their_markers_differ(two, tmp_path, monkeypatch, capsys):
    """A text source whose tokenizer puts a BOS before each document beside token ids read in place (no BOS,
    split at the EOS): each row's documents are split at its own source's marker, so each source's val loss
    (--document-mask) is the one its own run gives."""
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.load(two.tok)
    (tmp_path / "ids.bin").write_bytes(np.array(tok.encode(two.z.read_text(), allowed_special="all"),
                                                dtype=np.uint16).tobytes())
    monkeypatch.setattr(BPETokenizer, "prepended_bos_id", 0, raising=False)  # byte 0: in neither text
    flags = ("--max-steps", "1", "--eval-every", "1", "--document-mask", "--cache-dir", str(tmp_path / "c"))
    pretrain(parse_args(argv(two, tmp_path / "mix", *flags, sources=[two.a, tmp_path / "ids.bin"])))
    row = rows_of(tmp_path / "mix")[0]
    lines = capsys.readouterr().out.splitlines()
    assert "BOS before each document" in next(line for line in lines if line.startswith("  aaa:"))
    assert "BOS" not in next(line for line in lines if line.startswith("  ids:"))
    for src, name in ((two.a, "aaa"), (tmp_path / "ids.bin", "ids")):
        pretrain(parse_args(argv(two, tmp_path / name, *flags, sources=[src])))
        assert rows_of(tmp_path / name)[0]["val_loss"] == row[f"val_loss_{name}"], name
    state = torch.load(tmp_path / "mix" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert [p["bos_id"] for p in state["data"][0]["sources"]] == [0, None]


def test_a_mixture_distilled_from_a_teacher_trains_and_at_alpha_0_as_without_it(two, tmp_path):
    """pretrain --teacher with --data A --data B: the mixture's batches carry each row's source, which the
    distillation loss takes (and gives the document ids of, --document-mask); at --distill-alpha 0 the losses are
    the plain mixture's bit for bit, at 0.5 they differ."""
    flags = ("--max-steps", "3", "--document-mask")
    pretrain(parse_args(argv(two, tmp_path / "teacher", "--max-steps", "2", sources=[two.a])))
    pretrain(parse_args(argv(two, tmp_path / "plain", *flags)))
    teach = ("--teacher", str(tmp_path / "teacher"))
    pretrain(parse_args(argv(two, tmp_path / "a0", *flags, *teach, "--distill-alpha", "0")))
    assert losses(tmp_path / "a0") == losses(tmp_path / "plain")
    pretrain(parse_args(argv(two, tmp_path / "a5", *flags, *teach)))
    assert losses(tmp_path / "a5") != losses(tmp_path / "plain")
    assert all("distill_kd" in r for r in rows_of(tmp_path / "a5") if "loss" in r)


def test_weights_whose_sum_overflows_are_shares_still(two, tmp_path):
    """--data-weights 1e308 1e308: each finite, their sum inf; normalised by it every share was 0 and the first
    batch's draw failed inside torch.multinomial. They are the halves that 1 1 are."""
    from tritongpt.train.pretrain import load_mixture
    from tritongpt.train.tokenizer import get_tokenizer

    args = parse_args(argv(two, tmp_path / "r", "--data-weights", "1e308", "1e308"))
    trainer = SimpleNamespace(ddp=False, is_main=True)
    splits = load_mixture(args, get_tokenizer(str(two.tok)), 16, 4, trainer)
    assert splits["weights"] == [0.5, 0.5]
    x, _, src = data.get_mixture_batch([p["train"] for p in splits["sources"]], splits["weights"], 4, 16,
                                       torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and set(src.tolist()) <= {0, 1}


def test_weights_whose_sum_overflows_are_recorded_as_their_shares_from_the_start(two, tmp_path, monkeypatch):
    """The run's arguments as the trackers get them (wandb's config), before the data is read: the shares drawn by
    (0.5 0.5), not 1e308 / inf, 0 each, from a second normalisation of its own."""
    class Seen(Exception):  # the run stops there: nothing after it is asked about
        pass

    def trackers_for(args, config):
        raise Seen(config["data_weights"])

    monkeypatch.setattr(common, "trackers_for", trackers_for)
    with pytest.raises(Seen) as seen:
        pretrain(parse_args(argv(two, tmp_path / "r", "--data-weights", "1e308", "1e308")))
    assert seen.value.args == ([0.5, 0.5],)
