"""GGUF import (train/gguf_import.py): a .gguf file as a model and tokenizer. Checked two ways: our own export read
back (every type: the logits of the model rounded as the file rounds it), and a file written here with ggml's
GGUFWriter alone (Q4_0 matrices), which transformers' own GGUF loader and tokenizer read too: the same logits and
ids as ours."""
import json

import numpy as np
import pytest
import torch

import plot_stub
from test_gguf_export import ARCHS, TEXT, logits, random_model, rounded
from tritongpt.errors import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
no_plots = plot_stub.no_plots  # (the sft run's loss figure: an empty PNG)


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_through_our_export(arch, kind, tok, tmp_path):
    """load_checkpoint of an exported .gguf: the exported model's logits with its weights rounded as the file's type
    rounds them (the llama's q/k rows un-permuted, the tied head of qwen2 tied again), and its tokenizer's ids."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.tokenizer import get_tokenizer

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    ours = load_checkpoint(path)
    assert ours.config.tie_weights is model.config.tie_weights and ours.config.vocab_size == 288
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    want = logits(rounded(model, kind), ids)
    assert (logits(ours, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    back = get_tokenizer(path)
    assert back.vocab_size == 280 and back.eot_id == tok.eot_id  # the [PAD] rows are no tokens
    for text in (TEXT, "  a  cat\n\n 123456 sat", "naïve café 東京 🙂"):
        assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all"), text


def test_a_broken_unpermute_is_seen(tok, tmp_path, monkeypatch):
    """The round trip's logits move when the llama's q/k rows are not un-permuted: the check can fail."""
    from tritongpt.train import gguf_import
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS["llama"], 288)
    path = write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    monkeypatch.setattr(gguf_import, "unpermute_qk", lambda w, n: w)
    off = (logits(gguf_import.load_gguf(path), ids) - logits(model, ids)).abs().max().item()
    assert off > 1e-2 * logits(model, ids).abs().max().item()


TEMPLATE = "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|end_of_text|>{% endfor %}"


def write_by_hand(path, kind="llama3", arch="llama", tie=False, edit=None):
    """A tiny Llama (or Qwen2) .gguf written with gguf.GGUFWriter alone, as convert_hf_to_gguf.py lays one out: its
    matrices Q4_0 (gguf.quants.quantize), norms F32, q/k rows in llama.cpp's interleaved order (random: only the
    loaders' un-permute decides where they go), a tokenizers-library BPE's vocabulary and merges, BOS prepended, a
    chat template. edit(writer, tensors): change the file (the refusal tests)."""
    import test_hf_tokenizer as th

    T = gguf.GGMLQuantizationType
    spec = json.loads(th.build_tokenizer(kind, vocab=300).to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items()}
    special = {a["content"]: a["id"] for a in spec["added_tokens"]}
    vocab.update(special)
    V, C, F, H, KV = 320, 64, 96, 4, 2
    tokens = [f"[PAD{i}]" for i in range(V)]
    types = [5] * V
    for t, i in vocab.items():
        tokens[i], types[i] = t, 3 if t in special else 1
    rng = np.random.default_rng(0)
    mat = lambda o, i: (rng.standard_normal((o, i)) * 0.3).astype(np.float32)  # noqa: E731
    norm = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": mat(V, C), "output_norm.weight": norm(C)}
    if not tie:
        t["output.weight"] = mat(V, C)
    for i in range(2):
        g = f"blk.{i}."
        t.update({g + "attn_norm.weight": norm(C), g + "ffn_norm.weight": norm(C), g + "attn_q.weight": mat(C, C),
                  g + "attn_k.weight": mat(C // H * KV, C), g + "attn_v.weight": mat(C // H * KV, C),
                  g + "attn_output.weight": mat(C, C), g + "ffn_gate.weight": mat(F, C),
                  g + "ffn_up.weight": mat(F, C), g + "ffn_down.weight": mat(C, F)})
        if arch == "qwen2":
            for n, rows in (("attn_q", C), ("attn_k", C // H * KV), ("attn_v", C // H * KV)):
                t[g + n + ".bias"] = (0.3 * rng.standard_normal(rows)).astype(np.float32)
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_block_count(2)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if kind == "llama3" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    ends = th.KINDS[kind]
    w.add_eos_token_id(vocab[ends[0]])
    if ends[1] is not None:
        w.add_bos_token_id(vocab[ends[1]])
    w.add_add_bos_token(kind == "llama3")
    w.add_chat_template(TEMPLATE)
    if edit is not None:
        edit(w, t)
    for name, x in t.items():
        if x.ndim == 2 and x.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(x, T.Q4_0), raw_dtype=T.Q4_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind, arch, tie", [("llama3", "llama", False), ("qwen2", "qwen2", True)])
def test_transformers_reads_a_hand_written_file_as_we_do(kind, arch, tie, tmp_path, capsys):
    """A Q4_0 file not of our writer: transformers' GGUF loader (AutoModelForCausalLM, AutoTokenizer with gguf_file)
    and ours give the same logits and the same ids; the BOS prepended (add_bos_token), the chat template kept, and
    the dequantizing said."""
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.tokenizer import get_tokenizer

    path = write_by_hand(tmp_path / "m.gguf", kind, arch, tie)
    ours = load_checkpoint(path)
    assert "Q4_0 tensors are dequantized, float weights asked for" in capsys.readouterr().err
    assert ours.config.tie_weights is tie and ours.config.n_kv_head == 2 and ours.config.rope_theta == 5000.0
    tok = get_tokenizer(path)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # (1999: Llama 3's split keeps 3 digits together, Qwen2's 1: a file's pre-tokenizer read as the other's shows)
    for text in ("a cat 12 sat on the mat. naïve café 東京 🙂  x\n\n y", "in 1999, x=3.14 IT'S", ""):
        assert tok.encode(text) == theirs_tok.encode(text, add_special_tokens=False), text
    assert tok.eot_id == theirs_tok.eos_token_id
    assert tok.prepended_bos_id == (theirs_tok.bos_token_id if kind == "llama3" else None)
    assert tok.chat_template == TEMPLATE
    ids = torch.tensor([tok.encode("a cat 12 sat on the mat, 7 sat")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    want = theirs(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_generate_from_a_gguf_file(tok, tmp_path, capsys):
    """`tritongpt generate --weights m.gguf`: the model and its tokenizer from the one file, greedy tokens that are
    the exported model's own greedy continuation."""
    from tritongpt.cli import main
    from tritongpt.train.generate import generate
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS["qwen2"], 288)
    path = write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    prompt = "a cat 12"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = generate(model, ids, 4, temperature=0.0, vocab_limit=280)
    want = prompt + tok.decode(out[0, ids.shape[1]:].tolist())
    assert main(["generate", "--weights", str(path), "--prompt", prompt, "--max-new-tokens", "4", "--temperature",
                 "0", "--device", "cpu"]) == 0
    assert len(want) > len(prompt) + 2 and capsys.readouterr().out.strip() == want.strip()


