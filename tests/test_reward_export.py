"""`tritongpt export` of a reward model: a Hugging Face <Family>ForSequenceClassification folder whose scores,
read by transformers' AutoModelForSequenceClassification on a right-padded batch, are RewardModel's."""
import json

import pytest
import torch

from audit_formats import EXPORT_BASES, TINY
from parity import assert_close_rel
from tritongpt.commands import export_target
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.reward import (NO_CLASSIFIER, SEQUENCE_CLASSIFIERS, RewardModel, export_reward_model,
                                    fold_head_bias, refuse_no_classifier)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def random_reward_model(cfg, seed=0):
    """Every parameter off its init, the head's bias too (Bradley-Terry leaves it at 0: a hand-made one must
    still reach the exported scores)."""
    torch.manual_seed(seed)
    rm = RewardModel(GPTModel(cfg))
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        rm.head.bias.fill_(0.75)
    return rm.eval()


def padded_batch(V, end, pad, lengths, seed=1):
    """Rows of random tokens (never the pad, never the end) closed by `end`, right-padded with `pad`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((len(lengths), max(lengths)), pad)
    for r, n in enumerate(lengths):
        row = torch.randint(0, V, (n,), generator=g)
        row[(row == pad) | (row == end)] = (pad + 1) % V if (pad + 1) % V != end else (pad + 2) % V
        row[-1] = end
        idx[r, :n] = row
    return idx, torch.tensor(lengths)


def hf_scores(folder, idx, lengths):
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mask = (torch.arange(idx.size(1))[None] < lengths[:, None]).long()
    with torch.no_grad():
        return hf.eval()(input_ids=idx, attention_mask=mask).logits[:, 0], hf


CLASSIFIED = [f for f in EXPORT_BASES if not f.startswith(("Cohere", "Command"))]


@pytest.mark.parametrize("family", CLASSIFIED)
def test_each_familys_classifier_gives_the_reward_models_scores(family, tmp_path):
    cfg = GPTConfig(**TINY, **EXPORT_BASES[family])
    name, refuse, export = export_target(cfg)
    rm = random_reward_model(cfg)
    V, eot, pad = cfg.vocab_size, cfg.vocab_size - 1, 0
    idx, lengths = padded_batch(V, eot, pad, [13, 7, 20, 1])
    with torch.no_grad():
        ours = rm(idx, lengths)
    refuse(rm.backbone, "a folder")
    refuse_no_classifier(name)
    unfolded = fold_head_bias(rm)
    # a LayerNorm with a bias takes the head's; an RMSNorm (or a bias-free LayerNorm) cannot
    assert (unfolded == 0.0) == (getattr(rm.backbone.final_norm, "bias", None) is not None)
    export_reward_model(rm, tmp_path, export, eot, pad)
    theirs, hf = hf_scores(tmp_path, idx, lengths)
    assert type(hf).__name__ == SEQUENCE_CLASSIFIERS[hf.config.model_type]
    assert hf.config.pad_token_id == pad and hf.config.num_labels == 1
    print(f"{family}: {type(hf).__name__}, head bias left out {unfolded:g}")
    assert_close_rel(theirs + unfolded, ours, 1e-5, f"{family} classifier scores")
    assert not torch.allclose(theirs[1:], theirs[:-1])  # each row read at its own last token
    with torch.no_grad():  # and read back (rlhf --reward): transformers' scores again
        assert_close_rel(RewardModel.load(tmp_path).eval()(idx, lengths), theirs, 1e-5, f"{family} read back")


def test_the_classifier_table_is_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

    for model_type, cls in SEQUENCE_CLASSIFIERS.items():
        assert names.get(model_type) == cls, model_type
    for model_type in ("olmoe", "cohere", "cohere2", "granite", "granitemoe"):  # NO_CLASSIFIER's families
        assert model_type not in names
    assert set(NO_CLASSIFIER) == {"OLMoE", "Cohere", "Cohere2", "Granite", "GraniteMoe"}


def test_export_command_writes_a_classifier_transformers_tokenizes_and_scores_alike(tmp_path, capsys):
    """The CLI on a run folder: the tokenizer pads with a token that is not the EOS (GPT-2's pads with its EOS
    by habit, which the classifier would skip, scoring the token before it), and scores match RewardModel's."""
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    run = tmp_path / "run"
    text = " ".join(f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(200))
    tok = BPETokenizer.train(text, 280, name="tiny")
    save_run_tokenizer(tok, run)
    rm = random_reward_model(GPTConfig(vocab_size=280, context_length=40, n_embd=32, n_layer=2, n_head=2))
    rm.save(run / "model.safetensors")
    out = tmp_path / "hf"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "a reward model on GPT-2's backbone" in said and "AutoModelForSequenceClassification" in said
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["the cat sat", "then the dog ran 7 laps, the cat number 3", " on mat 14"]
    enc = hf_tok([t + hf_tok.eos_token for t in texts], padding=True, return_tensors="pt")
    ids = [tok.encode(t) + [tok.eot_id] for t in texts]
    assert [row[:len(i)] for row, i in zip(enc["input_ids"].tolist(), ids)] == ids
    assert hf_tok.pad_token_id != tok.eot_id == hf_tok.eos_token_id
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == hf_tok.pad_token_id and config["architectures"] == \
        ["GPT2ForSequenceClassification"]
    lengths = enc["attention_mask"].sum(1)
    theirs, _ = hf_scores(out, enc["input_ids"], lengths)
    with torch.no_grad():
        ours = rm(enc["input_ids"], lengths)
    assert_close_rel(theirs, ours, 1e-5, "exported reward model's scores")
    # a peft adapter holds no scalar head; a backbone transformers has no classifier for is refused by name
    assert cli.main(["export", str(run), "--out", str(tmp_path / "a"), "--adapter"]) == 2
    assert "is a reward model" in capsys.readouterr().err
    cohere = random_reward_model(GPTConfig(**TINY, **EXPORT_BASES["Cohere"]))
    cohere.save(tmp_path / "cohere.safetensors")
    assert cli.main(["export", str(tmp_path / "cohere.safetensors"), "--out", str(tmp_path / "c")]) == 2
    assert "no CohereForSequenceClassification" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_bias_without_a_norm_bias_to_go_into_is_said(tmp_path, capsys):
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    run = tmp_path / "run"
    tok = BPETokenizer.train(" ".join(f"a dog {i} ran" for i in range(100)), 270, name="tiny")
    save_run_tokenizer(tok, run)
    rm = random_reward_model(GPTConfig(**dict(TINY, vocab_size=270), **EXPORT_BASES["Llama"]))
    rm.save(run / "model.safetensors")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "bias (0.75) has no place in Hugging Face's Llama classifier" in err


