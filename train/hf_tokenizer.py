"""Hugging Face tokenizers (a model folder's tokenizer.json) through the `tokenizers` library.

Published Llamas' tokenizers are not GPT-2's byte-level BPE: TinyLlama's and Llama 2's are
SentencePiece converted to a BPE with a Metaspace normalizer ("▁" for spaces) and byte fallback
(<0xE2> tokens for characters outside the vocabulary), SmolLM's and Llama 3's byte-level BPEs
split text with other pre-tokenizers (digits one by one, Llama 3's regex). BPETokenizer refuses
those; HFTokenizer hands them to `tokenizers` (the Rust library behind transformers' fast
tokenizers), which gives transformers' ids by construction, and keeps BPETokenizer's interface
(name, vocab_size, eot_id, special_tokens, encode/encode_batch/decode, hash, save/load).

A folder with no tokenizer.json but SentencePiece's tokenizer.model (older Llama and Mistral
conversions, T5-style folders) is converted by transformers, as its AutoTokenizer converts it, to
the same kind of spec (spec_from_sentencepiece); from there on it is a tokenizer.json like any other.

A run folder's tokenizer.json is then our own JSON (format "tritongpt-hf-tokenizer"): the
tokenizer.json object as read (or converted), the EOS and BOS spellings, a name, an info dict and the hash.
"""
import hashlib
import importlib
import json
import re
from pathlib import Path

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.train.tokenizer import SPM_MODEL, TokenizerChecks, _alternation, save_tokenizer_json, token_name

FORMAT = "tritongpt-hf-tokenizer"
# tokenizer.json's fields that do not decide ids under encode(add_special_tokens=False): the
# lengths of a batch (we never pad or cut) and what post_process would add
_NOT_IDS = ("truncation", "padding", "post_processor", "decoder", "version")


def _library():
    try:
        import tokenizers
    except ImportError:
        raise UserError("this tokenizer.json needs Hugging Face's tokenizers library: pip install 'tokenizers>=0.15'") \
            from None
    return tokenizers


# what converting a tokenizer.model takes (pyproject's "sentencepiece" extra): (module, pip requirement).
# transformers converts; its SentencePiece reader needs both sentencepiece and protobuf.
SPM_LIBRARIES = (("transformers", "transformers>=4.40"), ("sentencepiece", "sentencepiece>=0.2"),
                 ("google.protobuf", "protobuf>=3.20"))


def spec_from_sentencepiece(folder: Path) -> tuple:
    """The tokenizers-library spec (a tokenizer.json object) transformers makes of folder's
    SentencePiece tokenizer.model: AutoTokenizer reads the folder as the class its
    tokenizer_config.json (or config.json's model type) names, converting the model as it does for
    any folder without tokenizer.json, and its backend tokenizer is the spec.
    -> (spec, what read it: "transformers <version> <class>")."""
    path = folder / SPM_MODEL
    missing = []
    for module, requirement in SPM_LIBRARIES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(requirement)
    if missing:
        raise UserError(f"{path} is a SentencePiece tokenizer (and {folder} has no tokenizer.json): converting it "
                        f"needs {' and '.join(missing)}: pip install {' '.join(repr(r) for r in missing)} "
                        "(tritongpt's sentencepiece extra)")
    import sentencepiece
    import transformers

    try:  # sentencepiece's own check first: transformers 5 reads a file it cannot parse as a tiktoken one
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # RuntimeError, naming what is wrong (no ModelProto, no <unk>, ...)
        raise UserError(f"{path}: not a SentencePiece model ({(str(e).splitlines() or [''])[0]})") from None
    try:
        # trust_remote_code=False: a tokenizer class of the folder's own code is refused, never run
        # (transformers 4 would otherwise ask on a terminal)
        fast = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as e:  # ValueError, OSError, ...: its first line says what it missed
        raise UserError(f"{path}: transformers could not convert it ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]})") from None
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:  # transformers 4 without a converter for the class falls back to its Python tokenizer
        raise UserError(f"{path}: transformers reads it as {type(fast).__name__}, which has no tokenizers-library "
                        "form to convert it to")
    return json.loads(backend.to_str()), f"transformers {transformers.__version__} {type(fast).__name__}"


