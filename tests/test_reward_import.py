"""A Hugging Face <Family>ForSequenceClassification with one label (what TRL's RewardTrainer saves, or `tritongpt
export` writes of a reward model) read as a RewardModel: `rlhf --reward FOLDER|owner/name`. Its scores on a
right-padded batch are transformers' own; as a causal LM (--init, --weights) it is refused by name, never read with
a made-up LM head."""
import json
import shutil

import pytest
import torch

from parity import assert_close_rel
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint
from tritongpt.train.reward import RewardModel

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97  # not a power of two


# transformers configs of the families whose classifier heads need the most care: an untied Llama (no head tensor to
# infer a tie from), GPT-J and Phi (LM heads with a bias, always read), GPT-NeoX (embed_out), GPT-2 (Conv1D) and
# Qwen2 (TRL's reward models' usual family). By class name, built when a test asks: each config class is a module
# transformers imports on first use (~3 s of every worker's collection when all six were built at import).
CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64)),
}


def hf_config(family):
    name, fields = CONFIGS[family]
    return getattr(transformers, name)(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1,
                                       **fields)


def hf_classifier(config, folder, seed=0, **save):
    """A tiny random AutoModelForSequenceClassification, every tensor moved off its init, saved to folder."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder, **save)
    return hf


def right_padded(lengths, pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, V, (len(lengths), max(lengths)), generator=g)  # never the pad, BOS or EOS
    for r, n in enumerate(lengths):
        idx[r, n - 1] = 2  # closed by the EOS, as a reward model's texts are
        idx[r, n:] = pad
    return idx, torch.tensor(lengths)


def transformers_scores(folder, idx, lengths):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    mask = (torch.arange(idx.size(1))[None] < lengths[:, None]).long()
    with torch.no_grad():
        return hf(input_ids=idx, attention_mask=mask).logits[:, 0]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_transformers_classifier_reads_as_a_reward_model_with_its_scores(family, tmp_path):
    hf = hf_classifier(hf_config(family), tmp_path)
    idx, lengths = right_padded([13, 6, 1, 20])
    theirs = transformers_scores(tmp_path, idx, lengths)
    rm = RewardModel.load(tmp_path).eval()
    with torch.no_grad():
        ours = rm(idx, lengths)
    assert_close_rel(ours, theirs, 1e-5, f"{type(hf).__name__} read as a RewardModel")
    assert not torch.allclose(theirs[1:], theirs[:-1])  # each row read at its own last token
    assert torch.equal(rm.head.weight, hf.score.weight) and not rm.head.bias.any()
    # as a causal LM (sft --init, generate --weights) it is refused: a tied stand-in head would be a wrong model
    with pytest.raises(UserError, match=f"is a {type(hf).__name__} .*not a causal LM.*--reward"):
        load_checkpoint(tmp_path)


def test_a_sharded_bf16_classifier_reads_as_its_fp32_values(tmp_path):
    """The index and its shards, bf16 on disk: our fp32 model holds the file's values (transformers upcasts the
    same file to fp32 to compare)."""
    hf = hf_classifier(hf_config("llama"), tmp_path, seed=3)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    idx, lengths = right_padded([9, 17, 4])
    rm = RewardModel.load(tmp_path).eval()
    assert rm.head.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close_rel(rm(idx, lengths), transformers_scores(tmp_path, idx, lengths), 1e-5, "sharded bf16")


def test_what_is_not_a_one_label_classifier_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    two = hf_config("gpt2")
    two.num_labels = 2
    hf_classifier(two, tmp_path / "two")
    with pytest.raises(UserError, match=r"score.weight has shape \(2, 32\); a reward model's is \(1, 32\).*"
                                        r"GPT2ForSequenceClassification: 2 labels"):
        RewardModel.load(tmp_path / "two")
    # a causal LM is no reward model
    lm = transformers.AutoModelForCausalLM.from_config(hf_config("qwen2"))
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(UserError, match="is a Hugging Face model with no sequence classifier's score head"):
        RewardModel.load(tmp_path / "lm")
    # a config.json without architectures: the tensors say it (a score, no LM head)
    hf_classifier(hf_config("gpt2"), tmp_path / "bare")
    cfg = json.loads((tmp_path / "bare" / "config.json").read_text())
    del cfg["architectures"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="is a sequence classifier .*not a causal LM"):
        load_checkpoint(tmp_path / "bare")
    (tmp_path / "bare" / "config.json").write_text(json.dumps({**cfg, "architectures": ["SomeoneElsesRewardModel"]}))
    with pytest.raises(UserError, match="is a sequence classifier .*not a causal LM"):  # a class no causal LM's
        load_checkpoint(tmp_path / "bare")
    assert RewardModel.load(tmp_path / "bare").head.weight.shape == (1, 32)
    # a classifier's config over a score beside an LM head: neither, as transformers saves them
    classifier = {**cfg, "architectures": ["GPT2ForSequenceClassification"]}
    (tmp_path / "bare" / "config.json").write_text(json.dumps(classifier))
    file = tmp_path / "bare" / "model.safetensors"
    tensors = load_file(file)
    save_file({**tensors, "lm_head.weight": tensors["transformer.wte.weight"].clone()}, file, {"format": "pt"})
    with pytest.raises(UserError, match="has both a 'score.weight' and an LM head"):
        RewardModel.load(tmp_path / "bare")


def test_a_token_classifier_is_neither_a_causal_lm_nor_a_reward_model(tmp_path):
    """A <Family>ForTokenClassification has a score head and no LM head too: refused as both, by its class name
    (its config names the class, so the tensors are looked at only where no causal LM is named)."""
    config = hf_config("qwen2")
    config.num_labels = 3
    torch.manual_seed(0)
    transformers.AutoModelForTokenClassification.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="is a Qwen2ForTokenClassification .*not a causal LM"):
        load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="is a Qwen2ForTokenClassification: a score for every token"):
        RewardModel.load(tmp_path)


def test_generate_refuses_a_classifier_as_its_weights(tmp_path, capsys):
    from tritongpt import cli

    hf_classifier(hf_config("llama"), tmp_path / "rm")
    assert cli.main(["generate", "--weights", str(tmp_path / "rm"), "--prompt", "x", "--device", "cpu",
                     "--tokenizer", "default"]) == 2
    assert "is a LlamaForSequenceClassification (a reward model or classifier" in capsys.readouterr().err


def test_an_exported_reward_model_reads_back_with_its_scores(tmp_path):
    """`export` then RewardModel.load: the folded head bias comes back in the final norm's bias."""
    from audit_formats import EXPORT_BASES, TINY
    from test_reward_export import random_reward_model
    from tritongpt.commands import export_target
    from tritongpt.model.config import GPTConfig
    from tritongpt.train.reward import export_reward_model, fold_head_bias

    cfg = GPTConfig(**TINY, **EXPORT_BASES["GPT-2"])
    rm = random_reward_model(cfg)
    idx, lengths = right_padded([5, 11, 8])
    idx = idx % cfg.vocab_size
    with torch.no_grad():
        want = rm(idx, lengths)
    assert fold_head_bias(rm) == 0.0
    export_reward_model(rm, tmp_path, export_target(cfg)[2], cfg.vocab_size - 1, 0)
    back = RewardModel.load(tmp_path).eval()
    with torch.no_grad():
        assert_close_rel(back(idx, lengths), want, 1e-5, "exported and read back")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """A policy folder (a tiny LlamaForCausalLM and its tokenizer files) and a LlamaForSequenceClassification of its
    shape beside the same tokenizer files, as TRL's RewardTrainer saves one. -> (policy folder, classifier folder)."""
    from test_hf_tokenizer import llama_folder

    base = tmp_path_factory.mktemp("smollm")
    policy, _, lm = llama_folder(base / "policy", "smollm", context=512)
    config = transformers.LlamaConfig(**{**lm.config.to_dict(), "id2label": {0: "LABEL_0"}, "pad_token_id": 0,
                                         "architectures": None})
    hf_classifier(config, base / "rm")
    for f in policy.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, base / "rm" / f.name)
    return policy, base / "rm"