def test_the_pad_token_is_never_one_a_score_is_read_at():
    from tritongpt.train.reward import pad_token_for

    vocab = {"!": 0, "a": 1, "b": 2, "<|endoftext|>": 3}
    assert pad_token_for({"vocab.json": json.dumps(vocab)}, {3}) == (0, "!")
    assert pad_token_for({"vocab.json": json.dumps(vocab)}, {3, 0}) == (1, "a")  # "!" ends a turn here
    # GPT-2's byte order ("!" is 0, the NUL byte's "Ā" 188): the NUL byte, which no text's "!!" merges into
    gpt2 = {**{chr(33 + i): i for i in range(94)}, "Ā": 188, "!!": 256, "<|endoftext|>": 257}
    assert pad_token_for({"vocab.json": json.dumps(gpt2)}, {257}) == (188, "Ā")
    assert pad_token_for({"vocab.json": json.dumps(gpt2)}, {257, 188}) == (0, "!")  # unless it ends a turn
    # a SentencePiece-converted tokenizer.json: its own pad token first, its unk (an ordinary entry) else
    spec = {"model": {"vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "x": 4}},
            "added_tokens": [{"id": i, "content": t} for t, i in (("<s>", 1), ("</s>", 2), ("<pad>", 3))]}
    assert pad_token_for({"tokenizer.json": json.dumps(spec)}, {2}) == (3, "<pad>")
    assert pad_token_for({"tokenizer.json": json.dumps(spec)}, {3}) == (0, "<unk>")
    unigram = {"model": {"vocab": [["<unk>", 0.0], ["▁a", -1.0], ["</s>", 0.0]]},
               "added_tokens": [{"id": 2, "content": "</s>"}]}
    assert pad_token_for({"tokenizer.json": json.dumps(unigram)}, {0, 2}) == (1, "▁a")
    assert pad_token_for({}, {0}) == (1, None) and pad_token_for({}, {5}) == (0, None)


def test_a_lora_reward_model_exports_merged(tmp_path):
    """A reward run trained with --lora-rank saves W, A and B; the export is the merged backbone's classifier."""
    from tritongpt.model.lora import add_lora
    from tritongpt.train.reward import pad_token_for

    cfg = GPTConfig(**TINY, **EXPORT_BASES["Llama"])
    rm = random_reward_model(cfg)
    with torch.no_grad():
        rm.head.bias.zero_()
    add_lora(rm.backbone, 2, 8.0)
    with torch.no_grad():  # B starts at zero: an update that changes the scores
        for name, p in rm.backbone.named_parameters():
            if name.endswith("lora_B"):
                p.add_(torch.randn_like(p) * 0.3)
    eot = cfg.vocab_size - 1
    idx, lengths = padded_batch(cfg.vocab_size, eot, 0, [9, 16, 4])
    with torch.no_grad():
        ours = rm.eval()(idx, lengths)
    rm.save(tmp_path / "rm.safetensors")
    loaded = RewardModel.load(tmp_path / "rm.safetensors")
    assert not loaded.config.lora_rank  # merged on load
    _, _, export = export_target(loaded.config)
    assert pad_token_for({}, {eot}) == (0, None)
    export_reward_model(loaded, tmp_path / "hf", export, eot, 0)
    theirs, _ = hf_scores(tmp_path / "hf", idx, lengths)
    assert_close_rel(theirs, ours, 1e-5, "merged LoRA reward model's scores")
