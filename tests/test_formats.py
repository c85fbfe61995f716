"""SFT's record formats (Alpaca, prompt-completion, chat messages) and the chat template: what
each record becomes, what is learned, the prompt generation starts from, and bad records."""
import json

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import formats, sft

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 128


class CharTokenizer:
    """One id per character (its code point, < 128 here), <|endoftext|> = 128."""
    eot_id = EOT
    vocab_size = 129

    def encode(self, text, allowed_special="none_raise"):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) if i < 128 else "<|endoftext|>" for i in ids)


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def learned_text(example, mask_prompt=True):
    """The target tokens a batch of one learns, decoded (eot as its spelling)."""
    inputs, targets = sft.collate([example], pad_id=EOT, mask_prompt=mask_prompt)
    return CharTokenizer().decode([t for t in targets[0].tolist() if t != sft.IGNORE_INDEX])


def test_the_chat_template_text_and_what_is_learned():
    rec = formats.read_record(CHAT, "r")
    assert rec["output"] == "4" and rec["learn_all"]
    (ex,), _ = sft.encode_records([rec], CharTokenizer(), max_len=200)
    tok = CharTokenizer()
    assert tok.decode(ex.ids) == ("Be brief.\n\n### User:\nHi\n\n### Assistant:\nHello.<|endoftext|>"
                                  "### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>")
    # every assistant turn and its eot is learned, nothing else (the second user turn is context)
    assert learned_text(ex) == "Hello.<|endoftext|>4<|endoftext|>"
    assert learned_text(ex, mask_prompt=False) == tok.decode(ex.ids[1:])
    # the prompt generation starts from is the sequence up to the last answer, turn for turn
    prompt = formats.encode_prompt(tok, formats.prompt_parts(rec))
    assert prompt == ex.ids[:len(prompt)] and tok.decode(ex.ids[len(prompt):]) == "4<|endoftext|>"
    assert prompt.count(EOT) == 1  # the first answer's end is the token, not its spelling


@pytest.mark.parametrize("raw, learned, prompt", [
    ({"instruction": "Add", "input": "1 2", "output": "3"}, "3<|endoftext|>",
     formats.format_prompt({"instruction": "Add", "input": "1 2"})),
    ({"prompt": "Q: 1+2\nA:", "completion": " 3"}, " 3<|endoftext|>", "Q: 1+2\nA:"),
    # a conversational prompt-completion: the history's answer is context, only the completion learned
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                 {"role": "user", "content": "1+2?"}],
      "completion": [{"role": "assistant", "content": "3"}]}, "3<|endoftext|>",
     "### User:\nHi\n\n### Assistant:\nYo<|endoftext|>### User:\n1+2?\n\n### Assistant:\n"),
])
def test_each_format_learns_its_response_after_its_prompt(raw, learned, prompt):
    tok = CharTokenizer()
    rec = formats.read_records([("r", raw)])[0]
    (ex,), kept = sft.encode_records([rec], tok, max_len=200)
    assert kept == [rec] and learned_text(ex) == learned
    ids = formats.encode_prompt(tok, formats.prompt_parts(rec))
    assert tok.decode(ids) == prompt and ids == ex.ids[:ex.prompt_len]


def test_chat_truncation_clips_the_context_and_keeps_the_masks():
    tok = CharTokenizer()
    rec = formats.read_record(CHAT, "r")
    full, _ = sft.encode_records([rec], tok, max_len=200)
    n = len(full[0].ids)
    cut = n - 1 - len("4") - 8  # ends inside the second user turn
    (ex,), _ = sft.encode_records([rec], tok, max_len=cut, overlong="truncate")
    assert len(ex.ids) == cut + 1 and ex.ids == full[0].ids[:cut + 1]
    assert ex.context and all(ex.prompt_len <= a < b <= cut + 1 for a, b in ex.context)
    assert learned_text(ex) == "Hello.<|endoftext|>"
    # a cut inside the first answer leaves no context: the later turns are gone, not empty ranges
    (ex,), _ = sft.encode_records([rec], tok, max_len=ex.prompt_len + 2, overlong="truncate")
    assert ex.context == () and learned_text(ex) == "Hel"  # max_len + 1 = the prompt and 3 tokens
    dropped, _ = sft.encode_records([rec], tok, max_len=cut, overlong="drop")
    assert dropped == []


