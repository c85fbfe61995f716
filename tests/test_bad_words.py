"""vLLM's allowed_token_ids and bad_words (train/generate.py allow_and_ban): generate(), the batching engine and
prompt lookup's verify step each draw, greedy, the model's argmax among the allowed and unbanned tokens, computed
here directly token by token; a word of several tokens is banned only after its prefix; and serve's fields, their
tokenizing (vLLM's update_from_tokenizer) and their refusals."""
import json
import re

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.train import serve
from tritongpt.train.batch_generate import generate_batch
from tritongpt.train.engine import Engine
from tritongpt.train.generate import allow_and_ban, check_sampling, generate

from test_engine import VOCAB, tiny
from test_serve import call, new_text, start, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def banned_here(row, start, word):
    """A bad word's last token is banned where its other tokens end the generated text (a one-token word always)."""
    need = len(word) - 1
    return len(row) - start >= need and row[len(row) - need:] == list(word[:-1])


@torch.no_grad()
def reference(model, idx, new, allowed=None, words=()):
    """Greedy, by hand: a whole forward each step, the argmax over the tokens allowed and not banned."""
    rows, start = idx.tolist(), idx.size(1)
    for _ in range(new):
        logits = model(torch.tensor(rows))[:, -1].double()
        for r, row in enumerate(rows):
            ok = [t for t in range(logits.size(-1)) if (allowed is None or t in allowed)
                  and not any(w[-1] == t and banned_here(row, start, w) for w in words)]
            row.append(max(ok, key=lambda t: float(logits[r, t])))
    return torch.tensor(rows)


def test_greedy_generate_and_engine_draw_the_best_allowed_unbanned_token():
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    allowed = sorted(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:23].tolist())
    free = reference(model, idx, 6, allowed)
    # a one-token word (row 0's first pick); then a two-token word, row 1's third and fourth picks: its last token
    # banned there, after its prefix, but drawn where the prefix is not before it (row 0's)
    one = [[int(free[0, 7])]]
    mid = reference(model, idx, 6, allowed, one)
    words = one + [mid[1, 9:11].tolist()]
    want = reference(model, idx, 6, allowed, words)
    assert want[0, 7] != free[0, 7] and torch.equal(want[:, :10], mid[:, :10]) and want[1, 10] != mid[1, 10]
    assert words[1][1] in want[0, 7:].tolist()
    assert all(t in allowed for t in want[:, 7:].flatten().tolist())
    got = generate(model, idx, 6, allowed_token_ids=allowed, bad_words=words)
    assert torch.equal(got, want)
    engine = Engine(model, max_batch=4)
    h = engine.submit(idx, 6, allowed_token_ids=allowed, bad_words=words)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), want)


def test_the_prefix_is_matched_in_the_generated_text_only():
    """vLLM matches a word's prefix against the output tokens: the prompt's last token does not ban."""
    model = tiny()
    idx = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    first = int(reference(model, idx, 1)[0, -1])
    word = [int(idx[0, -1]), first]
    assert torch.equal(generate(model, idx, 3, bad_words=[word]), reference(model, idx, 3, words=[word]))
    assert int(generate(model, idx, 1, bad_words=[word])[0, -1]) == first


def test_prompt_lookup_never_accepts_a_banned_proposal():
    """The text repeats, so lookup proposes the pattern's next tokens: the banned one is rejected at the verify step
    (greedy: the reference's tokens; sampled: never drawn)."""
    model = tiny()
    idx = torch.tensor([[11, 12, 13, 14, 15] * 3 + [11, 12]])
    words = [[13], [14, 15]]
    stats = {}
    got = generate(model, idx, 8, prompt_lookup=2, num_draft_tokens=4, bad_words=words, stats=stats)
    assert stats["drafted"] > 0
    assert torch.equal(got, reference(model, idx, 8, words=words))
    engine = Engine(model, max_batch=4, prompt_lookup=2, num_draft_tokens=4)
    h = engine.submit(idx, 8, bad_words=words)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), got)
    allowed = [12, 14, 15, 40, 41]
    for seed in range(3):
        out = generate(model, idx, 8, temperature=1.5, prompt_lookup=2, allowed_token_ids=allowed,
                       bad_words=[[14, 15]], generator=torch.Generator().manual_seed(seed))[0, idx.size(1):].tolist()
        assert all(t in allowed for t in out) and all(out[j:j + 2] != [14, 15] for j in range(len(out)))


