"""`tritongpt chat`: the prompt each turn makes (exactly SFT's encoding of the same chat), the
history dropped to fit the context, the template a run recorded, and the command's loop."""
import io
import json

import pytest
import torch

from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import chat, formats, sft
from test_formats import EOT, CharTokenizer  # one id per character, <|endoftext|> = 128

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_turn_is_prompted_as_sft_encodes_the_same_chat():
    tok = CharTokenizer()
    conv = chat.Conversation("chat", system="Be brief.")
    conv.add("Hi", "Hello.")
    conv.add("2+2?", "4")
    ids, budget, dropped = conv.fit(tok, "And 3+3?", context=500, max_new_tokens=20)
    assert (budget, dropped) == (20, 0)
    # the SFT record of the whole conversation, answered: its sequence starts with exactly these ids
    rec = formats.read_record({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}]}, "r")
    (ex,), _ = sft.encode_records([rec], tok, max_len=500)
    assert ids == ex.ids[:len(ids)] and tok.decode(ex.ids[len(ids):]) == "6<|endoftext|>"
    assert ids.count(EOT) == 2


@pytest.mark.parametrize("template, want", [
    ("alpaca", formats.format_prompt({"instruction": "Sort b a", "input": ""})),
    ("completion", "Sort b a"),
])
def test_templates_without_turns_answer_each_line_alone(template, want):
    tok = CharTokenizer()
    conv = chat.Conversation(template)
    conv.add("first", "one")
    assert conv.turns == []
    ids, _, _ = conv.fit(tok, "Sort b a", context=500, max_new_tokens=8)
    assert tok.decode(ids) == want
    # alpaca: the prompt an SFT record with this instruction (and no input) is trained on
    rec = {"instruction": "Sort b a", "input": "", "output": "a b"} if template == "alpaca" else \
        {"prompt": "Sort b a", "output": "a b"}
    assert ids == formats.encode_prompt(tok, formats.prompt_parts(rec))


def test_the_oldest_turns_are_dropped_to_make_room_and_the_system_message_stays():
    tok = CharTokenizer()
    conv = chat.Conversation("chat", system="S")
    for i in range(5):
        conv.add(f"question {i}", f"answer {i}")
    full = len(formats.encode_prompt(tok, conv.prompt("next")))
    turn = full - len(formats.encode_prompt(tok, conv.prompt("next", 1)))
    ids, budget, dropped = conv.fit(tok, "next", context=full + 10 - 1, max_new_tokens=10)  # one token short
    assert dropped == 1 and budget == 10 and len(ids) == full - turn
    assert tok.decode(ids).startswith("S\n\n### User:\nquestion 1")
    conv.add("next", "done", dropped)
    assert [u for u, _ in conv.turns] == ["question 1", "question 2", "question 3", "question 4", "next"]
    # with every turn dropped and still no room for --max-new-tokens, the answer gets what is left
    alone = len(formats.encode_prompt(tok, conv.prompt("x" * 40, len(conv.turns))))
    ids, budget, dropped = conv.fit(tok, "x" * 40, context=alone + 3, max_new_tokens=10)
    assert (budget, dropped, len(ids)) == (3, 5, alone)
    with pytest.raises(UserError, match=rf"this message is {alone} tokens in the chat template; the model's "
                                        rf"context is {alone}: nothing is left for an answer"):
        conv.fit(tok, "x" * 40, context=alone, max_new_tokens=10)
    assert len(conv.turns) == 5  # a message that does not fit changes nothing
    # a budget over half the context asks only half of it: a short conversation keeps its history
    short = chat.Conversation("chat")
    short.add("a", "b")
    n = len(formats.encode_prompt(tok, short.prompt("c")))
    assert short.fit(tok, "c", context=2 * n, max_new_tokens=1000)[1:] == (n, 0)
    assert short.fit(tok, "c", context=2 * n - 2, max_new_tokens=1000)[2] == 1


