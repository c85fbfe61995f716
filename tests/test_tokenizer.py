"""Byte-level BPE: training, the from-scratch encoder vs tiktoken, files, special tokens, GPT-2 parity."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritongpt.errors import UserError
from tritongpt.train import tokenizer as tkz
from tritongpt.train.data import load_documents, load_text
from tritongpt.train.tokenizer import EOT, BPETokenizer, bytes_to_unicode, get_tokenizer

GPT2_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "gpt2"
HAVE_GPT2 = (GPT2_DIR / "encoder.json").is_file() and (GPT2_DIR / "vocab.bpe").is_file()

# Fragments that stress the pre-tokeniser: contractions, digit runs, whitespace runs, CRLF,
# code, combining marks, emoji (multi-byte, ZWJ sequences), CJK, RTL, control characters.
FRAGMENTS = ["don't", "I'll", "we've", "they're", "'s", "'S", " 12345", "3.14159", "   ", "\t\t", "\r\n",
             "\n\n\n", " \n ", "def f(x):\n    return x**2", "if (a<=b) { c++; }", "naïve café", "e\u0301",
             "👩‍👩‍👧", "🙂🙃", "日本語のテキスト", "עברית", "\x00\x1f\x7f", "\u00a0\u2003", "  leading", "trailing  ",
             "x" * 40, "__init__", "0x1F", "¡¿", "\ufeff"]
# Random text leaves out code points unassigned in Python's own Unicode table (and surrogates):
# regex engines classify those by their own Unicode version (the `regex` module 2026.11 calls
# U+3D000 a letter, tiktoken's engine does not), so the two encoders may split them differently.
assigned = st.characters(exclude_categories=("Cn", "Cs"))
fuzz_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(assigned, max_size=12)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def corpus():
    return load_text("pydoc")


@pytest.fixture(scope="module")
def small_tok(corpus):
    return BPETokenizer.train(corpus[:80_000], 600, name="small")


def test_bytes_to_unicode_is_a_printable_bijection():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256))
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"
    # the whole map, from its rule: a byte that is a printable non-space Latin-1 character stands for
    # itself; the others, in byte order, take 256, 257, ... (without GPT-2's files, which also check it)
    others = [b for b in range(256) if not (chr(b).isprintable() and not chr(b).isspace())]
    assert len(others) == 68 and m[0xAD] == chr(256 + others.index(0xAD))
    assert m == {b: chr(b) if b not in others else chr(256 + others.index(b)) for b in range(256)}


def test_the_pre_tokeniser_splits_text_into_gpt2s_words():
    """GPT2_PAT on a hand-split sentence: contractions (lower case only), one leading space on a
    word or number, and a whitespace run leaving its last space to the next word. tiktoken's own
    spelling of the pattern (shipped with it, no download) splits the same, and both spellings
    name one tokenizer."""
    import regex
    from tiktoken_ext.openai_public import r50k_pat_str

    text = "I'll say it's 42 or  99!\n\n  ok we're you've I'm he'd don't IT'S end \n"
    want = ["I", "'ll", " say", " it", "'s", " 42", " or", " ", " 99", "!", "\n\n ", " ok", " we", "'re", " you",
            "'ve", " I", "'m", " he", "'d", " don", "'t", " IT", "'", "S", " end", " \n"]
    assert regex.findall(tkz.GPT2_PAT, text) == want
    assert regex.findall(r50k_pat_str, text) == want
    ranks = {bytes([b]): b for b in range(256)}
    assert BPETokenizer(ranks, pat_str=r50k_pat_str).hash == BPETokenizer(ranks).hash


def test_a_file_with_the_hash_of_its_own_pattern_spelling_loads(tmp_path):
    """Files written before the GPT-2 spellings shared one hash recorded the hash of the spelling
    they hold (tiktoken's here); they still load, and as the shared identity."""
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = {bytes([b]): b for b in range(256)}
    tok = BPETokenizer(ranks, pat_str=r50k_pat_str)
    d = tok.to_dict()
    d["hash"] = tok._hash_with(r50k_pat_str)
    assert d["hash"] != tok.hash
    (tmp_path / "t.json").write_text(json.dumps(d), encoding="utf-8")
    assert BPETokenizer.load(tmp_path / "t.json").hash == BPETokenizer(ranks).hash


def test_training_hand_checked_example():
    # Wikipedia's BPE example: "aaabdaaabac" -> aa=Z, then ab=Y (ties go to the smaller ids:
    # (a, b) beats (Z, a)), then ZY=X, leaving "X d X a c".
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3 + 1)
    assert tok.ranks[b"aa"] == 256 and tok.ranks[b"ab"] == 257 and tok.ranks[b"aaab"] == 258
    assert tok.vocab_size == 260 and tok.eot_id == 259
    want = [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.encode("aaabdaaabac") == want
    assert tok.encode_reference("aaabdaaabac") == want
    assert tok.decode(want) == "aaabdaaabac"


def test_a_word_that_is_a_token_is_emitted_whole():
    # Merging by rank alone gets stuck at a|bc|d here (no "abc" or "bcd" token); tiktoken, and so
    # the reference encoder, first looks the whole word up.
    ranks = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259}
    tok = BPETokenizer(ranks)
    assert tok.encode("abcd") == tok.encode_reference("abcd") == [259]
    assert tok.encode(" abcd") == tok.encode_reference(" abcd") == [32, 97, 256, 100]


def test_training_reaches_the_vocab_size_and_is_deterministic(corpus, small_tok):
    assert small_tok.vocab_size == 600 and small_tok.eot_id == 599
    assert len(small_tok.ranks) == 599 and sorted(small_tok.ranks.values()) == list(range(599))
    assert all(len(t) >= 2 for t, i in small_tok.ranks.items() if i >= 256)
    assert small_tok.ranks[b" the"] < 600         # the most common English word is learned
    assert BPETokenizer.train(corpus[:80_000], 600).hash == small_tok.hash
    # Merges never cross a pre-tokeniser boundary or learn the separator's spelling.
    tok = BPETokenizer.train(("hello world" + EOT) * 20, 264)
    assert not any(b"<|" in t or b"o w" in t for t in tok.ranks)


def naive_bpe_ranks(text, n_merges):
    """Textbook BPE, recounting every adjacent pair of every pre-tokenised word before each merge:
    the most frequent pair wins, ties to the smallest (id, id); a merge spelling existing bytes
    reuses that token. None when the pairs run out first; n_merges None: merge until they do."""
    from collections import Counter

    import regex

    words = Counter()
    for piece in text.split(EOT):
        words.update(regex.findall(tkz.GPT2_PAT, piece))
    seqs = [(list(w.encode("utf-8")), f) for w, f in words.items()]
    vocab = [bytes([b]) for b in range(256)]
    ranks = {t: i for i, t in enumerate(vocab)}
    while n_merges is None or len(vocab) < 256 + n_merges:
        counts = Counter()
        for w, f in seqs:
            for p in zip(w, w[1:]):
                counts[p] += f
        if not counts:
            return ranks if n_merges is None else None
        a, b = min(counts, key=lambda p: (-counts[p], p))
        joined = vocab[a] + vocab[b]
        if joined not in ranks:
            ranks[joined] = len(vocab)
            vocab.append(joined)
        new = ranks[joined]
        for k, (w, f) in enumerate(seqs):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            seqs[k] = (out, f)
    return ranks


