"""`tritongpt eval`: windows that score every token once, losses equal to a hand computation,
the same figures on both kernel paths, and bits per byte from the text's bytes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.evaluate import evaluate_tokens, windows

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(1, 40), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n, context, data):
    stride = data.draw(st.integers(1, context))
    spans = windows(n, context, stride)
    scored = [p for b, e, first in spans for p in range(max(first, b + 1), e + 1)]
    assert scored == list(range(1, n))  # every target position, once, in order
    for b, e, first in spans:
        assert 0 <= b < e <= n - 1 and e - b <= context and b + 1 <= first <= e
    for p in range(1, n):  # the window scoring p sees at least min(p, context - stride + 1) tokens before it
        b = next(b for b, e, first in spans if first <= p <= e)
        assert p - b >= min(p, context - stride + 1)


def test_bad_stride_is_named():
    with pytest.raises(UserError, match="--stride must be between 1 and the context"):
        windows(100, 16, 17)


def _model(context=16, vocab=50):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=vocab, context_length=context, n_embd=32, n_layer=2, n_head=2)).eval()


def _hand_nll(model, tokens, spans):
    """-ln p of each scored target, from the logits in float64: an independent sum."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b, e, first in spans:
            logp = F.log_softmax(model(tokens[b:e][None]).double()[0], dim=-1)
            for p in range(first, e + 1):
                total -= float(logp[p - b - 1, tokens[p]])
                count += 1
    return total, count


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_loss_is_the_mean_nll_of_the_scored_tokens(stride):
    model = _model()
    tokens = torch.randint(0, 50, (61,))
    got = evaluate_tokens(model, tokens, stride=stride, batch_size=3, token_bytes=lambda ids: 2 * len(ids))
    total, count = _hand_nll(model, tokens, windows(61, 16, stride or 16))
    assert got["tokens"] == count == 60
    # fp32 losses summed per forward against a float64 sum: within the brief's fp32 bound
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / 120, rel=1e-6)


@pytest.mark.parametrize("stride", [None, 6])
def test_with_documents_kept_apart_each_is_scored_from_its_own_start(stride):
    """document_eot: each window's documents (each opened by the eot) are scored as if alone,
    from the eot that opens them, or from the window's start for the one it cuts."""
    model, eot = _model(), 49
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 49, (61,), generator=g)
    tokens[[9, 10, 30, 44]] = eot  # an empty document too
    got = evaluate_tokens(model, tokens, stride=stride, batch_size=3, document_eot=eot)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, e, first in windows(61, 16, stride or 16):
            cuts = [b] + [p for p in range(b + 1, e) if tokens[p] == eot] + [e]
            for lo, hi in zip(cuts, cuts[1:]):  # inputs [lo, hi) alone predict targets lo+1 .. hi
                logp = F.log_softmax(model(tokens[lo:hi][None]).double()[0], dim=-1)
                for p in range(max(first, lo + 1), hi + 1):
                    total -= float(logp[p - lo - 1, tokens[p]])
                    count += 1
    assert got["tokens"] == count == 60
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
    # a random model's context matters little, but past fp32's rounding of a mean (~1e-7)
    assert abs(got["loss"] - evaluate_tokens(model, tokens, stride=stride)["loss"]) > 1e-5


@pytest.mark.parametrize("stride", [None, 6])
def test_with_a_bos_before_each_document_each_is_scored_from_its_bos(stride):
    """document_bos: tokens of "BOS doc EOS BOS doc ..." (a tokenizer that prepends BOS): each document
    is scored as if alone from its BOS (position 0), its EOS the last of its inputs; the window's head
    before the first BOS alone too. Split at the EOS instead, the figure differs."""
    model, bos, eot = _model(), 1, 2
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    tokens = torch.randint(3, 50, (61,), generator=g)
    for p in (9, 11, 30, 44):  # an empty document (BOS EOS) too
        tokens[p], tokens[p + 1] = eot, bos
    got = evaluate_tokens(model, tokens, stride=stride, batch_size=3, document_eot=eot, document_bos=bos)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, e, first in windows(61, 16, stride or 16):
            cuts = [b] + [p for p in range(b + 1, e) if tokens[p] == bos] + [e]
            for lo, hi in zip(cuts, cuts[1:]):  # inputs [lo, hi) alone predict targets lo+1 .. hi
                logp = F.log_softmax(model(tokens[lo:hi][None]).double()[0], dim=-1)
                for p in range(max(first, lo + 1), hi + 1):
                    total -= float(logp[p - lo - 1, tokens[p]])
                    count += 1
    assert got["tokens"] == count == 60
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
    at_eot = evaluate_tokens(model, tokens, stride=stride, batch_size=3, document_eot=eot)["loss"]
    assert abs(got["loss"] - at_eot) > 1e-5


