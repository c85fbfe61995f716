"""Pretraining data: read a corpus, tokenise it once into a memmapped file, sample batches.
Documents are read one at a time, so a corpus need not fit in memory (only its largest document).

nanoGPT's recipe: the whole corpus becomes one flat array of token ids on disk (uint16 while
the vocabulary fits, else uint32), documents separated by <|endoftext|>; the last
`val_fraction` of it is the validation split. A batch is `batch_size` random windows of
`block_size + 1` tokens: x is the window minus its last token, y minus its first, so
y[t] is the token that follows x[..t]. A tokenizer whose own pipeline starts every text with a BOS
(Gemma's, Llama 2's and 3's) gets it before each document too: "BOS doc1 EOS BOS doc2 ...".

Sources (`iter_documents`, `load_documents`, `load_text`):
  None / "pydoc"  Python's own reference docs (pydoc_data.topics, ~465 KB of English),
                  shipped with every CPython: a corpus that needs no download.
  "stdlib"        the standard library's .py files, whole, in sorted walk order until STDLIB_MAX_BYTES
                  characters are read.
  a path          a text file, a folder of .txt files, or a .jsonl or .parquet file with a text field
                  (a .parquet: the Hugging Face Hub's datasets, FineWeb's shards; read a batch of rows
                  at a time), or a folder of .parquet files (of one split) read in name order.
  a .bin file     token ids already made: uint16, no header, as nanoGPT's prepare.py writes its
                  train.bin (GPT-2 ids: pass the gpt2 tokenizer). It is read in place, as one
                  flat array like the rest (its last val_fraction is the validation split)
                  (`prepare_tokens` only).
  a nanoGPT folder one holding train.bin: that file, with its val.bin beside it as the validation
                  split when there is one (`prepare_tokens` only; to a tokenizer trainer it is
                  still a folder of .txt files).
  token shards    a .npy of uint16 ids (build-nanogpt's fineweb.py writes them), or an llm.c .bin
                  (a 1024-byte header: magic 20240520, version 1, the count; then uint16 ids), alone
                  or a folder of them: the shards with "val" (or "valid", "validation") as a word of
                  their names are the validation split, the others training, in name order, read in
                  place as one array (ShardedTokens; `prepare_tokens` only).
Documents: each .py file, each .jsonl record or .parquet row, each .txt file, and within a .txt file the parts
between literal <|endoftext|> markers, wherever on a line they stand (how GPT-2-style text dumps
mark them). In a .jsonl record or a .py file that spelling is text, tokenised as ordinary
characters, never as the separator.
"""
import codecs
import errno
import hashlib
import itertools
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tritongpt.errors import UserError, note

EOT = "<|endoftext|>"
STDLIB_MAX_BYTES = 8 * 2**20
READ_CHARS = 2**22  # a text file is read in pieces of this many characters (bytes when raw)
META_FORMAT = "tritongpt-tokens"


# -- reading a corpus ------------------------------------------------------------------------
def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib_read(max_bytes: int = None):
    """The stdlib corpus's files and their text, (path, text), as _stdlib_docs reads them (files_read names them)."""
    max_bytes = STDLIB_MAX_BYTES if max_bytes is None else max_bytes
    skip = {"site-packages", "dist-packages", "__pycache__"}
    total = 0
    # Walk in sorted order, pruning installed packages, and stop at the cap (no full scan).
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, name)
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):  # a few test fixtures are deliberately not UTF-8
                continue
            yield path, text
            total += len(text)
            if total >= max_bytes:
                return


def _stdlib_docs(max_bytes: int = None) -> list:
    return [text for _, text in _stdlib_read(max_bytes)]


def _first_bad_byte(path: Path) -> int:
    """Where a file stops being UTF-8, counted in the file's bytes (a text-mode reader's error
    counts from the start of its own buffer)."""
    dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while raw := f.read(READ_CHARS):
            pending = dec.getstate()[0]
            try:
                dec.decode(raw)
            except UnicodeDecodeError as e:
                return offset - len(pending) + e.start
            offset += len(raw)
    # the file ended part-way through a letter (the reader's "unexpected end of data"): that
    # letter's first byte, not the file's length (a byte past its end)
    return offset - len(dec.getstate()[0])


def _split_eot(path: Path):
    """The documents of a text file, one at a time: its parts between <|endoftext|> markers.

    The file is read in pieces, so it need not fit in memory (one document must). The last
    len(EOT) - 1 characters of a piece are held back until the next one arrives: a marker can
    straddle two pieces. As Path.read_text: universal newlines, and a UTF-8 byte-order mark
    (Windows editors write one) is not part of the text.
    """
    k = len(EOT) - 1
    pieces, carry = [], ""
    try:
        with open(path, encoding="utf-8-sig") as f:
            while chunk := f.read(READ_CHARS):
                *done, last = (carry + chunk).split(EOT)
                for part in done:
                    pieces.append(part)
                    yield "".join(pieces)
                    pieces = []
                pieces.append(last[:-k] if len(last) > k else "")
                carry = last[-k:] if len(last) > k else last
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {_first_bad_byte(path)}: {e.reason})") from None
    pieces.append(carry)
    yield "".join(pieces)