def _config_id(folder: Path, key: str):
    """(id, file) of key (eos_token_id, bos_token_id) in config.json, else generation_config.json.
    A list (Llama 3's instruct models end on several ids) gives its first."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            i = read_json_object(path).get(key)
            i = i[0] if isinstance(i, list) and i else i
            if isinstance(i, int) and not isinstance(i, bool):
                return i, path
    return None, None


def generation_end_ids(folder, vocab: int, limit: int | None = None) -> tuple:
    """(ids, file): the end tokens a model folder's generation config lists, as its eos_token_id (an id or a list:
    an instruct Llama 3.1's three), from generation_config.json, else config.json: transformers' generate stops on
    those alone (its model.generation_config is that file, else one made of config.json), vLLM on them beside the
    tokenizer's EOS (try_get_generation_config's fallback too, the ids its stop_token_ids). ([], None): no file or
    no id. An id outside the model's vocab is refused, naming the file; limit: the tokenizer's size where the
    model's vocabulary is padded past it (only its ids are drawn), an id in the padding left out: it is never drawn,
    so it ends nothing (vLLM and transformers never meet it either), and a folder listing one is not refused."""
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            ends = read_json_object(path).get("eos_token_id")
            ends = [ends] if is_int(ends) else ends if isinstance(ends, list) else []
            if not all(is_int(t) and 0 <= t < vocab for t in ends):
                raise UserError(f"{path}: eos_token_id must be token ids of the model's {vocab}, got {ends!r}")
            return [int(t) for t in ends if limit is None or t < limit], path
    return [], None


# the special tokens transformers' tokenizers name besides BOS and EOS (SPECIAL_TOKENS_ATTRIBUTES): with them and a
# model's own (Gemma 3's image_token...), special_tokens_map, which apply_chat_template gives the template
NAMED_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# the special tokens transformers 5's tokenizer classes default to (their __init__'s defaults) where a folder's
# tokenizer_config.json (and special_tokens_map.json) leaves a key out, not where it sets null: the template is given
# them, and the EOS is where no file names one. The classes real chat models' folders are read as (tokenizer_class: a
# "...Fast" name is the same class in 5); any other (PreTrainedTokenizerFast, BloomTokenizerFast: TokenizersBackend)
# defaults to none. Checked against transformers 5.25.
CLASS_TOKENS = {
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
    # Command-R's: its EOS by default is the end of a turn
    "CohereTokenizer": {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "unk_token": "<UNK>",
                        "pad_token": "<PAD>", "cls_token": "<CLS>", "sep_token": "<SEP>", "mask_token": "<MASK_TOKEN>"},
    # Pythia's, OLMo 1's, MPT's
    "GPTNeoXTokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                         "pad_token": "<|padding|>"},
    "CodeGenTokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}

# config.json's model_type -> the class transformers 5's AutoTokenizer registers for it (TOKENIZER_MAPPING_NAMES),
# for the families tritongpt reads; None: TokenizersBackend (no defaults). A type not here (llama, falcon, bloom)
# has none registered: the folder's tokenizer_class decides.
MODEL_TYPE_CLASSES = {
    **dict.fromkeys(("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"), "Qwen2Tokenizer"),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text"), "GemmaTokenizer"),
    **dict.fromkeys(("cohere", "cohere2"), "CohereTokenizer"),
    **dict.fromkeys(("gpt2", "gpt_neo", "gptj", "codegen", "phi"), "GPT2Tokenizer"),
    **dict.fromkeys(("gpt_neox", "olmo", "olmoe", "mpt"), "GPTNeoXTokenizer"),
    **dict.fromkeys(("mistral", "mixtral", "phi3", "olmo2", "olmo3", "stablelm", "granite", "granitemoe"), None),
}
# the types whose folders' tokenizer_class transformers 5 overrides by the registered one
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
WRONG_CLASS_TYPES = ("qwen2", "phi3")


def tokenizer_class(cfg: dict, folder: Path) -> str | None:
    """The tokenizer class (without "Fast") transformers 5's AutoTokenizer reads folder as, whose defaults
    (CLASS_TOKENS) fill what its files leave out: tokenizer_config.json's tokenizer_class (else config.json's), but
    the one config.json's model_type registers where it registers another and says the folder's is wrong (Qwen2) or
    gives none, and TokenizersBackend (None) where the type registers it (a Mistral's or Phi-3's LlamaTokenizer) or a
    LlamaTokenizer's tokenizer.json is byte-level (LlamaTokenizer splits on Metaspace); the declared one, all that
    aside, where tokenizer_config.json's auto_map names a remote-code AutoTokenizer."""
    path = folder / "config.json"
    model = read_json_object(path) if path.is_file() else {}
    model_type = model.get("model_type")
    declared = cfg.get("tokenizer_class") or model.get("tokenizer_class")
    declared = declared.removesuffix("Fast") if isinstance(declared, str) else None
    auto = cfg.get("auto_map")
    remote = auto.get("AutoTokenizer") if isinstance(auto, dict) else auto if isinstance(auto, list) else None
    if declared is not None and remote is not None:
        # a remote-code tokenizer (tokenizer_config.json's auto_map): transformers skips both checks below for it
        # and, without trust_remote_code, reads the folder as its declared class
        return declared
    path = folder / "tokenizer.json"
    if declared == "LlamaTokenizer" and model_type not in WRONG_CLASS_TYPES and path.is_file() and \
            '"ByteLevel"' in path.read_text(encoding="utf-8"):  # (transformers' own test, on the file's text)
        return None
    if isinstance(model_type, str) and model_type in MODEL_TYPE_CLASSES:
        registered = MODEL_TYPE_CLASSES[model_type]
        if registered is None:
            return None
        if declared is None or model_type in WRONG_CLASS_TYPES:
            return registered
    return declared


def special_files(cfg: dict, cfg_path: Path, folder: Path) -> tuple:
    """tokenizer_config.json's fields as transformers 5 reads them (cfg, read from cfg_path): a legacy
    special_tokens_map.json's over them where the config has no added_tokens_decoder (an added_tokens_decoder, even
    an empty one, and transformers never opens the file), its values winning: its eos_token is the tokenizer's, not
    the config's, and a null there unsets the config's token.
    -> (fields, {key: the file its value came from, where not cfg_path})."""
    cfg, where = dict(cfg), {}
    path = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and path.is_file():
        legacy = read_json_object(path)
        for key in ("bos_token", "eos_token", *NAMED_TOKENS):  # (refused naming this file, not the config)
            token_name(legacy.get(key), path, key)
        cfg.update(legacy)
        where = dict.fromkeys(legacy, path)
    for key in ("bos_token", "eos_token", *NAMED_TOKENS):
        if key in where:
            continue
        value = cfg.get(key)
        token_name(value, cfg_path, key)  # (an id, a list, an object without a text: refused as such first)
        # transformers turns the config's {"__type": "AddedToken", ...} into an AddedToken and refuses any other
        # object (a TypeError: "Special token pad_token has to be either str or AddedToken"); the map's objects are
        # AddedTokens without the tag. Read here, {"content": ""} was a pad_token "" no transformers loads.
        if isinstance(value, dict) and value.get("__type") != "AddedToken":
            raise UserError(f"{cfg_path}: {key} is an object without \"__type\": \"AddedToken\", which transformers "
                            f"refuses (a TypeError) in tokenizer_config.json: write the token's text as a string, or "
                            f"add \"__type\": \"AddedToken\" as transformers writes it, got {value!r}"[:400])
    return cfg, where