def test_training_matches_a_naive_bpe_down_to_pairs_seen_once():
    """The incremental trainer (heap, stale entries, updates beside each merge) must learn the same ranks as
    recounting from scratch before every merge, through to the last merges of pairs seen once --
    pairs whose count fell and came back must be counted in full."""
    import random

    rng = random.Random(0)
    texts = ["the cat sat on the mat with a hat" + EOT + "that bat", "aaabdaaabac abcabd bcab",
             " ".join("".join(rng.choice("abc") for _ in range(rng.randint(1, 9))) for _ in range(25))]
    for text in texts:
        n = 0
        while naive_bpe_ranks(text, n + 1) is not None:  # every merge there is, the last ones of count 1
            n += 1
        want = naive_bpe_ranks(text, n)
        assert n > 10 and len(want) == 256 + n
        got = tkz.train_ranks(text, 256 + n + 1)
        by_id = sorted(got, key=got.get), sorted(want, key=want.get)
        assert got == want, f"{text[:30]!r}: merges {by_id[0][256:]} != naive {by_id[1][256:]}"
        with pytest.raises(UserError, match="ran out of pairs"):
            tkz.train_ranks(text, 256 + n + 2)


def test_training_on_long_words_and_runs_matches_a_naive_bpe():
    """Long words (no spaces: runs, a CJK sentence) and overlapping runs ("aaaa", "abab"), where the
    trainer updates only the pairs beside each merge: in "aaa" only the first two join, and
    "abab" -> "X X" turns (X, a), counted a moment before, into (X, X)."""
    import random

    rng = random.Random(1)
    texts = ["\n".join("a" * k for k in range(1, 41)),             # runs of every length, one word each
             "".join(rng.choice("ab") * rng.randint(1, 5) for _ in range(80)) + "\n" + "ab" * 30 + "\n" + "aba" * 20,
             "".join(rng.choice("=-") * rng.randint(1, 6) for _ in range(60)),
             "".join(rng.choice("日本日本語") for _ in range(120)) + "。" + "本日" * 20]  # 3-byte letters
    for text in texts:
        want = naive_bpe_ranks(text, None)            # every merge there is, down to pairs seen once
        got = tkz.train_ranks(text, len(want) + 1)
        by_id = sorted(got, key=got.get), sorted(want, key=want.get)
        assert got == want, f"{text[:30]!r}: merges {by_id[0][256:]} != naive {by_id[1][256:]}"
        with pytest.raises(UserError, match="ran out of pairs"):
            tkz.train_ranks(text, len(want) + 2)


def test_training_errors():
    with pytest.raises(UserError, match="too small"):
        BPETokenizer.train("abc", 200)
    with pytest.raises(UserError, match="too small for vocab_size"):
        BPETokenizer.train("ab ab", 1000)
    with pytest.raises(UserError, match="too small"):
        BPETokenizer.train("ab ab", 256)        # one short of the bytes and <|endoftext|>

    def unread():                               # a vocabulary too small is said before the corpus is read
        raise AssertionError("a document was read")
        yield
    with pytest.raises(UserError, match="vocab_size 256 is too small"):
        BPETokenizer.train(unread(), 256)
    # 256 bytes + <|endoftext|> and no merge at all is the smallest vocabulary there is
    tok = BPETokenizer.train("ab ab", 257)
    assert tok.vocab_size == 257 and tok.eot_id == 256 and len(tok.ranks) == 256
    assert tok.encode("ab ab") == [97, 98, 32, 97, 98]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=fuzz_text)
def test_reference_encoder_matches_tiktoken(small_tok, text):
    fast = small_tok.encode(text)
    assert small_tok.encode_reference(text) == fast
    assert small_tok.decode(fast) == text
    assert small_tok.encode_batch([text, text[::-1]]) == [fast, small_tok.encode(text[::-1])]


def test_whole_corpus_round_trip(corpus, small_tok):
    ids = small_tok.encode(corpus[80_000:140_000])
    assert ids == small_tok.encode_reference(corpus[80_000:140_000])
    assert small_tok.decode(ids) == corpus[80_000:140_000]
    assert len(ids) < 60_000 / 2                  # it compresses English (bytes alone: 60k ids)


def test_special_tokens(small_tok):
    text = f"one{EOT}two"
    with pytest.raises(ValueError, match="disallowed special token.*allowed_special"):
        small_tok.encode(text)
    with pytest.raises(UserError, match="disallowed special token"):
        small_tok.encode_reference(text)
    with pytest.raises(UserError, match="disallowed"):
        small_tok.encode_batch(["fine", text])
    ids = small_tok.encode(text, allowed_special="all")
    assert ids.count(small_tok.eot_id) == 1
    assert ids == small_tok.encode_reference(text, allowed_special={EOT})
    assert small_tok.decode(ids) == text
    plain = small_tok.encode(text, allowed_special="none")      # the spelling as ordinary text
    assert small_tok.eot_id not in plain and small_tok.decode(plain) == text
    assert plain == small_tok.encode_reference(text, allowed_special="none")
    with pytest.raises(UserError, match="unknown special"):
        small_tok.encode("x", allowed_special={"<|pad|>"})


@pytest.mark.parametrize("order", [0, 1])
def test_a_special_token_that_begins_another_loses_to_the_longer(order):
    # tiktoken matches specials in its hash map's order: "<|a|>b" could come out as "<|a|>" + "b".
    names = ["<|a|>", "<|a|>b"][::1 - 2 * order]
    tok = BPETokenizer({bytes([b]): b for b in range(256)}, {s: 256 + i for i, s in enumerate(names)})
    long_id, short_id = tok.special_tokens["<|a|>b"], tok.special_tokens["<|a|>"]
    text = "x<|a|>by<|a|>"
    want = [ord("x"), long_id, ord("y"), short_id]
    assert tok.encode_reference(text, "all") == want
    assert tok.encode(text, "all") == want
    assert tok.encode_batch([text, "z"], "all") == [want, [ord("z")]]
    with pytest.raises(UserError, match="disallowed special token '<\\|a\\|>b'"):
        tok.encode(text, {"<|a|>"})             # the text spells the longer one, not allowed
    assert tok.encode(text, "none") == tok.encode_reference(text, "none") == list(text.encode())


