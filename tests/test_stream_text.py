"""Streamed text against the whole answer, as vLLM's detokenizer has them: `serve`'s deltas add up to the
non-streamed text for every choice, with or without stop strings, on both endpoints; a character cut between tokens
is never sent as U+FFFD (nor one a prompt of token ids cuts); a stop string never leaks into the stream. The model
is a script of token ids over a byte-level BPE whose tokens split multi-byte characters."""
import random

import pytest
import torch

from test_serve import call, events, start
from tritongpt.commands import Choices, cut_at_stop
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.serve import Delta
from tritongpt.train.tokenizer import EOT, BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
# emoji, CJK, accents and a combining mark: the trained merges hold tokens like b"\x82\xf0\x9f" (a character's
# tail and the next one's head)
CORPUS = "the cat 🙂🎉 東京 naïve café a\u0301b " * 6


def tokenizer():
    return BPETokenizer.train(CORPUS, 280, special_tokens=(EOT, "<|im_end|>"))


class Scripted(torch.nn.Module):
    """A model stand-in whose greedy draw is script[row][k] as the row's k-th new token, then the EOS."""

    def __init__(self, vocab: int, eos: int):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, context_length=128, n_embd=32, n_layer=1, n_head=1)
        self.vocab, self.eos, self.script, self.prompt_len, self.adapters = vocab, eos, [[]], None, None

    def new_cache(self, batch, length):
        return type("Cache", (), dict(pos=0, reset=lambda c: setattr(c, "pos", 0)))()

    def forward(self, idx, cache=None):
        if cache is not None and cache.pos == 0:  # a prefill: the prompt's length
            self.prompt_len = idx.size(1)
        pos = (cache.pos if cache is not None else 0) + idx.size(1)
        if cache is not None:
            cache.pos = pos
        k = pos - self.prompt_len if cache is not None else -1  # (echo's scoring forward: no cache, no draw)
        out = torch.zeros(idx.size(0), idx.size(1), self.vocab)
        for b in range(idx.size(0)):
            row = self.script[b % len(self.script)]
            out[b, -1, row[k] if 0 <= k < len(row) else self.eos] = 20.0
        return out


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A server (--max-batch 1: generate(), which a stand-in model can drive) whose model is a Scripted."""
    folder = tmp_path_factory.mktemp("stream") / "run"
    tok = tokenizer()
    (folder / "ckpt-0000001").mkdir(parents=True)
    tok.save(folder / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=16, n_layer=1, n_head=1)).save(
        folder / "ckpt-0000001" / "model.safetensors")
    torch.save({"step": 1, "prompt_format": "chat"}, folder / "ckpt-0000001" / "state.pt")
    server = start(folder, "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    server.app.model = model = Scripted(tok.vocab_size, tok.eot_id)
    yield server, tok, model
    server.shutdown()
    server.server_close()


def both_ways(server, path, body) -> tuple:
    """(the response, each choice's streamed pieces by index, their last chunks), the stream checked error-free."""
    status, plain = call(server, path, body)
    assert status == 200, plain
    chunks = events(call(server, path, {**body, "stream": True})[1])
    assert not [c for c in chunks if "error" in c], chunks
    pieces, last = {}, {}
    for c in chunks:
        for ch in c["choices"]:
            text = ch["text"] if "text" in ch else ch["delta"].get("content") or ""
            pieces.setdefault(ch["index"], []).append(text)
            last[ch["index"]] = ch
    return plain, pieces, last


def answer_text(choice) -> str:
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_a_prompt_of_ids_that_cuts_a_character_streams_the_answers_text(scripted):
    """Token ids sent as the prompt can end inside a character ("a" and two of "€"'s three bytes). The stream read
    the prompt through the tokenizer's stream decoder, which holds those bytes back: the first new token then
    handed out the prompt's U+FFFD as the answer's (the new ids not completing it) or the completed "€" (where
    the answer, decoded as continuation() does, starts with U+FFFD), so the stream did not add up to the text
    and ended in a 500 error event. It now hands out the answer's text."""
    server, tok, model = scripted
    prompt = list("a€".encode())[:-1]
    model.script = [list(b"bc"), [list("€".encode())[-1]] + list(b"bc")]  # not completing it, completing it
    plain, pieces, last = both_ways(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "n": 2,
                                                               "temperature": 0})
    assert [c["text"] for c in plain["choices"]] == ["bc", "\ufffdbc"]
    for c in plain["choices"]:
        assert "".join(pieces[c["index"]]) == c["text"] and last[c["index"]]["finish_reason"] == "stop"


