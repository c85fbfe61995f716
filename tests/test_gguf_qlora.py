"""QLoRA on a .gguf file's own quantization: `sft/dpo/kto/reward/rlhf --init x.gguf --lora-rank R` train LoRA beside
the file's Q8_0 / Q4_0 / Q4_1 linears kept as Int8Linear / Int4Linear (gguf_import._load_kept), as on a GPTQ folder
(test_qlora_gptq.py; commands.folder_spec / folder_base, sft.load_init_base). The reference: the same LoRA on the
float load of the same file (load_gguf(quantized=False), its matrices the kept ones bit for bit)."""
import json

import pytest
import torch

from test_gguf_quant import write
from test_qlora import rel, sft_argv
from test_qlora_gptq import base_buffers, init_args, pref_argv
from tritongpt.cli import main
from tritongpt.model.lora import add_lora, has_lora
from tritongpt.model.quant import Int4Linear, Int8Linear, linear_bytes
from tritongpt.train.gpt2_weights import load_checkpoint

pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 288  # (the tokenizer's 270 ids and some unused rows)


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"Say {w}. {w} not {w}" for w in ("hi", "yes", "no", "ok", "up", "go") * 9),
                              270, name="tiny")


def gguf_file(tmp_path, qtype, tok, seed=0, name=None, other=None):
    return write(tmp_path / (name or f"{qtype}.gguf"), qtype, other=other, tok=tok, vocab=VOCAB, seed=seed)