def test_greedy_responses_answer_the_last_turn_of_a_chat(monkeypatch):
    """The model is asked to continue exactly the training sequence's prefix (eot tokens between
    turns); the prediction is the text it generates up to its eot."""
    seen = []

    def fake_generate(model, idx, budget, **kw):
        seen.append(idx[0].tolist())
        return torch.cat([idx, torch.tensor([[ord("4"), EOT]] * idx.size(0))], 1)

    import tritongpt.train.generate as gen
    monkeypatch.setattr(gen, "generate", fake_generate)
    model = GPTModel(GPTConfig(vocab_size=129, context_length=128, n_embd=8, n_layer=1, n_head=1))
    rec = formats.read_record(CHAT, "r")
    rows, acc = sft.evaluate_responses(model, CharTokenizer(), [rec], max_new_tokens=4)
    assert seen == [formats.encode_prompt(CharTokenizer(), formats.prompt_parts(rec))]
    assert acc == 1.0 and rows[0]["messages"] == CHAT["messages"][:-1] and rows[0]["gold"] == "4"
    assert "instruction" not in rows[0]
    comp = formats.read_record({"prompt": "P", "completion": "4"}, "r")
    rows, _ = sft.evaluate_responses(model, CharTokenizer(), [comp], max_new_tokens=4)
    assert rows[0]["prompt"] == "P" and rows[0]["prediction"] == "4"


@pytest.mark.parametrize("raw, msg", [
    ({"messages": "hi"}, r"field 'messages' must be a list of messages, got str"),
    ({"messages": []}, r"field 'messages' is an empty list"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"must end with an assistant message, not a user one"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"messages\[0\]: a assistant message here; expected "
                                                            r"system or user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"messages\[1\]: a user message here; expected assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     r"messages\[1\]: role 'tool' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\]: field 'content' is empty"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]},
     r"messages\[0\]: field 'content' must be a string, got int"),
    ({"messages": ["a"]}, r"messages\[0\]: expected an object with 'role' and 'content', got str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"messages\[1\]: a system message here; expected assistant"),
    ({"prompt": "a"}, r"missing field 'completion'"),
    ({"prompt": "a", "completion": 3}, r"field 'completion' must be a string, got int"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
     r"field 'completion' must be a list of one assistant message"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
     r"completion\[0\] must be an assistant message, got 'user'"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "completion": [{"role": "assistant", "content": "c"}]}, r"field 'prompt' must end with an user message"),
    ({"prompt": [{"role": "user", "content": "a"}],
      "completion": [{"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]},
     r"field 'completion' must be a list of one assistant message"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": ["b"]},
     r"completion\[0\] must be an assistant message, got str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion": "c"},
     r"fields of two formats \(completion and chat\)"),
    ({"instruction": "a", "output": "b", "messages": []}, r"fields of two formats \(alpaca and chat\)"),
    ({"prompt": "a", "output": "b", "instruction": "c"}, r"fields of two formats \(alpaca and completion\)"),
    ({"text": "a story"}, r"is pretraining data: train on it with `tritongpt pretrain"),
    ({"question": "a"}, r"no 'instruction', 'prompt' or 'messages' field"),
])
def test_bad_records_are_named(raw, msg):
    with pytest.raises(UserError, match=msg):
        formats.read_records([("f.jsonl: record 0 (line 1)", raw)])


