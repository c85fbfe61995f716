"""`tritongpt pretrain` end to end (shortened), its Python API, and its one-line input errors."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import plot_stub
from tritongpt.cli import main
from tritongpt.model.gpt import GPTModel
from tritongpt.train import common
from tritongpt.train.pretrain import model_vocab, parse_args, pretrain


pytestmark = pytest.mark.usefixtures("one_thread")
no_plots, real_plots = plot_stub.no_plots, plot_stub.real_plots  # (empty PNGs unless a test reads one)


def argv(corpus, out, *extra):
    # a --data among extra replaces the corpus (a second --data would make a mixture of the two)
    data = [] if "--data" in extra else ["--data", str(corpus.text)]
    return [*data, "--tokenizer", str(corpus.tok), "--cache-dir", str(corpus.cache),
            "--out-dir", str(out), "--device", "cpu", "--kernels", "reference", "--block-size", "32",
            "--batch-size", "4", *extra]


def test_cli_short_job_learns_and_writes_metrics_plot_checkpoint_then_resumes(corpus, tmp_path, capsys, real_plots):
    out = tmp_path / "run"
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "30", "--warmup-steps", "5", "--lr", "3e-3",
                                 "--eval-every", "10", "--eval-batches", "2", "--ckpt-every", "15",
                                 "--sample-every", "15", "--sample-tokens", "8", "--log-every", "10")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "--- sample at step 15 ---" in printed.err + printed.out
    assert "done: 30 steps" in printed.out

    rows = common.MetricsLog(out / "metrics.jsonl").rows()
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "mem_gb"} <= set(r)
        assert r["mfu"] is None and r["tok_per_s"] > 0  # CPU: no MFU
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 4  # steps 0, 10, 20, 30
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert abs(first - torch.log(torch.tensor(300.0)).item()) < 0.5  # starts near ln(vocab)
    assert last < first - 1.0 and vals[-1] < vals[0] - 0.8, (first, last, vals)
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in common.Checkpointer(out).list()] == ["ckpt-0000015", "ckpt-0000030"]
    model = GPTModel.load(out / "ckpt-0000030" / "model.safetensors")
    assert model.config.vocab_size == 300  # the tokenizer's, not the preset's 4096
    assert (out / "tokenizer.json").is_file()
    # 30 steps leave the model near a unigram one, so the losses above cannot tell a model blind to its context
    # (test_cli_job_learns_to_use_its_context is the check of that); what they miss that the checkpoints show:
    # every weight trained (one the optimizer never steps, or no gradient reaches, is as it was at step 15)...
    early = dict(GPTModel.load(out / "ckpt-0000015" / "model.safetensors").named_parameters())
    assert [k for k, w in model.named_parameters() if torch.equal(w, early[k])] == []
    # ...and positions read: in a row of one token repeated each position sees the same tokens, so only the
    # position can make its logits differ from the first one's (a model blind to positions gives them all alike)
    with torch.no_grad():
        logits = model(torch.full((1, 32), 7))[0]
    assert (logits[1:] - logits[0]).abs().amax(-1).min() > 1e-3

    # --resume continues from step 30 to 34 and appends to the same log
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "34", "--resume", "--eval-every", "0",
                                 "--sample-tokens", "0")])
    assert rc == 0
    printed = capsys.readouterr()
    assert "different data" not in printed.err
    assert "done: 4 steps (to step 34) in " in printed.out  # this call's steps, as its seconds and tokens/s are
    rows = common.MetricsLog(out / "metrics.jsonl").rows()
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 35))
    # the final evaluation (--eval-every 0: the only one) is in step 34's row, not a row of its own
    assert [r["step"] for r in rows] == [0, *range(1, 35)] and "val_loss" in rows[-1], rows[-1]
    assert common.Checkpointer(out).latest().name == "ckpt-0000034"

    # a checkpoint from before documents were hashed apart names its data by the joined text's
    # hash: the same data, so no note
    from tritongpt.train.data import load_text
    from tritongpt.train.tokenizer import text_hash

    ck = common.Checkpointer(out).latest()
    state = common.load_state(ck)
    assert state["data"][0]["source_hash"] != text_hash(load_text(str(corpus.text)))
    state["data"][0]["source_hash"] = text_hash(load_text(str(corpus.text)))
    torch.save(state, ck / "state.pt")
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "35", "--resume", "--eval-every", "0",
                                 "--sample-tokens", "0")])
    assert rc == 0 and "different data" not in capsys.readouterr().err

    # a checkpoint older than a flag has no record of it (here --grad-clip's and --document-mask's, dropped):
    # its default, or an "off" value, is what that run did, unnamed; another value is named
    ck = common.Checkpointer(out).latest()
    state = common.load_state(ck)
    del state["args"]["grad_clip"], state["args"]["document_mask"]
    for k in ("teacher", "distill_alpha", "distill_temperature", "distill_beta"):  # (distillation's: at defaults)
        del state["args"][k]
    torch.save(state, ck / "state.pt")
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "35", "--resume", "--sample-tokens", "0")])
    assert rc == 0 and "did not record" not in capsys.readouterr().err
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "35", "--resume", "--sample-tokens", "0",
                                 "--grad-clip", "0.5", "--document-mask")])
    err = capsys.readouterr().err
    assert rc == 0 and "resuming with --grad-clip 0.5, --document-mask True, which " in err, err
    assert "did not record (a flag newer than the checkpoint, or a run started without it)" in err

    # the same text with its paragraphs reordered: as many tokens, other windows; the resume says so
    paras = corpus.text.read_text().split("\n\n")
    other = tmp_path / "reordered.txt"
    other.write_text("\n\n".join(paras[len(paras) // 2:] + paras[:len(paras) // 2]))
    rc = main(["pretrain", *argv(corpus, out, "--max-steps", "36", "--resume", "--eval-every", "0",
                                 "--sample-tokens", "0", "--data", str(other))])
    assert rc == 0
    assert "resuming on different data" in capsys.readouterr().err


def test_cli_job_learns_to_use_its_context(corpus, tmp_path):
    """The main job on a text whose next letter is fixed by the last two: 8 letters in order, then in another
    order, again and again. 7 of the 8 letters are followed by one letter in the first order and another in the
    second, so a model that sees only the current token can do no better than (7/8) ln 2 = 0.61 nats, and one that
    ignores its input than ln 8 = 2.08. The real model, reading the letter before too, gets to 0.16-0.22 in 40
    steps (seeds 0-4 and 1337; attending only to the token itself: 0.64-0.73; inputs zeroed or one constant token:
    2.08-2.10; attention never stepped: 0.41-0.56, which the corpus run's every-weight-moved check catches
    exactly). Windows of 8 tokens: a previous-token head is learnt over 8 positions far sooner than over 32 (with
    windows of 4 x 32, 30 steps left the real model at 0.41-0.51, one attending only to itself at 0.61-0.72).
    Positions are the corpus run's check: in 8-token windows a model that ignores them learns this text too."""
    period = "ABCDEFGH" + "CDGBFHEA"
    text = tmp_path / "letters.txt"
    text.write_text(period * 200)
    from tritongpt.train.tokenizer import get_tokenizer

    assert len(get_tokenizer(str(corpus.tok)).encode(period * 2)) == 32  # a token a letter: the entropies hold
    out = tmp_path / "run"
    rc = main(["pretrain", *argv(corpus, out, "--data", str(text), "--block-size", "8", "--batch-size", "16",
                                 "--max-steps", "40", "--warmup-steps", "5", "--lr", "3e-3", "--lr-schedule",
                                 "constant", "--eval-every", "0", "--eval-batches", "4", "--sample-tokens", "0",
                                 "--log-every", "0")])
    assert rc == 0
    val = common.MetricsLog(out / "metrics.jsonl").rows()[-1]["val_loss"]
    current_only = 7 / 8 * math.log(2)
    assert val < current_only - 0.2, (val, current_only)
    # and not below what no model can do: each window's first token has no letter before it, so the mean over 8
    # positions is at least current_only / 8; a loss under it means the targets leak into the inputs (unshifted)
    assert val > current_only / 8 / 2, (val, current_only / 8)