@pytest.mark.parametrize("order", [0, 1])
def test_training_splits_out_the_longer_special_too(order):
    """Training cuts the text at its specials, longest first as encoding does: cut at "<|s|>"
    first, "<|s|>xy" left "xy" as text, a merge the encoder never meets there. Here the only
    text between the specials is "ab": one merge, and a second one has nothing to learn from."""
    names = ("<|s|>", "<|s|>xy")[::1 - 2 * order]
    ranks = tkz.train_ranks("ab<|s|>xy" * 50, 256 + 2 + 1, special_tokens=names)
    assert [k for k in ranks if len(k) > 1] == [b"ab"]
    with pytest.raises(UserError, match="ran out of pairs to merge after 1 merges"):
        tkz.train_ranks("ab<|s|>xy" * 50, 256 + 2 + 2, special_tokens=names)


def test_encode_batch_takes_any_iterable(small_tok):
    texts = ["one", "two three"]
    assert small_tok.encode_batch(t for t in texts) == [small_tok.encode(t) for t in texts]
    with pytest.raises(TypeError, match="strs, got int"):
        small_tok.encode_batch(["a", 3])


def test_decode_errors_and_partial_utf8(small_tok):
    with pytest.raises(UserError, match="out of range"):
        small_tok.decode([1, small_tok.vocab_size])
    with pytest.raises(UserError, match="out of range"):
        small_tok.decode([-1])
    first_byte = small_tok.ranks["é".encode()[:1]]  # half a character decodes to U+FFFD
    assert small_tok.decode([first_byte]) == "\ufffd"
    assert small_tok.decode_bytes([first_byte]) == b"\xc3"
    assert small_tok.decode([]) == ""
    import numpy as np
    import torch
    ids = small_tok.encode("hello there")
    for form in (torch.tensor(ids), np.array(ids), [np.int64(i) for i in ids], list(torch.tensor(ids))):
        assert small_tok.decode(form) == "hello there"
    for bad in ([1, 2.7], torch.tensor([1.0, 2.0]), np.array([1.5]), ["5"], [None], list(torch.tensor([1.0]))):
        with pytest.raises(UserError, match="token ids must be integers"):
            small_tok.decode(bad)           # int() read 2.7 as token 2


def test_save_load_round_trip(tmp_path, small_tok):
    path = small_tok.save(tmp_path / "tok.json")
    tok = BPETokenizer.load(path)
    assert tok.hash == small_tok.hash and tok.ranks == small_tok.ranks
    assert tok.special_tokens == small_tok.special_tokens and tok.vocab_size == 600
    text = "Some text, with 123 numbers and  spaces.\r\n"
    assert tok.encode(text) == small_tok.encode(text)
    assert get_tokenizer(str(path)).hash == small_tok.hash
    d = json.loads(path.read_text(encoding="utf-8"))
    assert "Ġthe" in d["tokens"]                    # readable, GPT-2 spelling

    d["tokens"][300], d["tokens"][301] = d["tokens"][301], d["tokens"][300]
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(UserError, match="hash"):
        BPETokenizer.load(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not a tokenizer JSON"):
        BPETokenizer.load(path)
    with pytest.raises(UserError, match="not found"):
        BPETokenizer.load(tmp_path / "missing.json")
    good = small_tok.to_dict()
    for field, value, msg in (("special_tokens", ["<|endoftext|>"], "field 'special_tokens' must be a JSON object"),
                              ("tokens", "abc", "field 'tokens' must be a JSON list"),
                              ("tokens", good["tokens"][:5] + [7], "field 'tokens' must hold strings only"),
                              # a pattern that is no regex, or one that drops text (encode would lose
                              # the characters between its matches; a capturing group returns groups)
                              ("pat_str", "(unclosed", "pat_str is not a valid regular expression"),
                              ("pat_str", r"\w+", "does not split text without loss"),
                              ("pat_str", r"( ?\p{L}+)|\s+|.", "does not split text without loss")):
        path.write_text(json.dumps(dict(good, **{field: value})), encoding="utf-8")
        with pytest.raises(UserError, match=msg):
            BPETokenizer.load(path)
    with pytest.raises(UserError, match="does not split text without loss"):
        BPETokenizer.train("some text " * 50, 300, pat_str=r"[a-z]+")
    with pytest.raises(UserError, match="is a folder: name the tokenizer file"):
        small_tok.save(tmp_path)
    # a Hugging Face tokenizer.json beside a Hub snapshot's weights is not ours: the folder is
    # read as Hugging Face's (and says what it lacks), not as our file
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.safetensors").write_bytes(b"")
    (snap / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert tkz.saved_tokenizer_path(snap / "model.safetensors") == snap
    with pytest.raises(UserError, match="not a byte-level BPE tokenizer"):
        get_tokenizer(snap)
    small_tok.save(snap / "tokenizer.json")
    assert tkz.saved_tokenizer_path(snap / "model.safetensors") == snap / "tokenizer.json"
    # ours but damaged: still found, so that loading it says so (not replaced by another tokenizer)
    (snap / "tokenizer.json").write_text('{"format": "tritongpt-bpe", "tok', encoding="utf-8")
    assert tkz.saved_tokenizer_path(snap / "model.safetensors") == snap / "tokenizer.json"


def test_the_constructor_checks_ids_and_names_the_end_of_text_token():
    """Ids 0..n-1 without gaps, all 256 single bytes, special ids right after; with no special
    tokens named, <|endoftext|> takes the next id."""
    base = {bytes([b]): b for b in range(256)}
    with pytest.raises(UserError, match="without gaps"):
        BPETokenizer(base | {b"ab": 257})
    no_ff = {t: i for t, i in base.items() if t != b"\xff"} | {b"ab": 255}
    with pytest.raises(UserError, match="all 256 single bytes"):
        BPETokenizer(no_ff)
    for specials in ({EOT: 257}, {EOT: 256, "<|pad|>": 258}, {EOT: 255}):
        with pytest.raises(UserError, match="special token ids must follow"):
            BPETokenizer(base, specials)
    tok = BPETokenizer(base)
    assert tok.special_tokens == {EOT: 256} and tok.eot_id == 256 and tok.vocab_size == 257
    assert tok.encode(f"a{EOT}", allowed_special="all") == [97, 256]


def test_the_hash_covers_what_decides_the_ids():
    """Equal hash, equal encoding: the hash changes with every token's bytes (also the last, and
    where one token ends and the next begins), with the special tokens and with the pattern."""
    base = {bytes([b]): b for b in range(256)}

    def h(extra, specials=None, pat=tkz.GPT2_PAT):
        return BPETokenizer(base | extra, specials, pat).hash

    ref = h({b"ab": 256, b"cde": 257})
    assert h({b"ab": 256, b"cde": 257}) == ref
    assert h({b"abc": 256, b"de": 257}) != ref          # the same bytes in a row, other tokens
    assert h({b"ab": 256, b"cdf": 257}) != ref          # the last token
    assert h({b"cde": 256, b"ab": 257}) != ref          # the order (the ids)
    assert h({b"ab": 256, b"cde": 257}, {"<|end|>": 258}) != ref
    assert h({b"ab": 256, b"cde": 257}, {EOT: 258, "<|pad|>": 259}) != ref
    assert h({b"ab": 256, b"cde": 257}, pat=r"\s*\S+|\s+") != ref


def test_a_pattern_with_capturing_groups_is_refused():
    # findall returns groups (tuples for two) instead of the matched text: a UserError, not a crash
    for pat in (r"(\S)(\S*)|(\s+)", r"(\S+|\s+)"):
        with pytest.raises(UserError, match="does not split text without loss"):
            tkz.compile_pattern(pat)


def test_token_files_name_bad_tokens(tmp_path, small_tok):
    """A token spelled with a character outside GPT-2's byte alphabet (a plain space is "Ġ" there),
    or a token listed twice, is named as such."""
    good = small_tok.to_dict()
    path = tmp_path / "tok.json"
    for i, spelling, msg in ((300, "a b", "token 'a b' has a character ' ' outside GPT-2's byte alphabet"),
                             (300, good["tokens"][299], "the same token appears twice")):
        tokens = list(good["tokens"])
        tokens[i] = spelling
        path.write_text(json.dumps(dict(good, tokens=tokens)), encoding="utf-8")
        with pytest.raises(UserError, match=msg):
            BPETokenizer.load(path)


def test_a_failed_save_leaves_the_file_as_it_was(tmp_path, small_tok):
    """save writes a temporary file and renames it: a save that fails half way (info that is not
    JSON) leaves the previous file whole."""
    path = small_tok.save(tmp_path / "tok.json")
    before = path.read_bytes()
    bad = BPETokenizer(small_tok.ranks, small_tok.special_tokens, name="small", info={"when": object()})
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_bytes() == before and BPETokenizer.load(path).hash == small_tok.hash


def test_lone_surrogates_are_refused_by_both_encoders(small_tok, tmp_path):
    """A broken JSON escape leaves a lone surrogate, which has no UTF-8 bytes: the fast path
    turned it into U+FFFD and the reference path raised; both now refuse it, and a corpus file
    holding one is named with its line."""
    for encode in (small_tok.encode, small_tok.encode_reference, lambda t: small_tok.encode_batch([t])):
        with pytest.raises(UserError, match="invalid Unicode at character 2"):
            encode("ab\ud83dc")
    from tritongpt.train.data import load_text

    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"c.jsonl:2: field 'text' holds invalid Unicode"):
        load_text(str(tmp_path / "c.jsonl"))


def test_from_gpt2_files_tiny(tmp_path):
    """The GPT-2 file format on the hand-checked example, with and without a damaged merge."""
    tok = BPETokenizer.train("aaabdaaabac", 260)
    encoder = {tok.token_str(i): i for i in range(259)} | {EOT: 259}
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na a\na b\naa ab\n", encoding="utf-8")
    loaded = get_tokenizer(str(tmp_path))
    assert loaded.hash == tok.hash and loaded.eot_id == 259
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na a\naa ab\na b\n", encoding="utf-8")
    with pytest.raises(UserError, match="vocab.bpe:3"):
        get_tokenizer(str(tmp_path))
    (tmp_path / "encoder.json").write_text(json.dumps(list(encoder)), encoding="utf-8")
    with pytest.raises(UserError, match="encoder.json: expected a JSON object mapping token spellings to ids"):
        get_tokenizer(str(tmp_path))
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(UserError, match="encoder.json and vocab.bpe"):
        get_tokenizer(str(tmp_path))


def test_get_tokenizer_errors(monkeypatch):
    import requests
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="could not download.*encoder.json and vocab.bpe") as e:
        get_tokenizer("gpt2")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"unknown tokenizer 'no/such/tokenizer.json' \(no such file or folder\)"):
        get_tokenizer("no/such/tokenizer.json")  # a typo'd path is told so, not only that the name is unknown