def _jsonl_docs(path: Path, text_field: str):
    """The text field of each record, one at a time."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict) or text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise UserError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                                    "name the right one with --text-field")
                if not isinstance(row[text_field], str):
                    raise UserError(f"{path}:{lineno}: field {text_field!r} is a "
                                    f"{type(row[text_field]).__name__}, expected a string")
                try:
                    row[text_field].encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate: a JSON escape like "\ud83d" alone
                    raise UserError(f"{path}:{lineno}: field {text_field!r} holds invalid Unicode at character "
                                    f"{e.start} (a lone surrogate)") from None
                yield row[text_field]
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


def _parquet_docs(path: Path, text_field: str):
    """The text column of each row of a .parquet file, a batch of rows at a time."""
    from tritongpt.train.parquet import parquet_texts

    for row, value in parquet_texts(path, text_field):
        if not isinstance(value, str):
            what = "null" if value is None else f"a {type(value).__name__}"
            raise UserError(f"{path}: row {row}: column {text_field!r} is {what}, expected a string")
        yield value


class _Names:
    """A file by its own name in its resolved folder, a string (a link to a folder's file names the file, a/../b and b
    are one), and the names a link's chain passes through: one resolve a folder, not a file (resolving each path
    cost 0.8 s of 1.6 s for a folder of 20,000 files, listing it 0.7 s), and strings, not Paths (a Path's parent and
    hash cost 0.5 s there, os.path 0.1 s)."""

    def __init__(self):
        self.parents = {}

    def own(self, p) -> str:
        folder, name = os.path.split(os.fspath(p))
        if folder not in self.parents:
            self.parents[folder] = os.path.realpath(folder or ".")
        return os.path.join(self.parents[folder], name)

    def hops(self, p) -> list:
        """Each name a link's chain reaches, in order (b -> a -> a Hub blob: a, then the blob); [] for a file."""
        p, seen, out = os.fspath(p), set(), []
        while os.path.islink(p) and p not in seen:  # (a loop ends where it comes back: it is refused where it is read)
            seen.add(p)
            p = self.own(os.path.join(os.path.dirname(p), os.readlink(p)))
            out.append(p)
        return out


def _once(files: list) -> list:
    """Files in their order, less a link to another of them: rglob lists a folder's link to one of its own files as a
    file of its own (iterdir a token shard's link), so that file was read twice as one source, drawn from twice as
    often, never said. Only such a link is dropped: two names of one stored file where neither names the other are
    two files, each read, as `datasets` reads them (a Hub snapshot's shards, links into its blobs/, share one blob
    where their bytes are equal: distinct shards, distinct rows; hard links, as dedup tools make of equal files)."""
    if not any(p.is_symlink() for p in files):
        return files
    names = _Names()
    listed = {names.own(p) for p in files}
    return [p for p in files if not listed.intersection(names.hops(p))]


def _refuse_broken_link(p: Path) -> None:
    """A link to nothing among a folder's data files is named, not skipped as no file (its data silently gone). A
    loop of links (a -> b -> a) is one too: exists() is false there, but its target is no missing file to restore."""
    if not p.is_symlink():
        return
    try:
        os.stat(p)
    except OSError as e:
        why = "a loop of links: it never reaches a file" if e.errno == errno.ELOOP else "its target does not exist"
        raise UserError(f"{p}: a broken link ({why})") from None


def _files_of(folder: Path, pattern: str) -> list:
    files = []
    for p in sorted(folder.rglob(pattern)):
        _refuse_broken_link(p)
        if p.is_file():  # not a folder that happens to be named *.txt
            files.append(p)
    return files


# words of a file name that say it holds an evaluation split (a Hub dataset's data/test-00000-of-00001.parquet)
_HELD_OUT_WORDS = {"test", "validation", "valid", "val", "dev", "eval"}


def parquet_shards(folder: Path) -> list:
    """A folder's .parquet files (a Hub dataset's shards), in name order, all of one split: a folder that mixes
    held-out shards (test-*, validation-*) with training ones is refused by name. Text (_txt_files) and records
    (sft.read_json_records) read a folder through this."""
    parquet = _files_of(folder, "*.parquet")
    held = [p for p in parquet if _HELD_OUT_WORDS & set(re.split(r"[^a-z]+", p.stem.lower()))]
    if held and len(held) < len(parquet):
        raise UserError(f"folder {folder} mixes splits: {held[0].name} is held-out data beside "
                        f"{next(p for p in parquet if p not in held).name}; pass the training files alone (a "
                        "folder of them, or one file)")
    return _once(parquet)  # (after the splits are judged by every name: a test-* link to a train-* shard mixes them)


def _txt_files(folder: Path) -> list:
    """A text folder's files: its .txt files, or else its .parquet files (a Hub dataset's shards, FineWeb's), in
    name order, all of one split."""
    files = _once(_files_of(folder, "*.txt"))
    parquet = parquet_shards(folder)
    if files and parquet:
        raise UserError(f"folder {folder} holds both .txt and .parquet files: pass a folder of one kind, or a file")
    files = files or parquet
    if not files:
        ids = " (its train.bin holds token ids: pretrain and eval read the folder as --data)" \
            if _is_token_folder(folder) else ""
        raise UserError(f"folder {folder} has no .txt or .parquet files{ids}")
    return files


def named_corpus(source) -> bool:
    """Whether a --data is one of the built-in corpora (none given: pydoc), not a path: Path('') would be the
    working directory."""
    return source in (None, "", "pydoc", "stdlib")


def check_text_field(source, text_field):
    """A text field other than the default names a .jsonl field (a .parquet column): on any other source it
    would be ignored and the whole file read as text, so it is refused (before any slow work). The default field
    reads nothing; a named corpus is no path (Path('') would be the working directory, walked whole)."""
    if text_field in (None, "text"):
        return
    path = None if named_corpus(source) else Path(str(source)).expanduser()
    parquet = path is not None and (path.suffix == ".parquet" or path.is_dir() and any(path.rglob("*.parquet")))
    if (path is None or path.suffix != ".jsonl") and not parquet:
        raise UserError(f"--text-field applies to .jsonl data (one JSON object per line) and .parquet columns; "
                        f"{_describe(source or None)} is read as plain text")