def test_label_false_is_refused_on_kto_records_only():
    """label false marks kto's undesirable completion ({prompt, completion, label}, text or conversational): refused
    there. An instruction or chat record's own "label" (a dataset's gold answer, say) is no KTO label: it was
    refused too, a whole SFT file with it."""
    user, reply = [{"role": "user", "content": "Is 7 even?"}], [{"role": "assistant", "content": "No."}]
    for raw in ({"prompt": "Is 7 even?", "completion": "No.", "label": False},
                {"prompt": user, "completion": reply, "label": False}):
        with pytest.raises(UserError, match=r"record 0 \(line 1\): label false marks an undesirable completion "
                                            r"\(kto's \{prompt, completion, label\} records\)"):
            formats.read_records([("f.jsonl: record 0 (line 1)", raw)])
    alpaca = formats.read_record({"instruction": "Is 7 even?", "output": "No.", "label": False}, "r")
    assert alpaca["output"] == "No."
    chat = formats.read_record({"messages": user + reply, "label": False}, "r")
    assert chat["output"] == "No." and chat["messages"][-1]["content"] == "No."


def test_a_file_holds_one_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(CHAT) + "\n")
    with pytest.raises(UserError, match=r"record 1 \(line 2\) is a chat record but .*record 0 \(line 1\) is "
                                         r"completion: a file holds records of one format"):
        sft.read_records(path)
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                    + json.dumps({"instruction": "c", "output": "d"}) + "\n")
    with pytest.raises(UserError, match=r"record 1 \(line 2\) is an alpaca record but"):
        sft.read_records(path)
    # JSON Lines in a .json file (as datasets' to_json writes them): the error says what it looks like
    (tmp_path / "lines.json").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(CHAT))
    with pytest.raises(UserError, match=r"lines.json: not valid JSON \(Extra data at line 2\) \(one JSON object a "
                                         r"line\? name the file .jsonl\)"):
        sft.read_records(tmp_path / "lines.json")
    # a record with no format's fields, after records of one format, is named by that format's field
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"completion": "c"}))
    with pytest.raises(UserError, match=r"record 1 \(line 2\): missing field 'prompt'"):
        sft.read_records(path)
    # extra keys of a message (a name) are dropped; the two conversational forms read alike
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a", "name": "x"},
                                             {"role": "assistant", "content": "b"}]}) + "\n" +
                    json.dumps({"prompt": [{"role": "user", "content": "c"}],
                                "completion": [{"role": "assistant", "content": "d"}]}))
    a, b = sft.read_records(path)
    assert a == {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                 "output": "b", "learn_all": True}
    assert b["learn_all"] is False and b["output"] == "d"


def test_splits_group_chats_by_their_prompt():
    chats = [{"messages": [{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i}"}],
              "output": f"a{i}", "learn_all": True} for i in range(60)]
    train, val = sft.split_records(chats, 0.3)
    key = formats.record_key
    assert val and train and not {key(r) for r in train} & {key(r) for r in val}
    assert sft.split_records(chats, 0.3) == (train, val)
    # an Alpaca record splits by instruction and input, as it did before the other formats
    from tritongpt.train import tasks
    rec = {"instruction": "a", "input": "b", "output": "c"}
    assert key(rec) == tasks.prompt_key(rec)


def test_a_chat_splits_by_its_whole_history():
    """Chats that open alike but ask different last questions are different prompts; a
    prompt-completion record's key is its prompt."""
    def chat(*turns):
        msgs = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * len(turns), turns)]
        return formats.read_record({"messages": msgs}, "r")

    key = formats.record_key
    assert key(chat("Hi", "Yo", "1+2?", "3")) != key(chat("Hi", "Yo", "2+2?", "3"))
    assert key(chat("Hi", "Yo", "1+2?", "3")) == key(chat("Hi", "Yo", "1+2?", "three"))
    assert key(formats.read_record({"prompt": "Q:", "completion": " a"}, "r")) == "Q:"