def test_default_tokenizer_is_cached_and_retrained_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(tkz, "_DEFAULT", {})
    tok = tkz.default_tokenizer()                   # the one full-size training in the suite
    path = tmp_path / "bpe-pydoc-4096.json"
    assert path.is_file() and tok.vocab_size == 4096 and tok.eot_id == 4095
    assert tok.info["corpus_hash"] == tkz.text_hash(load_text("pydoc"))

    calls = []
    real_train = BPETokenizer.train.__func__

    def spy(cls, text, vocab_size, **kw):
        calls.append(vocab_size)
        return real_train(cls, text, 300, **kw)    # a cheaper stand-in for the 4096 training

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy))
    monkeypatch.setattr(tkz, "_DEFAULT", {})
    assert get_tokenizer("default").hash == tok.hash and calls == []   # loaded, not retrained

    d = json.loads(path.read_text(encoding="utf-8"))
    d["info"]["corpus_hash"] = "0" * 64             # as if trained on another Python's docs
    path.write_text(json.dumps(d), encoding="utf-8")
    monkeypatch.setattr(tkz, "_DEFAULT", {})
    retrained = tkz.default_tokenizer()
    assert calls == [4096] and retrained.info["corpus_hash"] == tok.info["corpus_hash"]
    assert BPETokenizer.load(path).info["corpus_hash"] == tok.info["corpus_hash"]

    path.write_text("garbage", encoding="utf-8")    # a damaged cache file is rebuilt too
    monkeypatch.setattr(tkz, "_DEFAULT", {})
    tkz.default_tokenizer()
    assert calls == [4096, 4096]


