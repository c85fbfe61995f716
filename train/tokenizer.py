"""Byte-level BPE, the GPT-2 tokenizer, written from scratch.

How GPT-2 turns text into ids, in four steps:

1. Pre-tokenise: a regex splits the text into "words" (letters with one leading space,
   digit runs, punctuation runs, whitespace). Merges never cross a word boundary, so
   " dog." becomes " dog" + "." and never "g.".
2. Bytes: each word is UTF-8 encoded; the 256 byte values are the first 256 tokens, so any
   text -- emoji, Chinese, binary junk -- can be encoded without an "unknown" token.
3. Merges: training repeatedly finds the most frequent adjacent pair of tokens in the corpus
   and makes it a new token. A token's *rank* is the order in which it was created.
4. Encoding a word replays the merges: repeatedly join the adjacent pair whose joined bytes
   have the lowest rank, until no adjacent pair joins into a known token.

`BPETokenizer.encode_reference` does exactly that in plain Python. `BPETokenizer.encode` hands
the same ranks and regex to `tiktoken` (Rust) for speed; tests check the two agree.
Special tokens (`<|endoftext|>`, the document separator) get the ids after the merges.

`bytes_to_unicode` is only needed to read and write files: OpenAI's `encoder.json` spells
each token's bytes as printable characters (a space is "Ġ"), and our JSON does the same.
"""
import hashlib
import heapq
import json
import operator
import os
from collections import Counter, defaultdict
from pathlib import Path

import regex

from tritongpt.errors import UserError, note, read_json_object, read_text_file
from tritongpt.cli import command_help

# GPT-2's pre-tokeniser: contractions, letters, digits, other symbols (each may take one
# leading space), then whitespace. `\s+(?!\S)` leaves the last space of a run to start the
# next word, so "a   b" splits as "a", "  ", " b".
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tiktoken's spelling of the same pattern ("gpt2" encoding): one identity for both, so GPT-2 read
# from OpenAI's files and from tiktoken share a hash, token caches and resume checks
# (tiktoken's older spelling, and since tiktoken 0.8 its possessive one, which is
# tiktoken_ext.openai_public.r50k_pat_str)
_SAME_PATTERN = {
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": GPT2_PAT,
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": GPT2_PAT,
}
EOT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
FORMAT = "tritongpt-bpe"
HF_FORMAT = "tritongpt-hf-tokenizer"  # hf_tokenizer.FORMAT (that module imports the tokenizers library)
# what --tokenizer takes, in every command's help
TOKENIZER_CHOICES = ("default | gpt2 | a tokenizer .json | a folder: a run's, OpenAI's encoder.json + vocab.bpe, "
                     "or Hugging Face's vocab.json + merges.txt or tokenizer.json (a Llama's: through the tokenizers "
                     "library) or SentencePiece's tokenizer.model (converted by transformers)")
# what --init and --weights take beside paths and names (tritongpt/cli.py fetches it first)
HUB_REPO_HELP = "a Hugging Face Hub repo id (owner/name: its weights, config and tokenizer fetched once)"
# the Hugging Face and llama.cpp files they take: a written-out family list went stale as families were added
HF_WEIGHTS_HELP = ("a Hugging Face model folder or its model.safetensors, of any family load_checkpoint reads "
                   "(GPT-2, Llama, Qwen, Gemma, ...: README.md's families table), a llama.cpp .gguf file")


# Text the pre-tokenising pattern must split without loss: letters of several scripts, digits,
# contractions, punctuation, symbols, emoji, combining marks, controls and whitespace runs.
_PATTERN_PROBE = ("It's 2024: naïve café, 東京 and Ελλάδα! x=3.14*r**2 #tag @user \t\n\n  end"
                  " \u00a0\u200b\u0301e\u0000\u007f 🙂👍🏽 'll \r\n$%^&~`|\\{}[]<>")


def compile_pattern(pat_str, name: str = "bpe"):
    """pat_str compiled, or a UserError: not a regular expression, or one that drops characters
    (text between its matches would vanish from encode; checked on _PATTERN_PROBE)."""
    if not isinstance(pat_str, str):
        raise UserError(f"tokenizer {name!r}: pat_str must be a string, got {type(pat_str).__name__}")
    try:
        pat = regex.compile(pat_str)
    except regex.error as e:
        raise UserError(f"tokenizer {name!r}: pat_str is not a valid regular expression ({e})") from None
    covered = "".join(pat.findall(_PATTERN_PROBE)) if pat.groups == 0 else None
    if covered != _PATTERN_PROBE:
        raise UserError(f"tokenizer {name!r}: pat_str {pat_str!r} does not split text without loss "
                        "(its matches must cover every character, with no capturing groups), so "
                        "encode would drop text")
    return pat


class TokenizerConfigError(UserError):
    """A field of tokenizer_config.json (special_tokens_map.json) of a shape no reader takes: refused whichever
    reads the folder, not a reason for from_hf_folder to try the tokenizers library instead (it said the same
    twice, or took the folder there, noting 'other ids', where the field was not checked)."""


def token_name(value, where, key: str):
    """A token named by tokenizer_config.json (special_tokens_map.json): a string, or {"content": ...} as
    transformers writes an AddedToken; None where it names none. Anything else (an id, a list) is refused, naming
    the file and field: read as no token, the EOS was taken from elsewhere (config.json's id, <|endoftext|>)
    without a word."""
    content = value.get("content") if isinstance(value, dict) else value
    if value is None or isinstance(content, str):
        return content or None
    hint = f" (an id goes in config.json's {key}_id)" if isinstance(value, int) and not isinstance(value, bool) \
        else ""
    raise TokenizerConfigError(f"{where}: {key} must be a token's text (a string, or {{\"content\": ...}} as "
                               f"transformers writes it), got {type(value).__name__} {value!r}"[:300] + hint)


class DisallowedSpecialToken(UserError, ValueError):
    """Text contains a special token's spelling (.token) but the caller did not allow special tokens."""

    def __init__(self, message: str, token: str):
        super().__init__(message)
        self.token = token