def _describe(source) -> str:
    return {None: "the pydoc corpus", "pydoc": "the pydoc corpus", "stdlib": "the standard library"}.get(
        source, str(Path(str(source)).expanduser()))


def _is_token_file(path: Path) -> bool:
    """A .bin or .npy source holds token ids (`_token_file`), not text."""
    return path.suffix in (".bin", ".npy") and path.is_file()


def _is_token_folder(path: Path) -> bool:
    """A folder as nanoGPT's prepare.py leaves it: train.bin (and val.bin, meta.pkl, input.txt)."""
    return path.is_dir() and _is_token_file(path / "train.bin")


def _shard_files(path: Path) -> list:
    """The token shards of a folder (build-nanogpt's .npy, llm.c's .bin), in name order; [] for
    any other folder."""
    if not path.is_dir() or _is_token_folder(path):
        return []
    names = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".npy"))
    for p in names:  # (is_file() is false for a broken link: that shard was silently left out of the data)
        _refuse_broken_link(p)
    return [p for p in names if _is_token_file(p)]


def reads_in_stdlib(read: dict | None) -> bool:
    """Whether a source's files (files_read's names, or a name a link of them passes through) lie in the standard
    library's folder: only such a source can read a file of the stdlib corpus, whose files are known only by reading
    it up to its cap (the cap counts characters, not bytes), so that read is spent only where it can find one."""
    if not read:
        return False
    root = os.path.join(os.path.realpath(sysconfig.get_paths()["stdlib"]), "")  # (each corpus file's name starts so)
    return any(name.startswith(root) for name in read) or \
        any(hop.startswith(root) for _, hops in read.values() for hop in hops)


def files_read(source) -> dict | None:
    """The files prepare_tokens reads for a source, {name: (path, hops)}: a nanoGPT folder's train.bin and val.bin, a
    folder's token shards (not its subfolders), a text folder's .txt or .parquet files (links among them too), the
    file itself, or the stdlib corpus's .py files. Keyed by each file's own name (_Names.own), hops the names its
    link chain passes through: one file is read twice where a name is read by two sources, or one's link passes
    through a name the other reads (a link and its target); two names whose chains only meet beyond them (two Hub
    snapshot files linked to one blob, two hard links of one file) are two files, each read, as `datasets` reads
    them. None for the pydoc corpus (no file), or a source the reading will refuse (it is named there)."""
    try:
        if source == "stdlib":
            files = [p for p, _ in _stdlib_read()]
        elif named_corpus(source):
            return None
        else:
            path = Path(str(source)).expanduser()
            if _is_token_folder(path):
                files = [p for p in (path / "train.bin", path / "val.bin") if p.is_file()]
            elif path.is_dir():
                files = _shard_files(path) or _txt_files(path)
            else:
                files = [path] if path.is_file() else []
        names = _Names()
        read = {names.own(p): (p, frozenset(names.hops(p))) for p in files}
    except (UserError, OSError):  # (OSError: a file gone since it was listed)
        return None
    return read or None


def iter_documents(source=None, text_field: str = "text"):
    """The corpus's documents one at a time (see the module docstring for what one is): a
    corpus need not fit in memory. A missing or unreadable source is named before the first."""
    if source is None or source == "pydoc":
        yield _pydoc_text()
        return
    if source == "stdlib":
        yield from _stdlib_docs()
        return
    path = Path(source).expanduser()
    if _is_token_file(path) or _shard_files(path) and not any(path.rglob("*.txt")):
        kind = "nanoGPT's .bin" if path.suffix == ".bin" else "token shards" if path.is_dir() else "a .npy"
        raise UserError(f"{path} holds token ids ({kind}), not text: pretrain and eval read it as --data; a "
                        "tokenizer is trained on text")
    if path.is_dir():
        for p in _txt_files(path):
            yield from _parquet_docs(p, text_field) if p.suffix == ".parquet" else _split_eot(p)
    elif path.is_file():
        readers = {".jsonl": _jsonl_docs, ".parquet": _parquet_docs}
        yield from readers[path.suffix](path, text_field) if path.suffix in readers else _split_eot(path)
    else:
        raise UserError(f"data source not found: {source} (use 'pydoc', 'stdlib', a text file, "
                        f"a folder of .txt files, a .jsonl or a .parquet file)")


def empty_corpus_error(source) -> UserError:
    """What a corpus with no text but whitespace is told (load_documents, prepare_tokens, bpe train)."""
    return UserError(f"{_describe(source)}: the corpus is empty")


def load_documents(source=None, text_field: str = "text") -> list:
    """The corpus as a list of documents (iter_documents, held in memory)."""
    docs = list(iter_documents(source, text_field))
    if not any(d.strip() for d in docs):
        raise empty_corpus_error(source)
    return docs


def load_text(source=None, text_field: str = "text") -> str:
    """The corpus as one string, its documents joined with <|endoftext|>, held in memory (a small
    corpus, such as the pydoc one the default tokenizer learns from; bpe train and prepare_tokens
    read theirs a document at a time)."""
    return EOT.join(load_documents(source, text_field))