@pytest.fixture(scope="module")
def pair():
    """Our tokenizer and tiktoken's, both built from GPT-2's published files (built once)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ours = BPETokenizer.from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2_DIR / "vocab.bpe"), str(GPT2_DIR / "encoder.json"))
    from tiktoken_ext.openai_public import r50k_pat_str

    # tiktoken's own spelling of GPT-2's regex (what get_encoding("gpt2") uses), not ours: the
    # pre-tokenisers must agree too
    pat = r50k_pat_str
    ref = tiktoken.Encoding("gpt2-offline", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    return ours, ref


@pytest.mark.skipif(not HAVE_GPT2, reason="needs ../shared/gpt2/encoder.json and vocab.bpe")
class TestGPT2Files:
    def test_one_identity_for_both_spellings_of_the_pattern(self, pair):
        ours, ref = pair  # tiktoken's spelling of GPT-2's regex vs ours: the same encoding, one hash
        assert BPETokenizer.from_tiktoken(ref).hash == ours.hash

    def test_tiktokens_older_spelling_has_the_same_identity(self, pair):
        ours, ref = pair
        older = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        assert BPETokenizer(ours.ranks, ours.special_tokens, older).hash == ours.hash

    def test_a_file_with_the_older_hash_still_loads(self, pair, tmp_path):
        ours, ref = pair
        tok = BPETokenizer.from_tiktoken(ref)
        d = tok.to_dict()
        d["hash"] = tok._hash_with(tok.pat_str)  # as written before the shared identity
        (tmp_path / "t.json").write_text(json.dumps(d), encoding="utf-8")
        assert BPETokenizer.load(tmp_path / "t.json").hash == ours.hash

    def test_same_vocabulary(self, pair):
        ours, ref = pair
        assert ours.vocab_size == ref.n_vocab == 50257 and ours.eot_id == ref.eot_token == 50256
        assert ours.ranks == ref._mergeable_ranks
        assert ours.encode("Hello world") == [15496, 995]

    @settings(max_examples=50, deadline=None)
    @given(text=fuzz_text)
    def test_fuzzed_text_encodes_like_tiktoken(self, pair, text):
        ours, ref = pair
        want = ref.encode(text, disallowed_special=())
        assert ours.encode(text) == want
        assert ours.encode_reference(text[:60]) == ref.encode(text[:60], disallowed_special=())
        assert ours.decode(want) == text

    def test_special_and_long_text(self, pair, corpus):
        ours, ref = pair
        text = corpus[:20_000] + EOT + corpus[-5_000:]
        want = ref.encode(text, allowed_special="all")
        assert ours.encode(text, allowed_special="all") == want
        assert ours.encode_reference(text, allowed_special="all") == want


def test_cli_train_encode_decode(tmp_path, capsys, corpus):
    from tritongpt.cli import main

    src, out = tmp_path / "corpus.txt", tmp_path / "tok.json"
    src.write_text(corpus[:30_000], encoding="utf-8")
    assert main(["bpe", "train", "--input", str(src), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = BPETokenizer.load(out)
    assert tok.vocab_size == 300 and tok.info["corpus_hash"] == tkz.text_hash(corpus[:30_000])
    capsys.readouterr()
    assert main(["bpe", "encode", "--tokenizer", str(out), "--text", "the cat sat"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("the cat sat")
    assert main(["bpe", "decode", "--tokenizer", str(out), "--ids", *map(str, ids)]) == 0
    assert capsys.readouterr().out == "the cat sat\n"
    assert main(["bpe", "encode", "--tokenizer", str(out), "--text", f"a{EOT}"]) == 2
    assert "--allow-special" in capsys.readouterr().err
    # --file encodes the file as it is (a .jsonl is not read as a corpus of documents)
    (tmp_path / "rows.jsonl").write_text('{"text": "the cat"}\n', encoding="utf-8")
    assert main(["bpe", "encode", "--tokenizer", str(out), "--file", str(tmp_path / "rows.jsonl")]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == tok.encode('{"text": "the cat"}\n')
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb")  # no newline translation either
    assert main(["bpe", "encode", "--tokenizer", str(out), "--file", str(tmp_path / "crlf.txt")]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == tok.encode("a\r\nb")
    assert main(["bpe", "encode", "--tokenizer", str(out), "--file", str(tmp_path / "nope.txt")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["bpe", "encode", "--tokenizer", str(out), "--file", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    # a run folder's tokenizer.json is the tokenizer of that folder
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    (run / "ckpt-0000001").mkdir()
    for where in (run, run / "ckpt-0000001"):  # a run folder, or one of its checkpoints
        assert main(["bpe", "encode", "--tokenizer", str(where), "--text", "the cat sat"]) == 0
        assert [int(i) for i in capsys.readouterr().out.split()] == ids
    (tmp_path / "empty").mkdir()
    assert main(["bpe", "encode", "--tokenizer", str(tmp_path / "empty"), "--text", "x"]) == 2
    assert "must hold our tokenizer.json (a run folder), GPT-2's encoder.json and vocab.bpe, or Hugging Face's vocab.json" in capsys.readouterr().err
    assert main(["bpe", "decode", "--tokenizer", str(out), "--ids", "300"]) == 2
    assert "out of range" in capsys.readouterr().err


def _streamed_corpora(tmp_path, corpus):
    """A folder of .txt files (one with <|endoftext|> inside, one document ending in a piece of
    its spelling and the next starting with the rest) and a .jsonl whose record spells it."""
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(corpus[:4000] + "<|endoftext" + EOT + "|>" + corpus[4000:6000], encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(corpus[6000:9000], encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in (corpus[9000:12000] + EOT + corpus[12000:13000],
                                                               corpus[13000:15000])) + "\n", encoding="utf-8")
    return folder, rows


def test_cli_train_streams_and_matches_training_on_the_whole_text(tmp_path, capsys, corpus):
    """bpe train reads its corpus a document at a time; the ranks, corpus_hash and corpus_chars
    are what training on the documents joined with <|endoftext|> gives."""
    from tritongpt.cli import main

    folder, rows = _streamed_corpora(tmp_path, corpus)
    body = tmp_path / "body.jsonl"                   # the records' text in another field, beside a decoy
    body.write_text("".join(json.dumps({"text": "decoy", "body": json.loads(r)["text"]}) + "\n"
                            for r in rows.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    for src, field in ((folder, "text"), (rows, "text"), (body, "body")):
        text, out = load_text(src, field), tmp_path / f"{src.name}.json"
        assert main(["bpe", "train", "--input", str(src), "--text-field", field, "--vocab-size", str(256 + 1 + 20),
                     "--out", str(out)]) == 0
        assert f"on {len(text):,} characters" in capsys.readouterr().out
        tok, want = BPETokenizer.load(out), BPETokenizer.train(text, 256 + 1 + 20)
        assert tok.ranks == want.ranks and tok.special_tokens == want.special_tokens
        assert tok.info["corpus_hash"] == tkz.text_hash(text) and tok.info["corpus_chars"] == len(text)
        assert tkz.train_ranks(iter(load_documents(src, field)), 256 + 1 + 20) == want.ranks


def test_cli_train_counts_each_document_before_reading_the_next(tmp_path, monkeypatch):
    """The corpus is never held whole: load_text and load_documents are not called, and each
    document is pre-tokenised before the next is asked for."""
    from tritongpt.cli import main
    from tritongpt.train import data

    def held_whole(*a, **k):
        raise AssertionError("bpe train read the whole corpus into memory")

    monkeypatch.setattr(data, "load_text", held_whole)
    monkeypatch.setattr(data, "load_documents", held_whole)
    seen, real_compile = [], tkz.compile_pattern

    class Recording:                                # the pre-tokeniser, noting what it splits
        def __init__(self, pat):
            self.pat = pat

        def findall(self, text):
            seen.append(text)
            return self.pat.findall(text)

        def __getattr__(self, name):
            return getattr(self.pat, name)

    monkeypatch.setattr(tkz, "compile_pattern", lambda *a, **k: Recording(real_compile(*a, **k)))

    def documents(source, text_field="text"):
        for i in range(5):
            if i:
                assert any(f"doc{i - 1} " in piece for piece in seen), \
                    f"document {i} asked for before {i - 1} was counted"
            yield f"doc{i} hello world, the quick brown fox {i}. " * 3

    monkeypatch.setattr(data, "iter_documents", documents)
    out = tmp_path / "tok.json"
    assert main(["bpe", "train", "--input", "anything", "--vocab-size", str(256 + 1 + 20), "--out", str(out)]) == 0
    assert BPETokenizer.load(out).info["corpus_chars"] == 5 * 3 * 41 + 4 * len(EOT)


def test_cli_train_refuses_an_empty_corpus(tmp_path, capsys):
    from tritongpt.cli import main

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n", encoding="utf-8")
    (blank / "b.txt").write_text(f"{EOT}\n{EOT}", encoding="utf-8")
    rows = tmp_path / "blank.jsonl"
    rows.write_text('{"text": " "}\n{"text": "\\n"}\n', encoding="utf-8")
    for src in (blank, rows):
        with pytest.raises(UserError, match="the corpus is empty") as e:
            load_text(src)
        out = tmp_path / "t.json"
        assert main(["bpe", "train", "--input", str(src), "--vocab-size", "300", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {e.value}"
        assert not out.exists()


# -- Hugging Face's GPT-2 tokenizer files (tritongpt export) -------------------------------------------
def test_hugging_face_files_give_the_same_ids_both_ways(corpus, tmp_path):
    """save_hf writes vocab.json / merges.txt / tokenizer_config.json; transformers' GPT-2
    tokenizer reading them encodes every stress fragment (and the special tokens) as we do, and
    from_hf_folder reads them back to the same tokenizer."""
    transformers = pytest.importorskip("transformers")
    tok = BPETokenizer.train(corpus[:60_000], 500, special_tokens=(EOT, "<|sep|>"), name="hf")
    tok.save_hf(tmp_path, model_max_length=128)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    for text in FRAGMENTS + ["".join(FRAGMENTS), corpus[60_000:63_000], f"a<|sep|>b{EOT}c"]:
        assert hf(text)["input_ids"] == tok.encode(text, allowed_special="all"), text
    assert hf.eos_token_id == tok.eot_id and hf.model_max_length == 128
    back = BPETokenizer.from_hf_folder(tmp_path)
    assert back.hash == tok.hash and back.special_tokens == tok.special_tokens
    assert get_tokenizer(tmp_path).hash == tok.hash  # a folder of these files is a tokenizer spec
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert tkz.saved_tokenizer_path(tmp_path / "model.safetensors") == tmp_path  # found beside weights


def test_only_gpt2s_pattern_has_hugging_face_files(tmp_path):
    tok = BPETokenizer.train("some text, more text " * 40, 270, pat_str=r"\s*\S+|\s+")
    with pytest.raises(UserError, match="another pattern than GPT-2's"):
        tok.save_hf(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_token_that_is_no_merge_of_earlier_ones_has_no_merges_spelling():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # three bytes in one step: no pair of earlier tokens makes it
    with pytest.raises(UserError, match=r"token 'abc' \(id 256\) is not one merge of two earlier tokens"):
        BPETokenizer(ranks).merges()


@pytest.mark.skipif(not HAVE_GPT2, reason="needs ../shared/gpt2/encoder.json and vocab.bpe")
def test_merges_from_ranks_are_gpt2s_published_merges(pair):
    """GPT-2's 50,000 merges, recovered from the ranks alone, are vocab.bpe line for line."""
    from tritongpt.train.tokenizer import token_to_str

    ours, _ = pair
    lines = [ln for ln in (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if ln]
    assert [f"{token_to_str(a)} {token_to_str(b)}" for a, b in ours.merges()] == lines


def test_hugging_face_folders_name_their_extra_tokens_and_options(corpus, tmp_path):
    """A pad token added after <|endoftext|> (named by tokenizer_config.json or added_tokens.json)
    is a special token, not a merge; a folder asking for a prefix space or an added BOS is
    refused, since this encoder would give other ids."""
    tok = BPETokenizer.train(corpus[:60_000], 400, special_tokens=(EOT, "<|pad|>"), name="hf")
    tok.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for how in ({"pad_token": "<|pad|>"}, {"added_tokens_decoder": {"399": {"content": "<|pad|>", "special": True}}},
                {"extra_special_tokens": {"pad": "<|pad|>"}}, "added_tokens.json"):
        (tmp_path / "added_tokens.json").unlink(missing_ok=True)
        if how == "added_tokens.json":
            (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": 399}))
            how = {}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "additional_special_tokens": [], **how}))
        assert BPETokenizer.from_hf_folder(tmp_path).hash == tok.hash, how
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "additional_special_tokens": []}))
    (tmp_path / "added_tokens.json").unlink()
    # unnamed, <|pad|> reads as a byte spelling without a merge
    with pytest.raises(UserError, match=r"merges.txt has 142 merges but .*vocab.json has 399 tokens"):
        BPETokenizer.from_hf_folder(tmp_path)
    for option in ("add_prefix_space", "add_bos_token"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, option: True}))
        with pytest.raises(UserError, match=f"sets {option}"):
            BPETokenizer.from_hf_folder(tmp_path)