def test_describe_shows_a_records_prompt_on_one_line():
    rec = formats.read_record(CHAT, "r")
    assert json.loads(formats.describe(rec)) == CHAT["messages"][:-1]  # the history, not the answer
    line = formats.describe(formats.read_record({"prompt": "Q:\n1+2", "completion": " 3"}, "r"))
    assert "\n" not in line and "1+2" in line and " 3" not in line
    alpaca = formats.read_record({"instruction": "Add", "input": "1 2", "output": "3"}, "r")
    assert formats.describe(alpaca) == "Add | 1 2"


def small_model_run(tmp_path, text):
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train(text, 300)
    tok.save(tmp_path / "run" / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=96, n_embd=32, n_layer=1, n_head=1)).save(
        tmp_path / "run" / "model.safetensors")
    return tmp_path / "run"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_cli_fine_tunes_on_chats_and_prompt_completions(tmp_path, capsys, kind):
    from tritongpt.cli import main
    from tritongpt.train.common import load_state

    words = ["red", "green", "blue", "cyan", "gold", "pink", "gray", "teal"]
    if kind == "chat":
        recs = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w},
                              {"role": "user", "content": "Again."}, {"role": "assistant", "content": w}]}
                for w in words * 3]
    else:
        recs = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in words * 3]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    run = small_model_run(tmp_path, " ".join(json.dumps(r) for r in recs) + formats.USER_HEADER * 5)
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(run), "--data", str(data), "--out-dir", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--eval-every", "1", "--eval-gen", "2", "--max-new-tokens", "3",
                 "--device", "cpu", "--kernels", "reference", "--sample-every", "1", "--val-fraction", "0.3"]) == 0
    # the printed sample names the held-out record's prompt (formats.describe), not its answer
    assert ('[{"role": "user", "content": "Say ' if kind == "chat" else "'Say ") in capsys.readouterr().out
    rows = json.loads((out / "responses.json").read_text())
    assert rows and {"messages" if kind == "chat" else "prompt", "gold", "prediction"} <= set(rows[0])
    if kind == "chat":  # the held-out prompt is the history up to the last answer
        assert [m["content"] for m in rows[0]["messages"]][1:] == [rows[0]["gold"], "Again."]
    assert load_state(out / "ckpt-0000002")["prompt_format"] == kind


# -- preference pairs in chat form ------------------------------------------------------------------
def chat_pair_records():
    hist = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "1+2?"}]
    explicit = {"prompt": hist, "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "4"}]}
    implicit = {"chosen": hist + [{"role": "assistant", "content": "3"}],
                "rejected": hist + [{"role": "assistant", "content": "4"}]}
    return hist, explicit, implicit


def test_chat_preference_pairs_encode_their_prompt_as_sft_does(tmp_path):
    from tritongpt.train.preference import encode_pairs, read_preference_file
    from tritongpt.train.rlhf import prompt_ids

    hist, explicit, implicit = chat_pair_records()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(explicit) + "\n" + json.dumps(implicit) + "\n")
    a, b = read_preference_file(path)
    assert a == b and a.format == "chat" and (a.chosen, a.rejected) == ("3", "4")
    tok = CharTokenizer()
    # the prompt is the SFT chat's prompt, token for token (the history's answer ends in the eot token)
    sft_rec = formats.read_record({"messages": hist + [{"role": "assistant", "content": "3"}]}, "r")
    want = formats.encode_prompt(tok, formats.prompt_parts(sft_rec))
    enc = encode_pairs([a], tok, 200)[0]
    assert enc.prompt == want and enc.chosen == [ord("3"), EOT] and enc.rejected == [ord("4"), EOT]
    assert prompt_ids([a.prompt, b.prompt], tok, 200) == [want]  # one prompt, once
    # a single-turn chat's prompt is one text, which hashes and encodes as a string prompt does; it
    # keeps its messages (formats.ChatPrompt), for a tokenizer with its own chat template
    one = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(one))
    (p,) = read_preference_file(path)
    text = formats.USER_HEADER + "Q" + formats.ASSISTANT_HEADER
    assert p.prompt == ((text, False),) and p.prompt.messages == ({"role": "user", "content": "Q"},)
    assert formats.prompt_key(p.prompt) == text and formats.encode_prompt(tok, p.prompt) == formats.encode_text(tok, text)


