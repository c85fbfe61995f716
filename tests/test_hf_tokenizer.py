"""Hugging Face tokenizers (tokenizer.json) of Llama-family folders: HFTokenizer gives
transformers' ids on a SentencePiece-converted BPE (TinyLlama's and Llama 2's shape), a Llama 3,
a SmolLM and a Qwen2 byte-level BPE (the last beside a Qwen2 model), and on a folder holding
SentencePiece's tokenizer.model alone (converted by transformers; sentencepiece's own ids), each
trained here on a few KB; generate, sft --init and export use it end to end; a GPT-2 folder still
gets BPETokenizer. Nothing downloaded."""
import copy
import io
import json
import random
import re
import unicodedata

import pytest
import torch

from parity import hf_llama
from tritongpt.errors import UserError
from tritongpt.train.tokenizer import DisallowedSpecialToken, get_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2's: every digit alone
WORDS = ("the cat sat on a mat while 42 dogs ran past 1999 naïve café 東京 über straße 🙂 x=3.14 it's "
         "Ελλάδα don't").split(" ")
# (kind, EOS, BOS); "sentencepiece_model": a folder with SentencePiece's tokenizer.model and no tokenizer.json
KINDS = {"sentencepiece": ("</s>", "<s>"), "llama3": ("<|end_of_text|>", "<|begin_of_text|>"),
         "smollm": ("<|endoftext|>", None), "qwen2": ("<|endoftext|>", None),
         "sentencepiece_model": ("</s>", "<s>")}
FIXED = [" Hello  wörld 12345 🙂🎉\n\n\tx  ", "The cat sat. 3.14159 東京 💡🐍 Ελλάδα\r\n   end", "", " ", "\n\n",
         "naïve\u00a0café\u200b, it's 2024!", "    leading spaces\ttabs\t\t\nand trailing   ", "零一二三 ١٢٣ 🏳️‍🌈"]


def _corpus(seed=0, lines=300):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines))


def _random_texts(n, seed):
    """Fresh text each run of the seed: words, digit runs, emoji, odd whitespace and letters never seen."""
    rng = random.Random(seed)
    pieces = WORDS + ["  ", "\n", "\t", "\r\n", "   \n ", "0123456789", "Ω≈ç√∫", "👩‍💻", "\u0301", "ß", "Q"]
    return ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def build_tokenizer(kind, vocab=400):
    """A tokenizers.Tokenizer in the shape of a published Llama family's, trained on _corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    text = _corpus()
    if kind == "sentencepiece":  # TinyLlama / Llama 2: "▁" for spaces, one prepended, bytes as <0xNN> tokens
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        tok.train_from_iterator(text.split("\n"), trainer)
        # the 256 byte tokens after the specials, as in Llama 2's vocabulary (ids 3..258)
        d = json.loads(tok.to_str())
        ids = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
        for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]):
            ids.setdefault(t, len(ids))
        d["model"]["vocab"] = ids
        for a in d["added_tokens"]:
            a["id"] = ids[a["content"]]
        tok = Tokenizer.from_str(json.dumps(d))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return tok
    tok = Tokenizer(models.BPE())
    if kind in ("llama3", "qwen2"):
        pattern = LLAMA3_PAT if kind == "llama3" else QWEN2_PAT
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if kind == "qwen2":  # Qwen2 composes its text first (NFC): "e" + U+0301 is "é"'s one token
            tok.normalizer = normalizers.NFC()
    else:  # SmolLM: every digit alone, then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if kind == "llama3" else \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    return tok


def sentencepiece_model(vocab=500) -> bytes:
    """A SentencePiece BPE model as Llama 2's was trained (byte fallback, <unk> <s> </s> as ids 0 to 2,
    digits alone, spaces kept as they are, a "▁" prepended), on _corpus and some of Python's docs."""
    import io

    import pydoc_data.topics

    spm = pytest.importorskip("sentencepiece")
    docs = "\n".join(list(pydoc_data.topics.topics.values())[:20])
    lines = [line for line in (_corpus() + "\n" + docs).splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   add_dummy_prefix=True, minloglevel=2)
    return model.getvalue()


# Llama 2's tokenizer_config.json, less what names no token
LLAMA2_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                           "clean_up_tokenization_spaces": False}


def llama_folder(folder, kind, context=40):
    """A folder as save_pretrained writes a Llama's: the tokenizer's files beside a tiny random
    LlamaForCausalLM whose config.json names the same EOS. -> (folder, transformers' tokenizer, model).
    "sentencepiece_model": tokenizer.model and a Llama 2's tokenizer_config.json, no tokenizer.json."""
    eos, bos = KINDS[kind]
    if kind == "sentencepiece_model":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(sentencepiece_model())
        (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG))
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        hf, _ = hf_llama(folder, len(theirs), eos=theirs.eos_token_id, context=context)
        assert not (folder / "tokenizer.json").exists()
        return folder, theirs, hf
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(kind), eos_token=eos, bos_token=bos)
    fast.save_pretrained(folder)
    hf, _ = hf_llama(folder, len(fast), eos=fast.convert_tokens_to_ids(eos), context=context,
                     kind="qwen2" if kind == "qwen2" else "llama")
    return folder, transformers.AutoTokenizer.from_pretrained(folder), hf


@pytest.fixture(scope="module", params=list(KINDS))
def folder(request, tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_match_transformers_and_decode_inverts_encode(folder):
    """transformers' ids (add_special_tokens=False) on fixed and fresh random text, one by one and
    batched; decode and the streamed decode give the text back; eot_id is the folder's EOS."""
    path, theirs, _ = folder
    tok = get_tokenizer(path)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.eot_id == theirs.eos_token_id and tok.vocab_size == len(theirs)
    texts = FIXED + _random_texts(40, random.randrange(1 << 30))
    want = [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [tok.encode(t) for t in texts] == want
    assert tok.encode_batch(texts) == want
    for t, ids in zip(texts, want):
        # lossless (byte fallback, byte level), but for Qwen2's NFC: its decode is the composed text
        t = unicodedata.normalize("NFC", t) if path.name.startswith("qwen2") else t
        if path.name.startswith("sentencepiece_model") and t.startswith(" ") and tok.decode(ids) != t:
            # transformers 5's conversion adds no "▁" before a text that starts with one (see
            # test_a_tokenizer_model_gives_sentencepiece_ids), and its decoder strips one space
            t = t[1:]
        assert tok.decode(ids) == t
        stream = tok.stream_decoder()
        assert "".join(stream.write([i]) for i in ids) + stream.flush() == t
    # the Llama's own pipeline adds BOS where its post-processor says; we never do
    if theirs.bos_token:
        assert theirs("a cat")["input_ids"][0] == theirs.bos_token_id != tok.encode("a cat")[0]


def test_special_tokens_follow_bpe_tokenizers_rules(folder):
    """Text spelling the EOS is refused by default (as ours), read as text with "none", encoded as
    the id with "all" or a set naming it (transformers' ids then)."""
    path, theirs, _ = folder
    tok = get_tokenizer(path)
    eos = theirs.eos_token
    text = f"a cat{eos} 12 dogs"
    with pytest.raises(DisallowedSpecialToken, match=f"disallowed special token '{eos}' at character 5"):
        tok.encode(text)
    with pytest.raises(DisallowedSpecialToken):
        tok.encode_batch(["fine", text])
    whole = theirs(text, add_special_tokens=False)["input_ids"]
    assert tok.eot_id in whole
    assert tok.encode(text, allowed_special="all") == whole == tok.encode(text, allowed_special={eos})
    plain = tok.encode(text, allowed_special="none")
    assert tok.eot_id not in plain and tok.decode(plain) == text
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode(text, allowed_special={"<nope>"})
    with pytest.raises(UserError, match=f"token id {tok.vocab_size} is out of range"):
        tok.decode([5, tok.vocab_size])


def test_saved_with_a_run_and_read_back(folder, tmp_path):
    """Our JSON (format tritongpt-hf-tokenizer) holds the tokenizer and its EOS: the same hash
    and ids back, found in a run folder by get_tokenizer; an edit is refused by its hash."""
    from tritongpt.train.tokenizer import is_ours, save_run_tokenizer, saved_tokenizer_path

    path, _, _ = folder
    tok = get_tokenizer(path)
    saved = save_run_tokenizer(tok, tmp_path / "run")
    assert is_ours(saved) and saved_tokenizer_path(tmp_path / "run") == saved
    back = get_tokenizer(tmp_path / "run")
    text = _random_texts(1, 7)[0]
    assert (back.hash, back.eot_id, back.encode(text), repr(back)) == (tok.hash, tok.eot_id, tok.encode(text),
                                                                      repr(tok))
    d = json.loads(saved.read_text())
    d["eos_token"] = next(s for s in tok.special_tokens if s != tok.eos_token)
    saved.write_text(json.dumps(d))
    with pytest.raises(UserError, match="content does not match its recorded hash"):
        get_tokenizer(saved)


def test_generate_on_the_llama_folder_gives_transformers_greedy_text(folder, tmp_path, capsys):
    """A text prompt through `generate --weights folder`: the greedy tokens transformers draws from
    the prompt as its tokenizer encodes it (BOS first where the folder's post-processor adds one),
    printed as text (streamed or at once), stopping at the folder's EOS as transformers does (the
    EOS row of the head is made the fifth new token's, a little larger, so the text does end)."""
    import shutil

    import torch

    from tritongpt import cli

    path, theirs, hf = folder
    path = shutil.copytree(path, tmp_path / path.name)
    prompt, eos = "the cat sat on 42", theirs.eos_token_id
    # the folder's own pipeline: BOS first where its post-processor puts one (TinyLlama's, Llama 3's), not printed
    ids = torch.tensor([theirs(prompt)["input_ids"]])
    lead = int(bool(theirs.bos_token) and ids[0, 0] == theirs.bos_token_id)
    assert lead == (path.name.startswith(("sentencepiece", "llama3"))), path.name
    assert get_tokenizer(path).prepended_bos_id == (theirs.bos_token_id if lead else None)
    with torch.no_grad():
        fifth = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=eos)[0, -1]
        hf.lm_head.weight[eos] = hf.lm_head.weight[fifth] * 1.05
    hf.save_pretrained(path)
    row = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=eos)[0].tolist()
    assert eos in row[ids.shape[1]:]
    want = theirs.decode(row[lead:row.index(eos, ids.shape[1])])
    for stream in ([], ["--stream"]):
        assert cli.main(["generate", "--weights", str(path / "model.safetensors"), "--prompt", prompt,
                         "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--kernels", "reference",
                         *stream]) == 0
        out = capsys.readouterr()
        assert out.out == want + "\n" and f"the model ended the text ({theirs.eos_token})" in out.err