def test_an_ordinary_token_a_config_names_stays_ordinary(corpus, tmp_path):
    """A config may name an ordinary token as its pad token (`export` of a reward model names the lowest one, "Ā",
    byte 0: a classifier's pad_token_id must not be the EOS its scores are read at): it keeps its id and spelling,
    and the folder reads back as the tokenizer it was written from."""
    tok = BPETokenizer.train(corpus[:60_000], 300, name="hf")
    tok.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name in ("Ā", "Ġ", tkz.token_to_str(tok._id_to_bytes[290])):  # byte 0, the space, a merge
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": name}))
        back = BPETokenizer.from_hf_folder(tmp_path)
        assert back.hash == tok.hash and back.vocab_size == tok.vocab_size, name


def test_a_gpt2_folders_eos_token_and_chat_template_are_checked(corpus, tmp_path):
    """tokenizer_config.json's (special_tokens_map.json's) tokens as the tokenizers-library path reads them: a
    string or transformers' {"content": ...}; an id or a list, read as no token, was passed over without a word,
    and so was an EOS other than <|endoftext|> (this encoder's texts end on that one) and a chat_template of the
    wrong type: refused, naming the file and field."""
    tok = BPETokenizer.train(corpus[:20_000], 270, special_tokens=(EOT, "<|im_end|>"), name="hf")
    tok.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    path = tmp_path / "tokenizer_config.json"
    for change, said in (({"eos_token": 269}, r"eos_token must be a token's text .*got int 269 \(an id goes in "
                                              r"config.json's eos_token_id\)"),
                         ({"pad_token": ["<|im_end|>"]}, r"pad_token must be a token's text .*got list"),
                         ({"eos_token": {"id": 1}}, r"eos_token must be a token's text .*got dict"),
                         ({"eos_token": "<|im_end|>"}, r"eos_token '<\|im_end\|>' is not <\|endoftext\|>"),
                         ({"chat_template": 42}, "chat_template must be a Jinja string, got int")):
        path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=f"{re.escape(str(path))}: {said}"):
            BPETokenizer.from_hf_folder(tmp_path)
    path.write_text(json.dumps({**cfg, "eos_token": {"content": EOT, "special": True}, "chat_template": "{{ x }}"}))
    back = BPETokenizer.from_hf_folder(tmp_path)
    assert back.hash == tok.hash and back.eot_id == tok.eot_id