class CorpusStats:
    """What names a corpus, gathered one document at a time: source_hash tells where documents
    end (["a<|endoftext|>b"] and ["a", "b"] are other corpora); joined_hash is the hash of the
    documents joined with <|endoftext|> (how a source was named before that)."""

    def __init__(self, docs=()):
        self._docs, self._joined = hashlib.sha256(), hashlib.sha256()
        self.documents = self.chars = 0
        self.blank = True
        for d in docs:
            self.add(d)

    def add(self, doc: str):
        b = doc.encode("utf-8")
        self._docs.update(len(b).to_bytes(8, "little"))
        self._docs.update(b)
        self._joined.update(EOT.encode() + b if self.documents else b)
        self.documents += 1
        self.chars += len(doc)
        self.blank = self.blank and not doc.strip()

    @property
    def source_hash(self):
        return self._docs.hexdigest()

    @property
    def joined_hash(self):
        return self._joined.hexdigest()


def documents_hash(docs) -> str:
    """Names the documents exactly (CorpusStats.source_hash of them)."""
    return CorpusStats(docs).source_hash


# -- tokenising once, to a memmap ----------------------------------------------------------------
@dataclass
class TokenData:
    train: np.ndarray       # memmap views: nothing is read until a batch touches it
    val: np.ndarray
    meta: dict
    path: Path
    tokens: np.ndarray = None  # all of them, train then val (the same memmap); None: two files

    def head(self, n: int = None) -> np.ndarray:
        """The first n tokens (None: all) of train then val; copied only where they are two files."""
        if self.tokens is not None:
            return self.tokens[:n]
        if n is not None and n <= len(self.train):
            return self.train[:n]
        return np.concatenate([self.train, self.val[:None if n is None else n - len(self.train)]])


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def document_bos(tokenizer) -> int | None:
    """The BOS every document of a token file starts with: the tokenizer's prepended_bos_id (Gemma's,
    Llama 2's and 3's own pipelines start every text with it, and the model saw it there), None for
    tokenizers that prepend nothing (GPT-2's BPE, Qwen's)."""
    return getattr(tokenizer, "prepended_bos_id", None)


def _meta_matches(meta: dict, want: dict, bin_path: Path) -> bool:
    # bos_id: HFTokenizer.hash leaves the post-processor out (it decides no text's ids), so the hash
    # alone would take a file written without BOS for a tokenizer that prepends one; caches from
    # before bos_id was recorded have none, as a GPT-2 tokenizer's file still has none
    keys = ("format", "source_hash", "tokenizer_hash", "vocab_size", "dtype", "bos_id")
    if any(meta.get(k) != want[k] for k in keys):
        return False
    n = meta.get("n_tokens")
    return (isinstance(n, int) and bin_path.is_file()
            and bin_path.stat().st_size == n * np.dtype(meta["dtype"]).itemsize)


def _write_tokens(docs, tokenizer, bin_path: Path, dtype) -> int:
    """Tokenise document by document, appending to a temporary file; returns the token count.
    Documents are separated by EOS; where the tokenizer prepends a BOS each one starts with it too
    ("BOS doc1 EOS BOS doc2 ...": transformers' tokenizer(doc) + EOS, one after the other)."""
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    bos = document_bos(tokenizer)
    lead = np.array([] if bos is None else [bos], dtype=dtype)
    tmp = bin_path.with_name(f".{bin_path.name}.{os.getpid()}.tmp")
    n = 0
    docs, first = iter(docs), True
    with open(tmp, "wb") as f:
        while group := list(itertools.islice(docs, 256)):
            # Everything between separators is ordinary text: a stray special spelling is not a token.
            for ids in tokenizer.encode_batch(group, allowed_special="none"):
                if not first:
                    f.write(eot.tobytes())
                    n += 1
                f.write(lead.tobytes())
                n += len(lead)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
                first = False
    os.replace(tmp, bin_path)
    return n


LLMC_MAGIC, LLMC_HEADER_BYTES = 20240520, 1024  # llm.c's token shards: 256 int32, then the uint16 ids