def test_chat_on_the_llama_folder_answers_with_transformers_greedy_text(folder, monkeypatch, capsys):
    """`chat --weights folder`: the turn is encoded with the folder's tokenizer as SFT encodes a
    chat, and the answer printed (streamed) is transformers' greedy continuation of those ids,
    decoded, up to the folder's EOS or the token budget."""
    import io

    import torch

    from tritongpt import cli
    from tritongpt.train import chat, formats

    path, theirs, hf = folder
    tok = get_tokenizer(path)
    prompt_ids = formats.encode_prompt(tok, chat.Conversation("chat").prompt("the cat sat"))
    with torch.no_grad():
        row = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                          pad_token_id=theirs.eos_token_id)[0, len(prompt_ids):].tolist()
    if theirs.eos_token_id in row:
        row = row[:row.index(theirs.eos_token_id)]
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert cli.main(["chat", "--weights", str(path / "model.safetensors"), "--template", "chat", "--temperature",
                     "0", "--max-new-tokens", "6", "--device", "cpu", "--kernels", "reference"]) == 0
    assert capsys.readouterr().out == theirs.decode(row) + "\n"


def test_sft_init_saves_the_tokenizer_and_export_writes_it_for_transformers(tmp_path, capsys):
    """sft --init on a SentencePiece Llama folder: the run saves the folder's tokenizer, generate on
    its checkpoint finds it, and export writes tokenizer.json and tokenizer_config.json that
    transformers.AutoTokenizer loads with the same ids and EOS (and tritongpt reads back)."""
    from tritongpt import cli
    from tritongpt.train.tokenizer import load_tokenizer

    path, theirs, _ = llama_folder(tmp_path / "sentencepiece", "sentencepiece", context=512)
    tok = get_tokenizer(path)
    run = tmp_path / "run"
    assert cli.main(["sft", "--init", str(path), "--n-train", "4", "--n-eval", "2", "--tasks", "first_word",
                     "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--kernels", "reference",
                     "--out-dir", str(run)]) == 0
    assert load_tokenizer(run / "tokenizer.json").hash == tok.hash
    capsys.readouterr()
    prompt = "naïve café 東京"
    assert cli.main(["generate", "--weights", str(run), "--prompt", prompt, "--max-new-tokens", "3",
                     "--device", "cpu", "--kernels", "reference"]) == 0
    assert capsys.readouterr().out.startswith(prompt)

    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(out)
    texts = FIXED + _random_texts(20, random.randrange(1 << 30))
    assert [exported(t, add_special_tokens=False)["input_ids"] for t in texts] == tok.encode_batch(texts)
    assert exported.eos_token == "</s>" and exported.bos_token == "<s>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eot_id
    assert get_tokenizer(out).hash == tok.hash


def test_pretrain_init_and_tokenizer_of_a_folder_save_its_tokenizer_with_the_run(corpus, tmp_path, capsys):
    """pretrain --init folder and pretrain --tokenizer folder (a fresh model of its vocabulary)
    tokenise the text with the folder's tokenizer and save it with the run, which a resume reads."""
    from tritongpt import cli
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.tokenizer import load_tokenizer

    path, _, _ = llama_folder(tmp_path / "llama3", "llama3", context=64)
    tok = get_tokenizer(path)

    def pretrain(out, *flags):
        return cli.main(["pretrain", "--data", str(corpus.text), "--cache-dir", str(corpus.cache), "--out-dir",
                         str(tmp_path / out), "--device", "cpu", "--kernels", "reference", "--block-size", "32",
                         "--batch-size", "2", "--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", *flags])

    assert pretrain("init", "--init", str(path), "--max-steps", "1") == 0
    assert pretrain("fresh", "--tokenizer", str(path), "--max-steps", "1") == 0
    for run in ("init", "fresh"):
        assert load_tokenizer(tmp_path / run / "tokenizer.json").hash == tok.hash
    assert load_checkpoint(tmp_path / "fresh").config.vocab_size == tok.vocab_size
    assert pretrain("init", "--init", str(path), "--max-steps", "2", "--resume") == 0
    # eval's bits per byte counts the UTF-8 bytes of the scored tokens' text (ASCII: the byte-level
    # decode of each window's ids concatenates to the whole text's); the BOS before the document
    # (Llama 3's <|begin_of_text|>) makes its first token a target too: every byte is scored
    text = " ".join(w for w in _corpus(seed=5, lines=8).split(" ") if w.isascii())
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(tmp_path / "init"), "--data", str(tmp_path / "eval.txt"), "--split",
                     "all", "--kernels", "reference", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] > 0 and result["bytes"] == len(text.encode("utf-8"))