def test_a_gpt2_folders_bad_config_field_is_said_once_beside_a_tokenizer_json(corpus, tmp_path):
    """With a tokenizer.json beside it (transformers' save_pretrained), a tokenizer_config.json field of a wrong shape
    is refused once, naming it: it was said twice ("...; nor does tritongpt's BPE read it: ..."), or (a pad_token
    id, which the tokenizers-library path does not read) the folder was read by that library instead, with a note of
    'other ids'. Another EOS still is a reason to read it there (that path keeps a folder's own EOS)."""
    transformers = pytest.importorskip("transformers")
    tok = BPETokenizer.train(corpus[:20_000], 270, special_tokens=(EOT, "<|im_end|>"), name="hf")
    tok.save_hf(tmp_path)
    transformers.GPT2TokenizerFast.from_pretrained(tmp_path).save_pretrained(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for change, said in (({"eos_token": 269}, "eos_token must be a token's text"),
                         ({"pad_token": 269}, "pad_token must be a token's text"),
                         ({"chat_template": 42}, "chat_template must be a Jinja string")):
        path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=re.escape(f"{path}: {said}")) as e:
            tkz.from_hf_folder(tmp_path)
        assert str(e.value).count(said) == 1, str(e.value)
    path.write_text(json.dumps({**cfg, "eos_token": "<|im_end|>"}))
    back = tkz.from_hf_folder(tmp_path)
    assert type(back).__name__ == "HFTokenizer" and back.eot_id == tok.special_tokens["<|im_end|>"]


def test_the_tokenizer_nearest_the_weights_is_theirs(small_tok, corpus, tmp_path):
    """Weights exported into a folder inside another run: the Hugging Face files beside them,
    not the enclosing run's tokenizer.json; a folder beside them that does not load stops a
    run that would have used it (naming --tokenizer), but not one that names --tokenizer."""
    from tritongpt.train.sft import pick_tokenizer

    run, hf = tmp_path / "run", tmp_path / "run" / "hf"
    small_tok.save(tmp_path / "run" / "tokenizer.json")
    other = BPETokenizer.train(corpus[:30_000], 300, name="other")
    other.save_hf(hf)
    (hf / "model.safetensors").write_bytes(b"")
    assert tkz.saved_tokenizer_path(hf / "model.safetensors") == hf
    assert pick_tokenizer(None, hf / "model.safetensors", 600).hash == other.hash
    assert tkz.saved_tokenizer_path(run / "model.safetensors") is None  # no such file
    (hf / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(UserError, match="pass --tokenizer to use another"):
        pick_tokenizer(None, hf / "model.safetensors", 600)
    assert pick_tokenizer(str(run / "tokenizer.json"), hf / "model.safetensors", 600).hash == small_tok.hash


def test_a_tokenizers_library_file_reads_back_as_the_same_tokenizer(corpus, tmp_path):
    """transformers 5 saves a tokenizer as tokenizer.json alone (the tokenizers library's file,
    which shares our run file's name): read as Hugging Face's, it is the tokenizer saved; one
    whose pre-tokenizer adds a prefix space is refused."""
    transformers = pytest.importorskip("transformers")
    tok = BPETokenizer.train(corpus[:60_000], 400, special_tokens=(EOT, "<|sep|>"), name="hf")
    tok.save_hf(tmp_path / "slow")
    transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "slow").save_pretrained(tmp_path / "fast")
    fast = tmp_path / "fast"
    if (fast / "vocab.json").is_file():  # an older transformers also writes the two files: use the JSON
        (fast / "vocab.json").unlink()
        (fast / "merges.txt").unlink()
    assert tkz.is_hf_tokenizer_folder(fast) and not tkz.is_ours(fast / "tokenizer.json")
    back = get_tokenizer(fast)
    assert back.hash == tok.hash and back.special_tokens == tok.special_tokens
    d = json.loads((fast / "tokenizer.json").read_text(encoding="utf-8"))
    d["pre_tokenizer"]["add_prefix_space"] = True
    (fast / "tokenizer.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(UserError, match="not GPT-2's pre-tokenizer"):
        BPETokenizer.from_hf_folder(fast)
    assert type(get_tokenizer(fast)).__name__ == "HFTokenizer"  # read by the tokenizers library instead


def test_a_transformers_tokenizer_json_file_is_read_as_its_folder(corpus, tmp_path):
    """--tokenizer path/to/tokenizer.json, the file transformers' save_pretrained writes, is read
    as the folder it sits in is (its tokenizer_config.json names the special tokens), not
    refused as a tritongpt tokenizer file that it is not."""
    transformers = pytest.importorskip("transformers")
    tok = BPETokenizer.train(corpus[:60_000], 400, name="hf")
    tok.save_hf(tmp_path / "slow")
    transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "slow").save_pretrained(tmp_path / "fast")
    back = get_tokenizer(tmp_path / "fast" / "tokenizer.json")
    assert back.hash == tok.hash and back.special_tokens == tok.special_tokens


def test_a_token_added_in_transformers_is_read_from_tokenizer_json(corpus, tmp_path):
    """transformers 5 keeps a token added with add_special_tokens only in tokenizer.json (and its
    name in tokenizer_config.json), also when vocab.json and merges.txt are there from before:
    tokenizer.json is read first, as transformers does, so the token keeps its id."""
    transformers = pytest.importorskip("transformers")
    tok = BPETokenizer.train(corpus[:60_000], 300, name="hf")
    tok.save_hf(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and "<|im_start|>" not in (tmp_path / "vocab.json").read_text()
    back = BPETokenizer.from_hf_folder(tmp_path)
    text = f"<|im_start|>a b{EOT}"
    assert back.vocab_size == tok.vocab_size + 1
    assert back.encode(text, allowed_special="all") == hf(text)["input_ids"]


def test_added_tokens_keep_their_ids_or_are_refused(corpus, tmp_path):
    """A token added beyond vocab.json (transformers 4: added_tokens.json, or
    added_tokens_decoder) keeps its id as a special token; added tokens Hugging Face treats in
    ways this encoder cannot (not special, stripping spaces) are refused, as is a malformed
    tokenizer.json (a named error, not a traceback)."""
    tok = BPETokenizer.train(corpus[:60_000], 300, name="hf")
    tok.save_hf(tmp_path)
    pad = tok.vocab_size
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": pad}))
    back = BPETokenizer.from_hf_folder(tmp_path)
    assert back.vocab_size == tok.vocab_size + 1 and back.special_tokens["<pad>"] == pad
    ids = back.encode("a<pad>b", allowed_special="all")
    assert ids == tok.encode("a") + [pad] + tok.encode("b")
    (tmp_path / "added_tokens.json").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for token, said in (({"content": "<pad>", "special": True, "lstrip": True}, "sets lstrip"),
                        ({"content": "foobar", "special": False}, "is not special")):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "added_tokens_decoder": {str(pad): token}}))
        with pytest.raises(UserError, match=said):
            BPETokenizer.from_hf_folder(tmp_path)
    hf = tmp_path / "fast"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                                  "pre_tokenizer": "ByteLevel"}))
    with pytest.raises(UserError, match="pre_tokenizer and post_processor must be JSON objects"):
        get_tokenizer(hf)


