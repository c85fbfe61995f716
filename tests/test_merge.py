"""`tritongpt merge` (train/merge.py): each method against a float64 formula written here element by element, the
models' checks, and the command end to end on checkpoints the tests write."""
import json
import math

import pytest
import torch

from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel, safetensors_metadata
from tritongpt.train import merge
from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

TEXT = " ".join(f"the cat {i} sat on the mat {i * 7}, and the dog ran." for i in range(60))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_and_task_arithmetic_against_their_sums():
    xs, base = [rand(5, 7, seed=s) for s in range(3)], rand(5, 7, seed=9)
    w = [0.5, 2.0, -0.25]
    want = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(merge.merge_tensors("linear", xs, w), want, rtol=1e-12, atol=1e-12)
    want = base + 0.7 * sum(wi * (x - base) for wi, x in zip(w, xs))
    got = merge.merge_tensors("task_arithmetic", xs, w, base, scale=0.7)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # fp32 in, fp32 out, computed in float64
    assert merge.merge_tensors("linear", [x.float() for x in xs], w).dtype == torch.float32


def test_slerp_walks_the_arc_and_falls_back_to_a_line_when_parallel():
    a, b = rand(6, 5, seed=1), rand(6, 5, seed=2)
    a = a * 3.0  # other norms: the angle is the directions', the weights go on the tensors themselves
    ua, ub = a.flatten() / a.norm(), b.flatten() / b.norm()
    theta = math.acos(float(ua @ ub))
    for t in (0.0, 0.3, 0.5, 1.0):
        want = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
        got = merge.slerp(t, a, b)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), t
    assert torch.allclose(merge.slerp(0.0, a, b), a) and torch.allclose(merge.slerp(1.0, a, b), b)
    # two unit vectors: the result stays on the sphere, at angle t * theta from a (a line would cut inside it)
    got = merge.slerp(0.3, ua, ub)
    assert abs(float(got.norm()) - 1.0) < 1e-12 and abs(math.acos(float(got @ ua)) - 0.3 * theta) < 1e-10
    # nearly parallel (cos > 0.9995): lerp, which is also finite where sin(theta) ~ 0
    c = a + 1e-4 * rand(6, 5, seed=3)
    assert torch.allclose(merge.slerp(0.25, a, c), torch.lerp(a, c, 0.25), rtol=1e-12, atol=1e-12)
    assert torch.allclose(merge.slerp(0.25, a, a), a)


def ties_by_hand(xs, w, base, density, scale, dare_keep=None, normalize=True):
    """TIES (or DARE's keep masks, dare_keep[i][j] with rescale) element by element, in Python floats."""
    flat = [(x - base).flatten().tolist() for x in xs]
    n = len(flat[0])
    taus = []
    for i, tau in enumerate(flat):
        if dare_keep is not None:
            taus.append([v / density if dare_keep[i][j] else 0.0 for j, v in enumerate(tau)])
            continue
        k = max(1, int(density * n))
        order = sorted(range(n), key=lambda j: -abs(tau[j]))[:k]
        taus.append([tau[j] if j in order else 0.0 for j in range(n)])
    out = []
    for j in range(n):
        wt = [w[i] * taus[i][j] for i in range(len(xs))]
        sign = 1.0 if sum(wt) >= 0 else -1.0
        agree = [i for i in range(len(xs)) if wt[i] != 0 and math.copysign(1.0, wt[i]) == sign]
        total = sum(wt[i] for i in agree)
        if normalize:
            div = sum(w[i] for i in agree)
            total = total / (div if div != 0 else 1.0)
        out.append(base.flatten()[j].item() + scale * total)
    return torch.tensor(out, dtype=torch.float64).view_as(base)