def bytes_to_unicode() -> dict:
    """byte value -> a printable character standing for it (GPT-2's encoder.json spelling).

    Printable Latin-1 bytes stand for themselves; the rest (control bytes, space, ...) are
    shifted to 256 and up, so every token is a readable string with no whitespace in it.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def token_to_str(token: bytes) -> str:
    return "".join(BYTE_ENCODER[b] for b in token)


def str_to_token(s: str, where: str = "tokenizer file") -> bytes:
    try:
        return bytes(BYTE_DECODER[c] for c in s)
    except KeyError as e:
        raise UserError(f"{where}: token {s!r} has a character {e.args[0]!r} outside GPT-2's byte alphabet") from None


def _any_special(specials) -> str:
    """A regex source matching any of the special tokens, longest first, so no prefix wins."""
    return "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))


def _alternation(specials):
    """_any_special compiled, captured (regex.split then keeps the specials it splits on)."""
    return regex.compile("(" + _any_special(specials) + ")")


# -- training -----------------------------------------------------------------------------------
def _n_merges(vocab_size: int, special_tokens) -> int:
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                        f"+ {len(special_tokens)} special token(s)")
    return n_merges


def count_words(docs, special_tokens=(EOT,), pat_str: str = GPT2_PAT) -> Counter:
    """The pre-tokenised words of `docs` (an iterable of documents) with their counts.

    That Counter is all that training needs of a corpus, so the documents are read one at a
    time and none is kept: a corpus need not fit in memory, only its largest document.
    Special tokens separate documents; no merge may learn their spelling or cross them. So each
    document is cut at its specials, longest first as encoding matches them (a special that
    starts another left that one's tail as text). Cutting the documents one by one counts the
    same words as cutting them joined with <|endoftext|>: no match can straddle a joining EOT,
    as that spelling has no border with itself (no proper prefix of it is also a suffix).
    """
    pat = compile_pattern(pat_str)
    cut = regex.compile(_any_special(special_tokens)) if special_tokens else None
    word_freq = Counter()
    for doc in docs:
        for piece in cut.split(doc) if cut else [doc]:
            word_freq.update(pat.findall(piece))
    return word_freq


def train_ranks(text, vocab_size: int, special_tokens=(EOT,), pat_str: str = GPT2_PAT,
                verbose: bool = False) -> dict:
    """Learn byte-level BPE ranks (token bytes -> id) for `vocab_size` ids including specials.

    `text` is a str, or an iterable of documents read one at a time (count_words): no word
    spans two documents. A vocab_size too small is refused before any document is read.
    """
    _n_merges(vocab_size, special_tokens)
    docs = [text] if isinstance(text, str) else text
    return merge_ranks(count_words(docs, special_tokens, pat_str), vocab_size, special_tokens, verbose)


def merge_ranks(word_freq: Counter, vocab_size: int, special_tokens=(EOT,), verbose: bool = False) -> dict:
    """The BPE ranks learnt from `word_freq` (count_words: pre-tokenised word -> count).

    Counts are kept per unique pre-tokenised word with its frequency, so the corpus is
    visited once. A heap keyed by (-count, pair) finds the best pair; ties go to the pair of
    smallest ids, which makes training deterministic. Merging it is the textbook step -- in
    each word, left to right, replace every (a, b) by the new token -- done in place:

    * every word's tokens sit in one flat list, linked to their neighbours (`prv`, `nxt`); a
      merge writes the new token at a's position and unlinks b's, so no word is copied;
    * `where` maps a pair to the positions where it starts, so a merge visits only its own
      occurrences, however long the words (a Chinese sentence is one pre-tokenised word);
    * an occurrence x a b y changes just three pairs: (x, a), (a, b), (b, y) become
      (x, new), (new, y). Reading x and y as they are now makes runs work: in "a b a b" the
      second merge sees x = new, so (new, a), counted by the first, becomes (new, new).
    """
    n_merges = _n_merges(vocab_size, special_tokens)
    tok, prv, nxt, freq = [], [], [], []           # per position: token (-1: merged away), links, word count
    pair_count = defaultdict(int)
    where = defaultdict(set)                       # pair -> positions where it starts (some stale)
    for w, f in word_freq.items():
        w = w.encode("utf-8")
        if len(w) < 2:                             # no pairs, nothing to learn
            continue
        start, end = len(tok), len(tok) + len(w)
        for i, pair in enumerate(zip(w, w[1:]), start):
            pair_count[pair] += f
            where[pair].add(i)
        tok += w
        prv += range(start - 1, end - 1)
        nxt += range(start + 1, end + 1)
        prv[start] = nxt[end - 1] = -1             # -1: the word ends here
        freq += [f] * len(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]       # id -> bytes
    ranks = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < 256 + n_merges:
        if not heap:
            raise UserError(f"the training text is too small for vocab_size {vocab_size}: it ran out of "
                            f"pairs to merge after {len(vocab) - 256} merges")
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg:           # stale heap entry: the count changed since
            continue
        a, b = pair
        joined = vocab[a] + vocab[b]
        # Different pairs can spell the same bytes ("ab"+"c", "a"+"bc"): reuse that token.
        new = ranks.get(joined)
        if new is None:
            new = len(vocab)
            vocab.append(joined)
            ranks[joined] = new
        changed = {pair}
        for i in sorted(where.pop(pair)):          # left to right: in "a a a" the first two join
            j = nxt[i]
            if tok[i] != a or j == -1 or tok[j] != b:  # stale: an earlier merge took a or b
                continue
            f, x, y = freq[i], prv[i], nxt[j]
            pair_count[pair] -= f
            if x != -1:                            # (x, a) becomes (x, new)
                gone, made = (tok[x], a), (tok[x], new)
                pair_count[gone] -= f
                pair_count[made] += f
                where[made].add(x)
                changed.update((gone, made))
            if y != -1:                            # (b, y) becomes (new, y)
                gone, made = (b, tok[y]), (new, tok[y])
                pair_count[gone] -= f
                pair_count[made] += f
                where[made].add(i)
                changed.update((gone, made))
                prv[y] = i
            tok[i], tok[j], nxt[i] = new, -1, y
        for p in changed:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_count[p]
        if verbose and (len(vocab) - 256) % 500 == 0:
            print(f"merge {len(vocab) - 256}/{n_merges}: {joined!r} (count {-neg})")
    return ranks


def save_tokenizer_json(d: dict, path, indent=None) -> Path:
    """Write a tokenizer's JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: name the tokenizer file to write (e.g. {path / 'tokenizer.json'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False, indent=indent)
    os.replace(tmp, path)
    return path


# -- the tokenizer -------------------------------------------------------------------------------
def _read_gpt2_files(encoder_json, vocab_bpe):
    """(encoder.json as read, merges as [(where, "a b")]) of OpenAI's / Hugging Face's files."""
    for p in (encoder_json, vocab_bpe):
        if not os.path.isfile(p):
            raise UserError(f"GPT-2 tokenizer file not found: {p}")
    try:
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{encoder_json}: not valid JSON ({e.msg} at line {e.lineno})") from None
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # the first line is a "#version" header
    return encoder, [(f"{vocab_bpe}:{n}", ln) for n, ln in enumerate(lines[1:], start=2) if ln]


def _added_tokens(tokens, path) -> dict:
    """{spelling: id} of Hugging Face added tokens ({"id", "content", "special", "lstrip", ...}),
    refusing the ones this encoder cannot reproduce: Hugging Face cuts a non-special added token
    out of any text (ours would be disallowed special text), and lstrip/rstrip/single_word
    change what surrounds it."""
    out = {}
    for t in tokens:
        content, i = t.get("content"), t.get("id")
        if not isinstance(content, str) or not isinstance(i, int):
            raise UserError(f"{path}: an added token needs a string content and an integer id, got {t!r}")
        if not t.get("special", True):
            raise UserError(f"{path}: added token {content!r} is not special; tritongpt's encoder has no such tokens")
        for option in ("lstrip", "rstrip", "single_word"):
            if t.get(option):
                raise UserError(f"{path}: added token {content!r} sets {option}; tritongpt's encoder would give "
                                "other ids")
        out[content] = i
    return out


def _tokenizers_json_bpe(path):
    """(vocab, merges as [(where, pair)], added tokens {spelling: id}) of the tokenizers library's
    tokenizer.json, if it is a byte-level BPE this encoder reproduces (GPT-2's pre-tokenizer)."""
    d = read_json_object(path)
    model, pre, post = d.get("model"), d.get("pre_tokenizer") or {}, d.get("post_processor") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise UserError(f"{path}: not a byte-level BPE tokenizer (model.type BPE with vocab and merges)")
    if not isinstance(pre, dict) or not isinstance(post, dict):
        raise UserError(f"{path}: pre_tokenizer and post_processor must be JSON objects")
    gpt2_pre = (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True)) == ("ByteLevel", False, True)
    adds = post.get("type") not in (None, "ByteLevel", "TemplateProcessing") or any(
        isinstance(piece, dict) and "SpecialToken" in piece for piece in post.get("single") or [])
    for differs, what in ((d.get("normalizer"), "a normalizer"),
                          (not gpt2_pre, "not GPT-2's pre-tokenizer (ByteLevel with its regex, no prefix space)"),
                          (adds, "a post-processor that adds tokens"),
                          (any(model.get(k) for k in ("dropout", "ignore_merges", "byte_fallback")),
                           "BPE options (dropout, ignore_merges, byte_fallback)")):
        if differs:
            raise UserError(f"{path} has {what}: tritongpt's encoder would give other ids")
    added = _added_tokens([t for t in d.get("added_tokens") or [] if isinstance(t, dict)], path)
    merges = [(f"{path} model.merges[{i}]", m) for i, m in enumerate(model["merges"])]
    return model["vocab"], merges, added