def test_one_window_when_the_context_holds_the_text():
    model = _model(context=64)
    tokens = torch.randint(0, 50, (40,))
    whole = evaluate_tokens(model, tokens)
    with torch.no_grad():
        ref = F.cross_entropy(model(tokens[:-1][None]).double()[0], tokens[1:])
    assert whole["windows"] == 1 and whole["loss"] == pytest.approx(float(ref), rel=1e-6)
    assert evaluate_tokens(model, tokens, stride=7)["loss"] == pytest.approx(whole["loss"], rel=1e-9)


def _run_with_tokenizer(tmp_path, text, vocab, name):
    """A run folder holding a BPE of `vocab` tokens trained on `text` and a 1-layer model."""
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    run = tmp_path / "run"
    tok = BPETokenizer.train(text, vocab, name=name)
    save_run_tokenizer(tok, run)
    torch.manual_seed(0)
    GPTModel(GPTConfig(vocab_size=vocab, context_length=32, n_embd=32, n_layer=1, n_head=2)).save(
        run / "model.safetensors")
    return run, tok


def test_eval_of_a_reward_model_says_the_interpreter_is_slow_on_the_triton_path(tmp_path, capsys):
    """A reward model's eval (RewardModel.load, not the language model's load) says the note too, once, and only
    with Triton kernels on the CPU."""
    from tritongpt.train.reward import RewardModel
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    text = " ".join(f"the cat number {i} sat on mat {i * 7}." for i in range(30))
    run = tmp_path / "rm"
    tok = BPETokenizer.train(text, 270, name="t")
    save_run_tokenizer(tok, run)
    torch.manual_seed(0)
    RewardModel(GPTModel(GPTConfig(vocab_size=270, context_length=32, n_embd=32, n_layer=1, n_head=2))).save(
        run / "model.safetensors")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the cat {i}", "chosen": " sat", "rejected": " ran"}) + "\n"
                            for i in range(3)))
    for kernels in ("triton", "reference"):
        assert main(["eval", "--weights", str(run), "--data", str(data), "--split", "all", "--device", "cpu",
                     "--kernels", kernels, "--json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["pairs"] == 3
        assert err.count("Triton's interpreter") == (kernels == "triton"), err


def test_eval_command_on_both_paths(tmp_path, capsys):
    """The command on a checkpoint and a text file the test writes: the figures printed, the
    same on the Triton path (interpreter: LayerNorm, MLP, attention, fused LM head + loss) as on
    the reference; the model's train mode is left as it was."""
    text = " ".join(f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(60))
    (tmp_path / "corpus.txt").write_text(text)
    run, tok = _run_with_tokenizer(tmp_path, text, 280, "t")
    results = []
    for kernels in ("reference", "triton"):
        argv = ["eval", "--weights", str(run), "--data", str(tmp_path / "corpus.txt"), "--kernels", kernels,
                "--device", "cpu", "--max-tokens", "150", "--json", "--cache-dir", str(tmp_path / "cache")]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        results.append(json.loads(out))
        # the interpreter said to be slow, as generate and the trainers say it: on the Triton path alone
        assert ("Triton's interpreter" in err and "--kernels reference is the fast CPU path" in err) == \
            (kernels == "triton"), err
    ref, tri = results
    assert ref["tokens"] == 149 and ref["split"] == "val" and ref["tokenizer"] == "t"
    assert tri["kernels"] == ["attention", "cross_entropy", "layernorm", "mlp", "rope"]
    assert tri["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    ids = tok.encode(text)
    n_val = len(ids) - (len(ids) - round(len(ids) * 0.1))
    assert ref["bytes"] == len(tok.decode_bytes(ids[-n_val:][1:150]))  # the scored targets' text
    assert ref["stride"] == ref["context"] == 32  # the default stride, as used: the context
    # without --max-tokens: the whole default tail, the last 10% of the tokens (the first not a target)
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "corpus.txt"), "--kernels", "reference",
                 "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == n_val - 1
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "corpus.txt"), "--stride", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "--stride must be between 1 and the context (32)" in capsys.readouterr().err


def test_bits_per_byte_counts_utf8_bytes_not_characters(tmp_path, capsys):
    """Bits per byte divides by the UTF-8 bytes the scored tokens spell: on text with accents and
    CJK that is more than its characters (a count of decoded characters gave too high a figure)."""
    text = " ".join(f"café n°{i} über straße, 日本語 {i % 7} ünd façade." for i in range(20))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    run, tok = _run_with_tokenizer(tmp_path, text, 300, "u")
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "corpus.txt"), "--split", "all",
                 "--kernels", "reference", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = tok.encode(text)
    want = len(tok.decode_bytes(ids[1:]))  # every token but the first is a scored target
    assert out["tokens"] == len(ids) - 1 and out["bytes"] == want > len(tok.decode(ids[1:])) + 100
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / want, rel=1e-9)


