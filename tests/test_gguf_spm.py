"""SentencePiece vocabularies in GGUF files (tokenizer.ggml.model "llama": Llama 2, Mistral 7B, Gemma, Phi-3), both
ways. The vocabulary is SentencePiece's own BPE (byte fallback), trained here on a small text; its tokenizer.json is
what transformers converts its tokenizer.model to. Read: a file written with gguf.GGUFWriter alone from
SentencePiece's pieces, scores and types gives transformers' GGUF tokenizer's ids (and SentencePiece's own). Written:
our export of a run with that tokenizer.json gives transformers, and our import, the run's ids."""
import io
import json

import numpy as np
import pytest

from tritongpt.errors import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.usefixtures("one_thread")

# spaces (doubled, leading, trailing), newlines and tabs, digits, characters outside the vocabulary (byte fallback)
TEXTS = ["a cat sat on the mat", "  two leading  and inner  spaces ", " one leading", "line\n\nbreaks\tand tab\n",
         "digits 12345 and 3.14", "naïve café 東京 🙂 Ελλάδα", "the dog ran", "", " ", "x"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "and", "digits", "line", "spaces", "leading"]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """(folder with SentencePiece's tokenizer.model and transformers' tokenizer.json of it, the processor)."""
    import random

    from tritongpt.train.hf_tokenizer import spec_from_sentencepiece

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) + rng.choice(["", "", str(rng.randint(0, 999))]) for _ in range(10))
             for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=360,
                                   byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    spec, _ = spec_from_sentencepiece(folder)
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder / "hf")
    return folder, spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def write_sp_gguf(path, sp, arch="llama", add_bos=None, space_prefix=None):
    """A GGUF vocabulary-only file as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes one from a
    tokenizer.model, with GGUFWriter alone: SentencePiece's pieces, scores and types (no merges)."""
    n = sp.get_piece_size()
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if space_prefix is not None:
        w.add_add_space_prefix(space_prefix)
    w.add_tensor("token_embd.weight", np.ones((n, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("add_bos", [None, False])
def test_a_hand_written_file_reads_as_transformers_reads_it(add_bos, sp_folder, tmp_path):
    """No merges in the file: they are recovered from the scores. Ours, transformers' (AutoTokenizer with gguf_file)
    and SentencePiece's own ids agree on every text; decoding gives the text back; the BOS is prepended unless
    add_bos_token says not (no key: llama.cpp's and transformers' default for SentencePiece, prepended)."""
    from tritongpt.train.gguf_import import gguf_tokenizer

    _, sp = sp_folder
    path = write_sp_gguf(tmp_path / "m.gguf", sp, add_bos=add_bos)
    ours = gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        if text.strip() == text:  # (SentencePiece itself drops leading and doubled spaces: its normalizer's)
            assert ids == sp.encode(text), text
        # (a text that starts with a space decodes one short: Metaspace prepends no "▁" to it, the decoder strips one
        # all the same; transformers' decode does so too)
        assert ours.decode(ids) == theirs.decode(ids) == (text[1:] if text.startswith(" ") else text), text
    assert any(i in ours.byte_ids for i in ours.encode(TEXTS[5]))  # (byte fallback was met)
    bos = sp.bos_id() if add_bos is None else None
    assert ours.prepended_bos_id == bos
    assert theirs.encode("a cat")[:1] == ([bos] if bos is not None else ours.encode("a cat")[:1])
    assert (ours.eot_id, ours.bos_token) == (sp.eos_id(), "<s>")


def test_no_space_prefix_and_gemma(sp_folder, tmp_path):
    """add_space_prefix false (Gemma's files): no "▁" prepended, as llama.cpp reads the key; a "gemma" and a "phi3"
    file as transformers' GGUF tokenizer builds them (its AutoTokenizer reads no Gemma config here, so its builder is
    asked directly): the same ids."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    from tritongpt.train.gguf_import import gguf_tokenizer

    _, sp = sp_folder
    plain = gguf_tokenizer(write_sp_gguf(tmp_path / "p" / "m.gguf", sp))
    none = gguf_tokenizer(write_sp_gguf(tmp_path / "n" / "m.gguf", sp, space_prefix=False))
    assert none.encode("cat") != plain.encode("cat") and none.encode(" cat") == plain.encode("cat")
    for arch, prefix in (("gemma", False), ("phi3", None)):  # (Phi-3's "▁" prepended by a normalizer: " a" is "▁▁a")
        path = write_sp_gguf(tmp_path / arch / "m.gguf", sp, arch=arch, space_prefix=prefix)
        arch, d, _ = get_gguf_tokenizer(str(path))
        theirs, _ = convert_gguf_tokenizer(arch, d)
        ours = gguf_tokenizer(path)
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == theirs.encode(text, add_special_tokens=False).ids, (arch, text)
            assert ours.decode(ids) == theirs.decode(ids), (arch, text)
            if arch == "gemma":
                assert ours.decode(ids) == text, text
        assert (ours.encode(" cat") == plain.encode(" cat")) is (arch == "gemma")


def test_our_export_reads_back_as_the_run_tokenizes(sp_folder, tmp_path):
    """A run whose tokenizer is that tokenizer.json: written as "llama" with SentencePiece's scores (minus the merge
    rank) and types (bytes BYTE), no merges; transformers and our import give the run's ids and BOS."""
    from test_gguf_export import LLAMA, random_model

    from tritongpt.train.gguf_export import BYTE, CONTROL, NORMAL, write_gguf
    from tritongpt.train.gguf_import import gguf_tokenizer
    from tritongpt.train.tokenizer import get_tokenizer

    folder, sp = sp_folder
    tok = get_tokenizer(folder / "hf")
    path = write_gguf(random_model(LLAMA, 384), tmp_path / "m.gguf", tok, "f32")
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in reader.fields
    tokens, types, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), \
        field("tokenizer.ggml.scores")
    n = sp.get_piece_size()
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert types[sp.bos_id()] == CONTROL and types[sp.piece_to_id("<0x41>")] == BYTE
    assert types[sp.piece_to_id("▁cat")] == NORMAL
    merged = [i for i in range(n) if types[i] == NORMAL and len(tokens[i]) > 1]
    assert [scores[i] for i in merged] == [sp.get_score(i) for i in merged]  # (SentencePiece's: minus the rank)
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.ggml.add_space_prefix") is True
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    back = gguf_tokenizer(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert back.encode(text) == ids and back.decode(ids) == tok.decode(ids), text
    assert theirs.eos_token_id == tok.eot_id == back.eot_id
    assert back.prepended_bos_id is None and theirs.encode("a")[:1] == tok.encode("a")[:1]


def test_refusals_by_name(sp_folder, tmp_path):
    """A BPE with byte fallback that SentencePiece did not train (tokenizers' trainer: its merges are no ranking of
    its tokens, the scores would merge otherwise); a GGUF vocabulary with neither scores nor merges; T5's Unigram
    ("t5", whose scores transformers reads as a Unigram's, not a BPE's ranks)."""
    import test_hf_tokenizer as th
    from test_gguf_export import LLAMA, random_model

    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import gguf_tokenizer
    from tritongpt.train.hf_tokenizer import HFTokenizer

    spec = json.loads(th.build_tokenizer("sentencepiece", vocab=300).to_str())
    tok = HFTokenizer(spec, eos_token="</s>", bos_token="<s>", name="bpe-trained")
    with pytest.raises(UserError, match="whose merges no token scores hold: its vocabulary implies merges"):
        write_gguf(random_model(LLAMA, 320), tmp_path / "m.gguf", tok, "f32")
    for model, said in (("llama", "neither tokenizer.ggml.scores nor tokenizer.ggml.merges"),
                        ("t5", "tokenizer.ggml.model is 't5'")):
        path = tmp_path / model / "m.gguf"
        path.parent.mkdir()
        w = gguf.GGUFWriter(path, "llama")
        w.add_tokenizer_model(model)
        w.add_token_list(["<unk>", "a", "b"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(UserError, match=said):
            gguf_tokenizer(path)


@pytest.mark.parametrize("key, value, kind, said", [
    ("tokenizer.ggml.scores", ["x"] * 4, "ARRAY", "tokenizer.ggml.scores must be a list of numbers, got 'x' among"),
    # (bool("no") is True: a space prefix the writer said not to add)
    ("tokenizer.ggml.add_space_prefix", "no", "STRING", "add_space_prefix must be true or false, got 'no'"),
    ("general.architecture", 3, "UINT32", "general.architecture must be a string, got 3"),
])
def test_a_sentencepiece_vocabularys_keys_of_the_wrong_type_refused_by_name(key, value, kind, said, tmp_path):
    from tritongpt.train.gguf_import import gguf_tokenizer

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "▁", "a", "▁a"])
    w.add_token_scores([0.0, -1.0, -2.0, -1.5])
    w.add_key_value(key, value, gguf.GGUFValueType[kind])  # (the writer keeps a key's last value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=said):
        gguf_tokenizer(path)