def test_pretrain_and_eval_on_a_bos_tokenizer_keep_each_document_bos_to_eos(tmp_path, monkeypatch, capsys):
    """pretrain --init of a folder whose tokenizer prepends BOS (Llama 3's <|begin_of_text|>, id 0):
    --document-mask's documents open at their BOS (the EOS closes the one before), in training, its
    evaluations and eval of the run; the sample's prompt starts with the BOS, as transformers'
    tokenizer(prompt), which the printed sample leaves out."""
    from tritongpt import cli
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train import generate as generate_mod

    path, theirs, _ = llama_folder(tmp_path / "llama3", "llama3", context=64)
    tok = get_tokenizer(path)
    bos = tok.prepended_bos_id
    assert bos == theirs.bos_token_id == 0
    docs = [_corpus(seed=s, lines=1) for s in range(40)]
    (tmp_path / "docs.txt").write_text("<|endoftext|>".join(docs), encoding="utf-8")
    seen, prompts = [], []
    forward, generate = GPTModel.forward, generate_mod.generate

    def spy(self, idx, *args, doc_ids=None, **kw):
        if kw.get("targets") is not None:
            seen.append((idx.clone(), doc_ids))
        return forward(self, idx, *args, doc_ids=doc_ids, **kw)

    monkeypatch.setattr(GPTModel, "forward", spy)
    monkeypatch.setattr(generate_mod, "generate", lambda m, idx, *a, **k: prompts.append(idx.tolist()) or
                        generate(m, idx, *a, **k))
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    assert cli.main(["pretrain", "--init", str(path), "--data", str(tmp_path / "docs.txt"), "--cache-dir", cache,
                     "--out-dir", str(run), "--device", "cpu", "--kernels", "reference", "--block-size", "48",
                     "--batch-size", "4", "--max-steps", "2", "--eval-every", "1", "--eval-batches", "1",
                     "--document-mask", "--prompt", "the cat sat", "--sample-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "BOS before each document" in out and "<|begin_of_text|>" not in out
    assert prompts == [[theirs("the cat sat")["input_ids"]]]
    assert cli.main(["eval", "--weights", str(run), "--cache-dir", cache, "--kernels", "reference", "--device",
                     "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["document_mask"] is True
    assert "note:" not in capsys.readouterr().err
    assert len(seen) >= 4
    for idx, doc_ids in seen:  # training, its evaluations, then eval's windows
        opens = doc_ids[:, 1:] != doc_ids[:, :-1]
        assert torch.equal(opens, idx[:, 1:] == bos)
        after_eos = idx[:, :-1] == tok.eot_id
        assert (idx[:, 1:][after_eos] == bos).all()  # "BOS doc EOS BOS doc": the data as written
    assert sum(int((idx[:, 1:] == bos).sum()) for idx, _ in seen) >= len(seen)  # windows hold documents' starts
    # a run from before the BOS was written (its record has no bos_id): its held-out tail is not where it
    # was, which eval says
    from tritongpt.train import evaluate

    own = evaluate.pretrain_data(run)
    assert own["bos_id"] == bos
    monkeypatch.setattr(evaluate, "pretrain_data", lambda w: {k: v for k, v in own.items() if k != "bos_id"})
    assert cli.main(["eval", "--weights", str(run), "--cache-dir", cache, "--kernels", "reference", "--device",
                     "cpu", "--json"]) == 0
    assert "trained on these documents with no BOS before each, the tokenizer now puts BOS id 0" in \
        capsys.readouterr().err


def test_a_gpt2_folder_still_gets_bpe_tokenizer(tmp_path):
    """GPT-2's files, and the tokenizer.json transformers writes for them, stay BPETokenizer's."""
    from tritongpt.train.tokenizer import BPETokenizer

    bpe = BPETokenizer.train(_corpus(), 300, name="small")
    bpe.save_hf(tmp_path / "gpt2")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2").save_pretrained(tmp_path / "fast")
    assert (tmp_path / "fast" / "tokenizer.json").is_file()
    for name in ("gpt2", "fast"):
        tok = get_tokenizer(tmp_path / name)
        assert isinstance(tok, BPETokenizer) and tok.hash == bpe.hash


def test_damaged_files_and_a_missing_eos_are_named(tmp_path, capsys, monkeypatch):
    """A tokenizer.json that is no JSON, or that the library cannot read, names that file; a folder
    naming no EOS anywhere is refused where the EOS is needed, naming where it looked; an EOS that
    is no token names tokenizer_config.json; without the tokenizers library, the error says so."""
    import sys

    path, _, _ = llama_folder(tmp_path / "smollm", "smollm")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tokenizers", None)  # import tokenizers raises ImportError
        with pytest.raises(UserError, match=r"needs Hugging Face's tokenizers library: pip install"):
            get_tokenizer(path)
    spec = (path / "tokenizer.json").read_text()
    (path / "tokenizer.json").write_text(spec[:len(spec) // 2])
    with pytest.raises(UserError, match=f"{path / 'tokenizer.json'}: not a tokenizer JSON file"):
        get_tokenizer(path)
    broken = json.loads(spec)
    broken["model"]["merges"] = 42
    (path / "tokenizer.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match=f"{path / 'tokenizer.json'}: not a tokenizer the tokenizers library reads"):
        get_tokenizer(path)
    (path / "tokenizer.json").write_text(spec)

    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token of"):
        get_tokenizer(path)
    del cfg["eos_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert get_tokenizer(path).eot_id == 0  # config.json's eos_token_id
    model_cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**model_cfg, "eos_token_id": -1}))  # was an OverflowError
    with pytest.raises(UserError, match=r"config.json: eos_token_id -1 is not a token of"):
        get_tokenizer(path)
    (path / "config.json").write_text(json.dumps({**model_cfg, "eos_token_id": None, "bos_token_id": None}))
    (path / "generation_config.json").unlink(missing_ok=True)
    tok = get_tokenizer(path)
    with pytest.raises(UserError, match="names no end-of-text token: tokenizer_config.json has no eos_token, and "
                                        "neither config.json nor generation_config.json an eos_token_id"):
        tok.eot_id
    from tritongpt import cli

    assert cli.main(["sft", "--init", str(path), "--n-train", "4", "--n-eval", "2", "--tasks", "first_word",
                     "--max-steps", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run")]) == 2
    assert f"error: {path} names no end-of-text token" in capsys.readouterr().err


class EntryNotFoundError(Exception):  # huggingface_hub's, by name: a repo without the file
    pass


class RepositoryNotFoundError(Exception):  # huggingface_hub's, by name: no such repo (or a private one)
    pass


class LocalEntryNotFoundError(Exception):  # huggingface_hub's, by name: local_files_only, a file not in the cache
    pass


class GatedRepoError(RepositoryNotFoundError):  # huggingface_hub's, by name: a license not accepted, or no token
    pass


def test_the_eos_token_as_transformers_writes_it_and_an_id_or_list_refused(tmp_path):
    """tokenizer_config.json's eos_token as an AddedToken ({"__type": "AddedToken", "content": ...}, as transformers
    writes it) names the EOS over config.json's eos_token_id; an id or a list was read as no token, and config.json's
    id taken in its place without a word: refused, naming the file and field."""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    build_tokenizer("llama3", vocab=300).save(str(tmp_path / "tokenizer.json"))  # <|begin_of_text|> 0, <|end..|> 1
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False,
                                             "special": True}}))
    tok = HFTokenizer.from_hf_folder(tmp_path)
    assert (tok.eos_token, tok.eot_id) == ("<|end_of_text|>", 1)
    for value, said in ((1, r"got int 1 \(an id goes in config.json's eos_token_id\)"),
                        (["<|end_of_text|>"], "got list"), ({"contents": "<|end_of_text|>"}, "got dict")):
        cfg.write_text(json.dumps({"eos_token": value}))
        with pytest.raises(UserError, match=f"{re.escape(str(cfg))}: eos_token must be a token's text .*{said}"):
            HFTokenizer.from_hf_folder(tmp_path)
    cfg.write_text(json.dumps({"bos_token": 0}))
    with pytest.raises(UserError, match="bos_token must be a token's text"):
        HFTokenizer.from_hf_folder(tmp_path)


def fake_hub(monkeypatch, hub, cache):
    """huggingface_hub.hf_hub_download answered from the folders hub/owner/name (copied into cache/owner/name,
    as into the Hub's cache; local_files_only: from cache alone), and list_repo_tree (the named chat templates'
    listing) from them too; google/gated is gated. -> (the (repo, file)s fetched, the repos asked for)."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    fetched, asked = [], []

    def fake_download(repo, filename, cache_dir=None, local_files_only=False, **kwargs):
        asked.append(repo)
        if local_files_only:
            if not (cache / repo / filename).is_file():
                raise LocalEntryNotFoundError(filename)
            return str(cache / repo / filename)
        if repo == "google/gated":
            raise GatedRepoError(repo)
        if repo == "someone/private":
            raise RepositoryNotFoundError(repo)
        if not (hub / repo).is_dir():
            raise RuntimeError(f"no repo {repo}")
        if not (hub / repo / filename).is_file():
            raise EntryNotFoundError(filename)
        fetched.append((repo, filename))
        (cache / repo / filename).parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(hub / repo / filename, cache / repo / filename))

    def fake_tree(repo, path_in_repo=None, recursive=False, **kwargs):
        folder = hub / repo / (path_in_repo or "")
        if repo in ("google/gated", "someone/private") or not folder.is_dir():
            raise EntryNotFoundError(path_in_repo)  # (the Hub's 404: no such repo, or no such folder in it)
        return (SimpleNamespace(path=p.relative_to(hub / repo).as_posix()) for p in sorted(folder.iterdir()))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_tree", fake_tree)
    return fetched, asked


def test_a_hub_repo_id_is_fetched_and_read_as_its_folder(tmp_path, monkeypatch, capsys):
    """--weights / --init owner/name (no such path here): its model.safetensors, config and
    tokenizer files come from the Hub (hf_hub_download, faked from a folder the test makes), and
    the commands read the fetched folder as the folder itself: the same generated text, the same
    tokenizer saved with an sft run; a sharded repo's index and shards are fetched and give the
    same text, and so does a repo from before safetensors (pytorch_model.bin alone). A repo with no
    weights, or none at all, is named."""
    import shutil

    from tritongpt import cli
    from tritongpt.train.tokenizer import load_tokenizer

    hub, cache = tmp_path / "hub", tmp_path / "cache"
    path, _, hf = llama_folder(hub / "someone" / "tiny-llama", "smollm", context=512)
    shutil.copytree(path, hub / "someone" / "sharded", ignore=shutil.ignore_patterns("model.safetensors"))
    hf.save_pretrained(hub / "someone" / "sharded", max_shard_size="40KB")
    # SentencePiece's file beside tokenizer.json (Llama 2's and Gemma's repos have both): not fetched, never read
    (hub / "someone" / "sharded" / "tokenizer.model").write_bytes(b"not read")
    shutil.copytree(path, hub / "someone" / "old", ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(hf.state_dict(), hub / "someone" / "old" / "pytorch_model.bin")  # a repo from before safetensors
    (hub / "someone" / "none").mkdir()
    shutil.copy(path / "config.json", hub / "someone" / "none" / "config.json")
    fetched, asked = fake_hub(monkeypatch, hub, cache)
    monkeypatch.chdir(tmp_path)  # someone/tiny-llama is no path from here (hub/someone/... is)
    flags = ["--prompt", "the cat sat on 42", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu",
             "--kernels", "reference"]
    assert cli.main(["generate", "--weights", str(path), *flags]) == 0
    want = capsys.readouterr().out
    assert cli.main(["generate", "--weights", "someone/tiny-llama", *flags]) == 0
    out = capsys.readouterr()
    assert out.out == want and f"someone/tiny-llama: the Hugging Face Hub's files, in {cache / 'someone' / 'tiny-llama'}" \
        in out.err
    assert {f for _, f in fetched} == {p.name for p in path.iterdir() if p.is_file()}  # weights, config, tokenizer

    assert cli.main(["sft", "--init", "someone/tiny-llama", "--n-train", "4", "--n-eval", "2", "--tasks",
                     "first_word", "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--kernels",
                     "reference", "--out-dir", str(tmp_path / "run")]) == 0
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").hash == get_tokenizer(path).hash
    capsys.readouterr()
    fetched.clear()
    assert cli.main(["generate", "--weights", "someone/sharded", *flags]) == 0
    assert capsys.readouterr().out == want
    shards = {f for _, f in fetched if f.startswith("model-")}
    assert len(shards) > 1
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json"} < {f for _, f in fetched}
    assert "tokenizer.model" not in {f for _, f in fetched}
    fetched.clear()
    assert cli.main(["generate", "--weights", "someone/old", *flags]) == 0
    assert capsys.readouterr().out == want
    assert {"pytorch_model.bin", "config.json", "tokenizer.json"} < {f for _, f in fetched}
    assert not any(f.startswith("model") for _, f in fetched)  # asked for, not there
    assert cli.main(["generate", "--weights", "someone/none", *flags]) == 2
    assert "'someone/none' is no file or folder here, and as a Hugging Face Hub repo: someone/none has none of " \
           "model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json; " \
           "download the weights elsewhere and pass their path" in capsys.readouterr().err
    assert cli.main(["generate", "--weights", "someone/missing", *flags]) == 2
    assert "could not fetch someone/missing from the Hugging Face Hub (offline?): RuntimeError" in capsys.readouterr().err
    assert cli.main(["generate", "--weights", "google/gated", *flags]) == 2
    assert "google/gated is gated on the Hugging Face Hub: accept its terms on https://huggingface.co/google/gated, " \
           "then log in (`hf auth login`) or set HF_TOKEN" in capsys.readouterr().err
    assert cli.main(["generate", "--weights", "someone/private", *flags]) == 2
    assert "there is no model someone/private on the Hugging Face Hub (or it is private: log in, or set HF_TOKEN)" \
        in capsys.readouterr().err
    # below a folder that is here (run/), a mistyped path: not asked of the Hub
    assert cli.main(["generate", "--weights", "run/ckpt-9", *flags]) == 2
    assert "run/ckpt-9" not in asked and "Hugging Face Hub" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sentencepiece", "llama3", "smollm"])
def test_sft_examples_and_prompts_start_with_bos_where_the_tokenizer_does(tmp_path, kind):
    """SFT's examples, its held-out prompts and a preference pair's prompt start with BOS where the
    folder's own pipeline starts every text with it (TinyLlama's <s>, Llama 3's <|begin_of_text|>), as
    transformers' tokenizer(text) gives them; SmolLM's has none and gets none. The prompt's length counts
    the BOS, so the answer is still what is learned."""
    from tritongpt.train import formats
    from tritongpt.train.sft import encode_records

    path, theirs, _ = llama_folder(tmp_path / kind, kind)
    tok = get_tokenizer(path)
    record = {"prompt": "the cat sat on", "output": " 42 mats"}
    (ex,), _ = encode_records([record], tok, 64)
    bos = theirs.bos_token_id if kind != "smollm" else None
    assert tok.prepended_bos_id == bos
    want_prompt = theirs(record["prompt"])["input_ids"]  # transformers' pipeline: BOS added where it adds one
    assert ex.ids[:ex.prompt_len] == want_prompt == formats.encode_prompt(tok, record["prompt"])
    assert ex.ids[ex.prompt_len:] == theirs(record["output"], add_special_tokens=False)["input_ids"] + [tok.eot_id]
    assert (ex.ids[0] == bos) == (bos is not None) and ex.ids.count(bos) == (bos is not None)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "so"}]}
    (ex,), _ = encode_records([chat], tok, 512)
    assert (ex.ids[0] == bos) == (bos is not None)
    # the later user turn is context, not learned: its range moved with the BOS
    (start, end), = ex.context
    (text, ends), = [(t, e) for t, e, learned in formats.record_parts(chat, tokenizer=tok)[2:] if not learned]
    assert ex.ids[start:end] == formats.encode_text(tok, text) + [tok.eot_id] * ends and "and?" in text


@pytest.mark.parametrize("kind", ["llama3", "smollm"])
def test_the_exported_tritongpt_template_writes_the_bos_sft_trained_with(tmp_path, kind):
    """A run tuned on chats in tritongpt's template is exported with it as Jinja; transformers'
    apply_chat_template adds no special tokens of its own, so where the tokenizer starts texts with a BOS
    (Llama 3's) the template writes it: the ids are SFT's, BOS first; SmolLM's has none and its template
    is HF_CHAT_TEMPLATE as it is."""
    from tritongpt.train import formats
    from tritongpt.train.sft import encode_records

    path, theirs, _ = llama_folder(tmp_path / kind, kind)
    tok = get_tokenizer(path)
    chat = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo 42"}]}
    (ex,), _ = encode_records([chat], tok, 512)
    theirs.chat_template = formats.hf_chat_template(tok)
    assert theirs.apply_chat_template(chat["messages"], return_dict=False) == ex.ids
    assert (ex.ids[0] == theirs.bos_token_id) == (kind == "llama3")
    assert (theirs.chat_template == formats.HF_CHAT_TEMPLATE) == (kind == "smollm")


def sentencepiece_folder(folder, config=LLAMA2_TOKENIZER_CONFIG):
    """tokenizer.model and a tokenizer_config.json (a Llama 2's), nothing else. -> folder."""
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_tokenizer_model_gives_sentencepiece_ids(tmp_path, capsys):
    """A folder whose tokenizer is SentencePiece's tokenizer.model (no tokenizer.json), converted by
    transformers: the ids are the sentencepiece library's own and transformers' on unicode, emoji
    (bytes, through byte fallback), runs of spaces, tabs and newlines; with the BOS the folder's
    pipeline puts first (add_bos_token) they are transformers' tokenizer(text) and sentencepiece's
    add_bos; decode gives the text back; EOS and BOS are the model's </s> and <s>. Which reader read
    the folder is said once. A text that starts with a space is where transformers 5 and
    sentencepiece part: its Metaspace adds no "▁" before a text that starts with one (transformers 4's
    conversion did): ours are transformers' there."""
    spm = pytest.importorskip("sentencepiece")
    folder = sentencepiece_folder(tmp_path / "llama2")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    tok = get_tokenizer(folder)
    assert get_tokenizer(folder / "tokenizer.model").hash == tok.hash
    note = capsys.readouterr().err
    assert note.count("note:") == 1 and f"{folder / 'tokenizer.model'} (no tokenizer.json beside it) is converted by " \
        f"transformers {transformers.__version__} LlamaTokenizer and read by Hugging Face's tokenizers library " \
        "(500 tokens, EOS '</s>')" in note
    assert type(tok).__name__ == "HFTokenizer" and tok.vocab_size == sp.get_piece_size() == len(theirs) == 500
    assert (tok.eot_id, tok.prepended_bos_id) == (sp.eos_id(), sp.bos_id()) == (theirs.eos_token_id,
                                                                                theirs.bos_token_id) == (2, 1)
    texts = ["naïve café, 東京 and Ελλάδα", "emoji 🙂🎉 👩‍💻 and 𝄞", "two  spaces,   three\tand a tab\t\t",
             "lines\n\nand\r\n  indented\n", "trailing   ", "x=3.14*r**2 # 1999 ١٢٣", "a", "",
             "\n  after a newline"] + [t for t in _random_texts(40, random.randrange(1 << 30)) if not t.startswith(" ")]
    for t in texts:
        ids = sp.encode(t)
        assert tok.encode(t) == ids == theirs(t, add_special_tokens=False)["input_ids"], t
        assert tok.encode_batch([t]) == [ids]
        assert theirs(t)["input_ids"] == [tok.prepended_bos_id] + ids
        assert sp.encode(t, add_bos=True) == [sp.bos_id()] + ids
        assert tok.decode(ids) == sp.decode(ids) == t
    assert [sp.id_to_piece(i) for i in sp.encode("🎉")][1:] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]  # its bytes
    for t in (" leading", "  two", "   ", " 42\n x"):
        ours = tok.encode(t)
        assert ours == theirs(t, add_special_tokens=False)["input_ids"]
        assert ours in (sp.encode(t), sp.encode(t[1:])), t  # transformers 4's, 5's: the dummy "▁" is the space


def test_a_run_from_a_tokenizer_model_folder_keeps_the_converted_tokenizer(corpus, tmp_path, monkeypatch, capsys):
    """pretrain --init on a Llama folder with tokenizer.model: the run saves the converted spec, which
    generate on the run reads back without converting again (sentencepiece not importable, the
    converter failing), and export writes it as tokenizer.json, which transformers.AutoTokenizer
    loads with the same ids."""
    import sys

    from tritongpt import cli
    from tritongpt.train import hf_tokenizer
    from tritongpt.train.tokenizer import load_tokenizer

    path, theirs, _ = llama_folder(tmp_path / "sentencepiece_model", "sentencepiece_model", context=64)
    tok = get_tokenizer(path)
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--init", str(path), "--data", str(corpus.text), "--cache-dir", str(corpus.cache),
                     "--out-dir", str(run), "--device", "cpu", "--kernels", "reference", "--block-size", "32",
                     "--batch-size", "2", "--max-steps", "1", "--sample-tokens", "0", "--log-every", "0",
                     "--eval-every", "0"]) == 0
    saved = load_tokenizer(run / "tokenizer.json")
    assert saved.hash == tok.hash and saved.info["converted_by"].startswith("transformers ")
    capsys.readouterr()
    prompt = "naïve café 東京"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "sentencepiece", None)

        def no_conversion(folder):
            raise AssertionError(f"converted {folder} again")

        m.setattr(hf_tokenizer, "spec_from_sentencepiece", no_conversion)
        assert cli.main(["generate", "--weights", str(run), "--prompt", prompt, "--max-new-tokens", "3",
                         "--device", "cpu", "--kernels", "reference"]) == 0
        assert capsys.readouterr().out.startswith(prompt)
        # a tokenizer.model already there would be read as the export's own, were tokenizer.json gone
        out = tmp_path / "export"
        out.mkdir()
        (out / "tokenizer.model").write_bytes((path / "tokenizer.model").read_bytes())
        assert cli.main(["export", str(run), "--out", str(out)]) == 2
        assert f"{out} already holds tokenizer.model: pass --overwrite" in capsys.readouterr().err
        assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "tokenizer.model").exists()
    exported = transformers.AutoTokenizer.from_pretrained(out)
    texts = FIXED + _random_texts(20, random.randrange(1 << 30))
    assert [exported(t, add_special_tokens=False)["input_ids"] for t in texts] == tok.encode_batch(texts)
    assert [exported(t)["input_ids"] for t in texts] == [theirs(t)["input_ids"] for t in texts]
    assert (exported.eos_token, exported.bos_token) == ("</s>", "<s>")