class TokenizerChecks:
    """The input checks both tokenizers share (BPETokenizer, hf_tokenizer.HFTokenizer): text spelling a
    special token, text that is no Unicode, ids that are no tokens. Needs .special_tokens,
    ._special_pat (their alternation, or None), .vocab_size and .name."""

    def _checked_ids(self, ids) -> list:
        """ids (a list, tensor or array) as Python ints, each a token id."""
        if hasattr(ids, "tolist"):                  # a tensor or numpy array: Python numbers at once
            ids = ids.tolist()
        try:                                        # int() made 2.7 token 2 and "5" token 5
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise UserError(f"token ids must be integers ({e})") from None
        n = self.vocab_size
        if ids and not 0 <= min(ids) <= max(ids) < n:
            bad = next(i for i in ids if not 0 <= i < n)
            raise UserError(f"token id {bad} is out of range for tokenizer {self.name!r} (vocab size {n})")
        return ids

    def _allowed(self, allowed_special) -> set:
        """allowed_special -> the set of special tokens to encode as their ids.

        "none_raise" (default): none, and text spelling one is an error; "none": none, their
        spellings are ordinary text; "all"; or a set of names.
        """
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special in ("none_raise", None):
            return set()
        if allowed_special == "none":               # encode special spellings as ordinary text
            return set()
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise UserError(f"unknown special token(s) {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        return allowed

    @staticmethod
    def _check_unicode(text: str):
        """A lone surrogate (from a broken JSON escape such as "\\ud83d") has no UTF-8 bytes: the
        fast path would turn it into U+FFFD and the reference path fail, so both refuse it."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the text holds invalid Unicode at character {e.start} ({text[e.start]!r}, a lone "
                            "surrogate: a broken JSON escape, or bytes that are not UTF-8 in a "
                            "command-line argument)") from None

    def _check_special(self, text: str, allowed: set, allowed_special):
        if allowed_special == "none" or not self._special_pat:
            return
        for m in self._special_pat.finditer(text):
            if m.group() not in allowed:
                raise DisallowedSpecialToken(
                    f"text contains the disallowed special token {m.group()!r} at character {m.start()}; "
                    f"pass allowed_special='all' (or {{{m.group()!r}}}) to encode it as one special token", m.group())


class BPETokenizer(TokenizerChecks):
    """Byte-level BPE: `ranks` maps token bytes to ids 0..n-1; special tokens follow.

    encode (tiktoken) and encode_reference (plain Python) give the same ids, save on code points
    that Unicode has not assigned yet (the two regex engines may class them differently);
    decode inverts both.
    """
    chat_template = None  # GPT-2 has no chat template: chats are rendered in tritongpt's (formats.py)
    chat_templates = None  # (nor named ones: hf_tokenizer.HFTokenizer's)

    def without_chat_template(self) -> "BPETokenizer":
        return self

    def __init__(self, ranks: dict, special_tokens=None, pat_str: str = GPT2_PAT, name: str = "bpe",
                 info: dict = None, encoding=None):
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise UserError(f"tokenizer {name!r}: token ids must be 0..{n - 1} without gaps")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise UserError(f"tokenizer {name!r}: byte-level BPE needs all 256 single bytes as tokens")
        if special_tokens is None:
            special_tokens = {EOT: n}
        if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
            raise UserError(f"tokenizer {name!r}: special token ids must follow the {n} ordinary tokens")
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens)
        self.pat_str = pat_str
        self.name = name
        self.info = dict(info or {})                 # free-form provenance (e.g. corpus hash)
        self._pat = compile_pattern(pat_str, name)
        self._special_pat = _alternation(self.special_tokens) if self.special_tokens else None
        self._prefix_pairs = [(a, b) for a in self.special_tokens for b in self.special_tokens
                              if a != b and b.startswith(a)]  # usually none (see _nested)
        self._id_to_bytes = [b""] * self.vocab_size
        for tok, i in self.ranks.items():
            self._id_to_bytes[i] = tok
        for s, i in self.special_tokens.items():
            self._id_to_bytes[i] = s.encode("utf-8")
        self._enc = encoding
        self._hash = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def train(cls, text, vocab_size: int, special_tokens=(EOT,), pat_str: str = GPT2_PAT,
              name: str = "bpe", verbose: bool = False) -> "BPETokenizer":
        """Learn merges on `text` until there are `vocab_size` ids; specials take the last ids.
        `text`: a str, or an iterable of documents read one at a time (train_ranks)."""
        ranks = train_ranks(text, vocab_size, special_tokens, pat_str, verbose)
        specials = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, specials, pat_str, name=name)

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, specials=(EOT,), name: str = "gpt2") -> "BPETokenizer":
        """OpenAI's GPT-2 files: encoder.json (token spelling -> id) and vocab.bpe (the merges);
        Hugging Face names them vocab.json and merges.txt. `specials`: the entries of
        encoder.json that are special tokens, not byte spellings.

        The ids come from encoder.json; vocab.bpe is checked against them: merge i must create
        token 256 + i from two existing tokens, which is what makes id == rank.
        """
        encoder, merges = _read_gpt2_files(encoder_json, vocab_bpe)
        return cls._from_encoder_and_merges(encoder, merges, specials, str(encoder_json), str(vocab_bpe), name)

    @classmethod
    def _from_encoder_and_merges(cls, encoder, merges, specials, encoder_where, merges_where, name):
        """encoder: spelling -> id; merges: [(where, "a b")] in rank order."""
        if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
            raise UserError(f"{encoder_where}: expected a JSON object mapping token spellings to ids")
        # A named token among the byte and merge ids (below 256 + merges) is an ordinary one that a config names,
        # as a classifier's pad token may be (`export` of a reward model names the lowest ordinary token): the
        # specials are the tokens after them.
        specials = {s: i for s, i in encoder.items() if s in specials and i >= 256 + len(merges)}
        ranks = {str_to_token(s, encoder_where): i for s, i in encoder.items() if s not in specials}
        for i, (where, line) in enumerate(merges):
            parts = line.split(" ") if isinstance(line, str) else line
            if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
                raise UserError(f"{where}: expected two tokens separated by a space, got {line!r}")
            a, b = (str_to_token(p, merges_where) for p in parts)
            if a not in ranks or b not in ranks or ranks.get(a + b) != 256 + i:
                raise UserError(f"{where}: merge {line!r} does not match {encoder_where}")
        if len(merges) + 256 != len(ranks):
            raise UserError(f"{merges_where} has {len(merges)} merges but {encoder_where} has {len(ranks)} tokens "
                            f"(expected 256 + merges)")
        return cls(ranks, specials, GPT2_PAT, name=name)

    @classmethod
    def from_hf_folder(cls, folder) -> "BPETokenizer":
        """A Hugging Face GPT-2 tokenizer folder: the tokenizers library's tokenizer.json (what
        transformers' save_pretrained writes), else vocab.json and merges.txt (as save_hf writes).
        Tokens that are no merge (<|endoftext|>, a pad token...) are named by tokenizer_config.json / special_tokens_map.json, and added with their ids by
        added_tokens.json, tokenizer_config's added_tokens_decoder or tokenizer.json. Whatever
        would give other ids than this encoder's is refused: a prefix space, an added BOS/EOS, a
        normalizer, an added token that strips spaces or is not special."""
        folder = Path(folder)
        named, added = [EOT], {}  # added: spelling -> id, beyond vocab.json
        foreign = None  # (template, file) of a chat template to note as unused, once this encoder reads the folder
        for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            path = folder / name
            if not path.is_file():
                continue
            d = read_json_object(path)
            if name == "added_tokens.json":
                added.update(d)
                continue
            for option in ("add_prefix_space", "add_bos_token", "add_eos_token"):
                if d.get(option):
                    raise UserError(f"{path} sets {option}: tritongpt's encoder does not, so its ids would differ")
            for key in ("additional_special_tokens", "extra_special_tokens"):
                value = d.get(key) or []
                if not isinstance(value, (str, list, dict)):  # (list() of a number: a TypeError naming no file)
                    raise UserError(f"{path}: {key} must be a token, a list of tokens or an object of them, got "
                                    f"{type(value).__name__} {value!r}")
                named += [value] if isinstance(value, str) else list(
                    value.values() if isinstance(value, dict) else value)
            tokens = {k: token_name(d.get(k), path, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            # this encoder's EOS is <|endoftext|> (eot_id): another would end texts and answers on a token the
            # model does not (with a tokenizer.json, from_hf_folder reads it through the tokenizers library instead)
            if tokens["eos_token"] not in (None, EOT):
                raise UserError(f"{path}: eos_token {tokens['eos_token']!r} is not {EOT}, the end of text of "
                                "tritongpt's GPT-2 encoder")
            named += list(tokens.values())
            if name == "tokenizer_config.json":  # (checked as the tokenizers-library path checks it; GPT-2's
                from tritongpt.train.chat_template import template_from_config  # chats are in tritongpt's format)

                # the folder's chat_template.jinja first, as transformers reads it: its save_pretrained (5's) writes
                # the template there, not into tokenizer_config.json
                jinja = path.parent / "chat_template.jinja"
                try:
                    template = template_from_config(d, str(path), path.parent)
                except UserError as e:
                    raise TokenizerConfigError(str(e)) from None
                foreign = (template, jinja if jinja.is_file() else path)
            decoder = d.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                # JSON keys: the ids as decimal strings (isdecimal: "²" is a digit, and no int())
                bad = [i for i in decoder if not i.strip().isdecimal()]
                if bad:
                    raise UserError(f"{path}: added_tokens_decoder's keys must be token ids, got {bad[0]!r}")
                tokens = [dict(t, id=int(i)) for i, t in decoder.items() if isinstance(t, dict)]
                added.update(_added_tokens(tokens, path))
        # tokenizer.json first, as transformers reads it: beside vocab.json it is the newer
        # serialization (transformers 5 keeps tokens added since only there)
        hf_json = folder / RUN_TOKENIZER
        if hf_json.is_file() and (not is_ours(hf_json) or not (folder / "vocab.json").is_file()):
            encoder, merges, more = _tokenizers_json_bpe(hf_json)
            added.update(more)
            where = (str(hf_json),) * 2
        else:
            encoder, merges = _read_gpt2_files(folder / "vocab.json", folder / "merges.txt")
            where = (str(folder / "vocab.json"), str(folder / "merges.txt"))
        encoder = {**encoder, **added} if isinstance(encoder, dict) else encoder  # (a non-object is named below)
        specials = [t.get("content") if isinstance(t, dict) else t for t in named + list(added)]
        tok = cls._from_encoder_and_merges(encoder, merges, [t for t in specials if isinstance(t, str)],
                                           *where, folder.name)
        # said only now: a folder this encoder refuses (other ids, another EOS) is read by HFTokenizer, which does
        # render its template, so the note would be untrue there
        if foreign is not None:
            _note_foreign_template(*foreign)
        return tok

    @classmethod
    def from_tiktoken(cls, enc, name: str = None) -> "BPETokenizer":
        """Wrap an existing tiktoken.Encoding (e.g. tiktoken.get_encoding("gpt2"))."""
        return cls(enc._mergeable_ranks, enc._special_tokens, enc._pat_str, name=name or enc.name, encoding=enc)

    # -- sizes and identity --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_tokens:
            raise UserError(f"tokenizer {self.name!r} has no {EOT} token")
        return self.special_tokens[EOT]

    @property
    def hash(self) -> str:
        """sha256 of what decides the ids (regex, tokens, specials): equal hash, equal encoding."""
        if self._hash is None:
            self._hash = self._hash_with(_SAME_PATTERN.get(self.pat_str, self.pat_str))
        return self._hash

    def _hash_with(self, pat_str: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"pat_str": pat_str, "special_tokens": sorted(self.special_tokens.items())}).encode())
        for tok in self._id_to_bytes[:len(self.ranks)]:
            h.update(len(tok).to_bytes(4, "little") + tok)
        return h.hexdigest()

    def __repr__(self):
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    # -- encoding: reference (plain Python) ----------------------------------------------------
    def _bpe(self, piece: bytes) -> list:
        """Merge one pre-tokenised word, lowest rank first (tiktoken's formulation of BPE)."""
        ranks = self.ranks
        if piece in ranks:                          # a whole-word token, as tiktoken does
            return [ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [ranks[p] for p in parts]

    def encode_ordinary_reference(self, text: str) -> list:
        ids = []
        for word in self._pat.findall(text):
            ids.extend(self._bpe(word.encode("utf-8")))
        return ids

    def encode_reference(self, text: str, allowed_special="none_raise") -> list:
        """The from-scratch encoder: regex split, then `_bpe` on each word's bytes."""
        allowed = self._allowed(allowed_special)
        self._check_unicode(text)
        self._check_special(text, allowed, allowed_special)
        if not allowed:
            return self.encode_ordinary_reference(text)
        return self._encode_split(text, allowed, self.encode_ordinary_reference)

    # -- encoding: fast path (tiktoken) --------------------------------------------------------
    @property
    def encoding(self):
        """The same ranks as a tiktoken.Encoding (built on first use)."""
        if self._enc is None:
            import tiktoken

            self._enc = tiktoken.Encoding(name=f"tritongpt-{self.name}-{self.hash[:12]}", pat_str=self.pat_str,
                                          mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        return self._enc

    def encode(self, text: str, allowed_special="none_raise") -> list:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        self._check_unicode(text)
        self._check_special(text, allowed, allowed_special)
        if self._nested(allowed):
            return self._encode_split(text, allowed, self.encoding.encode_ordinary)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts, allowed_special="none_raise", num_threads: int = 4) -> list:
        texts = list(texts)                         # checked, then encoded: a generator would be spent
        allowed = self._allowed(allowed_special)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects strs, got {type(t).__name__}")
            self._check_unicode(t)
            self._check_special(t, allowed, allowed_special)
        if self._nested(allowed):
            return [self._encode_split(t, allowed, self.encoding.encode_ordinary) for t in texts]
        return self.encoding.encode_batch(texts, num_threads=num_threads, allowed_special=allowed,
                                          disallowed_special=())

    def _nested(self, allowed) -> bool:
        """Is one allowed special token a prefix of another? tiktoken then matches whichever its
        hash map lists first, so `encode` splits the text itself, longest first, as
        encode_reference and Hugging Face's tokenizers do."""
        return any(a in allowed and b in allowed for a, b in self._prefix_pairs)

    def _encode_split(self, text: str, allowed: set, encode_ordinary) -> list:
        """The allowed special tokens (longest first) as their ids, the text between them by encode_ordinary."""
        ids = []
        for i, chunk in enumerate(_alternation(allowed).split(text)):
            if i % 2:                               # odd chunks are the separators themselves
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(encode_ordinary(chunk))
        return ids

    # -- decoding ------------------------------------------------------------------------------
    def decode_bytes(self, ids) -> bytes:
        table = self._id_to_bytes
        return b"".join([table[i] for i in self._checked_ids(ids)])

    def stream_decoder(self) -> "BytesSoFar":
        """What generate's --stream prints: the text each new id adds (see BytesSoFar)."""
        return BytesSoFar(self)

    def decode(self, ids) -> str:
        """ids -> text. Bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        """A token's bytes in GPT-2's printable spelling (for looking at the vocabulary)."""
        return token_to_str(self._id_to_bytes[i])

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "name": self.name, "pat_str": self.pat_str,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens, "info": self.info,
                "hash": self.hash,
                # id -> token, spelled like GPT-2's encoder.json ("Ġthe" is " the")
                "tokens": [token_to_str(t) for t in self._id_to_bytes[:len(self.ranks)]]}

    def save(self, path):
        return save_tokenizer_json(self.to_dict(), path, indent=0)

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a tokenizer JSON file ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{path}: not a tritongpt tokenizer file (expected format {FORMAT!r})")
        for key, kind in (("pat_str", str), ("tokens", list), ("special_tokens", dict)):
            if key not in d:
                raise UserError(f"{path}: missing field {key!r}")
            if not isinstance(d[key], kind):
                raise UserError(f"{path}: field {key!r} must be a JSON {_JSON_KIND[kind]}, "
                                f"got {type(d[key]).__name__}")
        if not all(isinstance(t, str) for t in d["tokens"]):
            raise UserError(f"{path}: field 'tokens' must hold strings only")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in d["special_tokens"].items()):
            raise UserError(f"{path}: field 'special_tokens' must map strings to ids")
        ranks = {str_to_token(s, str(path)): i for i, s in enumerate(d["tokens"])}
        if len(ranks) != len(d["tokens"]):
            raise UserError(f"{path}: the same token appears twice in 'tokens'")
        tok = cls(ranks, d["special_tokens"], d["pat_str"], name=d.get("name", path.stem), info=d.get("info"))
        # files written before the two GPT-2 spellings shared one hash recorded the spelling's own
        if d.get("hash") not in (None, tok.hash) and d["hash"] != tok._hash_with(tok.pat_str):
            raise UserError(f"{path}: content does not match its recorded hash (file edited or damaged)")
        return tok

    # -- Hugging Face's GPT-2 tokenizer files -------------------------------------------------------
    def merges(self) -> list:
        """The merge list a merges.txt holds, as (a, b) byte pairs, in rank order: token t of
        rank r is the pair BPE reaches on t's bytes with the merges below r, which is how
        tiktoken's ranks and GPT-2's merges describe the same encoder."""
        out = []
        for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(tok) < 2:
                continue
            parts = [bytes([b]) for b in tok]
            while len(parts) > 2:
                pairs = [(self.ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
                best, i = min(pairs)
                if best >= rank:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            if len(parts) != 2 or max(self.ranks[p] for p in parts) >= rank:
                raise UserError(f"tokenizer {self.name!r}: token {token_to_str(tok)!r} (id {rank}) is not one "
                                "merge of two earlier tokens, so it has no merges.txt spelling")
            out.append((parts[0], parts[1]))
        return out

    def hf_files(self, model_max_length: int | None = None, chat_template: str | None = None,
                 chat_templates: dict | None = None) -> dict:
        """{file name: text} of vocab.json, merges.txt and tokenizer_config.json as Hugging Face's
        GPT-2 tokenizer reads them (transformers.AutoTokenizer.from_pretrained on the folder): the same ids for the same text. Its pre-tokenizer regex is
        GPT-2's, so only a tokenizer with that pattern has them (UserError otherwise, before any
        file is written). chat_template: Jinja for apply_chat_template (formats.HF_CHAT_TEMPLATE);
        chat_templates: named others, written beside it (hf_chat_template_field)."""
        if _SAME_PATTERN.get(self.pat_str, self.pat_str) != GPT2_PAT:
            raise UserError(f"tokenizer {self.name!r} splits text with another pattern than GPT-2's; Hugging "
                            "Face's GPT-2 tokenizer would give other ids")
        vocab = {token_to_str(t): i for t, i in self.ranks.items()}
        vocab.update(self.special_tokens)
        merges = [f"{token_to_str(a)} {token_to_str(b)}" for a, b in self.merges()]
        eot = EOT if EOT in self.special_tokens else None
        others = [s for s in self.special_tokens if s != EOT]
        # the class named: a folder without config.json (a peft adapter's) says which tokenizer it holds
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": eot,
                  "eos_token": eot, "unk_token": eot, "additional_special_tokens": others,
                  "model_max_length": model_max_length or 1_000_000_000_000}
        if chat_template is not None:
            from tritongpt.train.chat_template import hf_chat_template_field

            config["chat_template"] = hf_chat_template_field(chat_template, chat_templates)
        return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
                "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

    def save_hf(self, out_dir, model_max_length: int | None = None) -> list:
        """Write hf_files() into out_dir; returns the paths written."""
        files = self.hf_files(model_max_length)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        return [out / name for name in files]


class BytesSoFar:
    """Streams a BPETokenizer's text: token bytes through an incremental UTF-8 decoder, so a
    character split across tokens is handed out whole, once its last byte arrives, and the text
    handed out is what decoding all the ids at once gives. (hf_tokenizer.TextSoFar: the same for
    tokens that are no bytes of their own.)"""

    def __init__(self, tok: BPETokenizer):
        import codecs

        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, ids) -> str:
        return self.decoder.decode(self.tok.decode_bytes(ids))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


_JSON_KIND = {str: "string", list: "list", dict: "object"}


# -- named tokenizers ------------------------------------------------------------------------------
RUN_TOKENIZER = "tokenizer.json"  # a run folder's tokenizer, read back by every later stage
# ours again in `tritongpt export`'s folder, where tokenizer.json would be read by Hugging Face
EXPORT_TOKENIZER = "tritongpt_tokenizer.json"
# SentencePiece's model: the tokenizer of a Hugging Face folder saved without tokenizer.json (older
# Llama and Mistral conversions, T5-style folders), which transformers converts (hf_tokenizer.py)
SPM_MODEL = "tokenizer.model"


def save_run_tokenizer(tok, out_dir):
    """Write tok as out_dir/tokenizer.json, where sft/reward/rlhf/dpo --init and generate find it."""
    if not hasattr(tok, "save"):
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / RUN_TOKENIZER)
    return out / RUN_TOKENIZER


def same_ids(a, b) -> bool:
    """Do tokenizers a and b give the same ids for every text? A Hugging Face tokenizer compares what decides a
    text's ids (ids_hash: one tokenizer.json beside another tokenizer_config.json's EOS counts as the same), ours
    its whole hash. (rlhf's reward model, merge's models and generate's draft must share the policy's ids.)"""
    return getattr(a, "ids_hash", a.hash) == getattr(b, "ids_hash", b.hash)


def saved_tokenizer_path(init):
    """The tokenizer.json saved by the run that wrote the checkpoint `init` (a file, checkpoint
    folder or run folder), or None."""
    p = Path(init).expanduser() if init else None
    if p is None or not p.exists():
        return None
    if p.is_file() and p.suffix == ".gguf":  # llama.cpp's file holds its tokenizer (get_tokenizer rebuilds it)
        return p
    base = p if p.is_dir() else p.parent
    # nearest first: the weights' own folder (ours, then Hugging Face's files: a Hub snapshot,
    # or `tritongpt export`'s folder), then the run folder above a checkpoint
    for ours in (base / RUN_TOKENIZER, base / EXPORT_TOKENIZER):
        if ours.is_file() and is_ours(ours):
            if ours.name == EXPORT_TOKENIZER and is_hf_tokenizer_folder(base) and _hf_changed_since_export(base, ours):
                return base
            return ours
    if is_hf_tokenizer_folder(base):
        return base
    run = base.parent / RUN_TOKENIZER
    return run if run.is_file() and is_ours(run) else None


def _hf_changed_since_export(folder: Path, ours: Path) -> bool:
    """`tritongpt export` writes the Hugging Face files and ours from one tokenizer. If they now
    differ, transformers saved the folder since (tokens added, say), and its files are the ones
    the weights go with: ours would encode the added tokens as plain bytes."""
    try:
        theirs = from_hf_folder(folder)
    except UserError as e:
        raise UserError(f"{folder} holds {ours.name} and Hugging Face tokenizer files that tritongpt cannot "
                        f"read ({e}): remove one of them, or pass --tokenizer") from None
    if theirs.hash == load_tokenizer(ours).hash:
        return False
    note(f"{folder}'s Hugging Face tokenizer files ({theirs.vocab_size} tokens) differ from {ours.name} "
         f"(written by tritongpt export): using the Hugging Face files, saved since")
    return True


def is_hf_tokenizer_folder(path) -> bool:
    """A folder holding Hugging Face's tokenizer files: GPT-2's vocab.json and merges.txt, the
    tokenizers library's tokenizer.json (not ours, which shares the name), or SentencePiece's tokenizer.model."""
    p = Path(path)
    if not p.is_dir():
        return False
    return ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()) or \
        ((p / RUN_TOKENIZER).is_file() and not is_ours(p / RUN_TOKENIZER)) or is_sentencepiece_folder(p)


def is_sentencepiece_folder(path) -> bool:
    """A Hugging Face folder whose tokenizer is only SentencePiece's tokenizer.model: no tokenizer.json
    (transformers reads that one first), nor GPT-2's vocab.json and merges.txt."""
    p = Path(path)
    return (p / SPM_MODEL).is_file() and not (p / RUN_TOKENIZER).is_file() and \
        not ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())