def with_run_updates(float_model, run):
    """float_model with LoRA of the run's rank and its trained A and B (our names: .lora.; a float model's
    parametrizations: .parametrizations.weight.0)."""
    cfg = run.config
    add_lora(float_model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    ours = {n.replace(".lora.", "."): p for n, p in run.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    theirs = {n.replace(".parametrizations.weight.0", ""): p for n, p in float_model.named_parameters()
              if n.endswith(("lora_A", "lora_B"))}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * 2  # (7 matrices a layer, 2 layers: A and B each)
    with torch.no_grad():
        for name, p in ours.items():
            theirs[name].copy_(p)
    return float_model


@pytest.mark.parametrize("qtype, cls", [("Q4_0", Int4Linear), ("Q8_0", Int8Linear)])
def test_sft_trains_lora_on_a_gguf_files_own_blocks_resumes_on_it_and_exports_merged(qtype, cls, tok, tmp_path,
                                                                                     capsys):
    from tritongpt.train import common
    from tritongpt.train.gguf_import import load_gguf

    path = gguf_file(tmp_path, qtype, tok)
    out = tmp_path / "run"
    assert main(sft_argv(path, out, "--max-steps", "2", "--lora-rank", "4", "--lr", "5e-2")) == 0
    mode = cls.mode
    assert f"QLoRA on --init's own GGUF quantization: the base's 14 matrices {mode}" in capsys.readouterr().err
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert (state["args"]["init_quantized"], state["args"]["quantize"]) == (f"gguf {mode}", None)
    run = load_checkpoint(out, quantized_ok=True).eval()
    flat = load_gguf(path, quantized=False)
    layers = [m for m in run.trf_blocks.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(layers) == 14 and all(type(m) is cls and m.group_size == 32 for m in layers)
    assert linear_bytes(run) < 0.5 * linear_bytes(flat)  # (the head float in both)
    # the updates moved (B starts at 0); the frozen base is the file's own blocks, bit for bit
    assert all(p.abs().sum() > 0 for n, p in run.named_parameters() if n.endswith("lora_B"))
    want, got = base_buffers(load_gguf(path)), base_buffers(run)
    assert len(want) >= 14 * 2 and sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the run computes LoRA on the file's float load with the same updates
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = with_run_updates(flat, run).eval()
    with torch.no_grad():
        logits = run(idx)
        assert rel(logits, ref(idx)) < 1e-5
    capsys.readouterr()
    assert main(["info", "--weights", str(out)]) == 0
    assert f"(QLoRA: --lora-rank on its --init file's own GGUF {mode.upper()} quantization)" in capsys.readouterr().out
    # the merged export: a float Llama folder of the logits the run computes unmerged
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    merged = load_checkpoint(tmp_path / "hf")
    assert not getattr(merged, "quantized", None) and not has_lora(merged)
    with torch.no_grad():
        assert rel(merged.eval()(idx), logits) < 1e-5
    # a resume re-loads the file, finds it the checkpoint's base, and goes on; another file (the same shapes,
    # other weights) is refused by name
    assert main(sft_argv(path, out, "--max-steps", "3", "--lora-rank", "4", "--lr", "5e-2", "--resume")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    other = gguf_file(tmp_path, qtype, tok, seed=1, name="other.gguf")
    capsys.readouterr()
    assert main(sft_argv(other, out, "--max-steps", "4", "--lora-rank", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"--init {other} is not the base" in err and f"resume with the run's own --init {path}" in err


@pytest.mark.parametrize("flags, said", [
    ([], "is GGUF-quantized (its blocks' linears kept in the file's own Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks), "
         "its matrices "
         "read as int4: they train only through LoRA updates beside them (QLoRA on its own quantization): pass "
         "--lora-rank"),
    (["--lora-rank", "4", "--quantize", "int8"], "--quantize int8: --init"),
    (["--lora-rank", "4", "--vocab-multiple", "64"], "--vocab-multiple 64: --init"),
])
def test_sft_on_a_kept_gguf_refuses_full_fine_tuning_quantize_and_vocab_multiple_by_name(tok, tmp_path, capsys,
                                                                                         flags, said):
    path = gguf_file(tmp_path, "Q4_0", tok)
    assert main(sft_argv(path, tmp_path / "bad", "--max-steps", "1", *flags)) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_mixed_gguf_loads_float_and_trains_as_a_float_init(tok, tmp_path, capsys):
    """Blocks' linears of two types (a Q5_0 among Q4_0) load dequantized: a float --init, fully fine-tuned or with
    --quantize like any other, not refused as quantized."""
    from tritongpt.train.sft import load_init_base

    path = gguf_file(tmp_path, "Q4_0", tok, other={"blk.1.ffn_down.weight": "Q5_0"})
    for args in (init_args(path), init_args(path, 4, "int4"), init_args(path, vocab_multiple=64)):
        model = load_init_base(args)
        assert model.init_quantized is None and not getattr(model, "quantized", None)
        assert not hasattr(model, "base_folder")
        assert any(p.requires_grad and p.dim() == 2 for p in model.trf_blocks.parameters())  # (float matrices)
        assert "its blocks' linears are Q4_0, Q5_0: kept quantized only where" in capsys.readouterr().err


def test_reward_trains_lora_and_a_new_head_on_a_gguf_files_backbone(tok, tmp_path, capsys):
    """reward takes the file's model as its backbone, kept int8 as the file holds it, with a new scalar head; the
    run records the file's quantization, its base the file's blocks bit for bit."""
    from safetensors import safe_open

    from tritongpt.train import common
    from tritongpt.train.gguf_import import load_gguf
    from tritongpt.train.reward import RewardModel

    path = gguf_file(tmp_path, "Q8_0", tok)
    out = tmp_path / "run"
    assert main(pref_argv("reward", path, out, "--max-steps", "2", "--eval-every", "0")) == 0
    err = capsys.readouterr().err
    assert "QLoRA on --init's own GGUF quantization" in err and "and the new reward head whole" in err
    ckpt = common.resume_checkpoint(out, "latest")
    assert common.load_state(ckpt)["args"]["init_quantized"] == "gguf int8"
    want = base_buffers(load_gguf(path))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        got = {k.removeprefix("backbone."): f.get_tensor(k) for k in f.keys() if k.removeprefix("backbone.") in want}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    rm = RewardModel.load(out, quantized_ok=True)
    assert rm.quantized == "int8" and has_lora(rm.backbone)
    assert any(p.abs().sum() > 0 for n, p in rm.named_parameters() if n.endswith("lora_B"))


def test_its_peft_adapter_goes_on_the_files_float_export_and_gives_the_runs_logits(tok, tmp_path, capsys):
    """peft loads no .gguf base: the adapter goes on the file's float export (`export x.gguf --out BASE`), whose
    matrices are the run's frozen blocks dequantized exactly, so it is checked equal to them (not re-quantized by
    round-to-nearest, which is not the file's rounding: that refused the right base); the adapter read back onto that
    base (merged) gives the run's logits; another file's export is refused by name."""
    path = gguf_file(tmp_path, "Q4_0", tok)
    out = tmp_path / "run"
    assert main(sft_argv(path, out, "--max-steps", "2", "--lora-rank", "4", "--lr", "5e-2")) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "ad"), "--adapter"]) == 2
    assert f"export it (`tritongpt export {path} --out BASE`) and pass --base BASE" in capsys.readouterr().err
    base = tmp_path / "base"
    assert main(["export", str(path), "--out", str(base)]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "ad"), "--adapter", "--base", str(base)]) == 0
    assert "its --init file's own GGUF INT4 blocks; the adapter goes on their float model" in capsys.readouterr().err
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(load_checkpoint(tmp_path / "ad").eval()(idx), load_checkpoint(out, quantized_ok=True).eval()(idx)) \
            < 1e-5
    other = tmp_path / "other"
    assert main(["export", str(gguf_file(tmp_path, "Q4_0", tok, seed=1, name="other.gguf")), "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "ad2"), "--adapter", "--base", str(other)]) == 2
    assert f"--base {other} is not the model this LoRA update was trained on" in capsys.readouterr().err