def test_a_tokenizer_model_without_its_libraries_or_damaged_is_named(tmp_path, monkeypatch, capsys):
    """Without transformers, sentencepiece or protobuf the error names the file and exactly what to
    install; a tokenizer.model that is not SentencePiece's (cut short, another format) is refused
    naming it, on the command line as an error, not a traceback."""
    import sys

    from tritongpt import cli

    pytest.importorskip("sentencepiece")
    folder = sentencepiece_folder(tmp_path / "llama2")
    model = folder / "tokenizer.model"
    for module, requirement in (("transformers", "transformers>=4.40"), ("sentencepiece", "sentencepiece>=0.2"),
                                ("google.protobuf", "protobuf>=3.20")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # import raises ImportError
            with pytest.raises(UserError) as e:
                get_tokenizer(folder)
        assert str(e.value) == (f"{model} is a SentencePiece tokenizer (and {folder} has no tokenizer.json): "
                                f"converting it needs {requirement}: pip install '{requirement}' (tritongpt's "
                                "sentencepiece extra)")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "sentencepiece", None)
        m.setitem(sys.modules, "google.protobuf", None)
        with pytest.raises(UserError, match=r"needs sentencepiece>=0.2 and protobuf>=3.20: pip install "
                                            r"'sentencepiece>=0.2' 'protobuf>=3.20' \(tritongpt's"):
            get_tokenizer(folder)
    good = model.read_bytes()
    for damaged in (good[:len(good) // 2], b'{"model": "BPE"}'):
        model.write_bytes(damaged)
        with pytest.raises(UserError, match=f"{model}: not a SentencePiece model \\(INTERNAL: could not parse "
                                            "ModelProto"):  # sentencepiece's reason
            get_tokenizer(folder)
        assert cli.main(["bpe", "encode", "--tokenizer", str(folder), "--text", "hi"]) == 2
        err = capsys.readouterr().err
        assert f"error: {model}: not a SentencePiece model" in err and "Traceback" not in err


def test_a_hub_repo_with_only_a_tokenizer_model_is_read_as_its_folder(tmp_path, monkeypatch, capsys):
    """--weights owner/name of a repo whose tokenizer is tokenizer.model alone: it is fetched with
    the weights and the fetched folder reads as the folder itself (the same generated text)."""
    from tritongpt import cli

    hub, cache = tmp_path / "hub", tmp_path / "cache"
    path, _, _ = llama_folder(hub / "someone" / "old-llama", "sentencepiece_model", context=64)
    fetched, _ = fake_hub(monkeypatch, hub, cache)
    monkeypatch.chdir(tmp_path)
    flags = ["--prompt", "the cat sat on 42", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu",
             "--kernels", "reference"]
    assert cli.main(["generate", "--weights", str(path), *flags]) == 0
    want = capsys.readouterr().out
    assert cli.main(["generate", "--weights", "someone/old-llama", *flags]) == 0
    assert capsys.readouterr().out == want
    assert {f for _, f in fetched} == {p.name for p in path.iterdir() if p.is_file()} >= {"tokenizer.model"}


PROMPT, CHAT = "the cat sat on 42", "the cat sat"


@pytest.fixture(scope="module")
def ends_folder(tmp_path_factory):
    """A SmolLM-shaped folder whose generation_config.json lists other end tokens beside its tokenizer's EOS (as an
    instruct Llama 3.1's lists <|eot_id|>, <|eom_id|> and <|end_of_text|>): the third token of PROMPT's greedy
    continuation (its first place there) and the second of CHAT's answer (chat's prompt, tritongpt's template).
    -> (folder, transformers' tokenizer, PROMPT's greedy 8 new ids, its end, CHAT's prompt ids, its answer's ids,
    its end), the greedy ids transformers' with the tokenizer's EOS alone."""
    from tritongpt.train.chat import Conversation
    from tritongpt.train.tokenizer import get_tokenizer

    path, theirs, hf = llama_folder(tmp_path_factory.mktemp("ends") / "smollm", "smollm")
    eos = theirs.eos_token_id

    def greedy(ids):
        with torch.no_grad():
            return hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=eos,
                               eos_token_id=eos)[0, len(ids):].tolist()
    row = greedy(theirs(PROMPT)["input_ids"])
    chat_ids = Conversation("chat").fit(get_tokenizer(path), CHAT, 40, 8)[0]
    answer = greedy(chat_ids)
    end, chat_end = row[2], answer[1]
    # each ends its own text first, and the other's not before it
    assert eos not in row + answer and end not in row[:2] + answer[:2] and chat_end not in row[:3] + answer[:1]
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos, end, chat_end]}))
    return path, theirs, row, end, chat_ids, answer, chat_end