def test_nothing_left_to_draw_and_bad_settings_are_refused():
    logits = torch.randn(2, 9)
    with pytest.raises(UserError, match="no token to draw"):
        allow_and_ban(logits, [3], [[3]])
    # a mask before (a grammar's) that leaves none of the allowed tokens
    with pytest.raises(UserError, match="no token to draw"):
        allow_and_ban(logits.index_fill(-1, torch.tensor([2, 3]), float("-inf")), [2, 3])
    # a finished row is no error
    assert torch.isinf(allow_and_ban(logits, [3], [[3]], live=torch.tensor([False, False]))).all()
    with pytest.raises(UserError, match="token id 9, outside the 9"):
        allow_and_ban(logits, [1, 9])
    for bad in ([], [-1], "12", [1.5]):
        with pytest.raises(UserError, match="allowed_token_ids must be a non-empty list"):
            check_sampling(allowed_token_ids=bad)
    for bad in ([[]], [1], [[1, -2]], "ab"):
        with pytest.raises(UserError, match="bad_words must be a list of tokenized words"):
            check_sampling(bad_words=bad)
    with pytest.raises(UserError, match="no token to draw"):
        generate(tiny(), torch.tensor([[1, 2, 3]]), 3, allowed_token_ids=[5], bad_words=[[5]])


def test_a_word_of_several_tokens_that_leaves_nothing_is_named_and_never_gives_token_0():
    """allowed_token_ids [7] and the word [7, 7]: after a 7 nothing is left. The error names the word (a DrawError,
    field bad_words: serve's 400 param), where a one-token word's stays the general one; prompt lookup's verify step,
    whose proposal 7 and the token after it are checked in one step, raises it too (it took token 0 there, outside
    allowed_token_ids), greedy and sampled (whose tempered logits are NaN, not -inf), generate() and the engine
    alike. Two new tokens: the error is the second's (token 0 taken there raised nothing until a later 7)."""
    from tritongpt.train.generate import DrawError

    logits = torch.randn(2, 9)
    with pytest.raises(DrawError, match="allowed_token_ids and bad_words leave a row") as e:
        allow_and_ban(logits, [3], [[3]])
    assert e.value.field is None
    said = re.escape("bad_words [3, 3] bans token 3 after its other tokens, which the text ends with")
    seen = torch.tensor([[1, 3], [1, 2]])
    with pytest.raises(DrawError, match=said) as e:
        allow_and_ban(logits, [3], [[3, 3]], seen, 0)
    assert e.value.field == "bad_words"
    with pytest.raises(DrawError, match="^" + said) as e:  # a word listed twice: named once ("bans", "its")
        allow_and_ban(logits, [3], [[3, 3], [3, 3]], seen, 0)
    assert "[3, 3], [3, 3]" not in str(e.value)
    model = tiny()
    idx = torch.tensor([[5, 7, 8, 9, 5]])  # (the n-gram "5" proposes 7, 8, 9)
    said = re.escape("bad_words [7, 7] bans token 7 after its other tokens")
    for kw in (dict(), dict(prompt_lookup=1, num_draft_tokens=3), dict(prompt_lookup=1, temperature=1.0)):
        with pytest.raises(DrawError, match=said):
            generate(model, idx, 2, allowed_token_ids=[7], bad_words=[[7, 7]], **kw)
    engine = Engine(model, max_batch=4, prompt_lookup=1, num_draft_tokens=3)
    h = engine.submit(idx, 2, allowed_token_ids=[7], bad_words=[[7, 7]])
    with pytest.raises(DrawError, match=said):
        while engine.running or engine.waiting:
            engine.step()
        h.wait()
    # offline (generate --prompts): the record it fails named, as a refusal at its submission is
    each = [None, dict(allowed_token_ids=[7], bad_words=[[7, 7]])]
    with pytest.raises(DrawError, match="^b.jsonl: record 1: " + said) as e:  # (its type and field kept)
        generate_batch(model, [idx, idx], 2, max_batch=2, each=each, names=["b.jsonl: record 0", "b.jsonl: record 1"])
    assert e.value.field == "bad_words"