@pytest.mark.cuda
def test_eval_on_a_gpu_in_bf16_agrees_across_paths():
    """The GPU default (bf16 autocast): the Triton path's figures within bf16's reach of the
    reference's, both near the fp32 figure, at GPT-2 small's width."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=256, n_embd=768, n_layer=2, n_head=12)).cuda()
    tokens = torch.randint(0, 50257, (2000,))
    fp32 = evaluate_tokens(model, tokens)["loss"]
    ref = evaluate_tokens(model, tokens, dtype=torch.bfloat16)["loss"]
    model.set_kernels("triton")
    tri = evaluate_tokens(model, tokens, dtype=torch.bfloat16)["loss"]
    assert math.isfinite(tri) and abs(tri - ref) / ref < 1e-2 and abs(tri - fp32) / fp32 < 1e-2


def test_a_pretraining_run_is_scored_on_its_own_held_out_tail(tmp_path, capsys):
    """Without --data / --val-fraction, eval scores exactly the tokens the run held out (its
    data and its split, recorded in the checkpoint), not a default tail that may overlap what the
    model trained on; asking for an overlapping split is noted. Bad sizes are one-line errors."""
    from tritongpt.train.data import load_text
    from tritongpt.train.tokenizer import BPETokenizer

    text = load_text("pydoc")[:12000]
    (tmp_path / "small.txt").write_text(text)
    BPETokenizer.train(text, 300, name="small").save(tmp_path / "tok.json")
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    assert main(["pretrain", "--data", str(tmp_path / "small.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--cache-dir", cache, "--out-dir", str(run), "--device", "cpu", "--kernels", "reference",
                 "--block-size", "32", "--batch-size", "2", "--max-steps", "2", "--val-fraction", "0.03",
                 "--eval-every", "0", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "cache" / "tokens.json").read_text())
    n, train = meta["n_tokens"], meta["split"]
    assert main(["eval", "--weights", str(run), "--cache-dir", cache, "--json"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    assert got["data"] == str(tmp_path / "small.txt") and got["tokens"] == n - train - 1
    assert "inside the" not in out.err  # the run's own tail: nothing to note
    # another tokenizer: the run's split counts the run's tokens, not these; the default 10% tail of
    # the text as this tokenizer splits it is scored instead (the run's count was applied to these
    # tokens: 2068 scored here, not 996, from a point inside the text the model trained on)
    other = BPETokenizer.train(text, 270, name="other")
    other.save(tmp_path / "other.json")
    n_other = len(other.encode(text))
    assert main(["eval", "--weights", str(run), "--tokenizer", str(tmp_path / "other.json"), "--cache-dir",
                 str(tmp_path / "cache-other"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == round(n_other * 0.1) - 1
    assert main(["eval", "--weights", str(run), "--cache-dir", cache, "--val-fraction", "0.5", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tokens"] == n - (n - round(n * 0.5)) - 1
    assert "inside the" in out.err and "tokens the model was trained on" in out.err
    # other data (the first half of the run's text): its own 10% tail, not the run's split, which
    # counts the run's tokens, applied to it
    (tmp_path / "half.txt").write_text(text[:6000])
    n_half = len(BPETokenizer.load(tmp_path / "tok.json").encode(text[:6000]))
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "half.txt"), "--cache-dir",
                 str(tmp_path / "cache-half"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == round(n_half * 0.1) - 1
    (tmp_path / "few.txt").write_text("a few words of text")             # val: its last token only
    n_few = len(BPETokenizer.load(tmp_path / "tok.json").encode("a few words of text"))
    for bad, said in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                      (["--max-tokens", "1"], "--max-tokens must be at least 2"),
                      (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
                      (["--val-fraction", "0"], "--val-fraction must be in (0, 1) with --split val, got 0.0"),
                      (["--data", str(tmp_path / "few.txt"), "--val-fraction", str(1 / n_few)],
                       "the val split of " + str(tmp_path / "few.txt") + " has 1 tokens: too few to score"),
                      (["--data", str(tmp_path / "tok.json"), "--val-fraction", "0.99999999"],
                       "leaves no tokens before the val split")):
        assert main(["eval", "--weights", str(run), "--cache-dir", cache, *bad]) == 2, bad
        assert said in capsys.readouterr().err


def test_a_run_trained_with_documents_kept_apart_is_scored_so(tmp_path, capsys, monkeypatch):
    """pretrain --document-mask passes each window's document ids to the model (training and its
    evaluations), records it, and eval scores the run the same way by default (--no-document-mask
    to mix them); a resume without the flag is named."""
    from tritongpt.train import data as data_mod
    from tritongpt.train.data import load_text
    from tritongpt.train.tokenizer import BPETokenizer

    docs = [d for d in load_text("pydoc")[:30000].split("\n\n") if d.strip()][:60]
    (tmp_path / "docs.txt").write_text("<|endoftext|>".join(docs))
    BPETokenizer.train(" ".join(docs), 300, name="small").save(tmp_path / "tok.json")
    tok = BPETokenizer.load(tmp_path / "tok.json")
    seen = []
    forward = GPTModel.forward

    def spy(self, idx, *args, doc_ids=None, **kw):
        if kw.get("targets") is not None:
            seen.append(doc_ids is not None and torch.equal(doc_ids, data_mod.document_ids(idx, tok.eot_id)))
        return forward(self, idx, *args, doc_ids=doc_ids, **kw)

    monkeypatch.setattr(GPTModel, "forward", spy)
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    flags = ["--data", str(tmp_path / "docs.txt"), "--tokenizer", str(tmp_path / "tok.json"), "--cache-dir", cache,
             "--out-dir", str(run), "--device", "cpu", "--kernels", "reference", "--block-size", "64",
             "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "0"]
    assert main(["pretrain", *flags, "--max-steps", "2", "--document-mask"]) == 0
    assert "documents kept apart" in capsys.readouterr().out
    assert seen and all(seen), seen  # every training and evaluation forward
    monkeypatch.setattr(GPTModel, "forward", forward)
    assert main(["eval", "--weights", str(run), "--cache-dir", cache, "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert main(["eval", "--weights", str(run), "--cache-dir", cache, "--json", "--no-document-mask"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert kept["document_mask"] is True and mixed["document_mask"] is False
    assert kept["tokens"] == mixed["tokens"] and abs(kept["loss"] - mixed["loss"]) > 1e-5
    assert main(["eval", "--weights", str(run), "--cache-dir", cache]) == 0
    assert "documents kept apart" in capsys.readouterr().out
    assert main(["pretrain", *flags, "--max-steps", "3", "--resume"]) == 0
    assert "--document-mask False (True)" in capsys.readouterr().err


def _small_token_ids(tmp_path):
    """12,000 characters of the pydoc corpus as uint16 ids of a 300-token BPE saved to tok.json."""
    from tritongpt.train.data import load_text
    from tritongpt.train.tokenizer import BPETokenizer

    text = load_text("pydoc")[:12000]
    tok = BPETokenizer.train(text, 300, name="small")
    tok.save(tmp_path / "tok.json")
    return np.array(tok.encode(text), dtype=np.uint16)


def _small_pretrain_flags(data, tmp_path, run):
    """pretrain on `data` with _small_token_ids' tokenizer, in 32-token blocks, into `run`."""
    return ["--data", str(data), "--tokenizer", str(tmp_path / "tok.json"), "--out-dir", str(run),
            "--device", "cpu", "--kernels", "reference", "--block-size", "32", "--batch-size", "2",
            "--eval-every", "0", "--sample-tokens", "0"]