FLAGS = ["--temperature", "0", "--max-new-tokens", "8", "--device", "cpu", "--kernels", "reference"]


def test_generate_stops_on_the_generation_configs_eos_too(ends_folder, capsys):
    """A folder whose tokenizer_config.json names one EOS and whose generation_config.json others too: transformers'
    generate stops on the generation config's, vLLM on those and the tokenizer's; `generate` stops where any is
    drawn, as vLLM does (which is where transformers stops here), rather than on the tokenizer's alone; --stream
    prints the same text."""
    from tritongpt import cli

    path, theirs, row, end, *_ = ends_folder
    ids = theirs(PROMPT)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)  # (its generation config: the file's)
    with torch.no_grad():
        theirs_row = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert theirs_row == row[:3]  # (transformers stops on it)
    for stream in ([], ["--stream"]):
        assert cli.main(["generate", "--weights", str(path), "--prompt", PROMPT, *FLAGS, *stream]) == 0
        out = capsys.readouterr()
        assert out.out == theirs.decode(ids + row[:2]) + "\n", stream
        assert f"the model ended the text ({theirs.decode([end])}) after 2 new tokens" in out.err


def test_generate_beams_stop_on_the_generation_configs_eos_too(ends_folder, capsys):
    """generate --num-beams: a beam ends on the generation config's end tokens too, as transformers' beam search
    (generation_config.eos_token_id, each of them): its beams' texts and scores."""
    from tritongpt import cli
    from tritongpt.commands import SAMPLE_SEPARATOR

    path, theirs, row, end, *_ = ends_folder
    ids = theirs(PROMPT)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, num_return_sequences=2,
                          do_sample=False, output_scores=True, return_dict_in_generate=True)
    beams = [b[len(ids):].tolist() for b in out.sequences]
    assert beams[0][:3] == row[:3]  # (the best beam ended at `end`: it did not without it, see ends_folder)
    assert cli.main(["generate", "--weights", str(path), "--prompt", PROMPT, *FLAGS, "--num-beams", "2",
                     "--num-return-sequences", "2"]) == 0
    got = capsys.readouterr()
    ends = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    texts = [theirs.decode(ids + next((b[:j] for j, t in enumerate(b) if t in ends), b)) for b in beams]
    assert got.out == f"{texts[0]}\n{SAMPLE_SEPARATOR}\n{texts[1]}\n"
    said = re.findall(r"beam \d: score ([-\d.]+)(?:, )?(.*)", got.err)
    assert [float(score) for score, _ in said] == pytest.approx(out.sequences_scores.tolist(), abs=1e-5)
    assert said[0][1] == f"the model ended the text ({theirs.decode([end])}) after 2 new tokens" and not said[1][1]


def test_generate_prompts_stop_on_the_generation_configs_eos_too(ends_folder, tmp_path):
    """generate --prompts: a record's text ends where `generate`'s does, finish_reason "stop", the end token
    counted (serve's completion choices)."""
    from tritongpt import cli

    path, theirs, row, *_ = ends_folder
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    assert cli.main(["generate", "--weights", str(path), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                     str(tmp_path / "o.jsonl"), *FLAGS]) == 0
    (record,) = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert (record["text"], record["finish_reason"], record["completion_tokens"]) == \
        (theirs.decode(row[:2]), "stop", 3)


def test_chat_stops_on_the_generation_configs_eos_too(ends_folder, monkeypatch, capsys):
    """chat: an answer ends on the generation config's end tokens too (serve's chat answers do)."""
    from tritongpt import cli

    path, theirs, *_, answer, _ = ends_folder
    monkeypatch.setattr("sys.stdin", io.StringIO(CHAT + "\n"))
    assert cli.main(["chat", "--weights", str(path), *FLAGS, "--template", "chat"]) == 0
    out = capsys.readouterr()
    assert out.out == theirs.decode(answer[:1]) + "\n" and "the answer was cut" not in out.err, out


def test_serve_and_run_batch_stop_on_the_generation_configs_eos_too(ends_folder, tmp_path, capsys):
    """serve (and run-batch, its server in process): an answer ends where `generate`'s does, vLLM's stop_reason the
    id, a stream's last choice chunk saying it and its usage counting the end token; min_tokens holds the end token
    back; a request's own stop_token_ids end it beside them, not in their place; ignore_eos ignores them all."""
    from tritongpt import cli

    from test_serve import call, events, start

    path, theirs, row, end, *_ = ends_folder
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8}
    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, got = call(server, "/v1/completions", {**body, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        chunks = events(got)
        texts = [c["choices"][0] for c in chunks if c["choices"]]
        assert status == 200 and "".join(c["text"] for c in texts) == theirs.decode(row[:2])
        assert (texts[-1]["finish_reason"], texts[-1]["stop_reason"]) == ("stop", end)
        assert chunks[-1]["usage"]["completion_tokens"] == 3

        def answer(**extra):
            status, got = call(server, "/v1/completions", {**body, **extra})
            assert status == 200, got
            choice = got["choices"][0]
            return choice["finish_reason"], choice["stop_reason"], got["usage"]["completion_tokens"]
        assert answer(min_tokens=3)[2] > 3
        assert answer(stop_token_ids=[row[1]]) == ("stop", row[1], 2)
        other = next(t for t in range(theirs.eos_token_id + 1, len(theirs)) if t not in row)
        assert answer(stop_token_ids=[other]) == ("stop", end, 3)
        assert answer(ignore_eos=True) == ("length", None, 8)
    finally:
        server.shutdown()
        server.server_close()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
    assert cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--weights",
                     str(path), "--device", "cpu", "--kernels", "reference"]) == 0
    (got,) = [json.loads(x)["response"]["body"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    choice = got["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"], got["usage"]["completion_tokens"]) == \
        (theirs.decode(row[:2]), "stop", end, 3)


def test_generate_and_serve_stop_on_an_eos_only_special_tokens_map_json_names(ends_folder, tmp_path, capsys):
    """A legacy folder (an older Llama 2's or Mistral's) naming its EOS in special_tokens_map.json alone: none in
    tokenizer_config.json (nor an added_tokens_decoder there, so transformers reads the map), config.json or
    generation_config.json. transformers' tokenizer.eos_token_id is the map's, which vLLM stops on; so do generate
    and serve (ends_folder's `end`, PROMPT's third greedy token, made the map's EOS here)."""
    import shutil

    from tritongpt import cli

    from test_serve import call, start

    src, theirs, row, end, *_ = ends_folder
    path = shutil.copytree(src, tmp_path / "legacy")
    for name, keys in (("tokenizer_config.json", ("eos_token", "added_tokens_decoder")),
                       ("config.json", ("eos_token_id",)), ("generation_config.json", ("eos_token_id",))):
        d = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({k: v for k, v in d.items() if k not in keys}))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": theirs.convert_ids_to_tokens(end)}))
    assert transformers.AutoTokenizer.from_pretrained(path).eos_token_id == end
    assert cli.main(["generate", "--weights", str(path), "--prompt", PROMPT, *FLAGS]) == 0
    out = capsys.readouterr()
    assert out.out == theirs.decode(theirs(PROMPT)["input_ids"] + row[:2]) + "\n"
    assert f"the model ended the text ({theirs.decode([end])}) after 2 new tokens" in out.err
    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, got = call(server, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 8})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200, got
    assert (got["choices"][0]["text"], got["choices"][0]["finish_reason"], got["usage"]["completion_tokens"]) == \
        (theirs.decode(row[:2]), "stop", 3)


def test_serve_min_tokens_holds_the_generation_configs_eos_back_under_ignore_eos(ends_folder):
    """ignore_eos with min_tokens: vLLM's update_from_generation_config keeps the generation config's end tokens in
    all_stop_token_ids, which its min_tokens processor holds back, even where ignore_eos leaves them out of
    stop_token_ids; so the first min_tokens tokens are never one of them (nor the EOS), and later ones end nothing.
    Here the third greedy token was the config's `end`, drawn under ignore_eos: it is the likeliest other token."""
    from test_serve import call, start

    path, theirs, row, end, *_ = ends_folder
    ids = theirs(PROMPT)["input_ids"]
    held = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + row[:2]])).logits[0, -1]
    logits[held] = -float("inf")
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
    for flags in ([], ["--max-batch", "1"]):  # (the engine's draws, and generate()'s without one)
        server = start(path, "--kernels", "reference", *flags)
        server.RequestHandlerClass.log_message = lambda *a: None
        try:
            got = [call(server, "/v1/completions", {**body, **extra})[1]["choices"][0]
                   for extra in ({"min_tokens": 3}, {"min_tokens": 2})]
        finally:
            server.shutdown()
            server.server_close()
        assert got[0]["token_ids"][:3] == row[:2] + [int(logits.argmax())] and end not in got[0]["token_ids"][:3]
        # (past min_tokens it is drawn, and under ignore_eos ends nothing)
        assert got[1]["token_ids"][:3] == row[:3] and got[1]["finish_reason"] == "length", flags