def test_bad_templates_and_system_messages():
    with pytest.raises(UserError, match="--system needs the chat template"):
        chat.Conversation("alpaca", system="S")
    with pytest.raises(UserError, match="--system is empty"):
        chat.Conversation("chat", system=" ")
    with pytest.raises(UserError, match="--template must be one of"):
        chat.Conversation("auto")


def test_run_template_reads_what_the_run_saved(tmp_path):
    (tmp_path / "ckpt-0000002").mkdir()
    GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=8, n_layer=1, n_head=1)).save(
        tmp_path / "ckpt-0000002" / "model.safetensors")
    assert chat.run_template(str(tmp_path / "ckpt-0000002" / "model.safetensors")) is None  # weights alone
    torch.save({"step": 2, "prompt_format": "alpaca"}, tmp_path / "ckpt-0000002" / "state.pt")
    assert chat.run_template(str(tmp_path)) == "alpaca"
    torch.save({"step": 2}, tmp_path / "ckpt-0000002" / "state.pt")  # a pretraining run's
    assert chat.run_template(str(tmp_path)) is None



def test_a_run_tuned_on_another_template_is_noted_with_every_template_of_the_data(tmp_path, capsys):
    """note_template_mismatch: one note for each run tuned on a template the data does not use,
    naming every template the data does use, whichever flag comes first; none for a run on the
    data's own template, for data with no template, or for a name that is no run folder (a Hub
    model, which saved none)."""
    for name, fmt in (("chat-run", "chat"), ("plain-run", None)):
        (tmp_path / name / "ckpt-0000001").mkdir(parents=True)
        GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=8, n_layer=1, n_head=1)).save(
            tmp_path / name / "ckpt-0000001" / "model.safetensors")
        torch.save({"step": 1, "prompt_format": fmt}, tmp_path / name / "ckpt-0000001" / "state.pt")
    chat_run, plain_run = str(tmp_path / "chat-run"), str(tmp_path / "plain-run")
    said = (f"note: {{}} {chat_run} was tuned on chat prompts, and these are alpaca and completion prompts: "
            "it reads them in a template it was not trained on\n")
    chat.note_template_mismatch(["completion", "alpaca", None, "alpaca"], {"--init": chat_run, "--reward": plain_run})
    assert capsys.readouterr().err == said.format("--init")
    chat.note_template_mismatch(["alpaca", "completion"], {"--init": None, "--reward": chat_run})  # no --init
    assert capsys.readouterr().err == said.format("--reward")
    for data, runs in ((["chat", "completion"], {"--init": chat_run}), ([None, ""], {"--init": chat_run}),
                       (["alpaca"], {"--init": "gpt2", "--reward": str(tmp_path / "no-such-run")})):
        chat.note_template_mismatch(data, runs)
        assert capsys.readouterr().err == "", (data, runs)


def test_an_exported_run_keeps_its_template(tmp_path, capsys):
    """export writes the run's prompt format into config.json (transformers keeps the extra key),
    so `chat --weights` on the exported folder prompts it as the run was tuned."""
    import json

    from transformers import AutoConfig

    from tritongpt.cli import main

    run = tmp_path / "run" / "ckpt-0000002"
    run.mkdir(parents=True)
    GPTModel(GPTConfig(vocab_size=4096, context_length=16, n_embd=16, n_layer=1, n_head=1)).save(
        run / "model.safetensors")
    torch.save({"step": 2, "prompt_format": "completion"}, run / "state.pt")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--tokenizer", "default"]) == 0
    capsys.readouterr()
    assert chat.run_template(str(tmp_path / "hf")) == "completion"
    assert chat.run_template(str(tmp_path / "hf" / "model.safetensors")) == "completion"
    assert AutoConfig.from_pretrained(tmp_path / "hf").tritongpt_prompt_format == "completion"
    assert main(["info", "--weights", str(tmp_path / "hf")]) == 0  # info says so too, as of the run's checkpoint
    out = capsys.readouterr().out
    assert "prompts      completion template (what `tritongpt chat` prompts it with)" in out
    assert "run          - (a `tritongpt export` folder: weights, config.json and tokenizer files; no training" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for value in ("klingon", None):  # not a template: none recorded
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tritongpt_prompt_format": value}))
        assert chat.run_template(str(tmp_path / "hf")) is None
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    assert chat.run_template(str(tmp_path / "hf")) is None