def test_python_api_on_jsonl_with_a_text_field(corpus, tmp_path):
    docs = corpus.text.read_text().split("\n\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    a = parse_args(argv(corpus, tmp_path, "--max-steps", "3", "--eval-every", "0", "--sample-tokens", "0",
                        "--data", str(jsonl), "--text-field", "body", "--vocab-multiple", "64"))
    r = pretrain(a)
    assert r["step"] == 3 and len(r["losses"]) == 3 and r["n_params"] > 0
    assert r["train_tokens"] > r["val_tokens"] > 0
    assert r["val_loss"] is not None and Path(r["checkpoint"]).name == "ckpt-0000003"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    cfg = GPTModel.load(Path(r["checkpoint"]) / "model.safetensors").config
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (300, 320)  # the tokenizer's 300 ids in 5 x 64 rows


def test_defaults_are_the_readme_main_job():
    """No flags: the tiny preset with the default tokenizer on the embedded corpus (--model and
    --tokenizer default to None so that --init can name them instead)."""
    from tritongpt.model.config import get_config
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args

    a = parse_args([])
    assert (a.model, a.init, a.data, a.tokenizer, a.kernels, a.device, a.dtype, a.out_dir) == \
        (None, None, None, None, "auto", "auto", "auto", "runs/pretrain")
    assert a.max_steps > 0 and a.resume is None and not a.compile
    model, tok, block, _ = check_args(a, TrainArgs.from_namespace(a))
    assert tok.name == "default" and block == 128
    assert model.config.to_dict() == get_config("tiny", vocab_size=tok.vocab_size).to_dict()


def test_model_vocab_follows_the_tokenizer_except_gpt2_with_gpt2():
    small = SimpleNamespace(name="default", vocab_size=4096)
    gpt2 = SimpleNamespace(name="gpt2", vocab_size=50257)
    assert model_vocab("tiny", SimpleNamespace(name="x", vocab_size=300), 4096) == 300
    assert model_vocab("gpt2-small", gpt2, 50257) == 50257
    assert model_vocab("gpt2-small", small, 50257) == 4096
    assert model_vocab("mini", gpt2, 4096) == 50257