def _open_ids(path: Path) -> np.ndarray:
    """A file of uint16 token ids, memmapped where it lies: a .npy (build-nanogpt's shards), an
    llm.c .bin (its header says so: magic, version 1, the count), or a bare .bin (nanoGPT's)."""
    size = path.stat().st_size
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npy array of token ids ({e})") from None
        if tokens.ndim != 1 or tokens.dtype != np.uint16 or not len(tokens):
            raise UserError(f"{path}: a .npy of token ids must be a non-empty 1-D uint16 array (as build-nanogpt's "
                            f"fineweb.py writes), got {tokens.dtype} of shape {tokens.shape}")
        return tokens
    header = np.fromfile(path, dtype="<i4", count=3) if size >= LLMC_HEADER_BYTES else None
    if header is not None and header[0] == LLMC_MAGIC:
        version, n = int(header[1]), int(header[2])
        if version != 1 or n < 1 or size != LLMC_HEADER_BYTES + 2 * n:
            raise UserError(f"{path}: an llm.c token shard (magic {LLMC_MAGIC}) whose header says version {version} "
                            f"and {n} tokens, but a version 1 file of {n} tokens is {LLMC_HEADER_BYTES + 2 * n} bytes, "
                            f"not {size}")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES, shape=(n,))
    if size == 0 or size % 2:
        raise UserError(f"{path}: {size} bytes is not a whole, non-zero number of uint16 token ids "
                        "(the .bin format nanoGPT's prepare.py writes)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _ids_record(path: Path) -> Path:
    """Where the hash and largest id of a token file are kept, by its resolved path."""
    from tritongpt.train.tokenizer import default_cache_dir

    return default_cache_dir() / "ids" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"


def _hash_ids(path: Path, tokens) -> tuple:
    """(sha256 of the ids, the largest id) of a token file. One pass in 64 MB pieces, kept beside
    the file's size, modification time and sampled bytes (`quick_stat`): while those stand, a later
    start (every rank of it) takes the record instead of reading the file again, as text corpora
    are taken. The pass runs at ~1 GB/s here: FineWeb-Edu 10B's 20 GB of shards, ~20 s a start."""
    stat, record = quick_stat(path.resolve()), _ids_record(path)
    saved = _read_meta(record)
    if (saved and _same_file(saved.get("stat"), stat) and isinstance(saved.get("sha256"), str)
            and isinstance(saved.get("max_id"), int)):
        if saved["stat"] != stat:  # a record from before the sample: kept, now with it
            _write_record(record, dict(saved, stat=stat))
        return saved["sha256"], saved["max_id"]
    h, top = hashlib.sha256(), 0
    for s in range(0, len(tokens), 2**25):
        piece = np.ascontiguousarray(tokens[s:s + 2**25])
        h.update(piece)
        top = max(top, int(piece.max()))
    _write_record(record, {"stat": stat, "sha256": h.hexdigest(), "max_id": top})
    return h.hexdigest(), top


def _write_record(record: Path, value: dict):
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache costs the next start one more pass, nothing else


def _read_ids(path: Path, tokenizer):
    """A file of uint16 ids (_open_ids), memmapped, and the hash of its ids (so a resume or eval
    knows its data). Its largest id is checked too: an id the tokenizer lacks would be an
    out-of-range embedding row several steps later, so the file is refused now."""
    if tokenizer.vocab_size > 2**16:
        raise UserError(f"{path} holds uint16 ids; the {tokenizer.name} tokenizer's {tokenizer.vocab_size} ids "
                        "do not fit in them")
    tokens = _open_ids(path)
    digest, top = _hash_ids(path, tokens)
    if top >= tokenizer.vocab_size:
        raise UserError(f"{path}: token id {top} is past the {tokenizer.name} tokenizer's {tokenizer.vocab_size} "
                        "ids (pass the tokenizer that wrote the file: --tokenizer gpt2 for nanoGPT's)")
    return tokens, digest


def _ids_meta(path: Path, tokenizer, source_hash: str, n: int, split: int, val_fraction) -> dict:
    return {"format": "uint16-ids", "source": str(path), "source_hash": source_hash, "n_tokens": n,
            "tokenizer_hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size, "dtype": "uint16",
            "split": split, "val_fraction": val_fraction}


def _token_file(path: Path, tokenizer, val_fraction: float) -> TokenData:
    """A .bin read in place, as one flat array: its last val_fraction is the validation split."""
    tokens, source_hash = _read_ids(path, tokenizer)
    if path.name == "train.bin" and (path.parent / "val.bin").is_file():
        note(f"{path.parent / 'val.bin'} is not read: the validation split is {path.name}'s tail (pass the "
             f"folder {path.parent} to validate on val.bin)")
    n = len(tokens)
    split = n - int(round(n * val_fraction))
    return TokenData(train=tokens[:split], val=tokens[split:], path=path, tokens=tokens,
                     meta=_ids_meta(path, tokenizer, source_hash, n, split, val_fraction))


class ShardedTokens:
    """Token shards read as one flat array, each memmapped where it lies: len(), a[i:j] (a view,
    no copy), a[idx] for an integer array idx (get_batch's windows, which may cross a shard's end),
    and np.asarray(a) / a.astype(t) (a copy)."""

    def __init__(self, shards: list, start: int = 0, stop: int | None = None):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.start = start
        self.stop = int(self.offsets[-1]) if stop is None else stop
        self.dtype = shards[0].dtype

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            begin, end, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ShardedTokens slices step 1 only")
            return ShardedTokens(self.shards, self.start + begin, self.start + max(begin, end))
        pos = np.asarray(key)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        pos = pos + self.start
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        out = np.empty(pos.shape, self.dtype)
        for k in np.unique(which):
            here = which == k
            out[here] = self.shards[k][pos[here] - self.offsets[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        pieces = [s[max(self.start - b, 0):min(self.stop - b, len(s))]
                  for s, b in zip(self.shards, self.offsets) if b < self.stop and b + len(s) > self.start]
        out = np.concatenate(pieces) if pieces else np.empty(0, self.dtype)
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype):
        return np.asarray(self).astype(dtype)


def _joined(arrays: list):
    return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)


def _shard_folder(folder: Path, files: list, tokenizer, val_fraction) -> TokenData:
    """A folder of token shards: those with "val" (or "valid", "validation") as a word of their
    names are the validation split (build-nanogpt's edufineweb_val_000000.npy, llm.c's
    fineweb_val_000000.bin), the rest train, each in name order; with no val shard, the last
    val_fraction of them all is held out."""
    import re

    # a word, in any case: not the "val" of "interval"; "validation" too (a HF-style split name)
    is_val = [bool(re.search(r"(^|[^a-z])val(id|idation)?($|[^a-z])", p.stem.lower())) for p in files]
    # a link to another shard dropped within its split, not across: a val shard linking a train shard is the
    # validation split the folder names (dropped, that split would silently become the training tail)
    train_files = _once([p for p, v in zip(files, is_val) if not v])
    val_files = _once([p for p, v in zip(files, is_val) if v])
    kept = set(train_files + val_files)
    files = [p for p in files if p in kept]
    if not train_files:
        raise UserError(f"{folder}: every token shard is a validation one ({', '.join(p.name for p in val_files)}): "
                        "no training shard")
    if val_files and val_fraction is not None:
        raise UserError(f"{folder} has its own validation shards ({', '.join(p.name for p in val_files[:3])}): "
                        "--val-fraction does not apply (leave it out)")
    if any(folder.glob("*.txt")):
        note(f"{folder}: reading its token shards; its .txt files are not read")
    read = {p: _read_ids(p, tokenizer) for p in files}
    # by stem and ids: the same shards as .npy or as llm.c .bin are the same data
    source_hash = hashlib.sha256(" ".join(f"{p.stem} {read[p][1]}" for p in files).encode()).hexdigest()
    train = _joined([read[p][0] for p in train_files])
    if val_files:
        val = _joined([read[p][0] for p in val_files])
        meta = _ids_meta(folder, tokenizer, source_hash, len(train) + len(val), len(train), None)
        return TokenData(train=train, val=val, meta=meta, path=folder)
    n = len(train)
    split = n - int(round(n * (0.1 if val_fraction is None else val_fraction)))
    meta = _ids_meta(folder, tokenizer, source_hash, n, split, val_fraction)
    return TokenData(train=train[:split], val=train[split:], meta=meta, path=folder, tokens=train)


def _nanogpt_vocab(meta_pkl: Path):
    """vocab_size from nanoGPT's meta.pkl (its character-level datasets write one), unpickled
    without running code: plain dicts, strings and numbers only."""
    import pickle

    class PlainData(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"it names {module}.{name}")

    try:
        with open(meta_pkl, "rb") as f:
            meta = PlainData(f).load()
    except Exception as e:  # cut short, not a pickle, or naming a class: each a file this cannot read
        raise UserError(f"{meta_pkl}: not nanoGPT's meta.pkl, a pickle of plain data ({e})") from None
    return meta.get("vocab_size") if isinstance(meta, dict) else None


def _token_folder(folder: Path, tokenizer, val_fraction) -> TokenData:
    """nanoGPT's data folder: train.bin, and val.bin as the validation split when it is there."""
    vocab = _nanogpt_vocab(folder / "meta.pkl") if (folder / "meta.pkl").is_file() else None
    if vocab is not None and vocab != tokenizer.vocab_size:
        raise UserError(f"{folder / 'meta.pkl'}: the ids are a vocabulary of {vocab} (nanoGPT's character-level "
                        f"data); the {tokenizer.name} tokenizer has {tokenizer.vocab_size} and could not decode them: "
                        "tokenise the text itself (e.g. its input.txt) instead")
    if any(folder.glob("*.txt")):
        note(f"{folder}: reading its token ids (train.bin); its .txt files are not read")
    _refuse_broken_link(folder / "val.bin")  # (not is_file(): the training tail silently held out in its place)
    if not (folder / "val.bin").is_file():
        return _token_file(folder / "train.bin", tokenizer, 0.1 if val_fraction is None else val_fraction)
    if val_fraction is not None:
        raise UserError(f"{folder} has its own validation split (val.bin): --val-fraction does not apply "
                        f"(leave it out, or pass {folder / 'train.bin'} alone to hold out its tail)")
    train, train_hash = _read_ids(folder / "train.bin", tokenizer)
    val, val_hash = _read_ids(folder / "val.bin", tokenizer)
    source_hash = hashlib.sha256(f"train.bin {train_hash} val.bin {val_hash}".encode()).hexdigest()
    meta = _ids_meta(folder, tokenizer, source_hash, len(train) + len(val), len(train), None)
    return TokenData(train=train, val=val, meta=meta, path=folder)


def _source_stat(src: dict):
    """A text source as it stands on disk: each file's `quick_stat` (and the .jsonl field read).
    While they are unchanged the text is taken as unchanged, as rsync's quick check and make take
    it, so a start need not read and hash a large corpus again (once per process under DDP). None
    for the built-in corpora, or a source iter_documents will refuse."""
    name = src.get("source")
    if name in (None, "pydoc", "stdlib"):
        return None
    path = Path(name).expanduser().resolve()
    files = _txt_files(path) if path.is_dir() else [path] if path.is_file() else None
    if files is None:
        return None
    return {"text_field": src.get("text_field", "text"), "files": [quick_stat(f) for f in files]}


# quick_stat reads at most 64 KiB of a file, whatever its size: a corpus of files just under 1 MiB read whole would
# cost a start ~75 % of reading the text (r181), what the quick check is there to avoid
SAMPLE_BLOCK, SAMPLE_BLOCKS = 2**12, 16


def _sample_hash(path: Path, size: int) -> str:
    """blake2b of SAMPLE_BLOCKS blocks of a file spread evenly from its first to its last (the whole
    file when it is no larger): the same for a copy (rsync -a, cp -p, a bucket mount), whatever its
    inode and change time, so such a copy is not read again."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
            h.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek((size - SAMPLE_BLOCK) * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def quick_stat(path: Path) -> list:
    """A file as the caches take it to be unchanged: [path, size, modification time] (rsync's quick
    check) and a hash of a sample of its bytes (`_sample_hash`). An edit that keeps the size and puts
    the time back (`touch -r`, `cp -p` of an edited copy, a checkout within the same second) is seen
    where it touches a sampled block; one elsewhere in a file over 64 KiB is not."""
    st = path.stat()  # before the sample: a file changed after it has another time next start
    return [str(path), st.st_size, st.st_mtime_ns, _sample_hash(path, st.st_size)]


def _same_file(saved, now: list) -> bool:
    """A recorded quick_stat is the file's now: all of it, or, for a record written before the
    sample was kept ([path, size, time]), those three (its cache is reused, not rebuilt)."""
    return isinstance(saved, list) and (saved == now or len(saved) == 3 and saved == now[:3])


def _same_source(saved, now: dict) -> bool:
    """A recorded _source_stat is the source's now (_same_file for each of its files)."""
    return (isinstance(saved, dict) and saved.get("text_field") == now["text_field"]
            and isinstance(saved.get("files"), list) and len(saved["files"]) == len(now["files"])
            and all(_same_file(s, f) for s, f in zip(saved["files"], now["files"])))


def _read_meta(meta_path: Path):
    """A cache's tokens.json, or None when it is missing or no JSON object (then it is rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _tokenizer_key(want: dict) -> str:
    """The tokenizer's part of a default cache folder's name: its hash, and the BOS where it prepends one
    (the same tokenizer.json with and without a BOS-prepending post-processor keep their own files)."""
    return want["tokenizer_hash"][:16] + ("" if want["bos_id"] is None else f"-bos{want['bos_id']}")


def _cache_by_stat(cache_dir, want: dict, stat: dict):
    """The cache made from the source as it stands now (`_source_stat`), found without reading the
    source: (folder, meta), or None. cache_dir=None looks in the tritongpt cache's folders for
    this tokenizer."""
    if cache_dir is not None:
        folders = [Path(cache_dir)]
    else:
        from tritongpt.train.tokenizer import default_cache_dir

        folders = sorted((default_cache_dir() / "tokens").glob(f"*-{_tokenizer_key(want)}"))
    for folder in folders:
        meta = _read_meta(folder / "tokens.json")
        if meta and _same_source(meta.get("source_stat"), stat) and _meta_matches(
                meta, dict(want, source_hash=meta.get("source_hash")), folder / "tokens.bin"):
            return folder, meta
    return None


def _tokenise(src: dict, tokenizer, cache_dir, want: dict, verbose: bool):
    """Name the source by hash, then (when the cache does not match) tokenise it: two passes over
    the source, one document at a time, so a corpus larger than memory can be prepared."""
    stats = CorpusStats(iter_documents(**src))
    if stats.blank:
        raise empty_corpus_error(src["source"])
    want = dict(want, source_hash=stats.source_hash)
    if cache_dir is None:
        from tritongpt.train.tokenizer import default_cache_dir

        cache_dir = default_cache_dir() / "tokens" / f"{want['source_hash'][:16]}-{_tokenizer_key(want)}"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = cache_dir / "tokens.bin", cache_dir / "tokens.json"
    meta = _read_meta(meta_path)
    if meta is None or not _meta_matches(meta, want, bin_path):
        if verbose:
            print(f"tokenising {src['source'] or 'pydoc'} with {tokenizer.name} -> {bin_path}")
        meta_path.unlink(missing_ok=True)           # no meta while the .bin is being rewritten
        n = _write_tokens(iter_documents(**src), tokenizer, bin_path, np.dtype(want["dtype"]))
        # joined_hash: how the source was named before documents were hashed apart (the text
        # joined with <|endoftext|>), so that a resume of an older checkpoint knows its data
        meta = dict(want, n_tokens=n, source=str(src["source"] or "pydoc"), tokenizer=tokenizer.name,
                    eot_id=tokenizer.eot_id, chars=stats.chars, documents=stats.documents,
                    joined_hash=stats.joined_hash)
    return cache_dir, meta


def prepare_tokens(source, tokenizer, cache_dir=None, val_fraction: float | None = None,
                   verbose: bool = False) -> TokenData:
    """Tokenise `source` into cache_dir/tokens.bin (+ tokens.json meta) unless a matching copy exists.

    The cache is reused only when the source text, the tokenizer and the file size all match
    what the meta file records; anything else is rebuilt. cache_dir=None picks a folder under
    the tritongpt cache named by those hashes. A source file or folder whose files' sizes, times
    and sampled bytes are those the meta records is not read again (`_source_stat`). A .bin source or a
    nanoGPT folder is token ids already: no cache. val_fraction: the held-out tail (None: 0.1, or
    a nanoGPT folder's val.bin).
    """
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    name = source.get("source") if isinstance(source, dict) else source
    path = None if name in (None, "pydoc", "stdlib") else Path(name).expanduser()
    if path is not None and _is_token_folder(path):
        return _token_folder(path, tokenizer, val_fraction)
    if path is not None and _shard_files(path):
        return _shard_folder(path, _shard_files(path), tokenizer, val_fraction)
    val_fraction = 0.1 if val_fraction is None else val_fraction
    if path is not None and _is_token_file(path):
        return _token_file(path, tokenizer, val_fraction)
    src = source if isinstance(source, dict) else {"source": source}
    dtype = token_dtype(tokenizer.vocab_size)
    want = {"format": META_FORMAT, "tokenizer_hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "bos_id": document_bos(tokenizer)}
    stat = _source_stat(src)  # before any read: a file changed while it is read is read again next time
    found = _cache_by_stat(cache_dir, want, stat) if stat else None
    cache_dir, meta = found or _tokenise(src, tokenizer, cache_dir, want, verbose)
    meta_path = cache_dir / "tokens.json"
    n = meta["n_tokens"]
    split = n - int(round(n * val_fraction))
    if (meta.get("split"), meta.get("val_fraction"), meta.get("source_stat")) != (split, val_fraction, stat) \
            or not meta_path.is_file():
        # only the record of the source on disk is new (a cache keyed before the sample was kept, say): a cache that
        # cannot be written (a shared one, mounted read-only) is reused as it is, as it was before the sample, and
        # the record is kept at a start that can write it
        refresh = meta_path.is_file() and (meta.get("split"), meta.get("val_fraction")) == (split, val_fraction)
        meta.update(split=split, val_fraction=val_fraction, source_stat=stat)
        tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)
        except OSError:
            if not refresh:
                raise
    if n == 0:
        raise UserError(f"{source}: tokenised to zero tokens")
    tokens = np.memmap(cache_dir / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
    return TokenData(train=tokens[:split], val=tokens[split:], meta=meta, path=cache_dir / "tokens.bin",
                     tokens=tokens)


# -- batches --------------------------------------------------------------------------------------
def document_ids(x, eot_id: int, bos_id: int | None = None):
    """[B, T] document ids of token windows. Without a BOS (GPT-2's files): each <|endoftext|>
    opens a document, as the token before every document in llm.c's and build-nanogpt's shards
    (and GPT-2 samples from it alone): the eot itself is position 0 of the document after it,
    whose first token it predicts, and the document before ends with the token that predicts the eot.

    bos_id: the file's documents are "BOS doc EOS" (a tokenizer that prepends BOS: meta's bos_id;
    token ids read in place, a .bin or shards, record none and are split at the EOS as written).
    Then the BOS opens a document and the EOS closes the one before: each document is BOS ... EOS,
    with the BOS at position 0, as a packed Llama/Gemma sequence with reset positions has it and as
    the model saw every text start. (Split at the EOS instead, the BOS would sit at position 1 of a
    document opened by the EOS, a place it never held.) The EOS's target is the next BOS, predicted
    from its own document alone."""
    return (x == (eot_id if bos_id is None else bos_id)).long().cumsum(1)


def get_batch(tokens, batch_size: int, block_size: int, generator: torch.Generator = None, device="cpu"):
    """`batch_size` random windows of `tokens`: x [B, T] and y = x shifted left by one, int64.

    Start positions come from `torch.randint(..., generator=generator)`, so a seeded generator
    gives the same batches and saving its state resumes the exact sequence.
    """
    if batch_size < 1 or block_size < 1:
        raise UserError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    n = len(tokens)
    if n < block_size + 1:
        raise UserError(f"context longer than the data: a block of {block_size} tokens needs at least "
                        f"{block_size + 1} tokens but this split has {n}; use a smaller context or more data")
    gen_device = generator.device if generator is not None else "cpu"
    starts = torch.randint(n - block_size, (batch_size,), generator=generator, device=gen_device).cpu()
    if isinstance(tokens, torch.Tensor):
        idx = starts[:, None] + torch.arange(block_size + 1)
        windows = tokens.cpu()[idx].long()
    else:
        idx = starts.numpy()[:, None] + np.arange(block_size + 1)
        windows = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    return _placed(windows[:, :-1], windows[:, 1:], device)


def _placed(x, y, device):
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


# -- mixtures of sources ---------------------------------------------------------------------------
def source_names(sources) -> list:
    """Short, unique, filesystem-safe labels of a mixture's sources (val_loss_<name> in metrics.jsonl): the file's
    stem or the folder's name ('pydoc' and 'stdlib' as themselves; a Hub dataset's folder, owner--name), with any
    character but letters, digits, '-' and '_' made '_'; where two share a label, each gets its position (1-based)
    appended: _1, _2 (again while that makes one another's: "part", "part", "part_2")."""
    names = []
    for source in sources:
        path = Path(str(source or "pydoc")).expanduser()
        parts = path.parts
        # a Hub dataset's files lie in <cache>/tritongpt-datasets/owner--name/config/split: name the dataset
        if "tritongpt-datasets" in parts[:-1]:
            name = parts[parts.index("tritongpt-datasets") + 1]
        else:
            name = path.stem if path.is_file() else path.name
        names.append(re.sub(r"[^A-Za-z0-9_-]", "_", name) or "data")
    # the labels name val_loss_<name> columns and --cache-dir's folders: two alike would share one
    while len(set(names)) < len(names):
        names = [f"{n}_{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names


def get_mixture_batch(arrays: list, weights, batch_size: int, block_size: int, generator: torch.Generator = None,
                      device="cpu"):
    """A batch of a data mixture: each row's source i is drawn with probability weights[i] (weights sum to 1),
    then a random window within that source (get_batch's): a window never runs from one source into the next.
    -> x, y [B, T] int64 and src [B], each row's source (its documents' markers may differ: document_ids_of_rows).

    The same generator draws the sources then the windows (source by source), so a seeded generator gives
    the same batches and its saved state resumes them."""
    gen_device = generator.device if generator is not None else "cpu"
    if len(arrays) == 1:  # nothing to draw: the generator gives get_batch's windows, as one --data has them
        src = torch.zeros(batch_size, dtype=torch.long)
    else:
        probs = torch.as_tensor(weights, dtype=torch.float64, device=gen_device)
        src = torch.multinomial(probs, batch_size, replacement=True, generator=generator).cpu()
    x = torch.empty(batch_size, block_size, dtype=torch.long)
    y = torch.empty(batch_size, block_size, dtype=torch.long)
    for i, tokens in enumerate(arrays):
        rows = (src == i).nonzero().squeeze(1)
        if len(rows):  # a source no row drew: no draw from the generator either
            x[rows], y[rows] = get_batch(tokens, len(rows), block_size, generator)
    x, y = _placed(x, y, device)
    return x, y, src.to(x.device)


def document_ids_of_rows(x, src, eot_id: int, bos_ids: list):
    """document_ids for a mixture's rows: row r split at its own source's marker (bos_ids[src[r]], a text source's
    BOS where its tokenizer prepends one; the EOS for token ids read in place, which record none)."""
    marks = torch.tensor([eot_id if b is None else b for b in bos_ids], device=x.device)[src.to(x.device)]
    return (x == marks[:, None]).long().cumsum(1)