def test_a_stop_string_does_not_match_a_character_the_next_token_completes(scripted):
    """vLLM's detokenizer holds back text that ends in U+FFFD (a character a later token may complete), so its stop
    strings never see it. Ours searched the text decoded so far, where the first bytes of "🙂" are a U+FFFD: a stop
    string with one in it ended the answer mid-character. It now matches once text follows the U+FFFD, as a lone
    continuation byte's, which no token completes, is then."""
    server, tok, model = scripted
    emoji = list("🙂".encode())
    model.script = [list(b"hi") + emoji + list(b"!")]
    body = {"max_tokens": 8, "temperature": 0, "stop": ["\ufffd", "i\ufffd"]}
    for path, extra in (("/v1/completions", {"prompt": "the"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}]})):
        plain, pieces, last = both_ways(server, path, {**body, **extra})
        assert answer_text(plain["choices"][0]) == "hi🙂!" == "".join(pieces[0])
        assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["stop_reason"] is None  # EOS
    model.script = [list(b"hi") + [0x80] + list(b"!")]
    plain, pieces, last = both_ways(server, "/v1/completions", {**body, "prompt": "the", "stop": ["\ufffd"]})
    assert plain["choices"][0]["text"] == "hi" == "".join(pieces[0])
    assert (plain["choices"][0]["stop_reason"], plain["usage"]["completion_tokens"]) == ("\ufffd", 4)


def test_stop_strings_found_at_the_same_place_go_by_the_requests_order():
    """Two stop strings starting at the same character: the one listed first cuts (vLLM's check_stop_strings tries
    them in order), not the one that sorts first, which decided the text and stop_reason with
    include_stop_str_in_output."""
    assert cut_at_stop("xabc", ["abc", "ab"], keep=True, since=0) == ("xabc", "abc")  # ("xabc" one step's text)
    assert cut_at_stop("xabc", ["abc", "ab"], keep=True, since=2) == ("xabc", "abc")  # (both end in "bc"'s step)
    assert cut_at_stop("xabc", ["abc", "ab"], keep=True, since=3) == ("xab", "ab")  # ("ab" a step before "abc")
    assert cut_at_stop("xabc", ["abc", "ab"], keep=True) == ("xab", "ab")  # (steps not known: "ab" ends first)
    assert cut_at_stop("xabc", ["ab", "abc"], keep=True) == ("xab", "ab")
    assert cut_at_stop("xabc", ["abc", "ab"], since=1) == ("x", "abc")
    # (two ending at the same character are found at the same step, whatever the tokens: the one listed first)
    assert cut_at_stop("xabc", ["bc", "abc"]) == ("xa", "bc") and cut_at_stop("xabc", ["abc", "bc"]) == ("x", "abc")


def streamed(tok, prompt, new, stops, **ends) -> tuple:
    """Model.draw's stream of one choice, without the model: the new ids drawn one a step until Choices' rule ends
    the row (an end token, a stop string) -> (the text sent as it was drawn, Choices' (text, finish, count, reason))."""
    rows = Choices(tok, prompt, stops, tok.eot_id, **ends)
    delta, row, sent = Delta(tok, prompt, rows), list(prompt), ""
    for t in new:
        row.append(t)
        sent += delta.add(t)
        if rows.end_of(row[len(prompt):]) is not None or stops and rows.stopped(torch.tensor([row]))[0]:
            break
    return sent, rows.ending(0, row)