def test_serves_beam_search_ends_on_the_tokenizers_eos_alone(ends_folder):
    """use_beam_search is vLLM's beam search, which ends a beam on the tokenizer's EOS alone (its
    serving_engine's beam_search: no stop_token_ids, no generation config's), not on the generation config's other
    end tokens as its sampling does: the beams are transformers' with eos_token_id the tokenizer's, not those with
    the generation config's list (`generate --num-beams`'s)."""
    from test_serve import call, start

    path, theirs, *_ = ends_folder
    ids, eos = theirs(PROMPT)["input_ids"], theirs.eos_token_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)

    def beams(ends):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, num_return_sequences=2,
                              do_sample=False, eos_token_id=ends, pad_token_id=eos)
        return [theirs.decode(next((b[:j] for j, t in enumerate(b) if t in ends), b))
                for b in (row[len(ids):].tolist() for row in out)]
    texts = beams([eos])
    assert texts != beams(json.loads((path / "generation_config.json").read_text())["eos_token_id"])
    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, got = call(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "n": 2,
                                                        "use_beam_search": True})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and [c["text"] for c in got["choices"]] == texts, got


def test_an_empty_eos_or_bos_token_is_refused_by_name(tmp_path):
    """tokenizer_config.json's eos_token "" (or bos_token): transformers reads a tokenizer without that token (its
    eos_token_id None, "" in a chat template), where config.json's eos_token_id was taken in its place without a
    word (the chat template's eos_token then another text): refused, naming the file and field."""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    build_tokenizer("llama3", vocab=300).save(str(tmp_path / "tokenizer.json"))  # <|begin_of_text|> 0, <|end..|> 1
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    cfg = tmp_path / "tokenizer_config.json"
    for key, value in (("eos_token", ""), ("eos_token", {"__type": "AddedToken", "content": "", "special": True}),
                       ("bos_token", "")):
        cfg.write_text(json.dumps({key: value}))
        with pytest.raises(UserError, match=f"{re.escape(str(cfg))}: {key} is an empty string, which names no token"):
            HFTokenizer.from_hf_folder(tmp_path)
    cfg.write_text(json.dumps({"eos_token": None}))  # (null, or no field: config.json's id, as before)
    assert HFTokenizer.from_hf_folder(tmp_path).eos_token == "<|end_of_text|>"