def is_ours(path) -> bool:
    """Not Hugging Face's tokenizer.json (which sits beside model.safetensors in a Hub snapshot):
    JSON without our format is skipped; ours, or a file that does not parse, is taken (a damaged
    one is then reported by load rather than silently replaced by another tokenizer)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return True  # unreadable: let BPETokenizer.load say what is wrong with it
    return isinstance(d, dict) and d.get("format") in (FORMAT, HF_FORMAT)


def load_tokenizer(path):
    """Our saved tokenizer JSON: a BPETokenizer, or an HFTokenizer (format HF_FORMAT: a Hugging Face
    tokenizer.json kept with its EOS, for a run started from such a folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None  # BPETokenizer.load says what is wrong with it
    if fmt == HF_FORMAT:
        from tritongpt.train.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    return BPETokenizer.load(path)


_NOTED = set()


def _note_foreign_template(template, path):
    """Say once per file (path: tokenizer_config.json, or the chat_template.jinja it was read from) that a GPT-2
    folder's chat template is not tritongpt's format (formats.HF_CHAT_TEMPLATE, as
    export writes it) and goes unused: transformers' apply_chat_template would render the folder's, and this tokenizer
    renders every chat (chat, serve, sft) in tritongpt's. Said rather than rendered: BPETokenizer keeps no template
    (its run file has none, and a run's chat data is in tritongpt's format), so the two would part at the next load."""
    from tritongpt.train.formats import HF_CHAT_TEMPLATE

    key = ("chat_template", str(Path(path).resolve()))
    # (stripped: ours opens with "{%-" and closes with "-%}", which strip the whitespace around it when rendered, so a
    # copy with a newline after it, as an editor saves a chat_template.jinja, renders the same)
    ours = (HF_CHAT_TEMPLATE.strip(), ("{{- bos_token -}}" + HF_CHAT_TEMPLATE).strip())
    if template is None or template.strip() in ours or key in _NOTED:
        return
    _NOTED.add(key)
    note(f"{path}: its chat_template is not tritongpt's chat format and is not used: a GPT-2 tokenizer renders chats "
         "in tritongpt's (transformers' apply_chat_template would render the file's)")


def from_hf_folder(folder):
    """A Hugging Face tokenizer folder as BPETokenizer when it reproduces the ids (GPT-2's files),
    else through the tokenizers library (HFTokenizer: SentencePiece-converted Llamas, byte-level BPEs
    with other pre-tokenizers; a bare tokenizer.model converted by transformers); which one is said
    once per folder."""
    folder = Path(folder)
    if is_sentencepiece_folder(folder):
        from tritongpt.train.hf_tokenizer import HFTokenizer

        tok = HFTokenizer.from_hf_folder(folder)
        if str(folder.resolve()) not in _NOTED:
            _NOTED.add(str(folder.resolve()))
            note(f"{folder / SPM_MODEL} (no tokenizer.json beside it) is converted by {tok.info['converted_by']} "
                 f"and read by Hugging Face's tokenizers library ({tok.vocab_size} tokens, EOS {tok.eos_token!r})")
        return tok
    try:
        return BPETokenizer.from_hf_folder(folder)
    except TokenizerConfigError:
        raise
    except UserError as e:
        hf_json = folder / RUN_TOKENIZER
        if not hf_json.is_file() or is_ours(hf_json):
            raise
        why = e
    from tritongpt.train.hf_tokenizer import HFTokenizer

    try:
        tok = HFTokenizer.from_hf_folder(folder)
    except UserError as e:
        raise UserError(f"{e}; nor does tritongpt's BPE read it: {why}") from None
    if str(folder.resolve()) not in _NOTED:
        _NOTED.add(str(folder.resolve()))
        reason = str(why).removeprefix(f"{hf_json} ").removesuffix(": tritongpt's encoder would give other ids")
        note(f"{hf_json} is read by Hugging Face's tokenizers library ({tok.vocab_size} tokens, EOS "
             f"{tok.eos_token!r}): tritongpt's BPE would give other ids ({reason})")
    return tok


def eot_or_none(tok):
    """The id that ends a text (our <|endoftext|>, a Hugging Face folder's EOS), or None."""
    try:
        return tok.eot_id
    except UserError:
        return None


def default_cache_dir(override=None) -> Path:
    """Where derived files live: `override`, else $TRITONGPT_CACHE, else ~/.cache/tritongpt."""
    return Path(override or os.environ.get("TRITONGPT_CACHE") or Path.home() / ".cache" / "tritongpt")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached_tokenizer(path, text: str, vocab_size: int, name: str, verbose: bool = False) -> BPETokenizer:
    """Load the tokenizer at `path` if it was trained on this exact text and size, else train and save."""
    path, h = Path(path), text_hash(text)
    if path.is_file():
        try:
            tok = BPETokenizer.load(path)
            if tok.info.get("corpus_hash") == h and tok.vocab_size == vocab_size:
                return tok
        except UserError:
            pass                                    # a damaged cache file is simply rebuilt
    if verbose:
        print(f"training the {name!r} tokenizer (vocab {vocab_size}) -> {path}")
    tok = BPETokenizer.train(text, vocab_size, name=name)
    tok.info.update(corpus_hash=h, corpus_chars=len(text))
    try:
        tok.save(path)
    except OSError as e:                            # read-only home: still usable, just not cached
        print(f"warning: could not cache the tokenizer at {path}: {e}")
    return tok


_DEFAULT = {}


def default_tokenizer(cache_dir=None, vocab_size: int = DEFAULT_VOCAB_SIZE, verbose: bool = False) -> BPETokenizer:
    """BPE with `vocab_size` ids trained on the embedded corpus (Python's pydoc topics).

    Trained once (a few seconds) and cached as JSON; retrained when the corpus changes (a
    different Python version ships different docs).
    """
    from tritongpt.train.data import load_text

    path = default_cache_dir(cache_dir) / f"bpe-pydoc-{vocab_size}.json"
    key = (str(path), vocab_size)
    if key not in _DEFAULT:
        _DEFAULT[key] = cached_tokenizer(path, load_text("pydoc"), vocab_size, name="default", verbose=verbose)
    return _DEFAULT[key]


def gpt2_tokenizer() -> BPETokenizer:
    """tiktoken's "gpt2" encoding (downloaded once by tiktoken, then cached by it)."""
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0]
        msg = f"{type(e).__name__}: {msg[:80]}..." if len(msg) > 80 else f"{type(e).__name__}: {msg}"
        raise UserError(f"could not download the GPT-2 tokenizer files ({msg}); "
                        f"offline, pass a folder holding OpenAI's encoder.json and vocab.bpe instead "
                        f"(e.g. --tokenizer path/to/gpt2/)") from None
    return BPETokenizer.from_tiktoken(enc, name="gpt2")