def extra_token_list(cfg: dict, cfg_path: Path, legacy: dict, map_path: Path):
    """Refuses the extra special tokens transformers 5 refuses (a TypeError), naming the file and field, where it
    reads them as from_pretrained and the tokenizer's __init__ do: tokenizer_config.json's extra_special_tokens (its
    additional_special_tokens where that is empty), dropped where an object (a model's own tokens by name); the
    legacy special_tokens_map.json's (legacy: its fields, where read) over it, its extra_special_tokens list joined
    to the config's; and where no extra_special_tokens is left, the additional_special_tokens left (the map's over
    the config's). What it reads must be a list or an object, else "extra_special_tokens must be a list/tuple of
    tokens or a dict of named tokens" (the map's additional_special_tokens object it reads as one token); a list's
    objects must carry "__type": "AddedToken" (the tokenizers library takes only strings and AddedTokens: "Input must
    be a List[Union[str, AddedToken]]"), but the map's extra_special_tokens', which it makes AddedTokens itself,
    marking them special, so that one saying "special" is refused ("got multiple values for keyword argument")."""
    # {key: (value, (file, field) of the value or of each item of a list)}, as transformers' init_kwargs
    kw = {k: (cfg[k], [(cfg_path, k)] * len(cfg[k]) if isinstance(cfg[k], list) else (cfg_path, k))
          for k in ("extra_special_tokens", "additional_special_tokens") if k in cfg}
    if "additional_special_tokens" in kw and not kw.get("extra_special_tokens", (None,))[0]:
        kw["extra_special_tokens"] = kw.pop("additional_special_tokens")
    if isinstance(kw.get("extra_special_tokens", (None,))[0], dict):  # (taken as a model's own, the key dropped)
        del kw["extra_special_tokens"]
    if "additional_special_tokens" in legacy:  # (taken as it stands; an object, as one token: refused if read)
        value = legacy["additional_special_tokens"]
        kw["additional_special_tokens"] = (value, [(map_path, "additional_special_tokens")] * len(value)
                                           if isinstance(value, list) else (map_path, "additional_special_tokens"))
    if "extra_special_tokens" in legacy:
        value = legacy["extra_special_tokens"]
        if isinstance(value, list):  # joined to the config's, its objects made AddedTokens (special=True)
            for t in value:
                if isinstance(t, dict) and "special" in t:
                    raise UserError(f"{map_path}: extra_special_tokens holds an object with \"special\" ({t!r}), "
                                    "which transformers refuses (TypeError: AddedToken() got multiple values for "
                                    "keyword argument 'special': it marks this file's tokens special itself): leave "
                                    "\"special\" out"[:400])
            old, where = kw.get("extra_special_tokens", (None, []))
            old = list(old or [])
            # (the config's value made a list: a string's characters, an object's keys, all strings)
            where = where if isinstance(where, list) and len(where) == len(old) else \
                [(cfg_path, "extra_special_tokens")] * len(old)
            joined = [t if not isinstance(t, dict) else "" for t in value]  # (a made AddedToken: a token)
            kw["extra_special_tokens"] = (old + joined, where + [(map_path, "extra_special_tokens")] * len(joined))
        elif isinstance(value, dict):
            kw.pop("extra_special_tokens", None)
        else:
            kw["extra_special_tokens"] = (value, (map_path, "extra_special_tokens"))
    if "additional_special_tokens" in kw and "extra_special_tokens" not in kw:  # (the tokenizer's __init__)
        kw["extra_special_tokens"] = kw.pop("additional_special_tokens")
    value, where = kw.get("extra_special_tokens", (None, None))
    if value is None or isinstance(value, dict) and where != (map_path, "additional_special_tokens"):
        return
    if isinstance(value, dict):
        raise UserError(f"{map_path}: additional_special_tokens is an object, which transformers 5 reads as one "
                        "token and then refuses (TypeError: extra_special_tokens must be a list/tuple of tokens "
                        "or a dict of named tokens): list the tokens, or name a model's own tokens in an "
                        f"extra_special_tokens object; got {value!r}"[:400])
    if not isinstance(value, list):
        path, field = where
        own = "" if (path, field) == (map_path, "additional_special_tokens") else \
            " (or an object of a model's own by name)"
        raise UserError(f"{path}: {field} must be a list of special tokens{own}, got {type(value).__name__} "
                        f"{value!r}, which transformers 5 refuses (TypeError: extra_special_tokens must be a list/tuple "
                        "of tokens or a dict of named tokens)"[:400])
    for t, (path, field) in zip(value, where):
        if not isinstance(t, str) and not (isinstance(t, dict) and t.get("__type") == "AddedToken"):
            raise UserError(f"{path}: {field} holds {t!r}, which transformers refuses (TypeError: Input must be a "
                            "List[Union[str, AddedToken]]): write the token's text as a string, or an object with "
                            "\"__type\": \"AddedToken\" as transformers writes it"[:400])


# the classes (of CLASS_TOKENS's) whose __init__ passes transformers' TokenizersBackend a pad_token of its own, a
# default or None; the others (LlamaTokenizer, TokenizersBackend itself) leave it to tokenizer.json's "padding"
OWN_PAD = ("Qwen2Tokenizer", "GemmaTokenizer", "CohereTokenizer", "GPTNeoXTokenizer", "GPT2Tokenizer",
           "CodeGenTokenizer")


def special_config(files: dict, folder: Path, padding=None) -> dict:
    """special_files' fields with the defaults of the class transformers reads the folder as (tokenizer_class) for
    the keys neither file names, and, where neither names a pad_token (a null names none) and the class passes none,
    the pad_token of tokenizer.json's "padding" (padding: that object), which transformers' TokenizersBackend takes
    by default (kwargs.setdefault): the template and init_kwargs (vLLM's /tokenizer_info) see it."""
    cls = tokenizer_class(files, folder)
    pad = padding.get("pad_token") if isinstance(padding, dict) else None
    pad = {"pad_token": pad} if isinstance(pad, str) and "pad_token" not in files and cls not in OWN_PAD else {}
    return {**CLASS_TOKENS.get(cls, {}), **pad, **files}


def spelling(value, where, key: str):
    """A special token's text as transformers gives a chat template: token_name's, but "" kept (transformers sets the
    token to "", defined, where token_name reads no token); None where it names none."""
    name = token_name(value, where, key)
    return "" if value is not None and name is None else name


def _own_key(key) -> bool:
    """Whether key names a model's own special token (image_token...): a "_token" key but the named ones."""
    return isinstance(key, str) and key.endswith("_token") and key not in NAMED_TOKENS and \
        key not in ("bos_token", "eos_token")