@pytest.mark.parametrize("extra,expect", [
    (["--data", "/no/such/file.txt"], "not found"),
    (["--data", "EMPTY"], "empty"),
    (["--data", "SHORT"], "context longer than the data"),
    (["--batch-size", "600"], "larger than the training data"),
    (["--grad-accum", "0"], "grad-accum"),
    (["--batch-size", "0"], "batch-size"),
    (["--model", "gpt5"], "unknown model"),
    (["--block-size", "4096"], "longer than tiny's context length"),
    (["--block-size", "0"], "--block-size must be positive"),
    (["--vocab-multiple", "0"], "--vocab-multiple must be a positive integer"),
    (["--tokenizer", "/no/such/tok.json"], "tokenizer"),
    (["--text-field", "title", "--data", "JSONL"], "no field 'title'"),
    (["--text-field", "body"], "--text-field applies to .jsonl data"),
    # the sample settings, before any training (they were first used at step --sample-every)
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--sample-tokens", "-5"], "--sample-tokens must be >= 0 (0: no samples), got -5"),  # was: no samples, silently
    # a flag of wsd's alone, which cosine (the default) ignored
    (["--decay-fraction", "0.5"], "--decay-fraction 0.5 is --lr-schedule wsd's"),
    # nan passed the `< 0` check: --grad-clip nan trained without clipping, --weight-decay nan stopped
    # at step 1 with "loss is nan"
    (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--seed", str(10**20)], "--seed must be a 64-bit integer"),  # was torch's "Overflow when unpacking"
    (["--ddp-timeout", "0"], "--ddp-timeout must be positive, got 0"),
    (["--logit-softcap", "-1"], "--logit-softcap must be a finite number >= 0 (0: no cap), got -1.0"),
    (["--logit-softcap", "inf"], "--logit-softcap must be a finite number >= 0"),
    # a dense model keeps GPTConfig's experts_per_token: the flag alone trained one without a word
    (["--experts-per-token", "3"], "--experts-per-token 3 is how many experts a token goes through: without "
                                   "--n-experts (its own or --init's) the MLP is dense"),
])
def test_bad_input_is_one_line_user_error(corpus, tmp_path, capsys, extra, expect):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("a few words only.")
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    files = {"EMPTY": "empty.txt", "SHORT": "short.txt", "JSONL": "docs.jsonl"}
    extra = [str(tmp_path / files[x]) if x in files else x for x in extra]
    rc = main(["pretrain", *argv(corpus, tmp_path / "run", "--max-steps", "2", *extra)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and expect in err, err
    assert not common.Checkpointer(tmp_path / "run").list()


@pytest.mark.parametrize("k", ["1", "2"])  # (2: GPTConfig's own experts_per_token, which a dense model keeps)
def test_experts_per_token_for_a_dense_init_is_refused(corpus, tmp_path, capsys, k):
    from tritongpt.model.config import GPTConfig

    GPTModel(GPTConfig(vocab_size=300, context_length=32, n_embd=16, n_layer=1, n_head=2)).save(
        tmp_path / "dense.safetensors")
    rc = main(["pretrain", *argv(corpus, tmp_path / "run", "--init", str(tmp_path / "dense.safetensors"),
                                 "--experts-per-token", k)])
    assert rc == 2
    assert f"--experts-per-token {k} is how many experts a token goes through: without --n-experts" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_reads_a_metrics_log_cut_short_and_names_a_damaged_line(corpus, tmp_path, capsys):
    """A run killed while appending a row leaves its last line cut short: the resume drops it (the log is rewritten
    to the checkpoint's step anyway). Another bad line was json's traceback from deep in the resume; now it is named."""
    out = tmp_path / "run"
    short = ("--eval-every", "0", "--sample-tokens", "0", "--log-every", "0", "--block-size", "16", "--batch-size", "2")
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", *short)]) == 0
    log = out / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 2, "lo')
    capsys.readouterr()
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "2", "--resume", *short)]) == 0
    assert f"note: {log}: its last line is cut short" in capsys.readouterr().err
    assert [r["step"] for r in common.MetricsLog(log).rows() if "loss" in r] == [1, 2]
    log.write_text('{"step": 1, oops}\n' + good)
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "3", "--resume", *short)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {log}:1: not a JSON row ("), err


def test_a_run_folder_is_not_reused_by_accident(corpus, tmp_path, capsys):
    """A new run into a folder holding one is refused (its checkpoints would outrank the new ones
    and its metrics mix with them); --overwrite replaces it. A resume says which flags changed,
    refuses a checkpoint past --max-steps, and names a model that does not fit."""
    out = tmp_path / "run"
    short = ("--eval-every", "0", "--sample-tokens", "0", "--log-every", "0")
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "4", "--ckpt-every", "2", *short)]) == 0
    capsys.readouterr()

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "2", *short)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out-dir") and "already holds a run (2 checkpoints up to ckpt-0000004, " \
        "metrics.jsonl)" in err and "--resume" in err and "--overwrite" in err, err

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "3", "--overwrite", *short)]) == 0
    capsys.readouterr()
    assert [p.name for p in common.Checkpointer(out).list()] == ["ckpt-0000003"]
    assert [r["step"] for r in common.MetricsLog(out / "metrics.jsonl").rows() if "loss" in r] == [1, 2, 3]

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "2", "--resume", *short)]) == 2
    assert "at step 3, past --max-steps 2" in capsys.readouterr().err

    # nothing to train: the checkpoint is evaluated (also when --eval-every divides its step)
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "3", "--resume", *short, "--eval-every", "3")]) == 0
    printed = capsys.readouterr()
    assert "already at --max-steps 3: nothing to train" in printed.err
    assert re.search(r"train loss - -> -, val loss \S+ -> \d", printed.out), printed.out
    assert "note: resuming" not in printed.err  # --dtype fp32 here and auto then: the same on a CPU

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "4", "--resume", "--lr", "1e-2",
                                   "--batch-size", "2", *short)]) == 0
    err = capsys.readouterr().err
    assert "note: resuming with --max-steps 4 (the run had 3), --batch-size 2 (4), --lr 0.01 (0.002)" in err, err
    assert "kernels" not in err, err
    # another path: the same model, named as resolved (auto on a CPU is the reference path)
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "4", "--resume", *short, "--kernels", "layernorm")]) == 0
    assert "note: resuming on the kernels layernorm (the run had reference)" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "4", "--resume", *short, "--kernels", "auto")]) == 0
    assert "kernels" not in capsys.readouterr().err

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "5", "--resume", "--overwrite", *short)]) == 2
    assert "--overwrite would delete the run" in capsys.readouterr().err
    # a checkpoint from elsewhere, resumed into a folder holding another run: refused as a new run is
    other = tmp_path / "other"
    assert main(["pretrain", *argv(corpus, other, "--max-steps", "1", *short)]) == 0
    assert main(["pretrain", *argv(corpus, other, "--max-steps", "5", "--resume", str(out), *short)]) == 2
    assert "already holds a run (1 checkpoint up to ckpt-0000001" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, other, "--max-steps", "5", "--resume", str(out), "--overwrite",
                                   *short)]) == 0  # its run replaced by the resumed one
    assert [p.name for p in common.Checkpointer(other).list()] == ["ckpt-0000005"]
    assert [r["step"] for r in common.MetricsLog(other / "metrics.jsonl").rows() if "loss" in r] == [5]
    capsys.readouterr()
    # metrics without a checkpoint (stopped before the first save): --resume would not help
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert main(["pretrain", *argv(corpus, tmp_path / "stopped", "--max-steps", "2", *short)]) == 2
    err = capsys.readouterr().err
    assert "holds the metrics of a run that wrote no checkpoint: --overwrite" in err and "--resume" not in err

    assert main(["pretrain", *argv(corpus, out, "--max-steps", "5", "--resume", "--model", "mini", *short)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this model: the checkpoint's model has" in err and "n_layer" in err \
        and "\n" not in err, err


def test_a_resume_names_another_dropout(corpus, tmp_path, capsys):
    """--dropout is the model's, not the loop's: a resume that drops it (the preset's 0.0) or
    changes it trains another run, and says so as for the loop's flags."""
    out = tmp_path / "run"
    short = ("--eval-every", "0", "--sample-tokens", "0", "--log-every", "0")
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", "--dropout", "0.1", *short)]) == 0
    capsys.readouterr()
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", "--resume", *short)]) == 0
    assert "note: resuming with --dropout 0.0 (the run had 0.1)" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", "--resume", "--dropout", "0.1", *short)]) == 0
    assert "note: resuming" not in capsys.readouterr().err



def test_init_starts_from_a_runs_weights(corpus, tmp_path, capsys, monkeypatch):
    """--init RUN (nanoGPT's init_from) trains on from that run's weights, with its tokenizer and
    its shape (at --lr tiny, the new run's weights are the old ones to ~1e-6, where a fresh start's are
    not); --dropout and --vocab-multiple apply to them; --block-size is held to their context; a
    resume under another --init says so; a path that is no checkpoint is refused."""
    from safetensors.torch import load_file

    short = ("--eval-every", "0", "--sample-tokens", "0", "--log-every", "0", "--max-steps", "1")
    first = tmp_path / "first"
    assert main(["pretrain", *argv(corpus, first, *short, "--model", "mini")]) == 0
    capsys.readouterr()
    # no --tokenizer: the run's own is found beside its weights
    base = [a for a in argv(corpus, tmp_path / "next", *short) if a not in ("--tokenizer", str(corpus.tok))]
    assert main(["pretrain", *base, "--init", str(first), "--lr", "1e-9", "--min-lr", "0"]) == 0
    out = capsys.readouterr().out
    assert f"pretrain: --init {first} (" in out and "(small tokenizer)" in out
    was = load_file(first / "ckpt-0000001" / "model.safetensors")
    now = load_file(tmp_path / "next" / "ckpt-0000001" / "model.safetensors")
    assert was.keys() == now.keys() and all((was[k] - now[k]).abs().max() < 1e-5 for k in was)
    assert (tmp_path / "next" / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    fresh = tmp_path / "fresh"
    assert main(["pretrain", *argv(corpus, fresh, *short, "--model", "mini", "--seed", "7")]) == 0
    new = load_file(fresh / "ckpt-0000001" / "model.safetensors")
    assert (was["out_head.weight"] - new["out_head.weight"]).abs().max() > 1e-2
    capsys.readouterr()

    more = tmp_path / "more"
    assert main(["pretrain", *argv(corpus, more, *short), "--init", str(first), "--dropout", "0.2",
                 "--vocab-multiple", "64"]) == 0
    cfg = GPTModel.load(more / "ckpt-0000001" / "model.safetensors").config
    assert (cfg.dropout, cfg.vocab_size, cfg.padded_vocab_size, cfg.n_layer) == (0.2, 300, 320, 6)  # mini
    capsys.readouterr()
    assert main(["pretrain", *argv(corpus, more, *short), "--init", str(fresh), "--resume", "--dropout", "0.2",
                 "--vocab-multiple", "64"]) == 0
    assert f"note: resuming with --init {fresh} (the run had {first})" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the same weights named relatively are the same --init
    assert main(["pretrain", *argv(corpus, more, *short), "--init", "first", "--resume", "--dropout", "0.2",
                 "--vocab-multiple", "64"]) == 0
    assert "--init" not in capsys.readouterr().err
    for bad, said in ((["--init", str(tmp_path / "none")], "--init '" + str(tmp_path / "none") + "': no checkpoint"),
                      (["--init", str(first), "--block-size", "999"],
                       f"--block-size 999 is longer than --init {first}'s context length 256"),
                      # --tokenizer over the run's own is heeded: here one with more tokens than the model
                      (["--init", str(first), "--tokenizer", "default"],
                       "tokenizer default has 4096 tokens but the model only 300")):
        assert main(["pretrain", *argv(corpus, tmp_path / "bad", *short), *bad]) == 2
        assert said in capsys.readouterr().err
    # --model with --init names a GPT-2 file's heads; a checkpoint of another shape keeps its own, noted
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args

    a = parse_args(["--init", str(first), "--model", "tiny"])
    assert check_args(a, TrainArgs.from_namespace(a))[0].config.n_layer == 6  # mini's
    assert "(its saved config, used), not tiny's" in capsys.readouterr().err


def test_fp16_from_the_command_line(corpus, tmp_path, capsys):
    """--dtype fp16 trains with loss scaling (its scale in the log line and metrics); a resume of
    an fp32 run in fp16 names the change, and starts its scale afresh."""
    out = tmp_path / "run"
    short = ("--eval-every", "0", "--sample-tokens", "0", "--log-every", "1")
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", "--dtype", "fp32", *short)]) == 0
    assert "loss scale" not in capsys.readouterr().out
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "2", "--dtype", "fp16", "--resume", *short)]) == 0
    said = capsys.readouterr()
    assert "note: resuming with --max-steps 2 (the run had 1), precision float16 (float32)" in said.err
    line = r"step +2 \| loss [0-9.]+ \| lr \S+ \| grad_norm [0-9.]+ \| loss scale 65536 \|"
    assert re.search(line, said.out), said.out
    last = common.MetricsLog(out / "metrics.jsonl").rows()[-1]
    assert last["loss_scale"] == 65536.0 and last["skipped"] is False