def test_masks_with_the_ngram_ban_that_leave_nothing_are_an_error_not_token_0():
    """allowed_token_ids [7, 8, 10] and no_repeat_ngram_size 1 after a prompt of 7, 8: the first token is 10, then the
    ban leaves the allowed ids nothing (the vocabulary is not all banned, which was all the ban checked): an error,
    not token 0 drawn outside them, plain decoding (greedy, sampled), prompt lookup's verify step and the engine's."""
    model, idx = tiny(), torch.tensor([[5, 7, 8, 9, 5]])  # (the n-gram "5" proposes 7, 8, 9)
    kw = dict(allowed_token_ids=[7, 8, 10], no_repeat_ngram_size=1)
    said = "--no-repeat-ngram-size 1 bans every token of a row's vocabulary .* the masks leave it"
    for extra in (dict(), dict(temperature=1.0), dict(prompt_lookup=1, num_draft_tokens=3)):
        assert generate(model, idx, 1, **kw, **extra)[0, -1] == 10
        with pytest.raises(UserError, match=said):
            generate(model, idx, 2, **kw, **extra)
    for engine in (Engine(model, max_batch=2), Engine(model, max_batch=2, prompt_lookup=1, num_draft_tokens=3)):
        h = engine.submit(idx, 2, **kw)
        with pytest.raises(UserError, match=said):
            while engine.running or engine.waiting:
                engine.step()
            h.wait()


def test_speculation_errs_only_where_a_row_takes_its_token():
    """The masks leave nothing after the draft 7 (allowed_token_ids [7, 8], the words [7, 7] and [7, 8]), but the
    model, its 8 biased up, refuses that draft: no row takes a token there, and the text is plain decoding's (8s),
    not an error, greedy and sampled, generate() and the engine."""
    model, idx = tiny(), torch.tensor([[5, 7, 8, 9, 5]])  # (the n-gram "5" proposes 7, 8, 9)
    kw = dict(allowed_token_ids=[7, 8], bad_words=[[7, 7], [7, 8]], logit_bias={8: 100.0})
    for temperature in (0.0, 1.0):
        want = generate(model, idx, 4, temperature=temperature, **kw)
        assert want[0, 5:].tolist() == [8] * 4
        got = generate(model, idx, 4, temperature=temperature, prompt_lookup=1, num_draft_tokens=3, **kw)
        assert torch.equal(got, want)
        engine = Engine(model, max_batch=2, prompt_lookup=1, num_draft_tokens=3)
        h = engine.submit(idx, 4, temperature=temperature, **kw)
        while engine.running or engine.waiting:
            engine.step()
        assert torch.equal(h.wait(), want)