def get_tokenizer(spec="default"):
    """"default" | "gpt2" | a saved tokenizer JSON | a run folder (its tokenizer.json) | a folder
    with encoder.json + vocab.bpe (OpenAI's) or vocab.json + merges.txt or tokenizer.json (Hugging
    Face's: an HFTokenizer where BPETokenizer would give other ids) or tokenizer.model (SentencePiece's,
    converted by transformers to an HFTokenizer) | a .gguf file (its metadata's tokenizer: gguf_import.py)."""
    if isinstance(spec, TokenizerChecks):  # a tokenizer already (BPETokenizer, HFTokenizer)
        return spec
    spec = "default" if spec is None else str(spec)
    if spec == "default":
        return default_tokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    p = Path(spec).expanduser()
    if p.is_dir():
        enc, bpe = p / "encoder.json", p / "vocab.bpe"
        if enc.is_file() and bpe.is_file():
            return BPETokenizer.from_gpt2_files(enc, bpe)
        saved = saved_tokenizer_path(p)  # a run folder or one of its checkpoints
        if saved is None:
            raise UserError(f"tokenizer folder {p} must hold our {RUN_TOKENIZER} (a run folder), "
                            "GPT-2's encoder.json and vocab.bpe, or Hugging Face's vocab.json and merges.txt or "
                            f"tokenizer.json or {SPM_MODEL}")
        return from_hf_folder(saved) if saved.is_dir() else load_tokenizer(saved)
    if p.is_file():
        if p.name == RUN_TOKENIZER and not is_ours(p):
            # transformers' own tokenizer.json: its special tokens are named beside it, so read
            # the folder, as a folder given by name is read
            return from_hf_folder(p.parent)
        if p.name == SPM_MODEL:  # SentencePiece's: likewise its folder, which names its special tokens
            return from_hf_folder(p.parent)
        if p.suffix == ".gguf":  # llama.cpp's model file, whose metadata holds the tokenizer
            from tritongpt.train.gguf_import import gguf_tokenizer

            return gguf_tokenizer(p)
        return load_tokenizer(p)
    raise UserError(f"unknown tokenizer {spec!r} (no such file or folder): use 'default', 'gpt2', a tokenizer "
                    f".json file, or a folder (a run's; encoder.json and vocab.bpe; Hugging Face's tokenizer files)")