def test_a_run_on_a_token_file_trains_resumes_and_is_scored_on_its_tail(tmp_path, capsys):
    """pretrain --data x.bin (nanoGPT's uint16 ids) trains on those ids: the same tokens as
    the text they were made from, so the same split; a resume on the same file says nothing,
    one on another file says the data differ; eval scores the run's own held-out tail of it."""
    ids = _small_token_ids(tmp_path)
    ids.tofile(tmp_path / "train.bin")
    run = tmp_path / "run"
    base = ["--tokenizer", str(tmp_path / "tok.json"), "--out-dir", str(run), "--device", "cpu",
            "--kernels", "reference", "--block-size", "32", "--batch-size", "2", "--val-fraction", "0.05",
            "--eval-every", "0", "--sample-tokens", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main(["pretrain", "--data", str(tmp_path / "train.bin"), "--max-steps", "2", *base]) == 0
    out = capsys.readouterr().out
    train = len(ids) - round(len(ids) * 0.05)
    assert f"train.bin: {train:,} training + {len(ids) - train:,} validation tokens" in out
    assert not (tmp_path / "cache").exists()  # read in place
    assert main(["pretrain", "--data", str(tmp_path / "train.bin"), "--max-steps", "3", "--resume", *base]) == 0
    assert "different data" not in capsys.readouterr().err
    ids[::-1].tofile(tmp_path / "other.bin")
    assert main(["pretrain", "--data", str(tmp_path / "other.bin"), "--max-steps", "4", "--resume", *base]) == 0
    assert "resuming on different data" in capsys.readouterr().err
    assert main(["eval", "--weights", str(run / "ckpt-0000003"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["data"] == str(tmp_path / "train.bin") and got["tokens"] == len(ids) - train - 1
    # the default tokenizer (4096 ids, learned on the pydoc corpus) cannot read GPT-2's ids
    np.array([50256, 11], dtype=np.uint16).tofile(tmp_path / "gpt2.bin")
    assert main(["pretrain", "--data", str(tmp_path / "gpt2.bin"), "--out-dir", str(tmp_path / "r2"),
                 "--max-steps", "1"]) == 2
    assert "token id 50256 is past the" in capsys.readouterr().err



def test_a_run_on_a_nanogpt_folder_validates_and_is_scored_on_its_val_bin(tmp_path, capsys):
    """pretrain --data folder/ (nanoGPT's train.bin + val.bin) trains on train.bin and validates
    on val.bin; a resume from the same folder says nothing; eval of the run scores val.bin
    (without --data), and --split all both files; --val-fraction beside a val.bin is refused."""
    ids = _small_token_ids(tmp_path)
    folder = tmp_path / "nano"
    folder.mkdir()
    ids[:-300].tofile(folder / "train.bin")
    ids[-300:].tofile(folder / "val.bin")
    run = tmp_path / "run"
    base = _small_pretrain_flags(folder, tmp_path, run)
    assert main(["pretrain", "--max-steps", "2", *base]) == 0
    assert f"nano: {len(ids) - 300:,} training + 300 validation tokens" in capsys.readouterr().out
    assert main(["pretrain", "--max-steps", "3", "--resume", *base]) == 0
    assert "different data" not in capsys.readouterr().err
    assert main(["eval", "--weights", str(run / "ckpt-0000003"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["data"] == str(folder) and got["tokens"] == 300 - 1
    assert main(["eval", "--weights", str(run / "ckpt-0000003"), "--json", "--split", "all", "--max-tokens",
                 str(len(ids) - 100)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len(ids) - 100 - 1  # into val.bin
    for cmd in (["pretrain", "--max-steps", "4", "--resume", *base], ["eval", "--weights", str(run)]):
        assert main([*cmd, "--val-fraction", "0.2"]) == 2
        assert "has its own validation split (val.bin): --val-fraction does not apply" in capsys.readouterr().err


def test_a_run_on_token_shards_trains_across_them_and_is_scored_on_its_val_shards(tmp_path, capsys):
    """pretrain --data folder/ of build-nanogpt's .npy shards: the training shards as one array
    (windows cross their ends), the val shards as the validation split; eval of the run scores
    the val shards, --split all every shard in order."""
    ids = _small_token_ids(tmp_path)
    folder = tmp_path / "edu_fineweb"
    folder.mkdir()
    cuts = [0, 700, 1500, len(ids) - 250, len(ids) - 120, len(ids)]
    names = ["edu_train_000001", "edu_train_000002", "edu_train_000003", "edu_val_000000", "edu_val_000001"]
    for name, b, e in zip(names, cuts, cuts[1:]):
        np.save(folder / f"{name}.npy", ids[b:e])
    run = tmp_path / "run"
    base = _small_pretrain_flags(folder, tmp_path, run)
    assert main(["pretrain", "--max-steps", "2", *base]) == 0
    assert f"edu_fineweb: {len(ids) - 250:,} training + 250 validation tokens" in capsys.readouterr().out
    assert main(["eval", "--weights", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["data"] == str(folder) and got["tokens"] == 250 - 1  # both val shards, as one sequence
    assert main(["eval", "--weights", str(run), "--json", "--split", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len(ids) - 1


def test_a_run_on_a_jsonl_field_is_scored_from_that_field(tmp_path, capsys):
    """A run trained on .jsonl rows' `body` field: eval without --data reads the same field (it
    looked for `text` and refused the run's own data)."""
    from tritongpt.train.tokenizer import BPETokenizer

    rows = [f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(80)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    BPETokenizer.train(" ".join(rows), 280, name="t").save(tmp_path / "tok.json")
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    assert main(["pretrain", "--data", str(tmp_path / "rows.jsonl"), "--text-field", "body",
                 "--tokenizer", str(tmp_path / "tok.json"), "--cache-dir", cache, "--out-dir", str(run),
                 "--device", "cpu", "--kernels", "reference", "--block-size", "32", "--batch-size", "2",
                 "--max-steps", "1", "--eval-every", "0", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    n, train = (json.loads((tmp_path / "cache" / "tokens.json").read_text())[k] for k in ("n_tokens", "split"))
    assert main(["eval", "--weights", str(run), "--cache-dir", cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == n - train - 1
    # other .jsonl data is read from --text-field, else "text": the run's field is for the run's data
    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:40]))
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "other.jsonl"), "--cache-dir",
                 str(tmp_path / "c2"), "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # and an explicit --text-field wins over the run's own (its rows have no "text")
    assert main(["eval", "--weights", str(run), "--text-field", "text", "--cache-dir", cache]) == 2
    assert "no field 'text' (found ['body'])" in capsys.readouterr().err
    # --text-field on plain text is refused, as pretrain refuses it (it was ignored: the whole file scored)
    (tmp_path / "plain.txt").write_text(" ".join(rows))
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "plain.txt"), "--text-field", "body"]) == 2
    assert "--text-field applies to .jsonl data" in capsys.readouterr().err


def test_a_run_on_a_relative_path_is_scored_from_another_folder(tmp_path, capsys, monkeypatch):
    """The run records its data's absolute path: eval run from another folder finds it (the
    path as given, relative to the folder pretrain ran in, was not found there)."""
    from tritongpt.train.tokenizer import BPETokenizer

    text = " ".join(f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(80))
    (tmp_path / "corpus.txt").write_text(text)
    BPETokenizer.train(text, 280, name="t").save(tmp_path / "tok.json")
    cache = str(tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--data", "corpus.txt", "--tokenizer", "tok.json", "--cache-dir", cache,
                 "--out-dir", "run", "--device", "cpu", "--kernels", "reference", "--block-size", "32",
                 "--batch-size", "2", "--max-steps", "1", "--eval-every", "0", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["eval", "--weights", str(tmp_path / "run"), "--cache-dir", cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(tmp_path / "corpus.txt")
    # the run's data moved away: the error says it is the run's own data and to pass --data
    (tmp_path / "corpus.txt").rename(tmp_path / "moved.txt")
    assert main(["eval", "--weights", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert f"it is the data the run of {tmp_path / 'run'} trained on: pass --data" in err, err


def test_evaluation_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    """A model with dropout handed over in train mode (pretraining's periodic eval): the loss is
    the eval-mode model's, not one with dropout noise, and the model is handed back in train
    mode; a model in eval mode stays in eval mode."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=16, n_embd=32, n_layer=2, n_head=2, dropout=0.5))
    tokens = torch.randint(0, 50, (40,))
    total, count = _hand_nll(model.eval(), tokens, windows(40, 16, 16))
    assert evaluate_tokens(model, tokens)["loss"] == pytest.approx(total / count, rel=1e-6)
    assert not model.training, "evaluate_tokens put an eval-mode model in train mode"
    model.train()
    assert evaluate_tokens(model, tokens)["loss"] == pytest.approx(total / count, rel=1e-6)
    assert model.training, "evaluate_tokens left a train-mode model in eval mode"


def test_dtype_is_the_forward_passes_autocast():
    """dtype=bf16 (the GPU default, --dtype bf16) runs the forward passes under bf16 autocast:
    the loss is the one the same windows give under torch.autocast directly, not the fp32 one."""
    model = _model()
    with torch.no_grad():  # confident logits: at init they are all near 0 and bf16 rounds them alike
        model.tok_emb.weight.mul_(30.0)
    tokens = torch.randint(0, 50, (61,))
    spans = windows(61, 16, 16)
    total = 0.0
    for b, e, first in spans:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[b:e][None])
        total += float(F.cross_entropy(logits[0].float(), tokens[b + 1:e + 1], reduction="sum"))
    got = evaluate_tokens(model, tokens, dtype=torch.bfloat16)["loss"]
    fp32 = evaluate_tokens(model, tokens)["loss"]
    assert got == pytest.approx(total / 60, rel=1e-6)
    assert abs(got - fp32) > 3e-5 * fp32, (got, fp32)  # bf16's rounding shows: autocast was on


def test_document_separators_spell_no_bytes(tmp_path, capsys):
    """Bits per byte counts the UTF-8 bytes of the text: the <|endoftext|> between .jsonl rows is
    a token the model predicts, but no text (counted as its 13-byte spelling, it would lower bits
    per byte by a separator's worth per document). Here the bytes are the rows' own, less the first
    token's (never a target)."""
    rows = [f"row {i}: the cat sat on mat {i * 7}, café {i % 5}." for i in range(40)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    run, tok = _run_with_tokenizer(tmp_path, " ".join(rows), 280, "r")
    assert main(["eval", "--weights", str(run), "--data", str(tmp_path / "rows.jsonl"), "--split", "all",
                 "--kernels", "reference", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out = json.loads(capsys.readouterr().out)
    first = tok.encode(rows[0])[0]
    assert out["tokens"] == sum(len(tok.encode(r)) for r in rows) + len(rows) - 1 - 1  # separators in, first out
    assert out["bytes"] == sum(len(r.encode("utf-8")) for r in rows) - len(tok.decode_bytes([first]))


class _SumOfNats(torch.nn.Module):
    """A stand-in scorer: every scored target costs `nats` (model(idx, targets, reduction="sum"))."""

    def __init__(self, nats, context=16):
        super().__init__()
        self.nats = nats
        self.config = GPTConfig(vocab_size=50, context_length=context, n_embd=32, n_layer=1, n_head=1)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, idx, targets=None, reduction="sum", doc_ids=None):
        return self.nats * (targets != -100).sum().float() * self.scale


def test_a_loss_past_exps_range_is_reported_not_a_crash():
    """A diverged model's loss can pass ~709 nats a token, where exp overflows a float: the figures
    are still printed, not an OverflowError traceback, and the perplexity is inf (as lambada's), not e^700
    (a finite figure the model never had); just below float's range it is exp(loss) itself."""
    nats = float(torch.empty(()).uniform_(750.0, 2000.0))
    got = evaluate_tokens(_SumOfNats(nats), torch.randint(0, 50, (40,)))
    assert got["tokens"] == 39 and got["loss"] == pytest.approx(nats, rel=1e-6)
    assert got["perplexity"] == math.inf
    got = evaluate_tokens(_SumOfNats(705.0), torch.randint(0, 50, (40,)))
    assert got["perplexity"] == pytest.approx(math.exp(705.0), rel=1e-5)


def test_fewer_than_two_tokens_is_a_user_error():
    """One token has nothing to predict: a UserError saying so (a ZeroDivisionError otherwise)."""
    for tokens in (torch.randint(0, 50, (1,)), torch.randint(0, 50, (0,))):
        with pytest.raises(UserError, match="evaluation needs at least 2 tokens"):
            evaluate_tokens(_SumOfNats(1.0), tokens)


def test_json_reports_are_strict_json():
    """--json's perplexity past float's range (and any NaN) is written as null, not Python's bare Infinity/NaN,
    which jq and JSON.parse refuse: a strict parser (one that rejects those constants) reads the report back."""
    from tritongpt.train.common import json_report

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    x = float(torch.rand(()))
    text = json_report({"perplexity": math.inf, "loss": x, "rows": [math.nan, -math.inf, 1], "nested": {"a": math.inf}})
    assert json.loads(text, parse_constant=refuse) == {"perplexity": None, "loss": x, "rows": [None, None, 1],
                                                        "nested": {"a": None}}