def test_fuzz_streamed_text_is_the_answers_own_and_stop_strings_never_leak():
    """Random token ids (characters cut between tokens and between the prompt and the answer, special tokens) and
    stop strings taken from the text they make (spanning tokens, several at once, some only in the prompt): what
    the stream sent is where the answer starts (Model.draw sends the rest at the end), never a U+FFFD the answer
    does not have; the answer ends at the first token whose text so far holds a stop string, cut where vLLM's
    check_stop_strings cuts (vllm_stop: before the first in the request's order that the token completes, at its
    end with include_stop_str_in_output, the string then in it once), finish "stop" with stop_reason the string;
    without one it is the whole continuation. A stop string never matches a U+FFFD the text so far ends in (vLLM's
    detokenizer holds it back). A special token's text is text only with skip_special_tokens false."""
    from tritongpt.commands import continuation

    tok, rng = tokenizer(), random.Random(0)
    specials = set(tok.special_tokens.values())
    for _ in range(300):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 4))]
        new = [rng.randrange(tok.vocab_size - 2) for _ in range(rng.randint(1, 10))]  # (no EOS, no <|im_end|>)
        if rng.random() < 0.3:
            new.insert(rng.randrange(len(new) + 1), rng.choice(sorted(specials)))
        skip, keep = rng.random() < 0.5, rng.random() < 0.4
        new = new[:new.index(tok.eot_id) + 1] if tok.eot_id in new else new
        # the answer's text after each token
        texts = [continuation(tok, prompt, [t for t in new[:k] if t != tok.eot_id and not (skip and t in specials)])
                 for k in range(1, len(new) + 1)]
        source = texts[-1] if rng.random() < 0.8 else tok.decode(prompt)  # (a stop only in the prompt stops nothing)
        stops = [source[a:a + rng.randint(1, 4)] for a in (rng.randrange(len(source)) for _ in range(
            rng.randint(0, 3)) if source)]
        # a special token's text (a stop only where it is text), a U+FFFD (only once text follows it)
        stops += [rng.choice(["<|im_end|>", "\ufffd"])] if rng.random() < 0.3 else []
        case = (prompt, new, stops, skip, keep)
        sent, (text, finish, count, reason) = streamed(tok, prompt, new, stops, include_stop=keep, skip_special=skip)
        assert text.startswith(sent), case
        hit = next((k for k, t in enumerate(texts) if any(s in t.rstrip("\ufffd") for s in stops)), None)
        if hit is None:
            assert text == texts[-1] and reason is None, case
            continue
        step, first, want = vllm_stop(texts, stops, keep)  # (which stop string, where: vLLM's rule)
        at = len(want) - len(first) if keep else len(want)
        assert (finish, reason, count) == ("stop", first, hit + 1) and step == hit, case
        assert text == want, case
        # (no stop string an earlier token completed: one listed after the stop_reason that the same token completed
        # may start before it, vLLM's; with include_stop_str_in_output the text ends with it, there once)
        before = len(texts[hit - 1].rstrip("\ufffd")) if hit else 0
        assert all(text.find(s) < 0 or text.find(s) + len(s) > before for s in stops), case
        assert text.find(reason) == (at if keep else -1) and (not keep or text.endswith(reason)), case
        assert keep or reason not in sent, case


def test_min_tokens_counts_the_text_its_tokens_show_not_a_character_they_leave_cut():
    """min_tokens: a stop string counts where it ends past the text of the first min_tokens tokens, which vLLM's
    detokenizer reads as it has handed it out, less text that ends in U+FFFD (a cut character: held back). Choices
    counted that U+FFFD into the text (its `after`, on the grown and whole-row paths alike), the stream (Delta) did
    not: with min_tokens 1 and "é" cut between the first two tokens, the stream cut at the stop string "é" while
    the answer went on past it (vLLM's stops there). Each path now stops, or not, at the same token."""
    tok = tokenizer()
    prompt, e = list(b"the"), list("é".encode())
    for new, stops, min_tokens, want in (
            (e + list(b"xy"), ["é"], 1, ("", "stop", 2, "é")),  # the "é" ends past "": it counts
            (e + list(b"xy"), ["é"], 2, ("éxy", "length", 4, None)),  # within the first two tokens' "é"
            ([0x80] + list(b"ab"), ["\ufffd"], 1, ("", "stop", 2, "\ufffd")),  # a lone byte's, once "a" follows
            ([0x80] + list(b"ab"), ["\ufffd"], 2, ("\ufffdab", "length", 3, None))):
        for grown in (True, False):
            rows = Choices(tok, prompt, stops, tok.eot_id, min_tokens=min_tokens)
            assert rows.grown is not None  # (a byte-level BPE's: Grown)
            rows.grown = rows.grown if grown else None  # (the whole row decoded each step instead)
            delta, row, sent, case = Delta(tok, prompt, rows), list(prompt), "", (new, min_tokens, grown)
            for t in new:
                row.append(t)
                sent += delta.add(t)
                stopped = bool(rows.stopped(torch.tensor([row]))[0])
                assert delta.done == stopped, case  # the stream ends where the answer does
                if stopped:
                    break
            assert rows.ending(0, row) == want and want[0].startswith(sent), case