def fake_answers(monkeypatch, answers):
    """generate() replaced: it records each prompt and answers the next of `answers` (a string
    that ends in "|" is cut there: no eot)."""
    import tritongpt.train.generate as gen
    from tritongpt.train.tokenizer import get_tokenizer

    tok, seen = get_tokenizer("default"), []

    def fake(model, idx, budget, **kw):
        seen.append(idx[0].tolist())
        text = answers[len(seen) - 1]
        new = tok.encode(text.rstrip("|")) + ([] if text.endswith("|") else [tok.eot_id])
        for i in new:  # streamed as generate streams
            kw["on_token"](torch.tensor([[i]]))
        return torch.cat([idx, torch.tensor([new])], 1)

    monkeypatch.setattr(gen, "generate", fake)
    return tok, seen


def test_the_command_keeps_the_conversation_and_obeys_its_commands(monkeypatch, capsys):
    tok, seen = fake_answers(monkeypatch, ["Hello.", "Fine, thanks|", "Third."])
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\n/what\nHow are you?\n/reset\nAgain\n/quit\nignored\n"))
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--system", "Be kind.",
                 "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["Hello.", "Fine, thanks", "Third."]
    assert "records no fine-tuning prompt format" in err and "unknown command '/what'" in err
    assert "the answer was cut at" in err and "the conversation is forgotten" in err and "outgrew" not in err
    conv = chat.Conversation("chat", system="Be kind.")
    assert seen[0] == formats.encode_prompt(tok, conv.prompt("Hi"))
    conv.add("Hi", "Hello.")
    assert seen[1] == formats.encode_prompt(tok, conv.prompt("How are you?"))  # the first answer and its eot
    assert seen[2] == formats.encode_prompt(tok, chat.Conversation("chat", system="Be kind.").prompt("Again"))
    assert len(seen) == 3  # nothing after /quit


def test_the_command_uses_the_template_an_sft_run_saved(tmp_path, monkeypatch, capsys):
    from tritongpt.train.tokenizer import BPETokenizer

    recs = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ["red", "blue", "gold", "pink"] * 3]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    tok = BPETokenizer.train(" ".join(json.dumps(r) for r in recs), 280)
    tok.save(tmp_path / "run" / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=16, n_layer=1, n_head=1)).save(
        tmp_path / "run" / "model.safetensors")
    assert main(["sft", "--init", str(tmp_path / "run"), "--data", str(tmp_path / "d.jsonl"), "--out-dir",
                 str(tmp_path / "sft"), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
                 "--eval-every", "0", "--sample-every", "0", "--val-fraction", "0"]) == 0
    capsys.readouterr()
    import tritongpt.train.generate as gen
    seen, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, idx, *a, **k: seen.append(idx[0].tolist()) or
                        real(model, idx, *a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("Say red:\n"))
    assert main(["chat", "--weights", str(tmp_path / "sft"), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    assert seen == [tok.encode("Say red:")]  # the completion template: the line as it is
    assert "prompt format" not in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("Say red:\n"))
    assert main(["chat", "--weights", str(tmp_path / "sft"), "--device", "cpu", "--max-new-tokens", "3",
                 "--template", "alpaca"]) == 0
    # the Alpaca preamble alone outgrows this model's 32 tokens: the turn is refused, naming the template
    assert "tokens in the alpaca template; the model's context is 32" in capsys.readouterr().err


def test_a_greedy_answer_is_what_generate_draws(monkeypatch):
    from tritongpt.train.generate import generate

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=129, context_length=64, n_embd=16, n_layer=1, n_head=2)).eval()
    tok = CharTokenizer()
    ids, budget, _ = chat.Conversation("completion").fit(tok, "abc", 64, 12)
    text, ended = chat.reply(model, tok, ids, budget, stream=False)
    want = generate(model, torch.tensor([ids]), 12, eos_id=EOT)[0, 3:].tolist()
    assert ended == (EOT in want)
    assert text == tok.decode(want[:want.index(EOT)] if ended else want)