def test_served_fields_tokenize_and_refuse(tmp_path):
    tok = tiny_run(tmp_path / "run", "chat")
    server = start(tmp_path / "run")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        model, prompt = server.app.model, "the cat sat"
        ids = tok.encode(prompt)
        words = serve.bad_words_ids(server.app.encode, [" mat", "dog ran"], 300)
        # each as it is; with a leading space only where that gives as many tokens (vLLM's rule): " mat" is one
        assert words == [tok.encode("mat"), tok.encode("dog ran")] and len(tok.encode(" mat")) == 1
        allowed = [i for i in range(40, 300, 3)]
        free = reference(model, torch.tensor([ids]), 5, allowed)[0, len(ids):].tolist()
        # a drawn token's text as a bad word (one that tokenizes back to that token alone)
        word = next(w for w in map(lambda t: tok.decode([t]), free)
                    if tok.encode(w.lstrip()) in ([t] for t in free))
        words = serve.bad_words_ids(server.app.encode, [word], 300)
        want = reference(model, torch.tensor([ids]), 5, allowed, words)[0, len(ids):].tolist()
        assert want != free
        status, out = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                       "allowed_token_ids": allowed, "bad_words": [word]})
        assert status == 200 and out["choices"][0]["text"] == new_text(tok, ids, want), out
        status, out = call(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "allowed_token_ids": [tok.encode(" a")[0]]})
        assert status == 200 and out["choices"][0]["message"]["content"].strip() == "a a a", out
        for body, field, message in (({"allowed_token_ids": []}, "allowed_token_ids", "non-empty list"),
                                     ({"allowed_token_ids": [300]}, "allowed_token_ids", "tokens are 0..299"),
                                     ({"bad_words": [5]}, "bad_words", "non-empty strings"),
                                     ({"bad_words": "mat"}, "bad_words", "non-empty strings"),
                                     ({"bad_words": ["mat"], "use_beam_search": True, "n": 2}, "bad_words",
                                      "cannot be used with 'use_beam_search'")):
            status, out = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, **body})
            assert status == 400 and out["error"]["param"] == field and message in out["error"]["message"], out
    finally:
        server.shutdown()
        server.server_close()


def test_the_static_mask_is_built_once_a_request_and_draws_the_same_tokens():
    """The mask of the ids banned at every step (outside allowed_token_ids, one-token bad words) was rebuilt on the
    host each decode step (a [rows, vocab] tensor sent to the device): it is built once for a request's ids and
    reused (static_ban's cache), the tokens those of the by-hand reference; other ids build their own."""
    from tritongpt.train.generate import static_ban

    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    allowed = list(range(3, VOCAB, 4))
    words = [[allowed[2]], [allowed[0], allowed[1]]]
    static_ban.cache_clear()
    got = generate(model, idx, 5, allowed_token_ids=allowed, bad_words=words)
    assert torch.equal(got, reference(model, idx, 5, allowed, words))
    assert static_ban.cache_info().misses == 1 and static_ban.cache_info().hits == 4
    engine = Engine(model, max_batch=4)
    hs = [engine.submit(idx[:1], 4, allowed_token_ids=allowed, bad_words=words),
          engine.submit(idx[1:], 4, allowed_token_ids=allowed[:9])]
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(hs[0].wait(), reference(model, idx[:1], 4, allowed, words))
    assert torch.equal(hs[1].wait(), reference(model, idx[1:], 4, allowed[:9]))
    assert static_ban.cache_info().misses == 2  # (the first request's ids were cached already)