def test_rlhf_takes_a_hub_classifier_sharing_the_policys_tokenizer(smollm, tmp_path, monkeypatch, capsys):
    """`rlhf --init FOLDER --reward owner/name`: the classifier is fetched (hf_hub_download faked) and scores the
    rollouts; its tokenizer is the policy's, so no note; one of another tokenizer with as many tokens is noted."""
    from test_hf_tokenizer import fake_hub, llama_folder
    from tritongpt import cli
    from tritongpt.train.rlhf import note_other_tokenizer
    from tritongpt.train.tokenizer import get_tokenizer

    import tritongpt.train.rlhf as rlhf

    policy, rm = smollm
    shutil.copytree(rm, tmp_path / "hub" / "someone" / "rm")
    fake_hub(monkeypatch, tmp_path / "hub", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # someone/rm is no path from here
    ends, real = [], rlhf.note_other_tokenizer  # the check is given the end the run's responses have
    monkeypatch.setattr(rlhf, "note_other_tokenizer", lambda r, tok, end=None: ends.append(end) or real(r, tok, end))
    assert cli.main(["rlhf", "--init", str(policy), "--reward", "someone/rm", "--iterations", "1",
                     "--prompts-per-iter", "2", "--minibatch-size", "2", "--epochs", "1", "--max-new-tokens", "4",
                     "--eval-prompts", "2", "--eval-samples", "1", "--device", "cpu", "--kernels", "reference",
                     "--out-dir", str(tmp_path / "rl")]) == 0
    out = capsys.readouterr()
    assert "rlhf (ppo): eval reward" in out.out and "is not the policy's" not in out.err, out.err
    assert "someone/rm: the Hugging Face Hub's files" in out.err
    assert (tmp_path / "rl" / "ckpt-0000001").is_dir()
    assert ends == [get_tokenizer(policy).eot_id]  # an Alpaca run's: the eot
    other, _, _ = llama_folder(tmp_path / "other", "qwen2")
    assert get_tokenizer(other).hash != get_tokenizer(policy).hash
    note_other_tokenizer(str(other), get_tokenizer(policy))
    assert "the tokenizer saved with --reward" in capsys.readouterr().err
    note_other_tokenizer(str(policy), get_tokenizer(policy))
    assert "the tokenizer saved with --reward" not in capsys.readouterr().err
    # the policy's tokenizer.json with another EOS (a base model's and its chat model's): the same ids, noted as
    # another end token, not as other ids
    chat = tmp_path / "chat"
    shutil.copytree(policy, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    theirs, ours = get_tokenizer(chat), get_tokenizer(policy)
    assert theirs.eot_id != ours.eot_id and theirs.ids_hash == ours.ids_hash
    note_other_tokenizer(str(chat), ours)
    err = capsys.readouterr().err
    assert "encodes as the policy's but ends a text with token" in err and "is not the policy's" not in err, err
    assert f"token {theirs.eot_id} ('<|im_end|>'), the policy's responses with {ours.eot_id} ('<|endoftext|>')" \
        in err, err
    # a ChatML run, whose responses end at <|im_end|>: the chat model's end token, no note
    note_other_tokenizer(str(chat), ours, theirs.eot_id)
    assert "the tokenizer saved with --reward" not in capsys.readouterr().err


def test_reward_init_trains_a_reward_model_on_with_its_head(smollm, tmp_path, capsys):
    """`reward --init` a Hugging Face classifier, then that run: each starts from the given head (one Adam step of
    lr 1e-4 away, where a fresh head would be ~1/sqrt(C) off), and with --lora-rank the head trains whole. `dpo`
    refuses a reward model as its policy, by name."""
    from safetensors.torch import load_file

    from tritongpt import cli

    _, rm = smollm
    flags = ["--num-pairs", "8", "--max-steps", "1", "--batch-size", "4", "--eval-every", "0", "--val-fraction", "0",
             "--device", "cpu", "--kernels", "reference", "--lr", "1e-4"]
    score = load_file(rm / "model.safetensors")["score.weight"]
    assert cli.main(["reward", "--init", str(rm), *flags, "--out-dir", str(tmp_path / "a")]) == 0
    head = RewardModel.load(tmp_path / "a").head
    capsys.readouterr()
    assert cli.main(["info", "--weights", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "reward model a scalar head" in out and "run          reward, step 1 of 1" in out, out
    # Bradley-Terry sees score differences only: the bias's gradient is zero but for rounding, whose sign and size
    # depend on the CPU's summation order (AVX-512 vs AVX2), and Adam scales even a 1e-9 gradient up to a
    # step: the bias (0 in the HF head) stays within one step, not bit-exactly 0
    assert 0 < (head.weight - score).abs().max() < 3e-4 and head.bias.abs().max() < 3e-4
    assert cli.main(["reward", "--init", str(tmp_path / "a"), *flags, "--out-dir", str(tmp_path / "b"),
                     "--lora-rank", "2"]) == 0
    assert "parameters train, and the --init's reward head whole" in capsys.readouterr().err
    again = RewardModel.load(tmp_path / "b").head
    assert 0 < (again.weight - head.weight).abs().max() < 3e-4
    assert cli.main(["reward", "--init", str(rm), "--model", "tiny", *flags, "--out-dir", str(tmp_path / "c")]) == 2
    assert "--model tiny with --init" in capsys.readouterr().err
    assert cli.main(["dpo", "--init", str(rm), *flags, "--out-dir", str(tmp_path / "d")]) == 2
    assert "is a LlamaForSequenceClassification" in capsys.readouterr().err


def test_eval_scores_a_reward_model_on_preference_pairs(smollm, tmp_path, capsys):
    """`eval --weights` a reward model: accuracy, Bradley-Terry loss and mean margin over the pairs, as each pair
    scored alone (no padding, no batch) gives them; --split val holds out what `reward --data` would; the language
    model's flags are refused by name."""
    import random

    import torch.nn.functional as F

    from tritongpt import cli
    from tritongpt.train.preference import encode_pairs, read_preference_file, split_pairs
    from tritongpt.train.tokenizer import get_tokenizer

    _, rm_dir = smollm
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat hat big small red blue one two three".split()
    records = [{"prompt": " ".join(rng.choices(words, k=rng.randint(2, 9))),
                "chosen": " ".join(rng.choices(words, k=rng.randint(1, 7))),
                "rejected": " ".join(rng.choices(words, k=rng.randint(1, 7)))} for _ in range(23)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    flags = ["--weights", str(rm_dir), "--data", str(data), "--device", "cpu", "--json", "--batch-size", "5"]
    assert cli.main(["eval", *flags, "--split", "all"]) == 0
    got = json.loads(capsys.readouterr().out)
    rm, tok = RewardModel.load(rm_dir).eval(), get_tokenizer(rm_dir)
    rc, rr = [], []
    with torch.no_grad():
        for e in encode_pairs(read_preference_file(data), tok, rm.config.context_length):
            for seq, out in ((e.prompt + e.chosen, rc), (e.prompt + e.rejected, rr)):
                out.append(rm(torch.tensor([seq]), torch.tensor([len(seq)]))[0])
    rc, rr = torch.stack(rc), torch.stack(rr)
    assert got["pairs"] == 23 and got["split"] == "all"
    assert got["acc"] == (rc > rr).sum().item() / 23 and 0 < got["acc"] < 1
    assert got["margin"] == pytest.approx((rc - rr).mean().item(), rel=1e-5, abs=1e-6)
    assert got["loss"] == pytest.approx(-F.logsigmoid(rc - rr).mean().item(), rel=1e-5)
    assert cli.main(["eval", *flags, "--val-fraction", "0.4"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert held["pairs"] == len(split_pairs(read_preference_file(data), 0.4)[1]) and held["split"] == "val"
    assert cli.main(["eval", "--weights", str(rm_dir), "--device", "cpu"]) == 0  # the embedded tasks' held-out
    assert "preference pairs of embedded tasks (val): accuracy" in capsys.readouterr().out
    assert cli.main(["eval", *flags, "--stride", "4", "--max-tokens", "9"]) == 2
    assert "--stride, --max-tokens: for a language model's eval" in capsys.readouterr().err


def test_eval_of_a_reward_model_on_a_text_file_says_it_needs_preference_pairs(smollm, tmp_path, capsys):
    """A text corpus (what an LM's eval reads) as a reward model's --data was told only "expected a .json ...":
    now why (a reward model is scored on preference pairs), naming the file and the records' fields."""
    from tritongpt import cli

    _, rm_dir = smollm
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 5)
    assert cli.main(["eval", "--weights", str(rm_dir), "--data", str(tmp_path / "corpus.txt"), "--device",
                     "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'corpus.txt'}: {rm_dir} is a reward model, scored on preference pairs, not text" in err
    assert '{"prompt", "chosen", "rejected"} records' in err


def test_info_describes_a_reward_model_without_its_lm_head(smollm, capsys):
    """`info --weights` a classifier folder: its backbone's config, and the parameters transformers counts (the
    backbone and its score; ours has the head's bias too), with no LM head."""
    from tritongpt import cli

    _, rm_dir = smollm
    assert cli.main(["info", "--weights", str(rm_dir)]) == 0
    out = capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir)
    n = hf.num_parameters() + 1
    assert f"parameters   {n:,} ({n / 1e6:.1f}M, without an LM head)\n" in out
    assert "reward model a scalar head Linear(64, 1) on this backbone" in out and "  n_embd          64\n" in out


def test_info_leaves_out_a_stand_in_lm_head_bias(tmp_path, capsys):
    """A Phi classifier reads with a zero LM head bias stood in (its reader takes one always): never used, so not a
    parameter `info` counts, as the head's weight is not."""
    from tritongpt import cli

    hf = hf_classifier(hf_config("phi"), tmp_path)
    assert cli.main(["info", "--weights", str(tmp_path)]) == 0
    n = hf.num_parameters() + 1  # and our head's bias
    assert f"parameters   {n:,} ({n / 1e6:.1f}M, without an LM head)\n" in capsys.readouterr().out


def test_eval_of_a_reward_run_defaults_to_the_pairs_it_held_out(tmp_path, capsys):
    """A `reward` run's own --data, --val-fraction, --num-pairs and --seed are eval's defaults: the embedded tasks'
    round(40 x 0.25) held-out pairs, a file's by-prompt split at the run's fraction; a run that held none out is told
    how to score it; --model is refused for a reward model."""
    from tritongpt import cli
    from tritongpt.train.preference import read_preference_file, split_pairs

    flags = ["--model", "tiny", "--max-steps", "1", "--batch-size", "4", "--eval-every", "0", "--device", "cpu",
             "--kernels", "reference"]
    assert cli.main(["reward", *flags, "--num-pairs", "40", "--val-fraction", "0.25", "--out-dir",
                     str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(tmp_path / "a"), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["pairs"], got["data"], got["val_fraction"]) == (10, "embedded tasks", 0.25)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a} {b}?", "chosen": a, "rejected": b})
                              for a in words for b in words if a != b))
    assert cli.main(["reward", *flags, "--data", str(data), "--val-fraction", "0.3", "--out-dir",
                     str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(tmp_path / "b"), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = len(split_pairs(read_preference_file(data), 0.3)[1])
    assert (got["pairs"], got["data"], got["val_fraction"]) == (want, str(data.resolve()), 0.3) and 0 < want < 56
    assert cli.main(["reward", *flags, "--data", str(data), "--val-fraction", "0", "--out-dir",
                     str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "holds out none of the pairs of" in capsys.readouterr().err
    assert cli.main(["eval", "--weights", str(tmp_path / "c"), "--device", "cpu", "--split", "all"]) == 0
    assert "56 preference pairs of" in capsys.readouterr().out
    assert cli.main(["eval", "--weights", str(tmp_path / "c"), "--device", "cpu", "--model", "tiny"]) == 2
    assert "--model: for a language model's eval" in capsys.readouterr().err