# -- command line: `tritongpt bpe train|encode|decode` -----------------------------------------------
def cmd_train(args):
    import time

    from tritongpt.train.data import CorpusStats, check_text_field, empty_corpus_error, iter_documents

    check_text_field(args.input, args.text_field)
    out, source = Path(args.out), Path(args.input)
    # the corpus is read before the tokenizer is written, so --out naming it ran, and replaced the corpus with the
    # tokenizer's JSON
    if out.is_file() and source.is_file() and out.samefile(source):
        raise UserError(f"--out {args.out} is the --input corpus: writing the tokenizer there would replace it; "
                        "name another file")
    stats = CorpusStats()

    def documents():
        """The corpus one document at a time, named as it passes (the hash and length of the
        documents joined with <|endoftext|>, as when the whole text was read first)."""
        for doc in iter_documents(args.input, text_field=args.text_field):
            stats.add(doc)
            yield doc
        if stats.blank:
            raise empty_corpus_error(args.input)

    t0 = time.perf_counter()
    tok = BPETokenizer.train(documents(), args.vocab_size, name=Path(args.out).stem, verbose=args.verbose)
    chars = stats.chars + len(EOT) * (stats.documents - 1)  # the joined text's length
    tok.info.update(corpus_hash=stats.joined_hash, corpus_chars=chars, source=str(args.input))
    tok.save(args.out)
    print(f"trained {tok.vocab_size} tokens on {chars:,} characters in {time.perf_counter() - t0:.1f}s "
          f"-> {args.out}")
    return 0