def test_the_generate_command_takes_them_as_flags(tmp_path, capsys):
    """generate --allowed-token-ids (comma-separated, or @FILE) and --bad-words (tokenized as serve's bad_words):
    the text greedy draws is the by-hand reference's; bad values are refused by flag."""
    from tritongpt import cli
    from tritongpt.train.gpt2_weights import load_checkpoint

    tok = tiny_run(tmp_path / "run", "chat")
    model = load_checkpoint(str(tmp_path / "run")).eval()
    ids = tok.encode("the cat sat")
    allowed = list(range(40, 290, 3))
    free = reference(model, torch.tensor([ids]), 4, allowed)[0, len(ids):].tolist()
    word = next(w for w in map(lambda t: tok.decode([t]), free) if tok.encode(w.lstrip()) in ([t] for t in free))
    words = serve.bad_words_ids(lambda text, bos, special: tok.encode(text, allowed_special="all"), [word], 300)
    want = reference(model, torch.tensor([ids]), 4, allowed, words)[0].tolist()
    assert want[len(ids):] != free
    (tmp_path / "ids.txt").write_text(" ".join(map(str, allowed[:9])) + "\n" + ",".join(map(str, allowed[9:])))
    base = ["generate", "--weights", str(tmp_path / "run"), "--prompt", "the cat sat", "--device", "cpu",
            "--max-new-tokens", "4", "--temperature", "0"]
    assert cli.main([*base, "--allowed-token-ids", "@" + str(tmp_path / "ids.txt"), "--bad-words", word]) == 0
    assert capsys.readouterr().out == tok.decode(want) + "\n"
    assert cli.main([*base, "--allowed-token-ids", ",".join(map(str, allowed))]) == 0
    assert capsys.readouterr().out == tok.decode(ids + free) + "\n"
    # --prompts FILE: the engine's rows take them too
    (tmp_path / "p.txt").write_text("the cat sat\n")
    batch = [*base[:3], "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.jsonl"), *base[5:]]
    assert cli.main([*batch, "--allowed-token-ids", ",".join(map(str, allowed)), "--bad-words", word]) == 0
    text = tok.decode(want)
    assert text.startswith("the cat sat") and json.loads((tmp_path / "o.jsonl").read_text())["text"] == text[11:]
    for flags, said in ((["--allowed-token-ids", "1,x"], "--allowed-token-ids: 'x' is not a token id"),
                        (["--allowed-token-ids", "5, 300"], "--allowed-token-ids has token id 300: the model's "
                                                            "tokens are 0..299"),
                        (["--allowed-token-ids", "@nope.txt"],
                         "--allowed-token-ids @nope.txt: file not found: nope.txt"),
                        (["--bad-words", " "], "--bad-words takes a word of text")):
        assert cli.main([*base, *flags]) == 2
        assert said in capsys.readouterr().err