def test_the_command_refuses_bad_flags_before_any_model(capsys):
    assert main(["chat", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1, got 0" in capsys.readouterr().err
    assert main(["chat", "--template", "completion", "--system", "S"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err
    assert main(["chat", "--temperature", "-1"]) == 2


def test_the_command_says_when_turns_are_dropped_and_forgets_them(monkeypatch, capsys):
    """--model tiny has 128 tokens of context; --max-new-tokens 100 asks for half of it (64), and a
    line with one earlier turn is more: the second and third lines each push the one turn before
    them out, and the note counts only that one (a dropped turn is gone, not dropped again)."""
    tok, seen = fake_answers(monkeypatch, ["Ok.", "Ok.", "Ok."])
    lines = [f"Tell me more about the number {i} and " + "then some more words about it " * 3 for i in range(3)]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--template", "chat", "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert err.count("the conversation outgrew the context: its 1 oldest turn(s) are dropped") == 2, err
    assert "its 2 oldest" not in err and "the answer was cut" not in err  # each answer ended at its eot
    assert seen[2] == formats.encode_prompt(tok, chat.Conversation("chat").prompt(lines[2]))


def test_the_command_samples_with_its_flags(tmp_path, monkeypatch, capsys):
    """--temperature, --top-k, --top-p, --seed and --max-new-tokens reach generate(), and a
    tokenizer smaller than the model limits the ids drawn."""
    import tritongpt.train.generate as gen
    from tritongpt.train.tokenizer import get_tokenizer

    tok, calls = get_tokenizer("default"), []

    def fake(model, idx, budget, **kw):
        calls.append(dict(kw, budget=budget))
        return torch.cat([idx, torch.tensor([[tok.eot_id]])], 1)

    monkeypatch.setattr(gen, "generate", fake)
    GPTModel(GPTConfig(vocab_size=tok.vocab_size + 8, context_length=64, n_embd=16, n_layer=1, n_head=2)).save(
        tmp_path / "m.safetensors")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--weights", str(tmp_path / "m.safetensors"), "--tokenizer", "default", "--device", "cpu",
                 "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--seed", "5",
                 "--max-new-tokens", "9"]) == 0
    (kw,) = calls
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["budget"], kw["eos_id"]) == (0.5, 7, 0.9, 9, tok.eot_id)
    assert kw["generator"].initial_seed() == 5 and kw["vocab_limit"] == tok.vocab_size
    assert "only the tokenizer's ids are drawn" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_windows_lines_a_spaced_command_and_a_terminal(monkeypatch, capsys):
    """A line's \\r\\n is not the user's text, "/quit " is /quit, scripted input gets no banner;
    at a terminal each line is read with a "> " prompt, an empty one is skipped, and the end of
    the input (Ctrl-D) ends the chat."""
    tok, seen = fake_answers(monkeypatch, ["One.", "Two.", "Three."])
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\r\n/quit \r\nignored\n"))
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--template", "completion"]) == 0
    assert seen == [tok.encode("Hi")]
    assert "template; /reset" not in capsys.readouterr().err
    lines, prompts = iter(["Hi", "", "There"]), []

    def read(prompt):
        prompts.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("builtins.input", read)
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--template", "completion"]) == 0
    assert seen[1:] == [tok.encode("Hi"), tok.encode("There")] and prompts == ["> "] * 4
    out, err = capsys.readouterr()
    assert ('chat (completion template; /reset forgets the conversation, /quit ends; a line ending in \\ goes on, '
            'and """ opens and closes a message of several lines)') in err
    assert out.splitlines() == ["Two.", "Three."]


def test_chat_and_generate_keep_their_own_sampling_defaults():
    from tritongpt.cli import build_parser

    c = build_parser().parse_args(["chat"])
    assert (c.template, c.max_new_tokens, c.temperature, c.seed) == ("auto", 256, 0.7, 1337)
    from tritongpt.commands import check_beam_args

    g = build_parser().parse_args(["generate", "--prompt", "x"])
    check_beam_args(g)  # generate's temperature depends on --num-beams: 0.8 without (0 with: test_beam_search.py)
    assert (g.max_new_tokens, g.temperature, g.seed) == (50, 0.8, 1337)


def test_a_message_of_several_lines():
    """A trailing backslash goes on to the next line; \"\"\" opens a message that runs to a line
    ending with it; the quotes' own lines are not in it; the input ending inside one sends it."""
    def reader(lines):
        lines, prompts = iter(lines), []

        def read(prompt):
            prompts.append(prompt)
            return next(lines, None)
        return read, prompts

    for lines, want, asked in (
            (["one line", "next"], "one line", ["> "]),
            (["first \\", "second\\", "third", "next"], "first \nsecond\nthird", ["> ", "... ", "... "]),
            (['  """', "def f():", "    return 1", "", '"""', "next"], "def f():\n    return 1",
             ["> ", "... ", "... ", "... ", "... "]),
            (['"""Dear model,', "  two lines. \"\"\"  "], "Dear model,\n  two lines. ", ["> ", "... "]),
            (['"""inline"""'], "inline", ["> "]),
            (['"""', "cut short"], "cut short", ["> ", "... ", "... "]),
            (["ends \\"], "ends ", ["> ", "... "]),
            (["C:\\dir\\ ", "next"], "C:\\dir\\ ", ["> "]),  # the line ends in a space, not a backslash
            ([], None, ["> "])):
        read, prompts = reader(lines)
        assert chat.read_message(read) == want, lines
        assert prompts == asked, lines


def test_the_command_takes_messages_of_several_lines(monkeypatch, capsys):
    tok, seen = fake_answers(monkeypatch, ["One.", "Two.", "Three."])
    text = 'Write:\\\nred\n"""\n/quit\nis text here\n"""\n/reset now?\n/quit\nignored\n'
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--template", "completion"]) == 0
    assert seen == [tok.encode("Write:\nred"), tok.encode("/quit\nis text here")]
    assert "unknown command '/reset now?'" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO('"""\nNever closed.\n'))
    assert main(["chat", "--model", "tiny", "--device", "cpu", "--template", "completion"]) == 0
    assert seen[2:] == [tok.encode("Never closed.")]
    assert 'the input ended inside a """ message' in capsys.readouterr().err