def test_an_empty_named_special_token_reads_as_transformers_5_reads_it(tmp_path):
    """{"content": ""} as a pad_token or unk_token (tokenizer_config.json's AddedToken, or special_tokens_map.json's
    object): transformers 5 loads it as the token "" (no error, fast or converted tokenizer alike), so this reader
    reads it the same and the chat template gets pad_token "" as transformers passes it. (An empty eos_token or
    bos_token is refused, above: there config.json's id would stand in for it.)"""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    build_tokenizer("llama3", vocab=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    cfg, smap = tmp_path / "tokenizer_config.json", tmp_path / "special_tokens_map.json"
    for key, config, legacy in (
            ("pad_token", {"pad_token": {"__type": "AddedToken", "content": "", "special": True}}, None),
            ("unk_token", {}, {"unk_token": {"content": ""}})):
        cfg.write_text(json.dumps(config))
        smap.unlink(missing_ok=True)
        if legacy is not None:
            smap.write_text(json.dumps(legacy))
        assert getattr(transformers.AutoTokenizer.from_pretrained(tmp_path), key) == ""  # (the premise)
        assert HFTokenizer.from_hf_folder(tmp_path).template_tokens == {key: ""}

def test_tokenizer_info_gives_the_folders_special_tokens_as_transformers_init_kwargs(ends_folder, tmp_path):
    """vLLM's /tokenizer_info is its tokenizer's init_kwargs (AddedTokens as their text): a folder's pad_token and
    unk_token by name, a model's own (image_token, extra_special_tokens) under model_specific_special_tokens, as
    transformers.AutoTokenizer holds them, where pad_token was always None here."""
    import shutil

    from test_serve import call, start

    path = tmp_path / "specials"
    shutil.copytree(ends_folder[0], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(pad_token="<|im_end|>", unk_token={"__type": "AddedToken", "content": "<|im_start|>", "special": True,
                                                           "lstrip": False, "rstrip": False, "normalized": False,
                                                           "single_word": False},
               image_token="<|im_start|>", extra_special_tokens={"video_token": "<|im_end|>"})
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    kwargs = transformers.AutoTokenizer.from_pretrained(path).init_kwargs

    def text(value):
        return value if isinstance(value, (str, dict)) or value is None else value.content
    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, info = call(server, "/tokenizer_info")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200, info
    for key in ("eos_token", "bos_token", "pad_token", "unk_token", "model_specific_special_tokens"):
        assert info[key] == text(kwargs[key]), key
    assert info["pad_token"] == "<|im_end|>" and info["model_specific_special_tokens"] == \
        {"image_token": "<|im_start|>", "video_token": "<|im_end|>"}


# -- incremental decoding: a window of the row's last ids spells them as decoding the whole row does ----------------
@pytest.fixture(scope="module")
def decoder_shapes():
    """{name: HFTokenizer} of each decoder shape: Llama 2's (Replace, ByteFallback, Fuse, Strip), a Metaspace with
    byte fallback (Mistral's converted, and with prepend_scheme "first"), Llama 3's and SmolLM's byte-level BPE, a BERT
    WordPiece, and the decoders that look past a token on small vocabularies (every token drawn often): BPEDecoder's
    "</w>" (the last token spelled without its space), CTC (a token equal to the one before dropped, its pad spelled
    as nothing, its word delimiter a space) and a Strip of the text's first and last spaces after a ByteLevel (whose
    rows of one or two spaces the library panics on); each with added tokens, special (<|im_end|>, its EOS) and not
    (one of spaces and "▁")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from tritongpt.train.hf_tokenizer import HFTokenizer

    shapes = {kind: build_tokenizer(kind, 300) for kind in ("sentencepiece", "llama3", "smollm")}
    shapes["metaspace"] = build_tokenizer("sentencepiece", 300)
    shapes["metaspace"].decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    # (a vocabulary of WORDS' words, characters and "##" characters: WordPieceTrainer's is not the same each run)
    chars = sorted(set("".join(WORDS)))
    pieces = ["[UNK]"] + sorted(set(WORDS) - {""}) + chars + ["##" + c for c in chars]
    shapes["wordpiece"] = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    shapes["wordpiece"].pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    shapes["wordpiece"].decoder = decoders.WordPiece()
    shapes["metaspace_first"] = build_tokenizer("sentencepiece", 300)
    shapes["metaspace_first"].decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"),
                                                           decoders.ByteFallback(), decoders.Fuse()])

    def word_level(pieces, decoder):
        t = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0]))
        t.decoder = decoder
        return t
    shapes["bpe_suffix"] = word_level(["<unk>", "the</w>", "th", "e</w>", "c", "at</w>", "a</w>", "a", "</w>", "s</w>",
                                       ".</w>", "é", "\ufffd</w>", "n't</w>"], decoders.BPEDecoder())
    shapes["ctc"] = word_level(["<pad>", "|", "a", "b", "the", "'", "n't", ".", "s", "|a", "<pad>b", "é"],
                               decoders.CTC(pad_token="<pad>", word_delimiter_token="|"))
    shapes["strip_end"] = word_level(["<unk>", "Ġ", "ĠĠ", "a", "Ġa", "aĠ", "Ġthe", "Ċ", "ĠĊ", "Ã", "Ã©", "b", "Ġb"],
                                     decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 2)]))
    for t in shapes.values():
        t.add_tokens([AddedToken("<tool>", special=False), AddedToken(" ▁x ", special=False, normalized=False)])
        t.add_special_tokens(["<|im_end|>"])
    return {name: HFTokenizer(json.loads(t.to_str()), eos_token="<|im_end|>") for name, t in shapes.items()}


def _random_ids(rng, tok, n):
    """Random ids, many of them byte-fallback tokens, added tokens and low ids (single bytes of a byte-level BPE)."""
    odd, byte = sorted(tok.special_tokens.values()) + [tok.vocab_size - 1, tok.vocab_size - 2], sorted(tok.byte_ids)
    return [rng.choice(byte) if byte and u < 0.3 else rng.choice(odd) if u < 0.4 else
            rng.randrange(min(60, tok.vocab_size)) if u < 0.55 else rng.randrange(tok.vocab_size) for u in (rng.random() for _ in range(n))]


def _panics_at(tok, ids):
    """The first k whose decode(ids[:k]) the tokenizers library panics on (a UserError here), else None."""
    from tritongpt.train.hf_tokenizer import DecoderPanic

    for k in range(len(ids) + 1):
        try:
            tok.decode(ids[:k])
        except DecoderPanic:
            return k
    return None


def test_streamed_text_and_stop_checks_decode_a_window_as_the_whole_row(decoder_shapes):
    """A differential fuzz: on random ids of each decoder shape (cut characters, runs of byte-fallback tokens that
    turn valid characters to U+FFFD, a Strip of the first space, Metaspace's and WordPiece's first token, added and
    special tokens), the stream decoder hands out, write by write, what decoding the ids so far whole gave it (the
    text less what later ids may change; the stream adds up to decode), the Window's text is the whole row's past
    its done ids at every id, and Choices.stopped, growing each row's text, stops the rows cut() on the whole row
    stops (min_tokens, skip_special_tokens, include_stop, stop ids)."""
    from tritongpt.commands import Choices
    from tritongpt.train.hf_tokenizer import DecoderPanic, Window

    for name, tok in decoder_shapes.items():
        assert tok.incremental, name
        rng, stopped = random.Random(name), 0
        for _ in range(200):
            ids = _random_ids(rng, tok, rng.randint(0, 40))
            stream, window, shown = tok.stream_decoder(), Window(tok), ""
            if (bad := _panics_at(tok, ids)) is not None:  # (strip_end's row of one or two spaces)
                for i in ids[:bad - 1]:
                    stream.write([i])
                with pytest.raises(DecoderPanic, match="Strip"):
                    stream.write([ids[bad - 1]])
                continue
            for k, i in enumerate(ids, 1):
                n = k
                while n and ids[n - 1] in tok.byte_ids:
                    n -= 1
                whole = tok.decode(ids[:n]).rstrip("\ufffd")
                want = whole[len(shown):] if whole.startswith(shown) else ""
                shown += want
                assert stream.write([i]) == want, (name, ids, k)
                window.ids.append(i)
                text = window.text(k)
                assert text == tok.decode(ids[:k])[window.done:] and window.local, (name, ids, k)
                window.commit(k, text)
            assert shown + stream.flush() == tok.decode(ids), (name, ids)
            assert stream.shown is None, (name, ids)  # (the window never fell back to whole decodes)
        rows = 0
        while rows < 40:
            prompt, new = _random_ids(rng, tok, rng.randint(0, 6)), _random_ids(rng, tok, rng.randint(1, 20))
            if _panics_at(tok, prompt + new) is not None:  # (a row decoding whole raises: drawn again)
                continue
            rows += 1
            text = tok.decode(prompt + new) or "x"
            stops = [text[a:a + rng.randint(1, 3)] for a in (rng.randrange(len(text)) for _ in range(rng.randint(1, 3)))]
            kw = dict(stop_token_ids=rng.choice([(), (5,), (7, 9)]), ignore_eos=rng.random() < 0.2,
                      min_tokens=rng.choice([0, 0, 2, 5]), include_stop=rng.random() < 0.3,
                      skip_special=rng.random() < 0.3)
            grown, whole = Choices(tok, prompt, stops, tok.eot_id, **kw), Choices(tok, prompt, stops, tok.eot_id, **kw)
            whole.grown = None
            row = list(prompt)
            for i in new:
                row.append(i)
                assert grown.stopped(torch.tensor([row])).tolist() == whole.stopped(torch.tensor([row])).tolist(), \
                    (name, prompt, new, stops, kw)
            assert grown.first_stop == whole.first_stop
            stopped += grown.grown is not None and bool(whole.first_stop)
        assert stopped >= 5, (name, stopped)  # (rows grown, stopped where the whole row's text stops them)


class _CountingDecode:
    """A tokenizers.Tokenizer whose decode counts the ids it is given (the rest passed through)."""

    def __init__(self, tok):
        self.tok, self.ids = tok, 0

    def decode(self, ids, **kw):
        self.ids += len(ids)
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_streaming_and_stop_checks_decode_the_last_ids_not_the_whole_row(decoder_shapes):
    """Streaming (TextSoFar.write) and the stop check of every row each step (Choices.stopped) decoded the whole row
    for each new id of a Hugging Face tokenizer: O(length) a token, a Llama's or Qwen's biggest host cost a step. A
    counting spy on the tokenizer's decode: the ids each new id costs stay a window's few however long the row
    (the prompt's once), and the text is the whole decode's."""
    from tritongpt.commands import Choices

    for name in ("sentencepiece", "llama3"):
        tok = copy.copy(decoder_shapes[name])
        spy = tok._tok = _CountingDecode(tok._tok)
        prompt = tok.encode(_corpus(seed=1, lines=12))
        new = tok.encode(_corpus(seed=2, lines=24))
        assert len(prompt) > 100 and len(new) > 200, (len(prompt), len(new))
        stream = tok.stream_decoder()
        text = stream.write(prompt)
        spy.ids = 0
        text += "".join(stream.write([i]) for i in new)
        assert text + stream.flush() == tok.decode(prompt + new)
        # (old: the whole row each write, 70,000 ids here)
        assert spy.ids <= 40 * len(new), (name, spy.ids)
        rows = Choices(tok, prompt, ["0123"], tok.eot_id)
        spy.ids, row = 0, list(prompt)
        for i in new:
            row.append(i)
            assert rows.stopped(torch.tensor([row])).tolist() == [False]
        assert spy.ids <= 3 * len(prompt) + 40 * len(new), (name, spy.ids)
        row.extend(tok.encode(" 0123"))
        assert rows.stopped(torch.tensor([row])).tolist() == [True]


@pytest.mark.parametrize("name", ["bpe_suffix", "ctc", "strip_end"])
def test_decoders_that_look_past_a_token_stream_a_window_not_the_whole_row(decoder_shapes, name):
    """BPEDecoder's suffix (the last token spelled without its space), CTC (a token equal to the one before dropped)
    and a Strip of the text's end after a ByteLevel were decided not local: the stream and the stop check decoded
    the whole row for each new id (2,000 ids: 2,000,000 ids decoded, 0.9 to 3.4 s here, against 19,000 and 16 to
    28 ms for a ByteLevel). Each reaches back a bounded way (local_decoder), so a window does: a counting spy on the
    library's decode, the ids each new id costs stay a window's few, and the text is the whole decode's."""
    from tritongpt.commands import Choices

    tok = copy.copy(decoder_shapes[name])
    spy = tok._tok = _CountingDecode(tok._tok)
    rng = random.Random(name)
    # (after "a", no row's text is only spaces: a Strip of the end panics on one or two)
    prompt = [tok._tok.token_to_id("a")] + _random_ids(rng, tok, 20)
    new = _random_ids(rng, tok, 600)
    stream = tok.stream_decoder()
    text = stream.write(prompt)
    spy.ids = 0
    text += "".join(stream.write([i]) for i in new)
    assert text + stream.flush() == tok.decode(prompt + new)
    assert spy.ids <= 40 * len(new), spy.ids  # (old: the whole row each write, 194,142 ids)
    rows = Choices(tok, prompt, ["0123"], None)
    assert rows.grown is not None
    spy.ids, row = 0, list(prompt)
    for i in new:
        row.append(i)
        assert rows.stopped(torch.tensor([row])).tolist() == [False]
    assert spy.ids <= 3 * len(prompt) + 40 * len(new), spy.ids


def test_generate_streams_a_stop_string_only_in_the_new_text_after_a_prompts_byte_run(decoder_shapes, capsys):
    """A prompt that ends in a run of byte-fallback tokens ("€", three of them): the stream decoder holds the run
    back (a later byte may turn it to U+FFFDs) and handed it out with the first new token's text, which
    `generate --stream`'s TextStream searched for stop strings as new text: --stop "€" cut the stream after "the "
    where the text printed without --stream (continuation's) holds no stop string and runs on."""
    from tritongpt.commands import TextStream, continuation, cut_at_stop

    tok = decoder_shapes["sentencepiece"]
    prompt, new = tok.encode("the €"), tok.encode(" sat")
    assert prompt[-1] in tok.byte_ids and "€" not in tok.stream_decoder().write(prompt)  # (the run held back)
    for stops in (["€"], ["€ ", "sat"]):
        stream = TextStream(tok, prompt, tok.eot_id, stops)
        for t in new:
            stream(torch.tensor([[t]]))
        stream.close()
        text, cut = cut_at_stop(continuation(tok, prompt, new), stops)  # (what generate prints without --stream)
        assert capsys.readouterr().out == (tok.decode(prompt) + text if cut else tok.decode(prompt + new)) + "\n"
        assert cut == (None if stops == ["€"] else "sat")


def test_the_stream_counts_min_tokens_text_where_a_prompts_byte_run_holds_it_back(decoder_shapes):
    """A prompt ending in a byte-fallback run ("€") and new ids that are bytes too: ContinuationStream hands out
    nothing until a later id says whether the row's text starts with the prompt's, so Delta took min_tokens' text as
    "" and a stop string inside it ("€", the first three new ids) counted: the stream was done at the next token
    while the answer (Choices, min_tokens' text "€") ran on. Delta now counts the first min_tokens ids' text."""
    from tritongpt.commands import Choices
    from tritongpt.train.serve import Delta

    tok = decoder_shapes["sentencepiece"]
    prompt = tok.encode("the €")
    new = prompt[-3:] + tok.encode(" sat")  # ("€" again: three byte tokens, then text)
    assert all(t in tok.byte_ids for t in new[:3])
    for grown in (True, False):
        rows = Choices(tok, prompt, ["€"], tok.eot_id, min_tokens=3)
        rows.grown = rows.grown if grown else None
        delta, row, sent = Delta(tok, prompt, rows), list(prompt), ""
        for t in new:
            row.append(t)
            sent += delta.add(t)
            assert delta.done == bool(rows.stopped(torch.tensor([row]))[0]), (grown, len(row))
        text, finish, count, reason = rows.ending(0, row)
        assert (finish, reason) == ("length", None) and text.startswith(sent) and sent.startswith("€"), (grown, sent)


def test_a_decoder_a_window_cannot_spell_is_decoded_whole():
    """Decoders whose text of a token depends on tokens a window need not hold (a Replace of two characters after a
    Fuse may span tokens, and the row's text then need not extend what was handed out; a regex Replace; a BPEDecoder
    suffix or a CTC pad after a Fuse) are decided once per tokenizer not incremental: the stream and the stop check
    decode the whole row and give its text. BPEDecoder and CTC on the tokens, and a Strip of the end after a Fuse,
    were among them; they reach back a bounded way and now stream a window (local_decoder)."""
    from tokenizers import Tokenizer, decoders, models

    from tritongpt.commands import Choices
    from tritongpt.train.hf_tokenizer import HFTokenizer, local_decoder

    vocab = {"<unk>": 0, "a</w>": 1, "b": 2, "c</w>": 3, "<eos>": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    cases = ((decoders.BPEDecoder(), True, "a bbc"), (decoders.CTC(pad_token="<unk>"), True, "a</w>bc</w>"),
             (decoders.Sequence([decoders.Fuse(), decoders.Replace("bc", "X")]), False, "a</w>bX</w>"))
    for decoder, local, want in cases:
        t.decoder = decoder
        tok = HFTokenizer(json.loads(t.to_str()), eos_token="<eos>")
        assert tok.incremental == local, decoder
        ids = [1, 2, 2, 3]
        assert tok.decode(ids) == want
        stream = tok.stream_decoder()
        sent = "".join(stream.write([i]) for i in ids) + stream.flush()
        # (the Replace's row text "a</w>bb" becomes "a</w>bX</w>": what was handed out cannot follow it)
        assert sent == (want if local else "a</w>bb")
        assert (Choices(tok, [1], ["b"], 4).grown is not None) == local
    fused = {"type": "Fuse"}
    for d in ({"type": "BPEDecoder", "suffix": "</w>"}, {"type": "CTC", "pad_token": "<pad>"},
              {"type": "Replace", "pattern": {"String": "ab"}, "content": "c"},
              {"type": "Replace", "pattern": {"Regex": "a"}, "content": "c"}):
        assert local_decoder(d) == (d["type"] != "Replace" or "String" in d["pattern"]), d
        assert not local_decoder({"type": "Sequence", "decoders": [fused, d]}), d
    assert local_decoder({"type": "Sequence", "decoders": [fused, {"type": "Strip", "content": " ", "start": 1,
                                                                   "stop": 1}]})


def test_a_misjudged_decoder_streams_only_what_extends_the_text_handed_out(monkeypatch):
    """The safety net under local_decoder: a window whose text does not spell the row's as decoding it whole does
    fell back to whole decodes, but TextSoFar then handed out whole[sent:] unchecked (the whole text need not start
    with what the window had handed out), and a window's text past its done ids was not checked against the piece a
    cut character held back of it (loose). With local_decoder misjudging on purpose (a Replace of two characters
    after a Fuse, a BPEDecoder's suffix, CTC), the text handed out is, after every piece, the start of the row's
    whole decode: a piece the whole text contradicts stalls the stream, as it did before windows."""
    from tokenizers import Tokenizer, decoders, models

    from tritongpt.train import hf_tokenizer

    monkeypatch.setattr(hf_tokenizer, "local_decoder", lambda d, fused=False: True)
    vocab = {"<unk>": 0, "a": 1, "b": 2, "c</w>": 3, "\ufffd": 4, "<eos>": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    cases = {"replace": decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X"),
                                           decoders.Replace("c</w>\ufffdb", "Y")]),
             "bpe": decoders.BPEDecoder(), "ctc": decoders.CTC(pad_token="<unk>", word_delimiter_token="b")}

    def stream(tok, writes):
        s, sent = tok.stream_decoder(), ""
        for k in range(1, len(writes) + 1):
            sent += (piece := s.write(writes[k - 1]))
            whole = tok.decode([i for w in writes[:k] for i in w])
            assert not piece or whole.startswith(sent), (writes[:k], sent, whole)
        end = s.flush()
        assert sent + end == whole or not end and not whole.startswith(sent), (writes, sent, end, whole)
        return sent + end

    rng = random.Random(0)
    for name, decoder in cases.items():
        t.decoder = decoder
        tok = hf_tokenizer.HFTokenizer(json.loads(t.to_str()), eos_token="<eos>")
        assert tok.incremental, name  # (misjudged)
        for _ in range(100):
            stream(tok, [[rng.randrange(5)] for _ in range(rng.randint(1, 24))])
        if name == "replace":
            # the done "a" becomes "X" with "b" (the window's head); "c</w>" handed out before its cut "\ufffd",
            # not yet done, becomes "Y" with "b" (loose): both stall, the whole text no longer starting with them
            assert tok.decode([1, 2, 1]) == "Xa" and stream(tok, [[1], [2], [1]]) == "a"
            assert tok.decode([1, 3, 4, 2, 1]) == "aYa" and stream(tok, [[1], [3, 4], [2], [1]]) == "ac</w>"


@pytest.mark.parametrize("name, prompt, new, stops, min_tokens, ignore_eos", [
    ("sentencepiece", [60, 263], [185, 2], ["\ufffd"], 1, True),
    ("metaspace", [], [165, 49, 4, 306], ["\ufffd\ufffd"], 3, False)])
def test_min_tokens_counts_a_windows_text_less_its_trailing_replacement_characters(decoder_shapes, name, prompt, new,
                                                                                   stops, min_tokens, ignore_eos):
    """GrownText (an HF row's text grown a window at a time) measured min_tokens' text with the U+FFFDs its last ids
    leave (a byte-fallback run not yet a character), where Choices.cut on the whole row, Grown and the stream measure
    it less them: a stop string of U+FFFDs then stopped one row and not the other (33 of 6,000 fuzzed rows)."""
    from tritongpt.commands import Choices

    tok = decoder_shapes[name]
    kw = dict(ignore_eos=ignore_eos, min_tokens=min_tokens)
    grown, whole = Choices(tok, prompt, stops, tok.eot_id, **kw), Choices(tok, prompt, stops, tok.eot_id, **kw)
    whole.grown = None
    for k in range(1, len(new) + 1):
        row = torch.tensor([prompt + new[:k]])
        assert grown.stopped(row).tolist() == whole.stopped(row).tolist(), k
    assert grown.grown is not None


def test_byte_fallback_tokens_of_a_unigram_or_of_the_decoder_alone_are_decoded_as_one_run():
    """A run of byte-fallback tokens is decoded together, so the stream and the window hold it back; their ids were
    read from tokenizer.json's vocab only where it was a dict with the model's byte_fallback set. A Unigram's vocab
    is a list of [piece, score] (llm-jp's, byte_fallback true), and a BPE file may leave the flag out while its
    decoder's ByteFallback still spells <0xNN> as a byte: none counted, the stream handed out "ha" for <0x68><0x61>,
    which <0x82> after them turns, decoded whole, to three U+FFFDs, and the stop check missed "\ufffd\ufffd"."""
    from tokenizers import Tokenizer, decoders, models

    from tritongpt.commands import Choices
    from tritongpt.train.hf_tokenizer import HFTokenizer, Window

    pieces = ["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁the", "a"]
    unigram = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=True))
    bpe = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>"))
    for t in (unigram, bpe):
        t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
        tok = HFTokenizer(json.loads(t.to_str()), eos_token="</s>")
        assert tok.byte_ids == set(range(2, 258)) and tok.incremental
        ids = [258, 2 + 0x68, 2 + 0x61, 2 + 0x82, 259]  # "the", then h a and a stray continuation byte, then "a"
        whole = tok.decode(ids)
        assert whole == "the\ufffd\ufffd\ufffda"
        stream = tok.stream_decoder()
        assert "".join(stream.write([i]) for i in ids) + stream.flush() == whole
        window = Window(tok)
        for k in range(1, len(ids) + 1):
            window.ids.append(ids[k - 1])
            text = window.text(k)
            assert window.done <= len(tok.decode(ids[:k - 1])) and text == tok.decode(ids[:k])[window.done:], k
            window.commit(k, text)
        rows = Choices(tok, ids[:1], ["\ufffd\ufffd"], 1)  # (the grown text held "ha\ufffda")
        assert [rows.stopped(torch.tensor([ids[:k]])).item() for k in range(2, len(ids) + 1)] == [0, 0, 0, 1]


def test_a_fuse_inside_a_nested_sequence_counts_for_the_decoders_after_it():
    """local_decoder read a Sequence's parts in order, a Fuse or ByteLevel making the parts after it see one text;
    one inside a nested Sequence did not count, so a Replace of two characters after it passed as local: the window
    handed out "a" before the "b" that turns "ab" to "c", and the stop check never saw the "c"."""
    from tokenizers import Tokenizer, models

    from tritongpt.commands import Choices
    from tritongpt.train.hf_tokenizer import HFTokenizer, local_decoder

    replace = {"type": "Replace", "pattern": {"String": "ab"}, "content": "c"}
    nested = {"type": "Sequence", "decoders": [{"type": "Sequence", "decoders": [{"type": "Fuse"}]}, replace]}
    assert not local_decoder(nested)
    assert local_decoder({"type": "Sequence", "decoders": [replace, nested["decoders"][0]]})  # (before the Fuse)
    spec = json.loads(Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "<eos>": 3}, unk_token="<unk>")).to_str())
    tok = HFTokenizer(dict(spec, decoder=nested), eos_token="<eos>")
    assert tok.decode([1, 2]) == "c" and not tok.incremental
    rows = Choices(tok, [], ["c"], 3)
    assert rows.grown is None and rows.stopped(torch.tensor([[1]])).tolist() == [False]
    assert rows.stopped(torch.tensor([[1, 2]])).tolist() == [True]