def test_the_summary_compares_val_losses_of_this_run_only(corpus, tmp_path, capsys):
    """The done line's val loss goes from this call's first evaluation to its last: with
    --eval-every 0 there is one, the last step's, and it printed "val loss 5.1 -> 5.1" as if
    validation had not moved; on a resume the first is the checkpoint's, not step 0's."""
    out = tmp_path / "run"
    short = ("--sample-tokens", "0", "--log-every", "0")
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "2", "--eval-every", "0", *short)]) == 0
    last = common.MetricsLog(out / "metrics.jsonl").rows()[-1]["val_loss"]
    assert f"val loss - -> {last:.3f};" in capsys.readouterr().out
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "3", "--eval-every", "1", "--resume", *short)]) == 0
    vals = [r["val_loss"] for r in common.MetricsLog(out / "metrics.jsonl").rows() if "val_loss" in r]
    assert f"val loss {vals[0]:.3f} -> {vals[-1]:.3f};" in capsys.readouterr().out  # steps 2 and 3


def _pretrain_rank(rank, out, rec, port, kw):
    """The pretrain command as process `rank` of 2 under torchrun (test_loop's _run_ddp forks it); records its
    exit code and what it printed."""
    import contextlib
    import io

    from test_loop import _as_torchrun_rank

    _as_torchrun_rank(rank, port)
    said = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(said[0]), contextlib.redirect_stderr(said[1]):
        rc = main(["pretrain", *kw["argv"]])
    torch.save({"rc": rc, "out": said[0].getvalue(), "err": said[1].getvalue()}, Path(rec) / f"rank{rank}.pt")


def test_torchrun_two_cpu_processes_runs_the_real_cli(corpus, tmp_path):
    """The launcher is torchrun itself (not a home-made one): 2 gloo processes, rank 0 writes."""
    import importlib.util
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    # with TensorBoard installed, --report-to too: rank 0 alone reports (tests/test_tracking.py)
    track = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    # unbuffered: rank 0's report reaches the pipe when printed, not at its exit-time flush (a
    # guess at the one unexplained failure below, where stdout lacked the report with exit code 0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # `python -m torch.distributed.run` is the torchrun console script, pinned to this Python
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tritongpt.cli", "pretrain",
           *argv(corpus, out, "--max-steps", "6", "--ckpt-every", "3", "--eval-every", "3",
                 "--eval-batches", "1", "--sample-tokens", "0", "--log-every", "3", *track)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # (seen failing once under -n 2 with rc 0; the message keeps both streams for next time)
    assert "2 processes" in done.stdout and "done: 6 steps" in done.stdout, \
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    rows = common.MetricsLog(out / "metrics.jsonl").rows()
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer, not two
    assert [p.name for p in common.Checkpointer(out).list()] == ["ckpt-0000003", "ckpt-0000006"]
    state = common.load_state(out / "ckpt-0000006")
    assert state["world_size"] == 2 and len(state["generator"]) == 2  # every rank's batch generator

    # resumed by 2 processes in torchrun's environment: still one report (rank 1 also knows the checkpoint it
    # resumed from), and one note of each kind: on other blocks, every rank finds the data not the checkpoint's.
    # (Forked from this process, with torch imported: a second launch of torchrun itself cost ~10 s of
    # process starts; the launch above proves the launcher, the command reads only the variables it sets.)
    from test_loop import _run_ddp

    resume = argv(corpus, out, "--max-steps", "8", "--ckpt-every", "3", "--eval-every", "3", "--eval-batches", "1",
                  "--sample-tokens", "0", "--log-every", "3", *track, "--resume")
    resume[resume.index("--block-size") + 1] = "24"
    ranks = _run_ddp(out, tmp_path / "rec", worker=_pretrain_rank, argv=resume)
    assert [r["rc"] for r in ranks] == [0, 0], ranks[0]["err"][-3000:] + ranks[1]["err"][-3000:]
    stdout, stderr = (ranks[0][k] + ranks[1][k] for k in ("out", "err"))
    assert stdout.count("done: 2 steps (to step 8)") == 1, stdout
    assert stderr.count("note: resuming on different data than the checkpoint's") == 1, stderr[-3000:]
    assert [r["step"] for r in common.MetricsLog(out / "metrics.jsonl").rows() if "loss" in r] == list(range(1, 9))
    if track:  # one events file a launch (rank 1 wrote none), every step once
        from test_tracking import tensorboard_scalars

        assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
        assert [s for s, _ in tensorboard_scalars(out)["loss"]] == list(range(1, 9))