def test_run_template_of_a_folder_whose_config_is_not_json(tmp_path):
    """A weights folder whose config.json is not JSON records no prompt format: chat falls back
    to its default, as for a folder without one (from a mutation audit)."""
    GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=8, n_layer=1, n_head=1)).save(
        tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"tritongpt_prompt_format": "alpaca",')
    assert chat.run_template(str(tmp_path)) is None


def test_chat_cuda_graphs_reach_generate_and_are_refused_off_cuda(monkeypatch, capsys):
    """--cuda-graphs: every answer's generate gets cuda_graph=True (past the startup's device check); on a CPU the
    command refuses before the first line, naming the flag; with --draft it is refused by name."""
    import tritongpt.commands as commands
    import tritongpt.train.generate as gen

    base = ["chat", "--model", "tiny", "--device", "cpu", "--max-new-tokens", "5", "--cuda-graphs"]
    assert main(base) == 2
    assert "--cuda-graphs needs the model on a CUDA device; it is on cpu" in capsys.readouterr().err
    assert main([*base, "--draft", "d.safetensors"]) == 2
    assert "--cuda-graphs replays a one-token decode step: it does not take --draft" in capsys.readouterr().err
    asked = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: asked.append(kw["cuda_graph"]) or real(*a, **kw))
    monkeypatch.setattr(gen, "capture_cuda_graph", lambda fn, device: fn)
    monkeypatch.setattr(commands, "check_cuda_graphs", lambda args, device, model: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain\n"))
    assert main(base) == 0
    assert asked == [True, True]