def test_chat_preference_splits_group_by_the_whole_prompt():
    from tritongpt.train.preference import PreferencePair, split_pairs

    prompts = [(("### User:\nq\n\n### Assistant:\n", False), (f"a{i % 5}", True), ("### User:\nmore\n", False))
               for i in range(40)]
    pairs = [PreferencePair(p, f"good {i}", f"bad {i}", format="chat") for i, p in enumerate(prompts)]
    train, val = split_pairs(pairs, 0.4)
    assert train and val and not {p.prompt for p in train} & {p.prompt for p in val}


@pytest.mark.parametrize("change, msg", [
    (lambda e, i: i["rejected"].__setitem__(1, {"role": "user", "content": "Bye"}),
     r"'chosen' and 'rejected' must share every message but the last"),
    (lambda e, i: (i.update(chosen=i["chosen"][-1:], rejected=i["rejected"][-1:])),
     r"chosen\[0\]: a assistant message here"),
    (lambda e, i: e.update(chosen=e["chosen"] * 2), r"field 'chosen' must be a list of one assistant message"),
    (lambda e, i: e.update(rejected=[{"role": "assistant", "content": ""}]),
     r"rejected\[0\]: field 'content' is empty"),
    (lambda e, i: e.update(rejected=e["chosen"]), r"'chosen' and 'rejected' are identical"),
    (lambda e, i: e["prompt"].pop(), r"field 'prompt' must end with an user message"),
    (lambda e, i: e.update(chosen="3"), r"field 'chosen' must be a list of one assistant message"),
    (lambda e, i: e.update(chosen=[{"role": "user", "content": "3"}]),
     r"field 'chosen' must be a list of one assistant message"),
    (lambda e, i: e.update(rejected=["4"]), r"field 'rejected' must be a list of one assistant message"),
    # the implicit form's last messages are the answers: a chat ending with the user's words is refused
    (lambda e, i: [i[k].append({"role": "user", "content": k}) for k in ("chosen", "rejected")],
     r"record 1 \(line 2\): field 'chosen' must end with an assistant message, not a user one"),
])
def test_bad_chat_preference_records(tmp_path, change, msg):
    from tritongpt.train.preference import read_preference_file

    _, explicit, implicit = chat_pair_records()
    change(explicit, implicit)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(explicit) + "\n" + json.dumps(implicit) + "\n")
    with pytest.raises(UserError, match=msg):
        read_preference_file(path)


def test_a_preference_file_holds_chats_or_text_prompts(tmp_path):
    from tritongpt.train.preference import read_preference_file

    _, explicit, _ = chat_pair_records()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(explicit))
    with pytest.raises(UserError, match=r"record 1 \(line 2\) is a chat record but .*record 0 \(line 1\) is "
                                         r"completion: a file holds chats or text prompts, not both"):
        read_preference_file(path)


def test_text_preference_pairs_name_their_prompt_format(tmp_path):
    """A text prompt is a completion one, an instruction's is Alpaca's (the two may share a file),
    and the embedded task pairs are Alpaca's: the format reward, DPO and RLHF runs save."""
    from tritongpt.train.preference import read_preference_file, task_preferences

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n" +
                    json.dumps({"instruction": "y", "chosen": "a", "rejected": "b"}))
    assert [p.format for p in read_preference_file(path)] == ["completion", "alpaca"]
    assert {p.format for p in task_preferences(8, seed=1)} == {"alpaca"}


def test_dpo_on_chat_pairs_records_the_chat_format(tmp_path):
    from tritongpt.cli import main
    from tritongpt.train.common import load_state

    _, explicit, implicit = chat_pair_records()
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [explicit, implicit] * 4))
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", "tiny", "--data", str(path), "--out-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--kernels", "reference", "--val-fraction", "0",
                 "--eval-every", "0", "--sample-every", "0"]) == 0
    assert load_state(out / "ckpt-0000001")["prompt_format"] == "chat"