def own_tokens(cfg: dict, legacy: dict) -> dict:
    """A model's own special tokens (image_token...) as transformers 5 reads them from tokenizer_config.json (cfg) and a
    legacy special_tokens_map.json (legacy: its fields, where read). The config's "_token" strings, then its
    extra_special_tokens object (additional_special_tokens where that is empty) over them, are the model's tokens by
    name (and replace the config's own model_specific_special_tokens, which stands where there are none); the map's
    extra_special_tokens object goes over those. Below them all (transformers' auto-detected ones) the "_token" keys it
    reads only as AddedTokens: the config's {"__type": "AddedToken", ...} (an untagged object is none), and the map's,
    each in place of the config's of its name."""
    explicit = {k: v for k, v in cfg.items() if _own_key(k) and isinstance(v, str)}
    extra = cfg.get("extra_special_tokens")
    if "additional_special_tokens" in cfg and not extra:
        extra = cfg["additional_special_tokens"]
    if isinstance(extra, dict):
        explicit.update(extra)
    if not explicit and isinstance(cfg.get("model_specific_special_tokens"), dict):
        explicit = dict(cfg["model_specific_special_tokens"])
    if isinstance(legacy.get("extra_special_tokens"), dict):
        explicit.update(legacy["extra_special_tokens"])
    auto = {k: v for k, v in cfg.items() if _own_key(k) and isinstance(v, dict) and v.get("__type") == "AddedToken"}
    auto.update((k, v) for k, v in legacy.items() if _own_key(k))
    # (a null or a number among the auto-detected ones is no token to transformers: left out)
    auto = {k: v for k, v in auto.items() if isinstance(v.get("content") if isinstance(v, dict) else v, str)}
    return {**auto, **explicit}


def template_tokens(cfg: dict, where, own: dict) -> dict:
    """{name: spelling} of tokenizer_config.json's special tokens besides bos_token and eos_token, as transformers >= 5
    reads them into special_tokens_map (which apply_chat_template passes to the template, a template may write
    pad_token): NAMED_TOKENS of cfg (special_config's), then a model's own (own: own_tokens')."""
    tokens = {}
    for key in NAMED_TOKENS:
        name = spelling(cfg.get(key), where, key)
        if name is not None:
            tokens[key] = name

    def text(value):  # (a string, or an AddedToken as transformers writes it)
        return value.get("content") if isinstance(value, dict) else value

    for key, value in own.items():
        if not isinstance(text(value), str):  # (transformers refuses it too: a TypeError)
            raise UserError(f"{where}: special token {key!r} must be a token's text (a string, or {{\"content\": ...}} "
                            f"as transformers writes it), got {type(value).__name__} {value!r}"[:300])
        tokens[key] = text(value)
    return tokens


def as_init_kwargs(tokens: dict) -> dict:
    """template_tokens as transformers' tokenizer_config.json and init_kwargs hold them: NAMED_TOKENS by name, a
    model's own (image_token...) under model_specific_special_tokens."""
    kwargs = {k: v for k, v in tokens.items() if k in NAMED_TOKENS}
    own = {k: v for k, v in tokens.items() if k not in NAMED_TOKENS}
    return {**kwargs, "model_specific_special_tokens": own} if own else kwargs