def test_ties_trims_elects_and_averages_the_agreeing():
    xs, base = [rand(3, 7, seed=s) for s in (4, 5, 6)], rand(3, 7, seed=7)
    w = [1.0, 0.5, 2.0]
    for density, scale in ((0.4, 1.0), (1.0, 0.5), (0.05, 1.3)):  # 0.05 of 21: one element each
        got = merge.merge_tensors("ties", xs, w, base, density=density, scale=scale)
        assert torch.allclose(got, ties_by_hand(xs, w, base, density, scale), rtol=1e-12, atol=1e-12), density
    # a tie (the weighted sum exactly 0) elects + (mergekit's rule): the positive model's value
    d, zero = rand(2, 3, seed=14).abs() + 0.1, torch.zeros(2, 3, dtype=torch.float64)
    assert torch.equal(merge.merge_tensors("ties", [d, -d], [1.0, 1.0], zero), d)
    kept = merge.keep_largest(rand(50, seed=8), 0.3)
    assert int((kept != 0).sum()) == 15


def test_dare_drops_at_random_and_rescales():
    xs, base = [rand(4, 9, seed=s) for s in (10, 11)], rand(4, 9, seed=12)
    w, density = [1.0, 0.75], 0.6
    # the keep masks the method draws: the same generator, the same order (one rand per model's tensor)
    g = torch.Generator().manual_seed(5)
    keep = [(torch.rand((4, 9), generator=g, dtype=torch.float64) < density).flatten().tolist() for _ in xs]
    got = merge.merge_tensors("dare_ties", xs, w, base, density=density, generator=torch.Generator().manual_seed(5))
    want = ties_by_hand(xs, w, base, density, 1.0, dare_keep=keep, normalize=False)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    got = merge.merge_tensors("dare_linear", xs, w, base, density=density,
                              generator=torch.Generator().manual_seed(5))
    taus = [[v / density if k else 0.0 for v, k in zip((x - base).flatten().tolist(), kk)] for x, kk in zip(xs, keep)]
    want = base + torch.tensor([sum(wi * t[j] for wi, t in zip(w, taus)) for j in range(36)],
                               dtype=torch.float64).view(4, 9)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # unbiased: over a large tensor the kept share is density, and the mean of tau is kept
    tau = rand(200_000, seed=13).abs() + 1.0
    dropped = merge.drop_and_rescale(tau, 0.3, torch.Generator().manual_seed(0))
    assert abs(float((dropped != 0).double().mean()) - 0.3) < 0.005  # ~5 sigma: sqrt(.21 / 2e5) = 0.001
    assert abs(float(dropped.mean() / tau.mean()) - 1.0) < 0.02


def tiny(seed, **kw):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(**{"vocab_size": 300, "context_length": 32, "n_embd": 24, "n_layer": 2, "n_head": 2,
                                 **kw}))


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(TEXT, 300, name="merge-test")