# -- mutation pass: the resume note, the data checks' edges, the flags' edges -----------------------
def test_a_resume_is_told_exactly_when_its_data_differ(capsys):
    """The data position records the source, its split and block, the tokenizer and the data's
    hash and the BOS before its documents; a resume notes any change, and not the hashes older
    checkpoints lack or recorded as the joined text's. A checkpoint from before the BOS was recorded
    had none (a change only for a tokenizer that prepends one)."""
    from tritongpt.train.pretrain import DataPosition

    tok = SimpleNamespace(hash="t" * 64)
    splits = {"train": list(range(100)), "source_hash": "docs", "joined_hash": "joined", "bos_id": None}
    pos = DataPosition(SimpleNamespace(data=None, text_field="text", document_mask=False), tok, 32, splits)
    saved = pos.state_dict()
    assert saved == {"source": "pydoc", "text_field": "text", "train_tokens": 100, "block_size": 32,
                     "tokenizer_hash": "t" * 64, "source_hash": "docs", "document_mask": False, "bos_id": None}

    def told(d):
        pos.load_state_dict(d)
        return capsys.readouterr().err

    assert told(saved) == ""
    assert told({k: v for k, v in saved.items() if k != "source_hash"}) == ""   # before source_hash was kept
    assert told(dict(saved, source_hash="joined")) == ""                        # before documents were apart
    assert told({k: v for k, v in saved.items() if k != "bos_id"}) == ""        # before the BOS was recorded
    for change in ({"train_tokens": 99}, {"tokenizer_hash": "u" * 64}, {"block_size": 24}, {"source_hash": "x"},
                   {"bos_id": 0}):
        assert "note: resuming on different data than the checkpoint's" in told(dict(saved, **change)), change
    assert "(pydoc, 100 tokens, block 24): batches will differ" in told(dict(saved, block_size=24))
    # a run whose tokenizer prepends BOS (id 0), resumed from a checkpoint written before BOS was
    pos = DataPosition(SimpleNamespace(data=None, text_field="text", document_mask=False), tok, 32,
                       dict(splits, bos_id=0))
    assert told(pos.state_dict()) == "" and pos.state_dict()["bos_id"] == 0
    assert "note: resuming on different data" in told({k: v for k, v in pos.state_dict().items() if k != "bos_id"})


def test_the_data_checks_at_their_edges(tmp_path, capsys):
    """A block needs block + 1 training tokens; a batch may take exactly all of them; validation
    is evaluated on val when it holds a block + 1 tokens, else on train windows, with a note."""
    from tritongpt.errors import UserError
    from tritongpt.train.pretrain import load_splits

    class Chars:
        name, hash, vocab_size, eot_id = "chars", "c" * 64, 300, 299

        def encode_batch(self, texts, allowed_special="none_raise"):
            return [[ord(c) for c in t] for t in texts]

    (tmp_path / "t.txt").write_text("x" * 40)           # 40 tokens: 30 train, 10 val
    args = SimpleNamespace(data=str(tmp_path / "t.txt"), text_field="text", cache_dir=tmp_path / "c",
                           val_fraction=0.25)
    trainer = SimpleNamespace(ddp=False, is_main=True)
    with pytest.raises(UserError, match="context longer than the data: --block-size 30 needs at least 31"):
        load_splits(args, Chars(), 30, 1, trainer)
    splits = load_splits(args, Chars(), 10, 3, trainer)  # 3 x 10 = the 30 training tokens
    assert len(splits["train"]) == 30 and splits["eval"] == "train"
    assert "the validation split (10 tokens) is shorter than one block of 10" in capsys.readouterr().err
    splits = load_splits(args, Chars(), 9, 3, trainer)
    assert splits["eval"] == "val" and capsys.readouterr().err == ""


def test_the_flags_at_their_edges(corpus, capsys):
    """A block as long as the context, a prompt that fills it, an empty one and dropout 0 are fine;
    dropout 1 and a prompt past the context are not; .json data is noted as read as text; the
    weights are --seed's."""
    from tritongpt.errors import UserError
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args

    def check(*flags):
        a = parse_args(["--tokenizer", str(corpus.tok), *flags])
        return check_args(a, TrainArgs.from_namespace(a))

    assert check()[2] == check("--block-size", "128")[2] == 128           # tiny's context
    # the preset's random weights are --seed's
    seed = str(torch.randint(10**6, (1,)).item())
    one, two, other = (check("--seed", s)[0].state_dict() for s in (seed, seed, seed + "1"))
    assert all(torch.equal(one[k], two[k]) for k in one) and not torch.equal(one["tok_emb.weight"],
                                                                            other["tok_emb.weight"])
    assert len(check("--prompt", "<|endoftext|>" * 128, "--dropout", "0")[3]) == 128
    _, tok, _, prompt = check("--prompt", "")
    assert prompt == [tok.eot_id]  # an empty prompt: samples start from <|endoftext|>
    with pytest.raises(UserError, match=r"--prompt is 129 tokens; the context is 128"):
        check("--prompt", "<|endoftext|>" * 129)
    with pytest.raises(UserError, match=r"--dropout must be in \[0, 1\), got 1.0"):
        check("--dropout", "1.0")
    capsys.readouterr()
    check("--data", "records.json")
    assert "note: records.json is read as plain text" in capsys.readouterr().err


def test_hellaswag_under_ddp_each_rank_scores_its_share_and_sums_the_counts(corpus, monkeypatch):
    """hellaswag_eval_fn, as the Trainer calls it on rank r of w: the examples r, r + w, ... scored
    (each rank its share, not all of them), the right counts all-reduced, over all the examples.
    The all-reduce is faked (one process): it adds counts of 1 and 2 from the other ranks."""
    import random

    from tritongpt.model.config import GPTConfig
    from tritongpt.train import hellaswag
    from tritongpt.train.pretrain import hellaswag_eval_fn
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer(str(corpus.tok))
    rng, words = random.Random(), corpus.text.read_text().split()[:400]
    examples = [{"ctx": " ".join(rng.choices(words, k=rng.randint(3, 12))),
                 "endings": [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(4)],
                 "label": rng.randrange(4)} for _ in range(11)]
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=16, n_layer=1, n_head=2))
    alone = {rank: hellaswag.score(model, tok, examples[rank::3]) for rank in range(3)}  # before the fakes
    scored, real = [], hellaswag.ending_losses

    def recording(model, tok, share, *a, **k):
        scored.extend(ex["ctx"] for ex in share)
        yield from real(model, tok, share, *a, **k)

    def all_reduce(counts):
        counts += torch.tensor([1, 2], device=counts.device)

    monkeypatch.setattr(hellaswag, "ending_losses", recording)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    for rank in range(3):
        scored.clear()
        got = hellaswag_eval_fn(examples, tok)(model, rank, 3)
        assert scored == [ex["ctx"] for ex in examples[rank::3]], rank
        n = alone[rank]["examples"]
        right, right_norm = round(alone[rank]["acc"] * n), round(alone[rank]["acc_norm"] * n)
        assert got == {"hellaswag_acc": (right + 1) / 11, "hellaswag_acc_norm": (right_norm + 2) / 11}, rank