def _drop(name):
    return lambda w, t: t.pop(name)


def _set(key, value):
    def edit(w, t):
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    return edit


@pytest.mark.parametrize("edit, said", [
    (_drop("blk.1.ffn_up.weight"), r"missing tensor\(s\) \['blk.1.ffn_up.weight'\]"),
    (lambda w, t: t.update({"rope_freqs.weight": np.ones(8, np.float32)}), "rope_freqs.weight"),
    (lambda w, t: t.update({"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}), "blk.0.attn_q_norm.weight"),
    (_set("llama.rope.scaling.type", "yarn"), "llama.rope.scaling.type is 'yarn'"),
    (_set("llama.rope.dimension_count", 8), "partial rotary"),
    (lambda w, t: t.update({"blk.0.attn_k.weight": t["blk.0.attn_k.weight"][:16]}),
     r"blk.0.attn_k.weight has shape \(16, 64\), but its metadata says \(32, 64\)"),
])
def test_refusals_by_name(edit, said, tmp_path):
    from tritongpt.train.gguf_import import load_gguf

    with pytest.raises(UserError, match=said):
        load_gguf(write_by_hand(tmp_path / "m.gguf", edit=edit))


def test_unknown_architecture_and_tokenizers_refused(tmp_path, monkeypatch):
    """Another general.architecture; a tokenizer model other than "gpt2" and "llama" (T5's Unigram), or a
    pre-tokenizer not known, by name (the tokenizer folder to pass said); no gguf package: the pip command."""
    import sys

    from tritongpt.train.gguf_import import gguf_tokenizer, load_gguf

    w = gguf.GGUFWriter(tmp_path / "p.gguf", "starcoder2")
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="general.architecture is 'starcoder2'"):
        load_gguf(tmp_path / "p.gguf")

    def retokenize(model, pre):
        def edit(w, t):  # (a key given twice: the writer keeps the last)
            w.add_tokenizer_model(model)
            w.add_tokenizer_pre(pre)
        return edit

    path = write_by_hand(tmp_path / "s.gguf", edit=retokenize("t5", "default"))  # (SentencePiece's: test_gguf_spm)
    with pytest.raises(UserError, match="tokenizer.ggml.model is 't5'.*pass a tokenizer folder"):
        gguf_tokenizer(path)
    path = write_by_hand(tmp_path / "d.gguf", edit=retokenize("gpt2", "deepseek-llm"))
    with pytest.raises(UserError, match="tokenizer.ggml.pre is 'deepseek-llm'"):
        gguf_tokenizer(path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[gguf\]"'):
        load_gguf(path)


def _kv(key, value, kind):
    return lambda w, t: w.add_key_value(key, value, kind)  # (the writer keeps a key's last value, of any type)


_V = gguf.GGUFValueType


@pytest.mark.parametrize("edit, said", [
    (_kv("llama.rope.freq_base", [5000.0], _V.ARRAY), r"llama.rope.freq_base must be a number, got \[5000.0\]"),
    (_kv("llama.rope.freq_base", "5000", _V.STRING), "llama.rope.freq_base must be a number, got '5000'"),
    (_kv("llama.attention.layer_norm_rms_epsilon", [1e-5], _V.ARRAY),
     "llama.attention.layer_norm_rms_epsilon must be a number"),
    (_kv("llama.vocab_size", "320", _V.STRING), "llama.vocab_size must be a positive integer, got '320'"),
    (lambda w, t: t.update({"token_embd.weight": t["token_embd.weight"].reshape(-1)}),
     r"token_embd.weight has shape \(20480,\), not an embedding's 2-d"),
])
def test_metadata_of_the_wrong_type_refused_by_name(edit, said, tmp_path):
    """A key of the wrong GGUF type (a list or string where a number belongs) and a 1-d embedding: refused by name,
    not a TypeError from float(), a string read as its number, or an IndexError on the embedding's shape."""
    from tritongpt.train.gguf_import import load_gguf

    with pytest.raises(UserError, match=said):
        load_gguf(write_by_hand(tmp_path / "m.gguf", edit=edit))


@pytest.mark.parametrize("edit, said", [
    (_kv("tokenizer.ggml.tokens", 3, _V.UINT32), "tokenizer.ggml.tokens must be a list of strings, got 3"),
    (_kv("tokenizer.ggml.tokens", "abc", _V.STRING), "tokenizer.ggml.tokens must be a list of strings, got 'abc'"),
    (_kv("tokenizer.ggml.merges", ["ab"], _V.ARRAY), "tokenizer.ggml.merges entry 0 is 'ab', not two tokens"),
    (_kv("tokenizer.ggml.merges", "a b", _V.STRING), "tokenizer.ggml.merges must be a list of strings"),
    (_kv("tokenizer.ggml.bos_token_id", "1", _V.STRING), "bos_token_id must be a token id .*, got '1'"),
    (_kv("tokenizer.ggml.bos_token_id", 1.0, _V.FLOAT32), "bos_token_id must be a token id .*, got 1.0"),
    # (bool("false") is True: the BOS would be prepended where the writer said not)
    (_kv("tokenizer.ggml.add_bos_token", "false", _V.STRING), "add_bos_token must be true or false, got 'false'"),
    (_kv("tokenizer.chat_template", 3, _V.UINT32), r"tokenizer.chat_template must be a string \(a Jinja"),
    (_kv("tokenizer.chat_template", ["x"], _V.ARRAY), r"tokenizer.chat_template must be a string .*\['x'\]"),
])
def test_tokenizer_metadata_of_the_wrong_type_refused_by_name(edit, said, tmp_path):
    from tritongpt.train.gguf_import import gguf_tokenizer

    with pytest.raises(UserError, match=said):
        gguf_tokenizer(write_by_hand(tmp_path / "m.gguf", edit=edit))


def test_a_damaged_header_or_string_refused_by_name(tmp_path):
    """A tensor / key count larger than the file holds (the gguf reader runs off the end: IndexError), and a string
    whose bytes are not UTF-8 (decoded lazily, as the key is read): UserErrors naming the file."""
    from tritongpt.train.gguf_import import gguf_tokenizer, load_gguf

    raw = write_by_hand(tmp_path / "m.gguf").read_bytes()
    for at in (8, 16):  # (after magic and version: n_tensors, then n_kv, both uint64)
        bad = tmp_path / f"count{at}.gguf"
        bad.write_bytes(raw[:at] + (2 ** 40).to_bytes(8, "little") + raw[at + 8:])
        with pytest.raises(UserError, match=f"{bad}: not a GGUF file gguf can read"):
            load_gguf(bad)
    bad = tmp_path / "utf8.gguf"
    bad.write_bytes(raw.replace(b"{% for m", b"\xff% for m", 1))
    with pytest.raises(UserError, match="tokenizer.chat_template is not UTF-8 text"):
        gguf_tokenizer(bad)


def test_a_gguf_file_through_the_cli_as_a_user_runs_it(tmp_path, capsys):
    """From one .gguf file, through the commands: a ChatML Qwen2 folder as `export --format gguf` writes it;
    `info --weights m.gguf`; `serve --weights m.gguf` answers a chat completion in the file's chat template, up to
    its <|im_end|>: transformers' greedy tokens on the folder; `sft --init m.gguf` 2 steps on chats, rendered in the
    file's template, then `generate --weights RUN`: the run's greedy tokens."""
    from test_chat_template import CHATML, chat_folder
    from test_serve import call, start
    from tritongpt.cli import main
    from tritongpt.train.generate import generate
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.tokenizer import get_tokenizer

    folder, theirs, hf = chat_folder(tmp_path / "qwen", CHATML, "<|im_end|>")
    path = tmp_path / "m.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--gguf-type", "f32", "--out", str(path)]) == 0
    assert main(["info", "--weights", str(path)]) == 0
    said = capsys.readouterr().out
    assert "qkv_bias_only   True" in said and f"tokenizer    {path}\n" in said  # (the file's own)

    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        end = theirs.convert_tokens_to_ids("<|im_end|>")
        assert server.app.chat_stop == end
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"}]
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            row = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        body = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})[1]
        assert body["choices"][0]["message"]["content"] == theirs.decode(row[:row.index(end)] if end in row else row)
        assert body["usage"]["prompt_tokens"] == len(prompt)
    finally:
        server.shutdown()
        server.server_close()

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(8)))
    run = tmp_path / "run"
    assert main(["sft", "--init", str(path), "--out-dir", str(run), "--data", str(data), "--max-steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--kernels", "reference", "--eval-gen", "0"]) == 0
    assert "chats are rendered in the model's own chat template" in capsys.readouterr().err
    tok = get_tokenizer(run)
    assert tok.chat_template == CHATML and tok.encode("say 7") == get_tokenizer(path).encode("say 7")
    tuned = load_checkpoint(run)
    before = load_checkpoint(path)
    assert any((a - b).abs().max() > 0 for a, b in zip(tuned.parameters(), before.parameters()))  # (it trained)
    ids = torch.tensor([tok.encode("the cat sat")])
    with torch.no_grad():
        want = tok.decode(generate(tuned, ids, 5, temperature=0.0)[0].tolist())
    assert main(["generate", "--weights", str(run), "--prompt", "the cat sat", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu", "--kernels", "reference"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


# Text the three byte-level splits cut apart differently: a digit run (GPT-2 keeps it whole with the space before,
# Llama 3 cuts it in threes, Qwen2 in ones), contractions in capitals (Llama 3's and Qwen2's are case-blind, GPT-2's
# 'T is no contraction), newlines then spaces (GPT-2's \s+(?!\S) takes them together, Llama 3's \s*[\r\n]+ not)
SPLITS = ["in 12345 days, 1999 DON'T\n\n   stop", " 42 IT'S\n \n  ok 7", "x 31415926 ISN'T"]


def test_each_pre_tokenizer_name_is_its_own_split(tmp_path, monkeypatch):
    """tokenizer.ggml.pre "gpt-2", "llama-bpe", "qwen2" over one vocabulary whose merges cross all three splits'
    cuts (trained on SPLITS without a split: "Ġ1", "123", "'T", "ĊĊ"...): our tokenizer gives transformers' GGUF
    tokenizer's ids (it picks its regex by that name too) for each name, and another name's regex gives other ids:
    a name read as another's fails here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tritongpt.train import gguf_import

    spec = Tokenizer(models.BPE())
    spec.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spec.decoder = decoders.ByteLevel()
    spec.train_from_iterator(SPLITS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(spec.to_str())["model"]
    vocab = {**model["vocab"], "<|endoftext|>": 0}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {}
    for pre in ("gpt-2", "llama-bpe", "qwen2"):
        path = tmp_path / pre / "m.gguf"
        path.parent.mkdir()
        w = gguf.GGUFWriter(path, "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges(merges)
        w.add_eos_token_id(0)
        w.add_tensor("token_embd.weight", np.ones((len(tokens), 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        ours = gguf_import.gguf_tokenizer(path)
        ids[pre] = [ours.encode(text) for text in SPLITS]
        assert ids[pre] == [theirs.encode(text, add_special_tokens=False) for text in SPLITS], pre
        assert all(ours.decode(row) == text for row, text in zip(ids[pre], SPLITS))
    for pre in ids:  # each name's ids are its own: read with another name's regex, the same file gives others
        for other, pattern in gguf_import.PRE_PATTERNS.items():
            if other != pre:
                with monkeypatch.context() as m:
                    m.setitem(gguf_import.PRE_PATTERNS, pre, pattern)
                    ours = gguf_import.gguf_tokenizer(tmp_path / pre / "m.gguf")
                assert [ours.encode(text) for text in SPLITS] != ids[pre], (pre, other)


@pytest.mark.parametrize("arch, eps", [("gpt2", 1e-5), ("llama", 1e-6)])
def test_norm_eps_read_back_as_written(arch, eps, tok, tmp_path):
    """GGUF keeps eps as a float32 (1e-05 is 9.99999974738e-06 there): read back as the decimal written, so that a
    GPT-2 read from a .gguf exports again (its eps checked against Hugging Face's 1e-05 exactly)."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    path = write_gguf(random_model(dict(ARCHS[arch], norm_eps=eps), 288), tmp_path / "m.gguf", tok, "f32")
    back = load_gguf(path)
    assert back.config.norm_eps == eps
    write_gguf(back, tmp_path / "again.gguf", tok, "f32")  # (a GPT-2's eps is checked: no refusal)