def test_an_exported_chat_run_has_transformers_apply_its_chat_template(tmp_path, capsys):
    """export of a run tuned on chats writes the chat template into tokenizer_config.json:
    transformers' apply_chat_template gives SFT's text and ids, its generation prompt the prompt
    `chat` and the held-out answers use, and its assistant mask exactly what SFT learns."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.cli import main
    from tritongpt.train.tokenizer import BPETokenizer

    text = " ".join(f"### User:\nWhat is {i} plus {i}?\n\n### Assistant:\nIt is {2 * i}." for i in range(300))
    tok = BPETokenizer.train(text, 300, name="tiny")
    run = tmp_path / "run" / "ckpt-0000001"
    run.mkdir(parents=True)
    tok.save(tmp_path / "run" / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=8, n_layer=1, n_head=1)).save(
        run / "model.safetensors")
    torch.save({"step": 1, "prompt_format": "chat"}, run / "state.pt")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "apply_chat_template" in capsys.readouterr().out
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = CHAT["messages"] + [{"role": "user", "content": "And 3 plus 3?"},
                                   {"role": "assistant", "content": "It is 6."}]
    rec = formats.read_record({"messages": messages}, "r")
    (ex,), _ = sft.encode_records([rec], tok, max_len=500)
    assert hf.apply_chat_template(messages, tokenize=False) == tok.decode(ex.ids)
    out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ex.ids
    inputs, targets = sft.collate([ex], pad_id=tok.eot_id)
    learned = [i + 1 for i, t in enumerate(targets[0].tolist()) if t != sft.IGNORE_INDEX]
    assert [i for i, m in enumerate(out["assistant_masks"]) if m] == learned
    # the generation prompt: what `chat` and SFT's held-out answers start from
    prompt = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == formats.encode_prompt(tok, formats.prompt_parts(rec))
    # a run tuned otherwise gets no chat template (transformers' would then be none, not a wrong one)
    torch.save({"step": 1, "prompt_format": "alpaca"}, run / "state.pt")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 0
    assert "chat_template" not in json.loads((tmp_path / "hf2" / "tokenizer_config.json").read_text())


def test_content_given_as_text_parts_reads_as_its_text(tmp_path):
    """Content as a list of text parts (the OpenAI / Hugging Face multimodal form, used for
    text-only messages too) is its parts' text joined; any other part is refused, by index."""
    from tritongpt.train.preference import read_preference_file

    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    as_parts = {"messages": [{"role": "user", "content": parts("Hi ", "there")},
                             {"role": "assistant", "content": parts("Hello.")}]}
    as_text = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]}
    assert formats.read_record(as_parts, "r") == formats.read_record(as_text, "r")
    comp = formats.read_record({"prompt": [{"role": "user", "content": parts("a", "b")}],
                                "completion": [{"role": "assistant", "content": parts("c")}]}, "r")
    assert comp["messages"] == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": parts("q")}],
                                "chosen": [{"role": "assistant", "content": parts("y", "es")}],
                                "rejected": [{"role": "assistant", "content": "no"}]}))
    (pair,) = read_preference_file(path)
    assert (pair.chosen, pair.rejected) == ("yes", "no")
    image = {"type": "image", "url": "cat.png"}
    for content, msg in (([{"type": "text", "text": "a"}, image], r"messages\[0\]: content\[1\] is a 'image' part"),
                         (["a"], r"messages\[0\]: content\[0\] is a str part"),
                         ([{"type": "text", "text": 3}], r"content\[0\] is a 'text' part, not"),
                         (parts(" ", ""), r"messages\[0\]: field 'content' is empty")):
        with pytest.raises(UserError, match=msg):
            formats.read_record({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": "b"}]}, "r")