def test_hellaswag_is_scored_at_each_evaluation(corpus, tmp_path, capsys, real_plots):
    """--hellaswag N adds HellaSwag's acc and acc_norm on its first N examples to every
    evaluation (metrics.jsonl, hellaswag.png); the last one is what `tritongpt hellaswag` gives
    the final checkpoint. A bad flag or file is refused before training."""
    import random

    from tritongpt.train import hellaswag
    from tritongpt.train.sft import load_init_model
    from tritongpt.train.tokenizer import get_tokenizer

    rng, words = random.Random(0), corpus.text.read_text().split()[:400]
    rows = [{"ctx": " ".join(rng.choices(words, k=rng.randint(3, 12))),
             "endings": [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(4)],
             "label": rng.randrange(4), "split": "val"} for _ in range(9)]
    data = tmp_path / "hs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1",
                                 "--sample-every", "0", "--hellaswag", "7", "--hellaswag-data", str(data))]) == 0
    evals = [r for r in common.MetricsLog(out / "metrics.jsonl").rows() if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        for k in ("hellaswag_acc", "hellaswag_acc_norm"):  # a share of the 7 examples
            assert 0 <= r[k] <= 1 and abs(r[k] * 7 - round(r[k] * 7)) < 1e-9, (k, r[k])
    model = load_init_model(str(out))
    want = hellaswag.score(model, get_tokenizer(str(corpus.tok)), hellaswag.read_examples(data)[:7])
    assert (evals[-1]["hellaswag_acc"], evals[-1]["hellaswag_acc_norm"]) == (want["acc"], want["acc_norm"])
    assert (out / "hellaswag.png").stat().st_size > 1000
    capsys.readouterr()

    for extra, msg in ((["--hellaswag", "-1"], "--hellaswag must be >= 0 (0: off), got -1"),
                       (["--hellaswag-data", str(data)], "--hellaswag-data is read with --hellaswag N"),
                       (["--hellaswag", "3", "--hellaswag-data", str(tmp_path / "none.jsonl")],
                        "HellaSwag file not found")):
        assert main(["pretrain", *argv(corpus, tmp_path / "bad", "--max-steps", "1", *extra)]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    # offline, with no --hellaswag-data: the error names pretrain's flag (not hellaswag's --data)
    import urllib.request

    def offline(url, to):
        raise OSError("no network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(urllib.request, "urlretrieve", offline)
        mp.setenv("TRITONGPT_CACHE", str(tmp_path / "empty-cache"))
        assert main(["pretrain", *argv(corpus, tmp_path / "bad", "--max-steps", "1", "--hellaswag", "3")]) == 2
    assert "no network; pass --hellaswag-data with the hellaswag_val.jsonl file" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "all", "--max-steps", "1", "--eval-every", "0",
                                   "--sample-every", "0", "--hellaswag", "20", "--hellaswag-data", str(data))]) == 0
    assert "has 9 examples; scoring all of them" in capsys.readouterr().err
    # without --hellaswag: no HellaSwag figures and no hellaswag.png
    assert main(["pretrain", *argv(corpus, tmp_path / "off", "--max-steps", "1", "--eval-every", "0",
                                   "--sample-every", "0")]) == 0
    assert not (tmp_path / "off" / "hellaswag.png").exists()
    assert not any("hellaswag_acc" in r for r in common.MetricsLog(tmp_path / "off" / "metrics.jsonl").rows())


def test_under_torchrun_only_a_nodes_first_process_downloads_hellaswag_at_start(corpus, tmp_path, monkeypatch):
    """LOCAL_RANK 0 downloads the file while checking the flags; a node's other processes check
    the flags only, and read the file at their first evaluation (after load_splits' barrier)."""
    import inspect
    import urllib.request

    from tritongpt.errors import UserError
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args

    calls = []
    fetched = []

    def write_examples(to):
        Path(to).write_text("".join(json.dumps({"ctx": f"a {i}", "endings": ["b", "c d", "e", "f"], "label": i % 4})
                                    + "\n" for i in range(5)))

    def fetch(url, to):
        fetched.append(url)
        calls.append([f.function for f in inspect.stack()])
        write_examples(to)

    monkeypatch.setattr(urllib.request, "urlretrieve", fetch)
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    a = parse_args(["--tokenizer", str(corpus.tok), "--hellaswag", "3"])
    check_args(a, TrainArgs.from_namespace(a))
    assert fetched == [] and getattr(a, "_hellaswag", None) is None
    a = parse_args(["--tokenizer", str(corpus.tok), "--hellaswag", "-1"])
    with pytest.raises(UserError, match="--hellaswag must be >= 0"):  # the flags are still checked first
        check_args(a, TrainArgs.from_namespace(a))
    out = tmp_path / "run"
    assert main(["pretrain", *argv(corpus, out, "--max-steps", "1", "--eval-every", "0", "--sample-every", "0",
                                   "--hellaswag", "3")]) == 0
    assert len(fetched) == 1 and "fit" in calls[0]  # at the evaluation, not as the run starts
    # a file of one's own is no download: every process reads it, and a bad one is refused, at start
    a = parse_args(["--tokenizer", str(corpus.tok), "--hellaswag", "3", "--hellaswag-data", str(tmp_path / "h.jsonl")])
    write_examples(tmp_path / "h.jsonl")
    check_args(a, TrainArgs.from_namespace(a))
    assert len(a._hellaswag) == 3
    (tmp_path / "h.jsonl").write_text("{")
    a = parse_args(["--tokenizer", str(corpus.tok), "--hellaswag", "3", "--hellaswag-data", str(tmp_path / "h.jsonl")])
    with pytest.raises(UserError, match="not valid JSON"):
        check_args(a, TrainArgs.from_namespace(a))
    rows = [r for r in common.MetricsLog(out / "metrics.jsonl").rows() if "hellaswag_acc" in r]
    assert rows and all(abs(r["hellaswag_acc"] * 3 - round(r["hellaswag_acc"] * 3)) < 1e-9 for r in rows)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache0"))
    a = parse_args(["--tokenizer", str(corpus.tok), "--hellaswag", "3"])
    check_args(a, TrainArgs.from_namespace(a))
    assert len(fetched) == 2 and len(a._hellaswag) == 3