def write(model, folder, tok, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.safetensors", meta or None)
    save_run_tokenizer(tok, folder)
    return str(folder)


def test_merge_command_linear_slerp_and_ties_of_checkpoints(tmp_path, tok, capsys):
    models = [tiny(s) for s in (1, 2, 3)]
    assert not list(models[0].buffers())  # merge_models merges parameters: a buffer would need a rule of its own
    paths = [write(m, tmp_path / f"m{i}", tok) for i, m in enumerate(models)]
    out = tmp_path / "soup"
    assert main(["merge", *paths[:2], "--coefficients", "1", "3", "--out", str(out)]) == 0
    assert "merge: linear of 2 models" in capsys.readouterr().out
    soup = GPTModel.load(out / "model.safetensors")
    for (name, p), p0, p1 in zip(soup.named_parameters(), models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, (p0 + 3 * p1) / 4, atol=1e-6), name
    recipe = json.loads(safetensors_metadata(out / "model.safetensors")["merge"])
    assert recipe["method"] == "linear" and recipe["coefficients"] == [1.0, 3.0] and recipe["models"] == paths[:2]
    assert (out / "tokenizer.json").is_file()
    assert main(["info", "--weights", str(out)]) == 0  # info names the merge
    assert f"(a merge: linear of {paths[0]}, {paths[1]} (coefficients [1.0, 3.0]))" in capsys.readouterr().out
    # the merge is a checkpoint like any: generate reads it with its tokenizer
    assert main(["generate", "--weights", str(out), "--prompt", "the cat", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    capsys.readouterr()

    assert main(["merge", *paths[:2], "--method", "slerp", "--t", "0.25", "--out", str(tmp_path / "s")]) == 0
    s = GPTModel.load(tmp_path / "s" / "model.safetensors")
    for (name, p), p0, p1 in zip(s.named_parameters(), models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, merge.slerp(0.25, p0.double(), p1.double()).float(), atol=1e-6), name

    base = tiny(9)
    bpath = write(base, tmp_path / "base", tok)
    assert main(["merge", *paths[:2], "--method", "ties", "--base", bpath, "--density", "0.5",
                 "--coefficients", "1", "0.5", "--scale", "0.8", "--out", str(tmp_path / "t")]) == 0
    t = GPTModel.load(tmp_path / "t" / "model.safetensors")
    name, p = next((n, p) for n, p in t.named_parameters() if n.endswith("W_query.weight"))
    xs = [dict(m.named_parameters())[name].double() for m in models[:2]]
    want = ties_by_hand(xs, [1.0, 0.5], dict(base.named_parameters())[name].double(), 0.5, 0.8)
    assert torch.allclose(p.double(), want, atol=1e-6)


def test_merge_of_reward_models_and_lora_checkpoints(tmp_path, tok):
    from tritongpt.train.reward import RewardModel

    rms = []
    for s in (1, 2):
        rm = RewardModel(tiny(s))
        with torch.no_grad():
            rm.head.weight.normal_()
        rms.append(rm)
    paths = []
    for i, rm in enumerate(rms):
        (tmp_path / f"r{i}").mkdir()
        rm.save(tmp_path / f"r{i}" / "model.safetensors")
        save_run_tokenizer(tok, tmp_path / f"r{i}")
        paths.append(str(tmp_path / f"r{i}"))
    assert main(["merge", *paths, "--out", str(tmp_path / "warm")]) == 0
    warm = RewardModel.load(tmp_path / "warm")
    assert torch.allclose(warm.head.weight, (rms[0].head.weight + rms[1].head.weight) / 2, atol=1e-6)
    # a reward model and a causal LM do not merge
    lm = write(tiny(3), tmp_path / "lm", tok)
    with pytest.raises(UserError, match="is a reward model; .* is a causal LM: merge causal LMs or reward models"):
        merge.cmd_merge(merge_args([paths[0], lm], tmp_path / "x"))

    # a LoRA checkpoint is read merged (W + scale B A), as --weights reads it
    lora = tiny(4, lora_rank=2)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora" in n or n.endswith("original"):
                p.normal_(std=0.1)
    write(lora, tmp_path / "lora", tok)
    from tritongpt.train.gpt2_weights import load_checkpoint

    merged_lora = load_checkpoint(tmp_path / "lora")
    plain = write(tiny(5), tmp_path / "plain", tok)
    assert main(["merge", str(tmp_path / "lora"), plain, "--out", str(tmp_path / "lm2")]) == 0
    out = GPTModel.load(tmp_path / "lm2" / "model.safetensors")
    assert out.config.lora_rank == 0
    for (n, p), a, b in zip(out.named_parameters(), merged_lora.parameters(), tiny(5).parameters()):
        assert torch.allclose(p, (a + b) / 2, atol=1e-6), n


def merge_args(models, out, **kw):
    import argparse

    d = {"weights": [str(m) for m in models], "out": str(out), "method": "linear", "base": None,
         "coefficients": None, "t": None, "density": None, "scale": 1.0, "seed": 0, "overwrite": False,
         "tokenizer": None}
    return argparse.Namespace(**{**d, **kw})


def test_merge_refuses_other_models_tokenizers_and_bad_flags(tmp_path, tok, capsys):
    a, b = write(tiny(1), tmp_path / "a", tok), write(tiny(2), tmp_path / "b", tok)
    wide = write(tiny(3, n_embd=32), tmp_path / "wide", tok)
    with pytest.raises(UserError, match=r"is another model than .*: n_embd 32 \(.*: 24\).*only models of one"):
        merge.cmd_merge(merge_args([a, wide], tmp_path / "o"))
    other_tok = BPETokenizer.train(TEXT.replace("cat", "bird").upper(), 300, name="other")
    c = write(tiny(4), tmp_path / "c", other_tok)
    with pytest.raises(UserError, match="tokenizer is not .* a merge would average the embeddings of different"):
        merge.cmd_merge(merge_args([a, c], tmp_path / "o"))
    cases = [
        (dict(method="slerp", weights=[a, b, a]), "slerp interpolates two models, got 3"),
        (dict(weights=[a]), "linear needs two models or more, got 1"),
        (dict(method="ties"), "pass it as --base"),
        (dict(base=a), "linear takes no --base"),
        (dict(method="slerp", coefficients=[1.0, 2.0]), "slerp takes --t, not --coefficients"),
        (dict(coefficients=[1.0]), "--coefficients has 1 numbers for 2 models"),
        (dict(coefficients=[1.0, float("nan")]), "--coefficients must be finite"),
        (dict(coefficients=[1.0, -1.0]), "divides by the coefficients' sum, which is 0"),
        (dict(t=0.5), "--t is slerp's"),
        (dict(method="slerp", t=1.5), r"--t must be in \[0, 1\]"),
        (dict(density=0.5), "--density is ties'"),
        (dict(method="ties", base=a, density=0.0), r"--density must be in \(0, 1\]"),
        (dict(scale=2.0), "--scale multiplies the merged task vector"),
        (dict(method="task_arithmetic", base=a, scale=float("inf")), "--scale must be a finite number"),
        (dict(method="dare_ties", base=a, seed=2**64), "--seed must be a 64-bit integer"),
        (dict(method="ties", base=a, seed=3), "--seed draws dare's random drops .*--method ties draws none"),
    ]
    for kw, msg in cases:
        with pytest.raises(UserError, match=msg):
            merge.check_merge_args(merge_args(kw.pop("weights", [a, b]), tmp_path / "o", **kw))
    # the output: not a file, not over a model unless --overwrite, not one of the inputs
    (tmp_path / "file").write_text("x")
    assert main(["merge", a, b, "--out", str(tmp_path / "file")]) == 2
    assert "is a file: name a folder" in capsys.readouterr().err
    assert main(["merge", a, b, "--out", a]) == 2
    assert "already holds a model.safetensors: --overwrite" in capsys.readouterr().err
    assert main(["merge", a, b, "--out", a, "--overwrite"]) == 2
    assert "is one of the models merged" in capsys.readouterr().err
    assert main(["merge", a, str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope not found" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # nor a training run's folder or checkpoint (its own tokenizer.json, its newest checkpoint as --weights run/,
    # a checkpoint's weights under its state.pt), as `export` refuses them
    from tritongpt.train import common

    run = tmp_path / "run"
    ck = run / "ckpt-0000001"
    ck.mkdir(parents=True)
    tiny(5).save(ck / "model.safetensors")
    torch.save({"step": 1}, ck / "state.pt")
    before = (ck / "model.safetensors").read_bytes()
    for target in (run, ck):
        assert main(["merge", a, b, "--out", str(target), "--overwrite"]) == 2
        assert "is a tritongpt run or checkpoint folder" in capsys.readouterr().err
    assert (ck / "model.safetensors").read_bytes() == before and not (run / "model.safetensors").exists()
    assert common.resolve_checkpoint(run) == ck / "model.safetensors"


def test_merge_keeps_a_prompt_format_the_models_share(tmp_path, tok, capsys):
    from tritongpt.train.chat import run_template

    a = write(tiny(1), tmp_path / "a", tok, prompt_format="chat")
    b = write(tiny(2), tmp_path / "b", tok, prompt_format="chat")
    c = write(tiny(3), tmp_path / "c", tok, prompt_format="alpaca")
    assert main(["merge", a, b, "--out", str(tmp_path / "ab")]) == 0
    assert run_template(tmp_path / "ab") == "chat"
    capsys.readouterr()
    assert main(["info", "--weights", str(tmp_path / "ab")]) == 0  # info says the format chat will prompt it in
    assert "prompts      chat template (what `tritongpt chat` prompts it with)" in capsys.readouterr().out
    assert main(["merge", a, c, "--out", str(tmp_path / "ac")]) == 0
    assert "different prompt formats (alpaca, chat): the merge records none" in capsys.readouterr().err
    assert run_template(tmp_path / "ac") is None
    assert main(["info", "--weights", str(tmp_path / "ac")]) == 0
    assert "prompts " not in capsys.readouterr().out


def test_models_saved_without_a_tokenizer_merge_with_tokenizer(tmp_path, tok, capsys):
    """Checkpoints with no tokenizer beside them (a bare model.safetensors, or GPT-2's tokenizer offline): the
    refusal names --tokenizer, which merge takes; the models' saved tokenizers still win where they have one."""
    paths = []
    for i in (1, 2):
        (tmp_path / f"n{i}").mkdir()
        tiny(i).save(tmp_path / f"n{i}" / "model.safetensors")
        paths.append(str(tmp_path / f"n{i}"))
    assert main(["merge", *paths, "--out", str(tmp_path / "o")]) == 2
    assert "(--tokenizer)" in capsys.readouterr().err
    tok.save(tmp_path / "tok.json")
    assert main(["merge", *paths, "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok.json")]) == 0
    from tritongpt.train.tokenizer import get_tokenizer

    assert get_tokenizer(str(tmp_path / "o")).hash == tok.hash  # saved with the merge, for generate and --init
    # a model that saved another tokenizer is still refused: --tokenizer stands in only where none is saved
    other_tok = BPETokenizer.train(TEXT.replace("cat", "bird").upper(), 300, name="other")
    c = write(tiny(4), tmp_path / "c", other_tok)
    assert main(["merge", paths[0], c, "--out", str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "tok.json")]) == 2
    assert "tokenizer is not" in capsys.readouterr().err
    # every model with its own: --tokenizer was never read (a file that is no tokenizer went unsaid)
    d, e = write(tiny(5), tmp_path / "d", tok), write(tiny(6), tmp_path / "e", tok)
    assert main(["merge", d, e, "--out", str(tmp_path / "o3"), "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert f"merge: --tokenizer {tmp_path / 'nope.json'} stands in for a tokenizer the models were saved without, " \
        "and every model here has its own: it would do nothing" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_a_model_and_its_hugging_face_round_trip_are_one_architecture(tmp_path, tok):
    """A config field whose 0 means a default (mlp_hidden, n_kv_head, attention_head_dim, rotary_dim, and
    attention_multiplier's 1/sqrt(head_dim)) compares as the value it means: a model's export, read back, says
    them explicitly, and is the same model. moe_aux_loss is how a MoE trains, not what it computes."""
    llama = dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    plain = tiny(1, **llama)
    cfg = plain.config
    explicit = tiny(2, **llama, mlp_hidden=cfg.ff_hidden, n_kv_head=cfg.kv_heads, attention_head_dim=cfg.head_dim,
                    rotary_dim=cfg.head_dim, attention_multiplier=1 / math.sqrt(cfg.head_dim))
    a, b = write(plain, tmp_path / "a", tok), write(explicit, tmp_path / "b", tok)
    assert main(["merge", a, b, "--out", str(tmp_path / "ab")]) == 0
    out = GPTModel.load(tmp_path / "ab" / "model.safetensors")
    for (n, p), x, y in zip(out.named_parameters(), plain.parameters(), explicit.parameters()):
        assert torch.allclose(p, (x + y) / 2, atol=1e-6), n
    # another value is another model still
    wider = write(tiny(3, **llama, mlp_hidden=cfg.ff_hidden + 8), tmp_path / "w", tok)
    with pytest.raises(UserError, match=r"mlp_hidden 72 \(.*: 64\)"):
        merge.cmd_merge(merge_args([a, wider], tmp_path / "o"))
    scaled = write(tiny(4, **llama, attention_multiplier=0.5), tmp_path / "s", tok)
    with pytest.raises(UserError, match="attention_multiplier 0.5"):
        merge.cmd_merge(merge_args([a, scaled], tmp_path / "o"))
    moe = dict(llama, n_experts=2, experts_per_token=1)
    m1, m2 = write(tiny(5, **moe), tmp_path / "m1", tok), write(tiny(6, **moe, moe_aux_loss=0.01), tmp_path / "m2", tok)
    assert main(["merge", m1, m2, "--out", str(tmp_path / "moe")]) == 0