def test_the_stop_check_searches_the_grown_text_it_kept_after_a_call_that_adds_none(decoder_shapes):
    """GrownText.trim dropped the searched text's head but kept its tail whole: a later call whose ids add no text
    (a skipped special token) searched the old tail at the new offset, so " cat" within the first min_tokens
    tokens' text, which does not count, stopped the row. The text held back ("A" of a byte-fallback token, a run a
    later byte may extend) is what makes that call search at all."""
    from tritongpt.commands import Choices

    tok = decoder_shapes["sentencepiece"]
    the, cat, byte = tok.encode("the"), tok.encode(" cat"), tok._tok.token_to_id("<0x41>")
    kw = dict(ignore_eos=True, skip_special=True, min_tokens=len(the + cat) + 2)
    grown, whole = (Choices(tok, tok.encode("a dog"), [" cat"], tok.eot_id, **kw) for _ in range(2))
    whole.grown = None  # (decoded whole: the rule)
    row = list(grown.ids)
    for ids in [[t] for t in the] + [cat + [byte], [tok.eot_id], tok.encode(" sat")]:
        row += ids
        assert grown.stopped(torch.tensor([row])).tolist() == whole.stopped(torch.tensor([row])).tolist() == [False], \
            ids


def test_a_decoder_the_tokenizers_library_panics_on_is_a_user_error_naming_it(capfd):
    """A Strip decoder with stop > 0 panics inside the tokenizers library on a token (or, after a Fuse, a text) of
    only its content shorter than its start + stop (0.23: Strip(" ", 1, 1) on " "), and a Rust panic reaches
    Python as pyo3's PanicException, a BaseException no handler of ours stopped (a server's request thread died of
    it). decode and the stream raise a UserError naming the decoder; the empty row (whose text the library decodes
    as "" even after a Fuse, and panics) is "" without the library; and a stream whose row decodes never calls the
    library on a fresh window the Strip panics on (a row's run of spaces, which the row's own text does not end)."""
    from tokenizers import Tokenizer, decoders, models

    from tritongpt.train.hf_tokenizer import HFTokenizer

    t = Tokenizer(models.WordLevel({"<unk>": 0, " ": 1, "a": 2, "<eos>": 3}, unk_token="<unk>"))
    t.decoder = decoders.Strip(" ", 1, 1)  # (on each token)
    tok = HFTokenizer(json.loads(t.to_str()), eos_token="<eos>")
    assert tok.decode([2, 2]) == "aa"
    with pytest.raises(UserError, match=r'decoder \{"type": "Strip".*panicked inside the tokenizers library'):
        tok.decode([2, 1])
    stream = tok.stream_decoder()
    assert stream.write([2]) == "a"
    with pytest.raises(UserError, match="Strip"):
        stream.write([1])
    t.decoder = decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 1, 1)])  # (the text's first and last space)
    tok = HFTokenizer(json.loads(t.to_str()), eos_token="<eos>")
    assert tok.incremental and tok.decode([]) == ""
    with pytest.raises(UserError, match="Strip"):
        tok.decode([1])
    capfd.readouterr()
    ids = [2] + [1] * 40 + [2] + [1] * 40
    stream, sent = tok.stream_decoder(), ""
    for k in range(len(ids)):
        sent += stream.write(ids[k:k + 1])
        assert tok.decode(ids[:k + 1]).startswith(sent) and len(sent) >= k - 1, k  # (a space at most held back)
    assert sent + stream.flush() == tok.decode(ids) == "a" + " " * 40 + "a" + " " * 39
    assert stream.shown is None and "panicked" not in capfd.readouterr().err