def test_hellaswag_examples_are_the_first_n_read_once_with_a_note_only_when_fewer(tmp_path, capsys):
    from tritongpt.train import hellaswag
    from tritongpt.train.pretrain import hellaswag_examples

    data = tmp_path / "hs.jsonl"
    rows = [{"ctx": f"context {i}", "endings": [f"end {i} {j}" for j in range(4)], "label": (7 * i) % 4}
            for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = hellaswag.read_examples(data)
    assert hellaswag_examples(SimpleNamespace(hellaswag=3, hellaswag_data=str(data))) == every[:3]
    args = SimpleNamespace(hellaswag=5, hellaswag_data=str(data))
    got = hellaswag_examples(args)
    assert got == every and "scoring all of them" not in capsys.readouterr().err  # exactly as many: no note
    data.unlink()
    assert hellaswag_examples(args) is got  # read once: a later call does not read the file again
    assert hellaswag_examples(SimpleNamespace(hellaswag=0, hellaswag_data=None)) == []


def test_label_smoothing_and_z_loss_shape_the_training_loss_only(corpus, tmp_path, capsys):
    """--label-smoothing and --z-loss change what is trained: the logged train loss is the
    objective (at initialisation, where every logit is near 0, the z-loss adds z * log(V)^2 and
    smoothing adds ~nothing), while evaluations report the plain cross-entropy, so the first val
    loss is the plain run's. A resume that changes them names the change."""
    short = ("--sample-tokens", "0", "--log-every", "1", "--eval-every", "1", "--max-steps", "1")
    rows, out = {}, {}
    for name, extra in (("plain", ()), ("options", ("--label-smoothing", "0.1", "--z-loss", "0.01"))):
        assert main(["pretrain", *argv(corpus, tmp_path / name, *short, *extra)]) == 0
        rows[name] = common.MetricsLog(tmp_path / name / "metrics.jsonl").rows()
        out[name] = capsys.readouterr().out
    assert "loss: cross-entropy with label smoothing 0.1 and z-loss 0.01" in out["options"]
    assert "loss: cross-entropy" not in out["plain"]  # its train loss is the cross-entropy: nothing to say
    first_val = {k: next(r["val_loss"] for r in v if "val_loss" in r) for k, v in rows.items()}
    first_loss = {k: next(r["loss"] for r in v if "loss" in r) for k, v in rows.items()}
    assert first_val["options"] == first_val["plain"]
    expected = 0.01 * math.log(300) ** 2  # the tokenizer's 300 tokens are the model's vocabulary
    assert abs(first_loss["options"] - first_loss["plain"] - expected) < 0.05 * expected, (first_loss, expected)
    assert main(["pretrain", *argv(corpus, tmp_path / "options", *short[:-1], "2", "--resume",
                                   "--label-smoothing", "0.1")]) == 0
    assert "note: resuming with --max-steps 2 (the run had 1), --z-loss 0.0 (0.01)" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expect", [("--label-smoothing", "1.5", "--label-smoothing must be in [0, 1]"),
                                               ("--z-loss=-1e-4", None, "--z-loss must be in [0, inf]"),
                                               ("--z-loss", "nan", "--z-loss must be a finite number, got nan")])
def test_bad_loss_options_are_refused_before_any_work(corpus, tmp_path, capsys, flag, value, expect):
    assert main(["pretrain", *argv(corpus, tmp_path / "run", "--max-steps", "1"), flag, *[value] * bool(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_logit_softcap_makes_a_soft_capped_model_kept_by_init(corpus, tmp_path, capsys):
    """--logit-softcap builds the new model with GPTConfig.logit_softcap (saved with it: --init
    and generate get the same model); with --init it may only repeat the model's own cap."""
    short = ("--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", "--max-steps", "1")
    assert main(["pretrain", *argv(corpus, tmp_path / "capped", *short, "--logit-softcap", "15")]) == 0
    assert ", logits soft-capped at 15) on cpu" in capsys.readouterr().out
    model = GPTModel.load(tmp_path / "capped" / "ckpt-0000001" / "model.safetensors")
    assert model.config.logit_softcap == 15.0
    with torch.no_grad():
        h = model.hidden(torch.tensor([[1, 2, 3]]))
        assert torch.allclose(model.logits(h), 15.0 * torch.tanh(model.out_head(h) / 15.0))
    capsys.readouterr()
    init = ("--init", str(tmp_path / "capped"))
    assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, "--logit-softcap", "30")]) == 2
    assert "--logit-softcap 30 would change what --init's model computes (its logit_softcap is 15)" in \
        capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, "--logit-softcap", "0")]) == 2
    assert "--logit-softcap 0 would change what --init's model computes" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init)]) == 0
    assert GPTModel.load(tmp_path / "again" / "ckpt-0000001" / "model.safetensors").config.logit_softcap == 15.0
    # 0 is no cap (what the resume error below tells an uncapped run to pass), not a bad value
    assert main(["pretrain", *argv(corpus, tmp_path / "plain", *short, "--logit-softcap", "0")]) == 0
    assert GPTModel.load(tmp_path / "plain" / "ckpt-0000001" / "model.safetensors").config.logit_softcap == 0.0
    # a resume builds the model from the flags: without the cap it would train another model on
    more = ("--max-steps", "2", "--resume")
    assert main(["pretrain", *argv(corpus, tmp_path / "capped", *short[:-2], *more)]) == 2
    err = capsys.readouterr().err
    assert "--resume: " in err
    assert "soft-caps its logits at 15, this run's at 0 (0: none): pass --logit-softcap 15" in err
    assert main(["pretrain", *argv(corpus, tmp_path / "capped", *short[:-2], *more, "--logit-softcap", "15")]) == 0