def test_tokenizer_config_fields_of_the_wrong_type_are_named(tmp_path):
    """additional_special_tokens that is no token or list (list() of a number: a TypeError) and an
    added_tokens_decoder key that is no id (int(): a ValueError) name the file and field."""
    tok = BPETokenizer.train("aaabdaaabac", 260)
    tok.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for edit, said in (({"additional_special_tokens": 5}, "additional_special_tokens must be a token, a list of "
                                                          "tokens or an object of them, got int 5"),
                       ({"added_tokens_decoder": {"pad": {"content": "<pad>", "special": True}}},
                        "added_tokens_decoder's keys must be token ids, got 'pad'"),
                       ({"added_tokens_decoder": {"2\u00b2": {"content": "<pad>", "special": True}}},
                        "added_tokens_decoder's keys must be token ids, got '2\u00b2'")):  # a digit, not decimal
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(UserError, match=f"tokenizer_config.json: {said}"):
            BPETokenizer.from_hf_folder(tmp_path)


def test_hugging_face_settings_that_change_the_ids_are_refused(tmp_path):
    """A tokenizers-library tokenizer.json (written out by hand here) reads back as the tokenizer
    it spells; each setting with which Hugging Face would give other ids than this encoder (a
    normalizer, a pre-tokenizer without GPT-2's regex, a post-processor that adds a token, an
    added token that strips spaces or matches whole words only, an added EOS) is refused."""
    tok = BPETokenizer.train("aaabdaaabac", 260)
    good = {"normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            "added_tokens": [{"id": 259, "content": EOT, "special": True, "lstrip": False, "rstrip": False,
                              "single_word": False, "normalized": False}],
            "model": {"type": "BPE", "dropout": None, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {tok.token_str(i): i for i in range(259)},
                      "merges": [[tkz.token_to_str(a), tkz.token_to_str(b)] for a, b in tok.merges()]}}
    path = tmp_path / "tokenizer.json"

    def read(d):  # BPETokenizer's reader: get_tokenizer hands what it refuses to the tokenizers library
        path.write_text(json.dumps(d), encoding="utf-8")
        return BPETokenizer.from_hf_folder(tmp_path)

    assert read(good).hash == tok.hash == get_tokenizer(tmp_path).hash
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": EOT, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}]}
    eot = good["added_tokens"][0]
    for change, msg in ((dict(good, normalizer={"type": "NFC"}), "a normalizer"),
                        (dict(good, pre_tokenizer=dict(good["pre_tokenizer"], use_regex=False)),
                         "not GPT-2's pre-tokenizer"),
                        (dict(good, post_processor=template), "a post-processor that adds tokens"),
                        (dict(good, model=dict(good["model"], dropout=0.1)), "BPE options"),
                        (dict(good, added_tokens=[dict(eot, rstrip=True)]), "sets rstrip"),
                        (dict(good, added_tokens=[dict(eot, single_word=True)]), "sets single_word")):
        with pytest.raises(UserError, match=msg):
            read(change)
    read(good)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True}), encoding="utf-8")
    with pytest.raises(UserError, match="sets add_eos_token"):
        BPETokenizer.from_hf_folder(tmp_path)


def test_the_cache_folder_and_cached_tokenizers(tmp_path, monkeypatch, capsys):
    """default_cache_dir: the folder passed, else $TRITONGPT_CACHE, else ~/.cache/tritongpt.
    cached_tokenizer reuses its file only for the same text and size; a cache it cannot write
    (the folder is a file here) still gives the tokenizer, with a warning; default_tokenizer
    caches in the folder it is given."""
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "env"))
    assert tkz.default_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    assert tkz.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("TRITONGPT_CACHE")
    assert tkz.default_cache_dir() == Path.home() / ".cache" / "tritongpt"

    text = "the quick brown fox jumps over the lazy dog. " * 10
    path = tmp_path / "c" / "tok.json"
    first = tkz.cached_tokenizer(path, text, 270, name="c")
    assert tkz.cached_tokenizer(path, text, 270, name="c").hash == first.hash
    smaller = tkz.cached_tokenizer(path, text, 265, name="c")      # another size: trained again
    assert smaller.vocab_size == 265 and BPETokenizer.load(path).vocab_size == 265
    (tmp_path / "file").write_text("x", encoding="utf-8")
    unwritable = tkz.cached_tokenizer(tmp_path / "file" / "tok.json", text, 270, name="c")
    assert unwritable.hash == first.hash and "could not cache the tokenizer" in capsys.readouterr().out

    monkeypatch.setattr(tkz, "_DEFAULT", {})
    a = tkz.default_tokenizer(tmp_path / "a", vocab_size=260)
    b = tkz.default_tokenizer(tmp_path / "b", vocab_size=260)
    assert a.hash == b.hash and (tmp_path / "b" / "bpe-pydoc-260.json").is_file()


def test_an_export_folder_whose_hugging_face_files_changed_uses_them(small_tok, corpus, tmp_path, capsys):
    """`tritongpt export` writes ours (tritongpt_tokenizer.json) beside Hugging Face's files of the
    same tokenizer: ours is read. Files that now spell another tokenizer -- also one of the same
    size -- win. Our own run tokenizer.json alone is not a Hugging Face folder."""
    out = tmp_path / "export"
    small_tok.save_hf(out)
    small_tok.save(out / tkz.EXPORT_TOKENIZER)
    (out / "model.safetensors").write_bytes(b"")
    assert tkz.saved_tokenizer_path(out / "model.safetensors") == out / tkz.EXPORT_TOKENIZER
    other = BPETokenizer.train(corpus[100_000:180_000], small_tok.vocab_size, name="other")
    assert other.vocab_size == small_tok.vocab_size and other.hash != small_tok.hash
    other.save_hf(out)
    capsys.readouterr()
    assert tkz.saved_tokenizer_path(out / "model.safetensors") == out
    assert "differ from tritongpt_tokenizer.json" in capsys.readouterr().err
    run = tmp_path / "run"
    tkz.save_run_tokenizer(small_tok, run)
    assert not tkz.is_hf_tokenizer_folder(run) and tkz.is_hf_tokenizer_folder(out)