def test_the_ids_file_is_read_as_other_text_files_are_and_refused_by_name(tmp_path, capsys):
    """--allowed-token-ids @FILE: ids across lines, commas and spaces, duplicates kept; a file that is not UTF-8
    text, or a folder, a refusal naming it (read_text_file's), not a traceback from the decoder. The flags are read
    before the model loads: a typo is refused before any weights are looked for."""
    import argparse

    from tritongpt import cli
    from tritongpt.commands import mask_flags

    def masks(text):
        return mask_flags(argparse.Namespace(allowed_token_ids=text, bad_words=None))[0]

    (tmp_path / "ids.txt").write_text(" 7,\t3\r\n3 299\n")
    assert masks("@" + str(tmp_path / "ids.txt")) == [7, 3, 3, 299]
    (tmp_path / "bin.txt").write_bytes(b"1, 2, \xff\xfe")
    for path, said in ((tmp_path / "bin.txt", "not UTF-8 text"), (tmp_path, "is a folder, not a file")):
        with pytest.raises(UserError, match=said) as e:
            masks("@" + str(path))
        assert str(e.value).startswith(f"--allowed-token-ids @{path}: ")
    with pytest.raises(UserError, match="'-1' is not a token id"):
        masks("1,-1")
    for prompts in (["--prompt", "x"], ["--prompts", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.jsonl")]):
        for flag in (["--allowed-token-ids", "1,x"], ["--bad-words", ""]):
            assert cli.main(["generate", "--weights", str(tmp_path / "no-run"), *prompts, *flag]) == 2
            assert capsys.readouterr().err.startswith(f"error: {flag[0]}"), flag


def test_the_chat_command_takes_them_as_flags(tmp_path, monkeypatch, capsys):
    """chat --allowed-token-ids and --bad-words (generate's flags, read by the same helpers): each turn's greedy
    answer is the by-hand reference's over that turn's prompt (the conversation so far); bad values are refused by
    flag, a typo before any model is looked for."""
    import io

    from tritongpt import cli
    from tritongpt.train import chat
    from tritongpt.train.gpt2_weights import load_checkpoint

    tok = tiny_run(tmp_path / "run", "chat")
    model = load_checkpoint(str(tmp_path / "run")).eval()
    allowed = [t for t in range(40, 290, 3) if t != tok.eot_id]  # (no end of turn: each answer runs 4 tokens)
    conv, lines, want = chat.Conversation("chat"), ["the cat sat", "and then"], []
    ids = conv.fit(tok, lines[0], 128, 4)[0]
    free = reference(model, torch.tensor([ids]), 4, allowed)[0, len(ids):].tolist()
    word = next(w for w in map(lambda t: tok.decode([t]), free) if tok.encode(w.lstrip()) in ([t] for t in free))
    words = serve.bad_words_ids(lambda text, bos, special: tok.encode(text, allowed_special="all"), [word], 300)
    for line in lines:
        ids = conv.fit(tok, line, 128, 4)[0]
        want.append(reference(model, torch.tensor([ids]), 4, allowed, words)[0, len(ids):].tolist())
        conv.add(line, tok.decode(want[-1]))
    assert want[0] != free and all(t in allowed and [t] not in words for t in sum(want, []))
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    base = ["chat", "--weights", str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "4",
            "--temperature", "0"]
    assert cli.main([*base, "--allowed-token-ids", ",".join(map(str, allowed)), "--bad-words", word]) == 0
    assert capsys.readouterr().out == "".join(tok.decode(w) + "\n" for w in want)
    for flags, said in ((["--allowed-token-ids", "1,x"], "--allowed-token-ids: 'x' is not a token id"),
                        (["--allowed-token-ids", "5, 300"], "--allowed-token-ids has token id 300: the model's "
                                                            "tokens are 0..299"),
                        (["--bad-words", " "], "--bad-words takes a word of text")):
        assert cli.main([*base, *flags]) == 2
        assert said in capsys.readouterr().err
    for flag in (["--allowed-token-ids", "@nope.txt"], ["--bad-words", ""]):
        assert cli.main(["chat", "--weights", str(tmp_path / "no-run"), *flag]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag[0]}"), flag


def test_a_grammar_whose_end_token_the_masks_leave_out_is_refused_before_any_answer(tmp_path, monkeypatch, capsys):
    """--structured-outputs ends each text with its end token (chat's end of turn, generate's end of text, --prompts'
    records' too): where --allowed-token-ids leaves it out or --bad-words bans it, every text that reaches the
    grammar's end would have no token to draw (chat then quit mid-answer, the conversation lost). Refused by flag
    before any text (no --out written); with the end token allowed, chat answers as before."""
    import io

    from tritongpt import cli

    pytest.importorskip("xgrammar")
    tok = tiny_run(tmp_path / "run", "chat")
    spec = ["--structured-outputs", '{"choice": ["a", "b"]}']
    others = ",".join(str(t) for t in range(tok.vocab_size) if t != tok.eot_id)
    model = ["--weights", str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n')
    batch = ["generate", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out.jsonl")]
    for cmd in (["chat"], ["generate", "--prompt", "the cat"], batch):
        for flags, said in ((["--allowed-token-ids", others], f"--allowed-token-ids leaves out token {tok.eot_id}"),
                            (["--bad-words", "<|endoftext|>"], f"--bad-words bans token {tok.eot_id}")):
            monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand then\n"))
            assert cli.main([*cmd, *model, *spec, *flags]) == 2, (cmd, flags)
            out, err = capsys.readouterr()
            assert out == "" and said in err and "--structured-outputs" in err, (cmd, flags, out, err)
            assert not (tmp_path / "out.jsonl").exists()
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat", "structured_outputs": {"choice": ["a"]}}\n')
    assert cli.main([*batch, *model, "--allowed-token-ids", others]) == 2  # (a record's own grammar, named so)
    assert f"p.jsonl: record 0 (line 1): --allowed-token-ids leaves out token {tok.eot_id}, the end of the text, " \
           "which its structured_outputs' grammar" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand then\n"))
    assert cli.main(["chat", *model, *spec, "--allowed-token-ids", f"{others},{tok.eot_id}"]) == 0
    assert capsys.readouterr().out.splitlines() in (["a", "a"], ["a", "b"], ["b", "a"], ["b", "b"])