def test_n_kv_head_makes_a_grouped_query_model_kept_by_init_and_resume(corpus, tmp_path, capsys):
    """--n-kv-head builds the new model with fewer key/value heads (saved with it); with --init it
    may only repeat the model's own, and a resume without it is refused by name (the weights'
    shapes differ); a count that does not divide the heads is refused before any work."""
    short = ("--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", "--max-steps", "1")
    assert main(["pretrain", *argv(corpus, tmp_path / "gqa", *short, "--n-kv-head", "2")]) == 0
    assert ", 2 key/value heads for 4 query heads) on cpu" in capsys.readouterr().out
    model = GPTModel.load(tmp_path / "gqa" / "ckpt-0000001" / "model.safetensors")
    assert model.config.n_kv_head == 2 and model.trf_blocks[0].att.W_key.weight.shape == (64, 128)
    init = ("--init", str(tmp_path / "gqa"))
    for given in ("1", "0", "4"):  # (0 and 4: as many as the heads, GPT-2's)
        assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, "--n-kv-head", given)]) == 2
        assert f"--n-kv-head {given} would change the shapes of --init's weights (its n_kv_head is 2, with 4 " \
               "heads)" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, "--n-kv-head", "2")]) == 0
    more = ("--max-steps", "2", "--resume")
    assert main(["pretrain", *argv(corpus, tmp_path / "gqa", *short[:-2], *more)]) == 2
    assert "the checkpoint's model has n_kv_head 2 (this run: 0); pass the --n-kv-head it was trained with" in \
        capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "gqa", *short[:-2], *more, "--n-kv-head", "2")]) == 0
    capsys.readouterr()
    for bad, msg in (("3", "--n-kv-head 3 must divide tiny's 4 heads"),
                     ("-1", "--n-kv-head must be >= 0 (0: as many as the heads), got -1")):
        assert main(["pretrain", *argv(corpus, tmp_path / "bad", *short, "--n-kv-head", bad)]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_attention_window_makes_a_local_model_kept_by_init(corpus, tmp_path, capsys):
    """--attention-window / --window-layers build the new model with local attention (saved with it);
    with --init they may only repeat the model's own; a bad window is refused before any work."""
    short = ("--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", "--max-steps", "1")
    local = ("--attention-window", "8", "--window-layers", "odd")
    assert main(["pretrain", *argv(corpus, tmp_path / "local", *short, *local)]) == 0
    assert ", local attention over 8 positions in odd layers) on cpu" in capsys.readouterr().out
    model = GPTModel.load(tmp_path / "local" / "ckpt-0000001" / "model.safetensors")
    assert [b.att.window for b in model.trf_blocks] == [0, 8, 0, 8]
    init = ("--init", str(tmp_path / "local"))
    # (0 is a value too: --init's local model made dense)
    for flag, given, has in (("--window-layers", "all", "odd"), ("--attention-window", "16", "8"),
                             ("--attention-window", "0", "8")):
        assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, flag, given)]) == 2
        assert f"{flag} {given} would change what --init's model computes (its {flag[2:].replace('-', '_')} is " \
               f"{has})" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "again", *short, *init, *local)]) == 0
    capsys.readouterr()
    # --attention-window 0: a dense model, which the header does not call local
    assert main(["pretrain", *argv(corpus, tmp_path / "dense", *short, "--attention-window", "0")]) == 0
    out = capsys.readouterr().out
    assert "pretrain: " in out and "local attention" not in out
    assert GPTModel.load(tmp_path / "dense" / "ckpt-0000001" / "model.safetensors").config.attention_window == 0
    # --window-layers without a window (neither given nor --init's) would do nothing: said, not ignored
    for extra in ((), ("--init", str(tmp_path / "dense")), ("--attention-window", "0")):
        assert main(["pretrain", *argv(corpus, tmp_path / "bad", *short, *extra, "--window-layers", "odd")]) == 2
        assert "--window-layers odd picks the layers --attention-window makes local: without a window it does " \
               "nothing" in capsys.readouterr().err
    assert main(["pretrain", *argv(corpus, tmp_path / "bad", *short, "--attention-window", "-2")]) == 2
    assert "--attention-window must be >= 0 (0: every layer sees the whole context), got -2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the flag's choices, at parsing
        main(["pretrain", *argv(corpus, tmp_path / "bad", *short, "--window-layers", "even")])
    assert "--window-layers: all, odd or a comma list of layer indices (0,1,2,3,4,6), got 'even'" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_hellaswag_data_of_winogrande_logs_acc_alone(corpus, tmp_path):
    """--hellaswag-data may be any file hellaswag reads, WinoGrande's too, whose score has no acc_norm (both options
    share their ending): the evaluation logs acc alone, not a KeyError at the first evaluation."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.train.hellaswag import read_examples
    from tritongpt.train.pretrain import hellaswag_eval_fn
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer(str(corpus.tok))
    data = tmp_path / "wino.jsonl"
    data.write_text("".join(json.dumps({"sentence": f"The {w} did not fit in the case because the _ was too big.",
                                        "option1": w, "option2": "case", "answer": "12"[i % 2]}) + "\n"
                            for i, w in enumerate(("trophy", "ball", "book"))))
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=16, n_layer=1, n_head=2))
    got = hellaswag_eval_fn(read_examples(data), tok)(model, 0, 1)
    assert set(got) == {"hellaswag_acc"} and 0 <= got["hellaswag_acc"] <= 1


@pytest.mark.parametrize("other", [None, "sft"])
def test_a_wrong_resume_is_refused_before_the_data_is_tokenized(corpus, tmp_path, capsys, monkeypatch, other):
    """`pretrain --resume` on a folder without a checkpoint, or on another command's run, was refused by the Trainer
    after the data was tokenized (the audit's: minutes for a large corpus before 'no checkpoint found')."""
    from tritongpt.train import pretrain as pretrain_module

    def too_late(*args, **kwargs):
        raise AssertionError("the data was tokenized before the resume was checked")

    monkeypatch.setattr(pretrain_module, "load_splits", too_late)
    run = tmp_path / "run"
    if other:
        ckpt = run / "ckpt-0000001"
        ckpt.mkdir(parents=True)
        torch.save({"name": other, "step": 1, "args": {}}, ckpt / "state.pt")
        (ckpt / "model.safetensors").write_bytes(b"")
    assert main(["pretrain", *argv(corpus, run, "--max-steps", "2", "--resume")]) == 2
    err = capsys.readouterr().err
    want = (f"is a checkpoint of a {other} run, not of pretrain" if other else
            f"--resume: no checkpoint found at {run}, nothing to resume (leave --resume out to start a run)")
    assert err.startswith("error: ") and want in err, err


def test_resume_of_a_path_that_does_not_exist_names_it(corpus, tmp_path, capsys):
    """An explicit --resume path that is not there is a typo to fix, not a first run: 'nothing to resume (leave
    --resume out to start a run)' is said only for a bare --resume in a folder with no checkpoint; a named folder
    holding none is told what --resume takes."""
    import re

    from tritongpt.errors import UserError
    from tritongpt.train.common import resume_checkpoint

    run, missing, empty = tmp_path / "run", tmp_path / "ckpt-typo", tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", *argv(corpus, run, "--max-steps", "2", "--resume", str(missing))]) == 2
    assert capsys.readouterr().err == f"error: --resume {missing}: no such file or folder\n"
    def nothing_at(path):
        return f"^--resume: no checkpoint found at {re.escape(str(path))}, nothing to resume"

    # a folder the user named: not "leave --resume out" (they meant to resume, from another folder)
    with pytest.raises(UserError, match=f"^--resume {re.escape(str(empty))}: no checkpoint found at ") as e:
        resume_checkpoint(run, str(empty))
    assert "leave --resume out" not in str(e.value) and "name a run folder" in str(e.value)
    with pytest.raises(UserError, match=nothing_at(run)):
        resume_checkpoint(run, True)  # a bare --resume in a new --out-dir


def test_an_moe_runs_val_loss_is_the_cross_entropy_without_its_load_balancing_loss(corpus, tmp_path):
    """--moe-aux-loss trains the routers (the training loss adds it) but val_loss is the plain cross-entropy, as
    the header says: the same weights evaluate alike at coefficient 0.7 and 0 (forward(targets=)'s mean would add
    0.7 * aux, about 0.7)."""
    runs = {}
    for coef in ("0.7", "0"):
        a = parse_args(argv(corpus, tmp_path / coef, "--max-steps", "1", "--eval-every", "1", "--sample-tokens", "0",
                            "--mlp", "swiglu", "--n-experts", "4",
                            "--experts-per-token", "2", "--moe-aux-loss", coef, "--ckpt-every", "0"))
        runs[coef] = pretrain(a)
    first = {k: r["first_val_loss"] for k, r in runs.items()}  # step 0's: the same weights
    assert first["0.7"] is not None and first["0.7"] == pytest.approx(first["0"], rel=1e-6)
    assert runs["0.7"]["losses"][0] > runs["0"]["losses"][0] + 0.5  # the training objective does add it