class HFTokenizer(TokenizerChecks):
    """A tokenizers.Tokenizer with BPETokenizer's interface.

    encode never adds BOS/EOS (add_special_tokens=False): a Llama's own pipeline adds what its
    post_processor says (Llama 2 and TinyLlama prepend <s>, Llama 3 <|begin_of_text|>, SmolLM
    nothing); tritongpt's data, prompts and chats hold the text's ids, the EOS it adds itself between
    documents and after answers, as with our BPE, and the BOS where prepended_bos_id says the
    pipeline adds one (formats.with_bos, data._write_tokens).
    """

    def __init__(self, spec: dict, eos_token: str | None = None, bos_token: str | None = None, name: str = "hf",
                 info: dict = None, where: str = "tokenizer.json", no_eos: str | None = None):
        tokenizers = _library()
        if not isinstance(spec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(spec).__name__}")
        try:
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
        except Exception as e:  # the library raises a bare Exception naming the field it could not read
            raise UserError(f"{where}: not a tokenizer the tokenizers library reads ({str(e).splitlines()[0]})") \
                from None
        self._tok.no_truncation()  # a file may ask to cut or pad: ids are never dropped or added here
        self._tok.no_padding()
        self._plain_tok = None
        self.spec, self.name, self.where = spec, name, where
        self.info = dict(info or {})
        # the byte-fallback tokens (<0xE2>): a run of them is decoded together (TextSoFar, Window). Read from the
        # library's vocabulary, not the file's: a Unigram's "vocab" is a list of [piece, score] (llm-jp's, with
        # byte_fallback), and the decoder's ByteFallback turns these tokens to bytes whatever the model's flag says
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        vocab = self._tok.get_vocab(with_added_tokens=True) \
            if model.get("byte_fallback") or _holds_decoder(spec.get("decoder"), "ByteFallback") else {}
        self.byte_ids = frozenset(i for t, i in vocab.items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t))
        # whether a row's text can be decoded a window of its last ids at a time (local_decoder), decided once
        self.incremental = local_decoder(spec.get("decoder"))
        # the characters a Strip with stop > 0 strips: the library panics on a text of only them shorter than its
        # start + stop (Window decodes a fresh window's text only where it holds another character)
        self.strip_chars = frozenset(d.get("content") for d in _decoders(spec.get("decoder"))
                                     if d.get("type") == "Strip" and d.get("stop"))
        self.special_tokens = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())
                               if t.special}
        self._special_pat = _alternation(self.special_tokens) if self.special_tokens else None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        for what, token in (("eos_token", eos_token), ("bos_token", bos_token)):
            if token is not None and self._tok.token_to_id(token) is None:
                raise UserError(f"{where}: its {what} {token!r} is not a token of the tokenizer")
        self.eos_token, self.bos_token = eos_token, bos_token
        self._no_eos = no_eos or f"{where} names no end-of-text token"
        self._hash = None
        self._prepended_bos = (None, None)  # (the BOS spelling it was asked for, prepended_bos_id's answer)
        # the model's own chat template (chat_template.py), when its folder has one; a run keeps it
        # only if its chats were rendered with it. Not part of the hash: it decides no text's ids.
        self.chat_template = None
        # the folder's other named templates ({"tool_use": ...}: Hermes-2-Pro's, Command-R's), None: none; a chat
        # with tools renders in "tool_use" (chat_template.template_name), as transformers' and vLLM's do
        self.chat_templates = None
        # the folder's other special tokens by name ({"pad_token": ..., "image_token": ...}: template_tokens), which
        # transformers gives a chat template beside bos_token and eos_token. Not part of the hash, as the template.
        self.template_tokens = {}
        # the bos_token and eos_token transformers gives the template where they are not the tokenizer's own
        # ({"eos_token": None}: undefined; from_hf_folder's), as template_tokens not part of the hash
        self.template_ends = {}
        # the tokenizer class whose default gave template_ends a token tokenizer.json lacks (a Command-R class's
        # <|END_OF_TURN_TOKEN|>), else None: export names the class and leaves that token to its default, as the
        # source did (hf_files), since a tokenizer_config.json naming a token tokenizer.json lacks is refused
        self.template_class = None

    def without_chat_template(self) -> "HFTokenizer":
        """This tokenizer without a chat template (a run whose chats are in tritongpt's)."""
        import copy

        tok = copy.copy(self)
        tok.chat_template = tok.chat_templates = None
        return tok

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, folder) -> "HFTokenizer":
        """A folder as transformers' save_pretrained writes it: tokenizer.json (else SentencePiece's
        tokenizer.model, converted by transformers: spec_from_sentencepiece), and the EOS named by
        tokenizer_config.json's eos_token as transformers 5 reads it (special_files: a legacy
        special_tokens_map.json's winning), else config.json's or generation_config.json's
        eos_token_id (BOS likewise, kept for export), else the tokenizer class's default eos_token
        (special_config)."""
        folder = Path(folder)
        path, info = folder / "tokenizer.json", {"source": str(folder)}
        if path.is_file():
            spec = read_json_object(path)
        elif (folder / SPM_MODEL).is_file():
            path = folder / SPM_MODEL
            spec, info["converted_by"] = spec_from_sentencepiece(folder)
        else:
            raise UserError(f"{folder} holds no tokenizer.json (nor SentencePiece's {SPM_MODEL})")
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
        tok = cls(spec, name=folder.name, where=str(path), info=info)
        # (special_tokens_map.json's bos_token and eos_token win over the config's, as transformers reads them)
        files, came_from = special_files(cfg, cfg_path, folder)
        for key in ("eos", "bos"):
            value, src = files.get(f"{key}_token"), came_from.get(f"{key}_token", cfg_path)
            if (value.get("content") if isinstance(value, dict) else value) == "":
                # transformers reads "" as a tokenizer without that token ("" in a chat template; its eos_token_id
                # None, or the unknown token's id), not as config.json's id, which would be taken here in its place:
                # neither silently. (special_tokens_map.json's "" too: it stands in the config's place.)
                raise UserError(f"{src}: {key}_token is an empty string, which names no token (transformers "
                                f"reads it as a tokenizer without one): name the token, or leave the field out (or "
                                f"null) to take config.json's or generation_config.json's {key}_token_id")
            name = token_name(value, src, f"{key}_token")
            if name is None:
                i, where = _config_id(folder, f"{key}_token_id")
                # (id_to_token of a negative id is an OverflowError: it is no token either)
                name = tok._tok.id_to_token(i) if i is not None and i >= 0 else None
                if i is not None and name is None:
                    raise UserError(f"{where}: {key}_token_id {i} is not a token of {path}")
            elif tok._tok.token_to_id(name) is None:
                raise UserError(f"{src}: {key}_token {name!r} is not a token of {path}")
            setattr(tok, f"{key}_token", name)
        special = special_config(files, folder, spec.get("padding"))
        tok._no_eos = (f"{folder} names no end-of-text token: tokenizer_config.json has no eos_token, and neither "
                       "config.json nor generation_config.json an eos_token_id")
        if tok.eos_token is None:
            # where neither tokenizer_config.json (nor a legacy special_tokens_map.json read with it, Llama 2's and
            # older Mistral folders: taken above) nor config.json names it, the EOS is transformers 5's
            # tokenizer.eos_token: the class's default (a Qwen2Tokenizer's <|endoftext|>). vLLM stops on it (its
            # tokenizer's eos_token_id beside the generation config's), and SFT trainers end answers on it. Taken
            # after config.json's id, not before, so that no folder that had an EOS changes it (nor its runs' data).
            name = spelling(special.get("eos_token"), cfg_path, "eos_token")
            if name and tok._tok.token_to_id(name) is not None:
                tok.eos_token = name
            elif name:  # (transformers would add it as a new token, past the model's rows: no EOS the model draws)
                # (only the class's: a special_tokens_map.json's eos_token was taken, or refused, above)
                tok._no_eos += (f"; the eos_token {name!r} transformers reads (the default of its tokenizer class, "
                                f"{tokenizer_class(files, folder)}) is not a token of {path}")
            else:
                tok._no_eos += " (nor special_tokens_map.json, nor its tokenizer class by default)"
        legacy = {k: files[k] for k in came_from}  # (special_tokens_map.json's fields, where read)
        extra_token_list(cfg, cfg_path, legacy, folder / "special_tokens_map.json")
        tok.template_tokens = template_tokens(special, cfg_path, own_tokens(cfg, legacy))
        # the BOS and EOS transformers gives the template, where not the tokenizer's: none (undefined, not "") where
        # only config.json names one (it sets the EOS generation stops on, not the template's), a class's default
        # where the config names none
        for key in ("bos_token", "eos_token"):
            # ("" only from special_tokens_map.json: the config's is refused above)
            name = spelling(special.get(key), cfg_path, key)
            if name != getattr(tok, key):
                tok.template_ends[key] = name
                # (only a class's default can be no token here: the files' are refused above if not tokens)
                if name and tok._tok.token_to_id(name) is None:
                    tok.template_class = tokenizer_class(files, folder)
        from tritongpt.train.chat_template import templates_from_config

        named = templates_from_config(cfg, str(cfg_path), folder) or {}
        tok.chat_template = named.pop("default", None)
        tok.chat_templates = named or None
        return tok

    # -- sizes and identity --------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        """The EOS: what ends a document in our data and an answer in SFT and chat."""
        if self.eos_token is None:
            raise UserError(self._no_eos)
        return self._tok.token_to_id(self.eos_token)

    @property
    def prepended_bos_id(self) -> int | None:
        """The BOS id when this tokenizer's own pipeline (its post_processor: Gemma's, Llama 2's and 3's,
        TinyLlama's) starts every text with it, else None. transformers' tokenizer(text) adds it and
        our encode never does; `generate` puts it before a prompt and pretraining data before each
        document, as the model always saw one there (Gemma's text without it is much worse)."""
        if self.bos_token is None:
            return None
        if self._prepended_bos[0] != self.bos_token:  # asked once per BOS spelling (from_hf_folder sets it late)
            bos = self._tok.token_to_id(self.bos_token)
            added = self._tok.encode("a", add_special_tokens=True).ids
            plain = self._tok.encode("a", add_special_tokens=False).ids
            self._prepended_bos = (self.bos_token, bos if added[:1] == [bos] and plain[:1] != [bos] else None)
        return self._prepended_bos[1]

    @property
    def hash(self) -> str:
        """sha256 of what decides the ids (tokenizer.json but its version, padding, truncation, post-processor
        and decoder) and of the EOS, which our data puts between documents."""
        if self._hash is None:
            blob = json.dumps({"tokenizer": self._ids_spec(), "eos_token": self.eos_token}, sort_keys=True,
                              ensure_ascii=False)
            self._hash = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self._hash

    @property
    def ids_hash(self) -> str:
        """The hash of what decides a text's ids alone, the EOS aside: two folders of one tokenizer.json, one
        tokenizer_config.json naming another EOS (a base model's and its chat model's), give equal ids_hash."""
        blob = json.dumps(self._ids_spec(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _ids_spec(self) -> dict:
        return {k: v for k, v in self.spec.items() if k not in _NOT_IDS}

    def __repr__(self):
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"

    # -- encoding ------------------------------------------------------------------------------
    def _check(self, text: str, allowed_special):
        """BPETokenizer's rules (TokenizerChecks): "none_raise" (default) refuses text spelling a special
        token, "none" reads it as text, "all" or a set of names encode those as their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        self._check_unicode(text)
        self._check_special(text, self._allowed(allowed_special), allowed_special)

    @property
    def _plain(self):
        """The same tokenizer reading special spellings as text (allowed_special "none"), made on first use."""
        if self._plain_tok is None:
            import copy

            self._plain_tok = copy.deepcopy(self._tok)
            self._plain_tok.encode_special_tokens = True
        return self._plain_tok

    def encode(self, text: str, allowed_special="none_raise") -> list:
        self._check(text, allowed_special)
        tok = self._plain if allowed_special == "none" else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, allowed_special="none_raise", num_threads: int = 4) -> list:
        texts = list(texts)
        for t in texts:
            self._check(t, allowed_special)
        tok = self._plain if allowed_special == "none" else self._tok
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        """ids -> text, special tokens included, as transformers' decode(skip_special_tokens=False).
        Bytes of a cut-off character become U+FFFD."""
        return self._decode(self._checked_ids(ids))

    def _decode(self, ids) -> str:
        """decode of checked ids, the library's panics a UserError (DecoderPanic) naming the decoder."""
        if not ids:  # (no text; a Strip with stop > 0 after a Fuse panics on the empty text the library decodes)
            return ""
        try:
            return self._tok.decode(ids, skip_special_tokens=False)
        except BaseException as e:
            # a panic in the library's Rust reaches Python as pyo3's PanicException, a BaseException (not an
            # Exception: no `except Exception` of ours, a server's included, would stop it). A Strip
            # decoder with stop > 0 panics on a token (or, after a Fuse, a text) of only its content shorter than
            # its start + stop (tokenizers 0.23: Strip(" ", 1, 1) on " ")
            if type(e).__name__ != "PanicException":
                raise
            decoder = json.dumps(self.spec.get("decoder"), ensure_ascii=False)
            hint = " (a Strip with stop > 0 panics on a text of only its content shorter than its start + stop)" \
                if self.strip_chars else ""
            raise DecoderPanic(f"{self.where}: its decoder {decoder} panicked inside the tokenizers library decoding "
                               f"{len(ids)} ids ({str(e).splitlines()[0] if str(e) else type(e).__name__}){hint}; "
                               "the ids' text cannot be read with this decoder") from None

    def decode_bytes(self, ids) -> bytes:
        """The UTF-8 bytes of decode(ids) (eval's bits per byte counts them). Tokens here spell no
        bytes of their own, so a call's text is its ids decoded together: a SentencePiece decoder
        drops the leading space of each call's text, and a character cut between calls counts as
        U+FFFD's 3 bytes (eval decodes a window at a time: at most that much a window)."""
        return self.decode(ids).encode("utf-8")

    def stream_decoder(self) -> "TextSoFar":
        """What generate's --stream prints: the text each new id adds (see TextSoFar)."""
        return TextSoFar(self)

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "name": self.name, "vocab_size": self.vocab_size,
                "eos_token": self.eos_token, "bos_token": self.bos_token, "info": self.info, "hash": self.hash,
                **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
                **({"chat_templates": self.chat_templates} if self.chat_template is not None and self.chat_templates
                   else {}),
                **({"template_tokens": self.template_tokens} if self.template_tokens else {}),
                **({"template_ends": self.template_ends} if self.template_ends else {}),
                **({"template_class": self.template_class} if self.template_class else {}),
                "tokenizer": self.spec}

    def save(self, path):
        return save_tokenizer_json(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "HFTokenizer":
        path = Path(path)
        d = read_json_object(path)
        if d.get("format") != FORMAT:
            raise UserError(f"{path}: not a tritongpt Hugging Face tokenizer file (expected format {FORMAT!r})")
        for key in ("eos_token", "bos_token"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise UserError(f"{path}: field {key!r} must be a string or null, got {type(d[key]).__name__}")
        if not isinstance(d.get("tokenizer"), dict):
            raise UserError(f"{path}: field 'tokenizer' must be the tokenizer.json object")
        tok = cls(d["tokenizer"], d.get("eos_token"), d.get("bos_token"), d.get("name", path.stem), d.get("info"),
                  f"{path} (field 'tokenizer')", f"{path} names no end-of-text token (eos_token is null)")
        if d.get("hash") not in (None, tok.hash):
            raise UserError(f"{path}: content does not match its recorded hash (file edited or damaged)")
        if d.get("chat_template") is not None and not isinstance(d["chat_template"], str):
            raise UserError(f"{path}: field 'chat_template' must be a Jinja string or absent, got "
                            f"{type(d['chat_template']).__name__}")
        from tritongpt.train.chat_template import from_file

        # (each template's errors name this file and its field: the run's, not the folder it was first read from)
        tok.chat_template = from_file(d.get("chat_template"), f"{path} (field 'chat_template')")
        named = d.get("chat_templates")
        if named is not None and not isinstance(named, dict):
            raise UserError(f"{path}: field 'chat_templates' must be an object of named templates or absent, got "
                            f"{type(named).__name__}")
        for name, template in (named or {}).items():
            if not isinstance(template, str):
                raise UserError(f"{path}: field 'chat_templates': chat template {name!r} must be a Jinja string, got "
                                f"{type(template).__name__}")
        if named and (tok.chat_template is None or "default" in named):
            raise UserError(f"{path}: field 'chat_templates' names the templates besides 'chat_template' (the "
                            "default one), which it must have, and no 'default' of its own")
        tok.chat_templates = {name: from_file(t, f"{path} (field 'chat_templates')") for name, t in named.items()} \
            if named else None
        tokens = d.get("template_tokens", {})
        if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
            raise UserError(f"{path}: field 'template_tokens' must be an object of special tokens' text by name "
                            f"(\"pad_token\": ...) or absent, got {tokens!r}"[:300])
        tok.template_tokens = dict(tokens)
        ends = d.get("template_ends", {})
        if not isinstance(ends, dict) or not set(ends) <= {"bos_token", "eos_token"} or \
                not all(v is None or isinstance(v, str) for v in ends.values()):
            raise UserError(f"{path}: field 'template_ends' must be an object of bos_token and eos_token's text "
                            f"(or null) as the chat template sees them, or absent, got {ends!r}"[:300])
        tok.template_ends = dict(ends)
        cls_name = d.get("template_class")
        if cls_name is not None and cls_name not in CLASS_TOKENS:
            raise UserError(f"{path}: field 'template_class' must be one of the tokenizer classes whose defaults "
                            f"tritongpt knows ({', '.join(CLASS_TOKENS)}) or absent, got {cls_name!r}"[:300])
        tok.template_class = cls_name
        return tok

    def hf_files(self, model_max_length: int | None = None, chat_template: str | None = None,
                 chat_templates: dict | None = None) -> dict:
        """{file name: text}: tokenizer.json as read and a tokenizer_config.json naming EOS and BOS (and the
        folder's other special tokens, template_tokens, which a chat template may write), which
        transformers.AutoTokenizer loads with the same ids (add_special_tokens=False; with
        True, the file's own post-processor adds what the model's pipeline adds). chat_template: the
        default chat template; chat_templates: the named others (hf_chat_template_field)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token, "model_max_length": model_max_length or 1_000_000_000_000,
                  "clean_up_tokenization_spaces": False}
        # the BOS and EOS the chat template sees where they are not the tokenizer's (template_ends: none where only
        # config.json named one, a class's default, special_tokens_map.json's), so transformers renders the exported
        # folder's template as the source's; the EOS generation stops on is config.json's eos_token_id, which export
        # writes (and from_hf_folder reads back where the file names none)
        config.update(self.template_ends)
        # (transformers >= 5 reads them back, and gives a chat template them, as render does: a model's own by name)
        config.update(as_init_kwargs(self.template_tokens))
        # the named tokens the source had none of are null, not left out: left out, a class's default would fill
        # them (a Qwen2Tokenizer's unk_token, where the exported config.json's model_type picks the class), and
        # transformers' TokenizersBackend takes tokenizer.json's "padding" pad_token (a source without a pad token,
        # a null or a class passing its own None, GPT-2's, would gain that one in its template and /tokenizer_info)
        config.update((key, None) for key in NAMED_TOKENS if key not in config)
        if self.template_class is not None:
            # a BOS or EOS the template saw that tokenizer.json lacks was the source's class default (Command-R's
            # <|END_OF_TURN_TOKEN|>): named here, from_hf_folder would refuse the export (a config's token must be
            # the tokenizer's), so the export names the class and leaves the key out, as its source did; transformers
            # (which adds the default as a new token, source and export alike) and from_hf_folder read it back so.
            # Every other key of the class's defaults is named above (a null where the source had none).
            config["tokenizer_class"] = self.template_class
            for key, name in self.template_ends.items():
                if name and self._tok.token_to_id(name) is None and name == CLASS_TOKENS[self.template_class].get(key):
                    del config[key]
        if chat_template is not None:
            from tritongpt.train.chat_template import hf_chat_template_field

            config["chat_template"] = hf_chat_template_field(chat_template, chat_templates)
        return {"tokenizer.json": json.dumps(self.spec, ensure_ascii=False, indent=2),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}


class DecoderPanic(UserError):
    """The tokenizers library panicked decoding (HFTokenizer._decode)."""


def _decoders(d):
    """tokenizer.json's decoder d and the decoders of its Sequences, in order."""
    if isinstance(d, dict):
        yield d
        for part in (d.get("decoders") or []) if d.get("type") == "Sequence" else []:
            yield from _decoders(part)


def _holds_decoder(d, kind: str) -> bool:
    """Whether tokenizer.json's decoder d is, or has in its Sequence, a decoder of this type."""
    return isinstance(d, dict) and (d.get("type") == kind or d.get("type") == "Sequence" and
                                    any(_holds_decoder(part, kind) for part in d.get("decoders") or []))


def local_decoder(d, fused: bool = False) -> bool:
    """Whether d, tokenizer.json's "decoder", spells each id's text the same in any run of ids that has the ids just
    before it (fused: a Fuse or ByteLevel came before d in its Sequence, the tokens one text now): each spells a
    token alone (ByteLevel and ByteFallback a run of byte tokens together, Fuse and ByteLevel join all), but for the
    text's first token (Metaspace and WordPiece spell it without its space), its first and last spaces (a Strip after
    a Fuse), its last token (BPEDecoder) and a token equal to the one before (CTC). For those, a window of a row's
    last ids, decoded, spells its ids past its head as decoding the whole row does (Window), and the head is read in
    the same place each time. Any other (a Replace of a longer pattern after a Fuse may span tokens, and the row's
    text then need not extend the text handed out; a regex Replace; a BPEDecoder or CTC after a Fuse, whose suffix or
    pad may span tokens): decoded whole each time.

    Why a window of ids[p:m] with a head (ids[p:r]'s text, r the done ids) is exact for the kinds that look past a
    token: Window hands out window[len(head):], which is whole[m][len(whole[r]):] when ids[r:m] are spelled in the
    window as in the row and the head as it was read. BPEDecoder spells a token by whether it is last (its suffix
    "" last, " " before another): ids[r:m]'s last is last in both, and the head's last, read when it was last, only
    gains its " " where the suffix ends the token (else the window's text does not start with the head: checked,
    decoded whole from then on). CTC drops a token equal to the one just before (its pad and word delimiter are the
    token's own): it reaches back one id, and ids[r]'s is ids[r - 1], in the window since p < r; the head's first,
    never dropped in the window, is the head's alone. A Strip of the end after a Fuse takes at most `stop` content
    characters off the text's end: the head's text not empty, the window's fused text is more than a run of `stop`
    content characters, so the Strip takes the same ones off the window as off the row (and never panics on it)."""
    if d is None:  # (no decoder: the tokens joined by spaces)
        return True
    if not isinstance(d, dict):
        return False
    kind = d.get("type")
    if kind == "Sequence":
        for part in d.get("decoders") or []:
            if not local_decoder(part, fused):
                return False
            # (a Sequence in the Sequence fuses the tokens for the parts after it where any of its own parts does)
            fused = fused or any(_holds_decoder(part, joiner) for joiner in ("Fuse", "ByteLevel"))
        return True
    if kind in ("ByteLevel", "Fuse"):
        return True
    if kind in ("Metaspace", "WordPiece", "ByteFallback", "BPEDecoder", "CTC"):  # (on the tokens, not one fused text)
        return not fused
    if kind == "Strip":  # the text's first and last spaces after a Fuse: the head keeps some text (Window)
        return True
    if kind == "Replace":  # each token's own, or one character of the fused text
        pattern = (d.get("pattern") or {}).get("String")
        return isinstance(pattern, str) and (not fused or len(pattern) == 1)
    return False


class Window:
    """decode(ids[:m]) of a growing row without decoding the row: the ids up to r (a point no later id changes the
    text before: not after a byte-fallback token, not in a cut character) are done, their text's length `done`;
    text(m) decodes ids[p:m], a window from an earlier such point p whose own text `head` (ids[p:r]'s) is not empty
    (a Strip of a window's first space then cuts the head's), and what follows head is ids[r:m]'s text as decoding the
    whole row spells it (local_decoder). A tokenizer whose decoder is not local decodes the row whole each time (p
    and r stay 0), decided once per tokenizer (HFTokenizer.incremental); so does a row whose window's text does not
    start with its head (a BPEDecoder token with its suffix inside it, not at its end; checked rather than trusted),
    or whose window the library panics on (DecoderPanic: the row's own decode then says whether its text is read)."""
    SPAN = 16  # ids a window may reach back before p moves up to r

    def __init__(self, tok):
        self.tok, self.ids, self.local = tok, [], tok.incremental
        self.p = self.r = self.done = 0
        self.head = ""

    def _decode(self, ids) -> str:
        return self.tok._decode(ids)

    def text(self, m: int) -> str:
        """decode(ids[:m])[done:], m >= r."""
        if self.local:
            try:
                window = self._decode(self.ids[self.p:m])
            except DecoderPanic:  # (a window the library panics on where the row may not: the row decides)
                window = None
            if window is not None and window.startswith(self.head):
                return window[len(self.head):]
            self.local = False
        return self._decode(self.ids[:m])[self.done:]

    def commit(self, m: int, text: str) -> bool:
        """Marks ids[:m] done where no later id can change their text: text, text(m), holds no cut character at its
        end and ids[m - 1] is no byte-fallback token (a run of them is decoded together). -> whether it did."""
        if not self.local or m <= self.r or self.ids[m - 1] in self.tok.byte_ids or text.endswith("\ufffd"):
            return False
        r, self.r, self.done = self.r, m, self.done + len(text)
        head = ""
        # a fresh window's text, ids[r:m]'s alone, only where it holds a character a Strip of the end does not strip
        # (one of only those, shorter than the Strip's start + stop, panics the library; the row's text may not)
        strips = self.tok.strip_chars
        if m - self.p > self.SPAN and (not strips or any(c not in strips for c in text)):
            try:
                head = self._decode(self.ids[r:m])
            except DecoderPanic:  # (the window grows on from p)
                pass
        if head:
            self.p, self.head = r, head
        else:
            self.head += text
        return True


class TextSoFar:
    """Streams decode(ids so far). A token's text is not its own decode (SentencePiece's "▁" is a
    space except first), so each write decodes the ids and hands out what is new, holding back what
    later ids may change: a run of byte-fallback tokens (<0xE2>...) is decoded together, valid bytes
    turning to U+FFFD when the run ends in a broken character, and a trailing U+FFFD may be a
    character cut between tokens. flush hands out the rest. The ids are decoded a window at a time
    (Window: a write costs the last few ids' decode, not the row's), but for a decoder that is not
    local; a window whose text does not spell what was handed out (a decoder local_decoder misjudged)
    falls back to that, handing out only what extends the text handed out. (tokenizers' DecodeStream
    raises on byte tokens that never make a character, which a random model draws.)"""

    def __init__(self, tok: HFTokenizer):
        self.tok, self.window = tok, Window(tok)
        # the pieces handed out (joined only if the window falls back), and `loose`: those handed out past the
        # window's done ids (a cut character at the text's end keeps them from being done): its text starts with it
        self.pieces, self.loose = [], ""
        # the text handed out, kept to compare where the row is decoded whole each write: for a decoder that is not
        # local, and once a window's text did not spell what was handed out (a decoder local_decoder misjudged)
        self.shown = None if tok.incremental else ""

    def _fall_back(self):
        """Decodes the row whole from now on, handing out only what extends the text handed out (the window's
        pieces may be what the whole row's text no longer starts with: then nothing until it does)."""
        self.shown, self.window.local = "".join(self.pieces), False

    def write(self, ids) -> str:
        w = self.window
        w.ids += self.tok._checked_ids(ids)
        n = len(w.ids)
        while n > w.r and w.ids[n - 1] in self.tok.byte_ids:
            n -= 1
        if n == w.r:
            return ""
        if self.shown is None:
            text = w.text(n)
            # (checked before a piece goes out: what was handed out is the done text and loose, so a window that
            # spells the row's text past its done ids as decoding the row whole does starts with loose)
            if w.local and text.startswith(self.loose):
                new = text.rstrip("\ufffd")[len(self.loose):]
                self.loose = "" if w.commit(n, text) else self.loose + new
                if new:
                    self.pieces.append(new)
                return new
            self._fall_back()
        text = self.tok.decode(w.ids[:n]).rstrip("\ufffd")
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += new
        return new

    def flush(self) -> str:
        w = self.window
        if len(w.ids) == w.r:
            return ""
        if self.shown is None:
            text = w.text(len(w.ids))
            if w.local and text.startswith(self.loose):
                return text[len(self.loose):]
            self._fall_back()
        text = self.tok.decode(w.ids)
        return text[len(self.shown):] if text.startswith(self.shown) else ""