def vllm_stop(texts, stops, keep: bool = False):
    """vLLM's stop strings over an answer's text after each token (texts), a token a step: its detokenizer's text
    less the U+FFFDs it ends in (held back), searched by check_stop_strings for the stop strings in the request's
    order, each only where it ends in the step's new text; the first found wins. -> (step, stop, cut text) or
    None."""
    prev = ""
    for k, text in enumerate(texts):
        out = text.rstrip("\ufffd")
        for stop in stops if len(out) > len(prev) else ():
            at = out.find(stop, max(len(prev) - len(stop) + 1, 0))
            if at >= 0:
                return k, stop, out[:at + len(stop) if keep else at]
        prev = out
    return None


def test_stop_strings_a_token_completes_together_go_by_the_requests_order():
    """vLLM's check_stop_strings tries the stop strings in the request's order over a step's new text and takes the
    first it finds there, not the one that starts first: "e" before "h" in "the" (one token) cuts "th", "at"
    before "cat" in " cat" cuts " c". cut_at_stop took the earliest start ("t", " "): a text and stop_reason vLLM
    does not give. Served answers (Choices, grown and whole-row), their streams (Delta) and `generate --stream`'s
    HeldBack now give vLLM's, and a stop string an earlier token completes still wins."""
    tok = tokenizer()
    prompt, the, cat = list(b"a "), tok.encode("the"), tok.encode(" cat")
    assert len(the) == len(cat) == 1  # (one token each: both stop strings in one step's text)
    for new, stops, keep in ((the + cat, ["e", "h"], False), (the + cat, ["h", "e"], False),
                             (the + cat, ["at", "cat"], False), (the + cat, ["at", "cat"], True),
                             (the + cat, ["cat", "e c", "he"], False), (the + cat, ["e c", "he"], True)):
        texts = [tok.decode(prompt + new[:k + 1])[len("a "):] for k in range(len(new))]
        step, stop, want = vllm_stop(texts, stops, keep)
        for grown in (True, False):
            rows = Choices(tok, prompt, stops, tok.eot_id, include_stop=keep)
            rows.grown = rows.grown if grown else None
            delta, row, sent = Delta(tok, prompt, rows), list(prompt), ""
            for t in new:
                row.append(t)
                sent += delta.add(t)
                if rows.stopped(torch.tensor([row]))[0]:
                    break
            case = (new, stops, keep, grown)
            assert rows.ending(0, row) == (want, "stop", step + 1, stop) and sent == want, case
            assert delta.done, case


def test_held_back_searches_each_chunk_not_the_whole_text_again(monkeypatch):
    """HeldBack searched its whole text for the stop strings at every chunk: a stream's cost quadratic in its
    answer's length (0.6-2.4 s of host time a 100k-character answer, 4 characters a chunk). A stop string ending in
    text searched before is not there (it would have stopped the stream): only the chunk's window, and the stop
    strings that may end in it, need searching. The characters searched per chunk stay bounded, the text sent
    the same."""
    import tritongpt.commands as commands

    searched, cut = [], commands.cut_at_stop

    def counting(text, stops, after=0, keep=False, since=None):
        searched.append(len(text) - max(after - max(map(len, stops)) + 1, 0))
        return cut(text, stops, after, keep, since)

    monkeypatch.setattr(commands, "cut_at_stop", counting)
    rng = random.Random(0)
    text = "".join(rng.choice("ab Us\n") for _ in range(2000)) + "\n\nUser: hi"
    held = commands.HeldBack(["\n\nUser:", "zz"])
    sent = ""
    for i in range(0, len(text), 3):  # (as the streams do: nothing more once done)
        sent += held.add(text[i:i + 3])
        if held.done:
            break
    assert sent == text[:text.index("\n\nUser:")] and held.done
    assert max(searched) <= 3 + len("\n\nUser:"), max(searched)