def cmd_encode(args):
    tok = get_tokenizer(args.tokenizer)
    # a file: its own bytes as text (not load_text, which reads a corpus)
    text = args.text if args.text is not None else read_text_file(args.file)
    try:
        ids = tok.encode(text, allowed_special="all" if args.allow_special else "none_raise")
    except DisallowedSpecialToken as e:
        raise UserError(f"the text contains {e.token}: pass --allow-special to encode it as the special token") from None
    print(" ".join(map(str, ids)))
    return 0


def cmd_decode(args):
    print(get_tokenizer(args.tokenizer).decode(args.ids))
    return 0


def add_cli(sub):
    p = sub.add_parser("bpe", help=command_help("bpe"))
    bsub = p.add_subparsers(dest="bpe_command", metavar="ACTION", required=True)

    t = bsub.add_parser("train", help="learn BPE merges on a corpus and save them as JSON")
    t.add_argument("--input", default="pydoc",
                   help="pydoc (built-in corpus) | stdlib | a text file | a folder of .txt | a .jsonl (default %(default)s)")
    t.add_argument("--text-field", default="text", help="field holding the text in a .jsonl (default %(default)s)")
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="ids incl. <|endoftext|> (default %(default)s)")
    t.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    t.add_argument("--verbose", action="store_true", help="print progress every 500 merges")
    t.set_defaults(func=cmd_train)

    e = bsub.add_parser("encode", help="print the token ids of some text")
    e.add_argument("--tokenizer", default="default", help=TOKENIZER_CHOICES)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to encode")
    src.add_argument("--file", help="read the text from this file")
    e.add_argument("--allow-special", action="store_true", help=f"encode {EOT} in the text as the special token")
    e.set_defaults(func=cmd_encode)

    d = bsub.add_parser("decode", help="print the text of some token ids")
    d.add_argument("--tokenizer", default="default", help=TOKENIZER_CHOICES)
    d.add_argument("--ids", type=int, nargs="+", required=True, help="token ids, separated by spaces")
    d.set_defaults(func=cmd_decode)
