"""The GPU path builds for Hopper: every kernel launch compiled for sm_90 with Triton's compiler
and ptxas, on this GPU-less machine (bench/compile_check.py). The interpreter tests prove the
arithmetic; this proves the same launches compile, fit an SM and do not spill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tritongpt.bench import compile_check

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_matmul_kernel", "_attn_fwd", "_attn_fwd_split",
           "_attn_fwd_combine", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_ce_fwd_kernel",
           "_ce_bwd_kernel", "_rope_kernel", "_grouped_kernel", "_expert_grad_kernel", "_distill_kernel",
           "_gelu_pointwise_kernel", "_gate_pointwise_kernel", "_int8_linear_kernel", "_int4_linear_kernel",
           "_int8_linear_dx_kernel", "_int4_linear_dx_kernel", "_lora_shrink_kernel", "_lora_expand_kernel",
           "_lora_shrink_grouped_kernel", "_lora_expand_grouped_kernel", "_token_mask_kernel",
           "_sample_kernel"}


def _quick_build(out, *flags):
    """`bench compile --quick --strict` (flags: more of its flags) through the CLI, which starts the check with the
    interpreter off (it is on in this process): its compile.json, once it exited 0."""
    proc = subprocess.run([sys.executable, "-m", "tritongpt.cli", "bench", "compile", "--quick", "--strict",
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "sm90-offline" / "compile.json").read_text())


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
# One clean config a launch, every kernel config once (--one-config: ~220 builds of the ~750): with Triton's cache
# cold (a fresh machine, or a kernel changed) every config took 8.5 min beside the suite's other worker, and CI's
# cache is always cold
@pytest.mark.timeout(900)
def test_every_kernel_launch_builds_for_sm90(tmp_path):
    data = _quick_build(tmp_path, "--one-config")
    assert data["env"]["one_config"] is True
    assert data["env"]["target"] == "sm_90" and data["env"]["triton"] == triton.__version__
    rows = data["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(launch["clean_config"] for launch in data["launches"]), data["launches"]
    for r in rows:
        assert r["status"] != "error", r
    # GeGLU: the gate's forward and backward epilogues (the latter storing a) and dW_down's prologue (the
    # fallback with only the down Linear training) with gelu_tanh (its plain products are swiglu's)
    geglu = {r["variant"] for r in rows if r["case"].startswith("geglu")}
    assert len(geglu) == 3 and all("GATE_GELU=True" in v for v in geglu), geglu
    # the mixture-of-experts MLP: forward's gate+up (x gathered) and down (rows scattered back), backward's dg/du
    # epilogue (dy gathered, a stored beside dg and du) and dx's two products, and the per-expert weight
    # gradients: dW_down's from the stored a, dW_gate's and dW_up's, and dW_down's with a recomputed (only
    # w_down training: no dg/du launch)
    moe = {(r["kernel"], r["variant"]) for r in rows if r["case"].startswith("moe")}
    assert len(moe) == 7, moe
    assert {v.split(" PRECISION")[0] for k, v in moe if k == "_grouped_kernel"} == {
        "GATHER_A=True SCATTER_C=False EPILOGUE=3 SUM2=False GATE_GELU=False STORE_ACT=False HAS_BIAS=False CLAMP=False MXFP4=0",
        "GATHER_A=False SCATTER_C=True EPILOGUE=0 SUM2=False GATE_GELU=False STORE_ACT=False HAS_BIAS=False CLAMP=False MXFP4=0",
        "GATHER_A=True SCATTER_C=False EPILOGUE=4 SUM2=False GATE_GELU=False STORE_ACT=True HAS_BIAS=False CLAMP=False MXFP4=0",
        "GATHER_A=False SCATTER_C=True EPILOGUE=0 SUM2=True GATE_GELU=False STORE_ACT=False HAS_BIAS=False CLAMP=False MXFP4=0"
    }, moe
    assert sum("R_SWIGLU=True" in v for k, v in moe if k == "_expert_grad_kernel") == 1, moe
    # GPT-OSS's experts (kernels/moe.py's HAS_BIAS and CLAMP): forward's gate+up with both, its down with the
    # bias; backward's dg/du epilogue with the clamp's masks; the biases' gradients from the weight-gradient kernel
    oss = {(r["kernel"], r["variant"]) for r in rows if r["case"].startswith("gpt-oss moe")}
    assert any("EPILOGUE=3" in v and "HAS_BIAS=True CLAMP=True" in v for k, v in oss if k == "_grouped_kernel"), oss
    assert any("EPILOGUE=4" in v and "CLAMP=True" in v for k, v in oss if k == "_grouped_kernel"), oss
    # GPT-OSS's experts kept MXFP4 (moe_mlp_mxfp4): forward's two products decode blocks along K (MXFP4=1), dx's
    # da (the clamp's masks) and dg/du products along N (MXFP4=2); no weight-gradient launch (the experts frozen)
    mx = {(r["kernel"], r["variant"].split(" PRECISION")[0]) for r in rows if r["case"].startswith("gpt-oss mxfp4")}
    assert {k for k, _ in mx} == {"_grouped_kernel"} and len(mx) == 4, mx
    assert sorted(v.split("MXFP4=")[1] for _, v in mx) == ["1", "1", "2", "2"], mx
    assert any("EPILOGUE=3" in v and "HAS_BIAS=True CLAMP=True MXFP4=1" in v for _, v in mx), mx
    assert any("EPILOGUE=4" in v and "CLAMP=True MXFP4=2" in v for _, v in mx), mx
    assert not any("MXFP4=0" not in r["variant"] for r in rows
                   if r["kernel"] == "_grouped_kernel" and not r["case"].startswith("gpt-oss mxfp4")), "MXFP4 elsewhere"
    assert not any(("CLAMP=True" in r["variant"] or "HAS_BIAS=True" in r["variant"]) for r in rows
                   if r["kernel"] in ("_grouped_kernel", "_expert_grad_kernel")
                   and not r["case"].startswith("gpt-oss")), "GPT-OSS's flags outside its case"
    # the dense MLPs: dh's (dg/du's) epilogue stores a, and the prologues that recompute it are built for
    # the frozen fallback
    dense = {r["variant"] for r in rows if r["kernel"] == "_matmul_kernel"}
    assert any("EPILOGUE=2" in v and "STORE_ACT=True" in v for v in dense), dense
    assert any("EPILOGUE=4" in v and "STORE_ACT=True" in v for v in dense), dense
    assert any("B_GELU=True" in v for v in dense) and any("B_SWIGLU=True" in v for v in dense), dense
    # GPT-NeoX's exact GELU: the GELU MLP's forward epilogue, dh's epilogue (storing a) and dW2's prologue
    # (W1 frozen) built with GELU_ERF, only in its case (and in the split case's GELU pass, built for both GELUs)
    erf = {r["variant"] for r in rows if r["case"].endswith("exact gelu")}
    assert len(erf) == 3 and all("GELU_ERF=True" in v for v in erf), erf
    assert not any("GELU_ERF=True" in r["variant"] for r in rows
                   if not r["case"].endswith(("exact gelu", "split gelu")))
    # the squared-ReLU MLP (Arcee's): the same three launches with RELU2, only in its case (and the split pass's)
    relu2 = {r["variant"] for r in rows if r["case"].endswith(" relu2") and r["case"].startswith("mlp ")}
    assert len(relu2) == 3 and all("RELU2=True" in v for v in relu2), relu2
    assert not any("RELU2=True" in r["variant"] for r in rows if not r["case"].endswith((" relu2", "split gelu")))
    # ... and the int8 and int4 fc1's epilogue (the quantized squared-ReLU MLP): decode and prefill rows, each RELU2
    quant_relu2 = {(r["kernel"], r["case"]) for r in rows if r["case"].endswith(" relu2")
                   and "RELU2=True" in r["variant"] and r["kernel"] in ("_int8_linear_kernel", "_int4_linear_kernel")}
    assert len(quant_relu2) == 2 * len(compile_check.INT8_ROWS), quant_relu2
    # Gemma 2's attention soft cap: forward and both backward passes built with HAS_SOFTCAP, only in its case
    capped = {(r["kernel"], r["variant"]) for r in rows
              if "softcap=50" in r["case"] and " decode " not in r["case"] and r["kernel"] != "_attn_bwd_preprocess"}
    assert {k for k, _ in capped} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}, capped
    assert all("HAS_SOFTCAP=True" in v for _, v in capped), capped
    assert not any("HAS_SOFTCAP=True" in r["variant"] for r in rows if "softcap" not in r["case"])
    # ALiBi likewise: HAS_ALIBI in the three passes of its case only
    biased = {(r["kernel"], r["variant"]) for r in rows if r["case"].endswith(" alibi")
              and " decode " not in r["case"] and r["kernel"] != "_attn_bwd_preprocess"}
    assert {k for k, _ in biased} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}, biased
    assert all("HAS_ALIBI=True" in v for _, v in biased), biased
    assert not any("HAS_ALIBI=True" in r["variant"] for r in rows if not r["case"].endswith(" alibi"))
    # KV-cache decode at batch 1 splits the KV length (132 SMs): every decode case runs the split kernel then
    # the combine, with its own flags (a window: HAS_DOCS), and never the single-pass forward
    decode = {}
    for r in rows:
        if " decode " in r["case"]:
            decode.setdefault(r["case"], set()).add((r["kernel"], r["variant"]))
    assert len(decode) == 11 and all({k for k, _ in v} == {"_attn_fwd_split", "_attn_fwd_combine"}
                                     for v in decode.values()), decode
    for flag, tag in (("HAS_DOCS", " window"), ("HAS_SOFTCAP", " softcap=50"), ("HAS_ALIBI", " alibi")):
        assert all((f"{flag}=True" in v) == case.endswith(tag) for case, kv in decode.items()
                   for k, v in kv if k == "_attn_fwd_split"), (flag, decode)
    # gpt-oss's attention sinks: the split path's combine adds them (HAS_SINKS), its split kernel never reads them
    assert all((("HAS_SINKS=True" in v) == case.endswith(" sinks")) if k == "_attn_fwd_combine" else
               "HAS_SINKS" not in v for case, kv in decode.items() for k, v in kv), decode
    # a whole KV cache with its filled length read on the device (kv_len: HAS_KV_LEN), in its cases' forwards only:
    # the split kernel then the combine at batch 1 (with a window: HAS_DOCS too), the single pass at batch 32
    cached = {}
    for r in rows:
        if " kv_len " in r["case"]:
            cached.setdefault(r["case"], set()).add((r["kernel"], r["variant"]))
    # seven over a float cache, and six of them (not the window's) over an int8 one (INT8_KV, its cases' alone); and
    # a length a row ("rows"), paged (PAGE=16: float at batch 32 and 1, int8 at 32), at each of two head dims; and
    # gpt-oss's sinks at head dim 64, at batch 1 (the split path) and 32 (the single pass: HAS_SINKS in its epilogue)
    assert len(cached) == 23 and sum(case.endswith(" int8") for case in cached) == 8, cached
    assert sum(case.endswith(" sinks") for case in cached) == 2, cached
    for case, kv in cached.items():
        base = case.removesuffix(" int8").removesuffix(" sinks")
        want = {"_attn_fwd"} if base.endswith("B=32") else {"_attn_fwd_split", "_attn_fwd_combine"}
        assert {k for k, _ in kv} == want, (case, kv)
        assert all("HAS_KV_LEN=True" in v and ("HAS_DOCS=True" in v) == base.endswith(" window")
                   and ("INT8_KV=True" in v) == case.endswith(" int8")
                   and ("PAGE=16" in v) == (" paged16 " in case) for k, v in kv if k != "_attn_fwd_combine"), \
            (case, kv)
    assert not any("HAS_KV_LEN=True" in r["variant"] for r in rows if " kv_len " not in r["case"])
    assert not any("INT8_KV=True" in r["variant"] for r in rows if not r["case"].endswith(" int8"))
    # the sinks: in their cases' forwards only (the training case's backward kernels are the plain ones)
    sunk = {(r["kernel"], "HAS_SINKS=True" in r["variant"]) for r in rows if " sinks" in r["case"]}
    assert sunk == {("_attn_fwd", True), ("_attn_fwd_split", False), ("_attn_fwd_combine", True),
                    ("_attn_bwd_preprocess", False), ("_attn_bwd_dkdv", False), ("_attn_bwd_dq", False)}, sunk
    assert not any("HAS_SINKS=True" in r["variant"] for r in rows if " sinks" not in r["case"])
    # partial rotary (GPTConfig.rotary_dim): its launches copy the pass-through columns (PASS), and scale cos and
    # sin only with an attention factor (SCALED); whole heads build without either
    partial = [r["variant"] for r in rows if "rotary" in r["case"]]
    assert len(partial) == 4 and all("PASS=" in v for v in partial), partial
    assert sum("SCALED=True" in v for v in partial) == 2, partial
    assert not any("PASS=" in r["variant"] or "SCALED" in r["variant"] for r in rows
                   if r["kernel"] == "_rope_kernel" and "rotary" not in r["case"])
    # bf16 matmuls and attention must reach the tensor cores (wgmma/mma), or they will be slow
    for kernel in ("_matmul_kernel", "_grouped_kernel", "_expert_grad_kernel", "_attn_fwd", "_attn_bwd_dkdv",
                   "_attn_bwd_dq"):
        bf16 = [r for r in rows if r["kernel"] == kernel and "bfloat16" in r["case"]]
        assert bf16 and all(r["tensor_core_ops"] > 0 for r in bf16), kernel
    # a padded vocabulary's rows are 16-byte aligned: the loss kernels read them as vectors, with
    # label smoothing, the z-loss and a soft cap too, and with RL's temperature and entropy
    # (the unpipelined config of each autotuned launch: a pipelined one copies to shared memory instead, cp.async)
    # (every config of those launches: --one-config may have built a pipelined one first)
    padded = [r for r in _quick_build(tmp_path / "padded", "--cases", "x50304")["rows"]
              if r["kernel"].startswith("_ce_") and "x50304" in r["case"] and r["config"].endswith(" s1")]
    assert len({(r["case"], r["kernel"]) for r in padded}) == 6 and all(r["vector_loads"] > 0 for r in padded), padded
    for options in ("smoothing+z-loss+softcap", "temperature+entropy"):
        assert len({(r["case"], r["kernel"]) for r in padded if options in r["case"]}) == 2, (options, padded)
    # RL's binaries: the update's at a temperature and at 1 (rlhf's default) with the entropy, the scoring's without
    rl = {(r["kernel"], r["variant"].split(" ", 3)[3]) for r in padded if "temperature+entropy" in r["case"]}
    assert rl == {(k, f"HAS_TEMP={temp} HAS_ENT={ent}") for k in ("_ce_fwd_kernel", "_ce_bwd_kernel")
                  for temp, ent in (("True", "True"), ("True", "False"), ("False", "True"))}, rl
    # the distillation loss: forward KL, reverse KL and the mixture with the gradient, the mixture without; the
    # padded rows read as vectors too
    distill = [r for r in rows if r["kernel"] == "_distill_kernel"]
    assert {r["variant"] for r in distill} == {"MODE=0 HAS_GRAD=True", "MODE=1 HAS_GRAD=True", "MODE=2 HAS_GRAD=True",
                                               "MODE=2 HAS_GRAD=False"}, distill
    assert all(r["vector_loads"] > 0 for r in distill), distill
    # the int8 weight-only linear: decode and prefill rows, fc1 (GELU epilogue) and fc2, in bf16 and fp16, on the
    # tensor cores (the int8 tiles converted in registers); with group scales at int4's groups (G 128 in bf16 and
    # fp16, G 32 in bf16), each tile dequantized in registers onto them too
    int8 = [r for r in rows if r["kernel"] == "_int8_linear_kernel"]
    assert len({r["case"] for r in int8}) == 37 and all(r["tensor_core_ops"] > 0 for r in int8), int8
    assert {r["variant"].split()[0] for r in int8} == {"G=0", "G=128", "G=32"}, int8
    # the int4 one: the same rows and shapes at G 128 in bf16 and fp16, and G 32 (K steps of several groups) in bf16
    # (each with 2 cases more: the bias-free ones below); the unpacked, dequantized tiles reach the tensor cores too
    int4 = [r for r in rows if r["kernel"] == "_int4_linear_kernel"]
    assert len({r["case"] for r in int4}) == 23 and all(r["tensor_core_ops"] > 0 for r in int4), int4
    assert {r["variant"].split()[0] for r in int4} == {"G=128", "G=32"}, int4
    # both without a bias (HAS_BIAS=False: a GGUF-kept Llama layer's, int8 and int4 at group 32, or a GPTQ folder's
    # per-row int8), decode and prefill rows at a Llama width: those cases alone, on the tensor cores too
    nobias = [r for r in int8 + int4 if "HAS_BIAS=False" in r["variant"]]
    k, n = compile_check.LLAMA_LINEAR
    assert {(r["kernel"], r["variant"].split()[0], r["case"].split(" M=")[1]) for r in nobias} == {
        (kernel, g, f"{m} {k}->{n} no bias") for kernel, g in (("_int8_linear_kernel", "G=0"),
                                                               ("_int8_linear_kernel", "G=32"),
                                                               ("_int4_linear_kernel", "G=32"))
        for m in compile_check.LLAMA_ROWS}, nobias
    assert all(r["case"].endswith(" no bias") == ("HAS_BIAS=False" in r["variant"]) for r in int8 + int4), nobias
    assert all(r["tensor_core_ops"] > 0 for r in nobias), nobias
    # their input gradients (dx = dy @ W through the frozen weight): a few rows and a training step's, fc1 and
    # fc2, int8 and int4 G 128 in bf16 and fp16, int4 G 32 in bf16, and at the Llama width int8 per row and G 32 and
    # int4 G 32 in bf16; dequantized in registers onto the tensor cores
    dx = [r for r in rows if r["kernel"] in ("_int8_linear_dx_kernel", "_int4_linear_dx_kernel")]
    assert len({r["case"] for r in dx}) == 38 and all(r["tensor_core_ops"] > 0 for r in dx), dx
    assert "have a config that builds, fits and does not spill" in (tmp_path / "sm90-offline" / "compile.md").read_text()


def test_status_flags_what_autotune_would_skip_or_regret():
    ok = dict(shared=65536, registers=200, num_warps=4, local_bytes=0)
    assert compile_check._status(ok) == "ok"
    assert compile_check._status({**ok, "shared": compile_check.MAX_SHARED_BYTES[90] + 1}) == "too much shared memory"
    assert compile_check._status({**ok, "shared": 120_000}, arch=89) == "too much shared memory"  # 99 KB there
    assert compile_check._status({**ok, "registers": 255, "num_warps": 16}) == "too many registers"
    assert compile_check._status({**ok, "local_bytes": 64}) == "spills"


def test_spills_are_read_from_the_stack_frame_and_ptxas():
    """ptxas spills to the stack frame, which cuobjdump reports as STACK with LOCAL 0 (the fp32 matmul's TMA config on
    sm_90 below: 10368 bytes, 17216 of spill stores), and which local arrays share (RoPE's sin/cos); so a frame is
    read apart from LOCAL, and `ptxas -v`'s spill stores are the spill_bytes."""
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _matmul_kernel:\n  REG:32 STACK:10368 SHARED:1024 "
            "LOCAL:0 CONSTANT[0]:672 TEXTURE:0 SURFACE:0 SAMPLER:0\n\n")
    assert compile_check._parse_resources(text) == {"registers": 32, "stack_bytes": 10368, "local_bytes": 0}
    assert compile_check._parse_resources(text.replace("LOCAL:0", "LOCAL:8"))["local_bytes"] == 8
    with pytest.raises(RuntimeError, match="cannot read cuobjdump"):
        compile_check._parse_resources("no function here")
    log = ("ptxas info    : Compiling entry function '_matmul_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _matmul_kernel\n"
           "    {} bytes stack frame, {} bytes spill stores, {} bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 10368 bytes cumulative stack size\n")
    assert compile_check._parse_spills(log.format(10368, 17216, 17172)) == 17216
    assert compile_check._parse_spills(log.format(32, 0, 0)) == 0  # a local array's frame: no spill
    with pytest.raises(RuntimeError, match="cannot read ptxas"):
        compile_check._parse_spills("ptxas info    : Used 32 registers")


# RoPE's hd128 rotary96 launch: a stack frame that spills (sin/cos's argument reduction beside its registers)
_PTXAS_LOG_PROBE = r"""
import json, sys
import triton
from tritongpt.bench import compile_check as cc
launch = next(l for l in cc.capture(quick=True) if l.name == "_rope_kernel" and "rotary96" in l.case)
cc._JOBS[:] = [(launch, *launch.configs()[0])]
second_runs, real = [], cc._spill_bytes
cc._spill_bytes = lambda ptx, arch: second_runs.append(1) or real(ptx, arch)
rows = [cc._compile(0, 90)]
runs = [len(second_runs)]
rows.append(cc._compile(0, 90))  # Triton's cache has it now: no build, no log
runs.append(len(second_runs))
triton.compile = lambda *a, **k: 1 / 0
rows.append(cc._compile(0, 90))
print(json.dumps({"rows": rows, "runs": runs, "knob": triton.knobs.nvidia.dump_ptxas_log,
                  "stdout": sys.stdout is sys.__stdout__}))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
@pytest.mark.timeout(300)
def test_spill_stores_come_from_the_builds_own_ptxas_log_and_a_cache_hit_runs_ptxas_again(tmp_path):
    """A config with a stack frame reads its spill stores from the report ptxas printed in its own build (Triton's
    dump_ptxas_log, stdout captured), with no second ptxas run; built again from Triton's cache (no build, no log) it
    runs ptxas once for the same figure. The knob and stdout are put back, after a failed build too."""
    proc = subprocess.run([sys.executable, "-c", _PTXAS_LOG_PROBE], capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "TRITON_DUMP_PTXAS_LOG"},
                               "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    built, cached, failed = out["rows"]
    assert built["stack_bytes"] > 0 and built["spill_bytes"] > 0, built  # it spills (nothing passes on zeros)
    assert out["runs"] == [0, 1]  # ptxas again only for the cache hit
    assert cached["spill_bytes"] == built["spill_bytes"] and cached["ptx_sha1"] == built["ptx_sha1"], cached
    assert failed["status"] == "error" and "ZeroDivisionError" in failed["error"], failed
    assert out["knob"] is False and out["stdout"] is True


def test_a_triton_without_the_knob_builds_as_before():
    """Where Triton has no dump_ptxas_log knob (before its knobs module) the build runs with nothing set (the spills
    then read by a second ptxas run), and where it has one it is put back after the block, an exception's too."""
    import types

    with compile_check._knob(None, "dump_ptxas_log", True):
        pass
    knobs = types.SimpleNamespace(dump_ptxas_log=False)
    with pytest.raises(ZeroDivisionError), compile_check._knob(knobs, "dump_ptxas_log", True):
        assert knobs.dump_ptxas_log is True
        1 / 0
    assert knobs.dump_ptxas_log is False


def test_the_ptx_fingerprint_skips_debug_lines_and_nothing_else():
    """Source positions, comments, inlining labels and the debug sections do not change it; an instruction or a
    real label does (the labels are matched only on lines that start like one)."""
    fp = compile_check.ptx_fingerprint
    code = ["\tmov.u32 \t%r1, %tid.x;", "$L__BB0_1:", "\tadd.s32 \t%r2, %r1, 7;"]
    noisy = [".file\t1 \"attention.py\"", code[0], "\t.loc\t1 12 5", "$L__tmp3:", code[1], "  // begin inline asm",
             code[2], "$L__tmp12:", ".section\t.debug_abbrev", "$L__BB9_9:"]
    assert fp("\n".join(code)) == fp("\n".join(noisy))
    assert fp("\n".join(code)) != fp("\n".join(code[:2] + ["\tadd.s32 \t%r2, %r1, 8;"]))
    for kept in ("$L__BB0_2:", "$L__tmp3: mov.u32 %r1, 0;", "$L__tmpx:"):
        assert fp("\n".join(code)) != fp("\n".join(code + [kept])), kept


def test_gpus_before_ampere_are_checked_in_fp16(monkeypatch):
    """sm_75 (T4) and sm_70 (V100) have no bf16: training there runs fp16 (--dtype auto), so the
    check captures fp16 launches for them, bf16 for Ampere and later."""
    asked = []

    def capture(quick, half, tma):
        asked.append((half, tma))
        raise KeyboardInterrupt  # stop before compiling

    monkeypatch.setattr(compile_check, "capture", capture)
    for arch, quick in ((70, True), (75, True), (80, False), (90, True), (90, False)):
        with pytest.raises(KeyboardInterrupt):
            compile_check.run_check(arch, quick=quick)
    # and only Hopper's full build has the TMA configs (sm_90's tensor memory accelerator; --quick leaves them out)
    assert asked == [("float16", False), ("float16", False), ("bfloat16", False), ("bfloat16", False),
                     ("bfloat16", True)]
    assert compile_check.MAX_SHARED_BYTES[75] == 64 * 1024 and compile_check.MAX_SHARED_BYTES[70] == 96 * 1024


# Run with the interpreter off in a fresh process. A stand-in CUDA driver lets the JIT's own
# launch path (binder, cache key, triton.compile) run up to the launch without a GPU.
_JIT_PROBE = r"""
import json, os, sys
from tritongpt.bench import compile_check as cc
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

launches = cc.capture(quick=True)
jobs = {}
for launch in launches:
    if launch.name in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel") and launch.name not in jobs:
        jobs[launch.name] = (launch, *launch.configs()[0])
cc._JOBS[:] = [jobs["_layer_norm_fwd_kernel"]]
row = cc._compile(0, 90)                       # what the check (and gpu_session.sh) writes
cache = os.environ["TRITON_CACHE_DIR"]
n_check = len(os.listdir(cache))

class StandInDriver:  # what JITFunction.run asks of the driver before it launches
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(StandInDriver())
for name in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"):  # checked, then not checked
    launch, _, kwargs = jobs[name]
    kernel = launch.jit_fn().warmup(*launch.args, grid=(1,), **kwargs)
    n_after = len(os.listdir(cache))
    print(json.dumps({"kernel": name, "entries": n_after, "hash": kernel.hash}))
print(json.dumps({"check_status": row["status"], "check_entries": n_check}))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
def test_check_fills_the_cache_a_jit_launch_reads(tmp_path):
    """gpu_session.sh runs the check on all cores before the tests and the bench, so autotune
    loads binaries instead of compiling them one by one on the clock. That only helps if the
    check writes the very cache entry the JIT's launch looks up: same binder, same key."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _JIT_PROBE], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fwd, bwd, check = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
    assert check["check_status"] == "ok" and check["check_entries"] == 1
    assert fwd["entries"] == 1, "the JIT compiled again: the check's entry has another key"
    assert bwd["entries"] == 2, "the stand-in driver path did not compile a kernel it had not seen"
    assert fwd["hash"] != bwd["hash"]


def test_a_launch_group_passes_only_when_each_of_its_launches_has_a_clean_config():
    """The MLP's matmul kernel runs several products in one case; one product with no clean config
    used to pass because another product's config was clean."""
    class FakeLaunch:
        def __init__(self, case, name, flags):
            self.case, self.name, self._flags = case, name, flags

        def variant(self):
            return self._flags

    launches = [FakeLaunch("mlp", "_matmul_kernel", "EPILOGUE=1"), FakeLaunch("mlp", "_matmul_kernel", "EPILOGUE=0"),
                FakeLaunch("mlp", "_matmul_kernel", "EPILOGUE=0"), FakeLaunch("ln", "_ln", "")]
    rows = [{"status": s} for s in ("ok", "spills", "ok", "error", "spills", "ok")]
    jobs = [[0, 1], [2], [3, 4], [2, 5]]  # the third launch: an error and a spill, nothing clean
    assert compile_check.verdicts(launches, jobs, rows) == {
        ("mlp", "_matmul_kernel", "EPILOGUE=1"): True, ("mlp", "_matmul_kernel", "EPILOGUE=0"): False,
        ("ln", "_ln", ""): True}


class FakeLaunch:
    def __init__(self, case, name, flags):
        self.case, self.name, self._flags = case, name, flags

    def variant(self):
        return self._flags


def test_one_config_builds_each_launchs_configs_until_one_is_clean_spread_over_the_kernels_launches():
    """--one-config: round by round, each launch's next config (from its ordinal among its kernel's launches) until
    one is clean; a job two launches share is built once; the verdicts are those of building every config."""
    launches = [FakeLaunch("a", "_k", "X=1"), FakeLaunch("b", "_k", "X=1"), FakeLaunch("c", "_k", "X=2"),
                FakeLaunch("d", "_j", ""), FakeLaunch("e", "_j", "")]
    jobs = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10], [10, 9]]  # (e's configs are d's, in another order)
    status = ["ok", "ok", "ok", "error", "spills", "error", "ok", "ok", "ok", "spills", "ok"]
    labels = ["c0", "c1", "c2"] * 3 + ["c0", "c1"]  # (every config of each kernel reached by one launch or another)
    rows, built = [None] * len(status), []
    for batch in compile_check._rounds(launches, jobs, rows, labels):
        built.append(list(batch))
        for j in batch:
            rows[j] = {"status": status[j]}
    # round 1: a at its first config, b at its second, c at its third; d at its first, e at its second (9, d's)
    # round 2: b's third (an error) and d's second (10, clean: e has it too); round 3: b's first, all built
    assert built == [[0, 4, 8, 9], [5, 10], [3]], built
    every = [{"status": st} for st in status]
    assert compile_check.verdicts(launches, jobs, rows) == compile_check.verdicts(launches, jobs, every) == {
        ("a", "_k", "X=1"): True, ("b", "_k", "X=1"): False, ("c", "_k", "X=2"): True, ("d", "_j", ""): True,
        ("e", "_j", ""): True}


def test_one_config_builds_every_config_of_a_kernel_once_even_where_no_launch_reached_it():
    """--one-config: a kernel config no launch reached before each had a clean one is built once after (at the
    first launch that has it), so a config that fails to compile is still found (the suite's sm_90 build asserts
    no row is an error); the verdicts stay those of building every config."""
    launches = [FakeLaunch("a", "_k", ""), FakeLaunch("b", "_k", ""), FakeLaunch("c", "_j", "")]
    jobs = [[0, 1, 2], [3, 4, 5], [6, 7]]
    labels = ["c0", "c1", "c2", "c0", "c1", "c2", "c0", "c1"]
    status = ["ok", "ok", "error", "ok", "ok", "error", "ok", "error"]
    rows, built = [None] * len(status), []
    for batch in compile_check._rounds(launches, jobs, rows, labels):
        built.append(list(batch))
        for j in batch:
            rows[j] = {"status": status[j]}
    # a clean at c0 and b at c1 in round 1, c at c0: then _k's c2 (a's, the first) and _j's c1, once each
    assert built == [[0, 4, 6], [2, 7]], built
    assert [r["status"] for r in rows if r is not None].count("error") == 2
    every = [{"status": st} for st in status]
    assert compile_check.verdicts(launches, jobs, rows) == compile_check.verdicts(launches, jobs, every) == {
        ("a", "_k", ""): True, ("b", "_k", ""): True, ("c", "_j", ""): True}


# The attention launches' autotune configs as the check sees them (after each kernel's prune),
# in a fresh process with the interpreter off: under it nothing is autotuned.
def test_head_dim_256_times_its_own_tiles(capture_run):
    """Head dim 256 (Gemma) autotunes over its own tiles only, in fp32 smaller ones still (the
    others overflow sm_89's 99 KB or spill there), and the other head dims never time those:
    each launch's configs after its prune, as the tuner would time them. Its dQ (and 16-bit dK/dV) launches
    keep the one-stage 16 x 16 tile at every length (the only one within sm_75's 64 KB)."""
    import torch

    from tritongpt.kernels.attention import TILES, tile_group

    launches = capture_run["attention_tiles"]
    kinds = {"_attn_fwd": "forward", "_attn_bwd_dkdv": "backward_dkdv", "_attn_bwd_dq": "backward_dq"}
    seen = set()
    for launch in launches:
        dtype = torch.float32 if "float32" in launch["case"] else torch.bfloat16
        group = tile_group(launch["block_d"], dtype)
        seen.add((launch["kernel"], launch["block_d"], group))
        tiles = {tuple(t) for t in launch["tiles"]}
        assert tiles and tiles <= set(TILES[kinds[launch["kernel"]]][group]), (group, launch)
        if launch["block_d"] == 256 and "Tq=1024" in launch["case"] and group == "wide":
            assert len(tiles) > 1, launch  # a choice left for the tuner at full length
        if launch["block_d"] == 256 and (launch["kernel"] == "_attn_bwd_dq" or
                                         launch["kernel"] == "_attn_bwd_dkdv" and group == "wide"):
            assert (16, 16, 4, 1) in tiles, launch  # the tile within a T4's 64 KB, at every length
    assert {(k, 256, g) for k in kinds for g in ("wide", "wide_fp32")} <= seen
    decode = [launch for launch in launches if launch["block_d"] == 256 and "Tq=1 " in launch["case"] + " "]
    assert decode and all(t[0] == 16 for launch in decode for t in launch["tiles"]), decode
    for kind, groups in TILES.items():  # fp32 at 256: 16-row streamed tiles, the ones that fit sm_89's 99 KB
        streamed = [m if kind == "backward_dkdv" else n for m, n, _, _ in groups["wide_fp32"]]
        assert max(streamed) <= 16, kind


def test_cases_picks_the_launches_it_names(monkeypatch):
    """--cases REGEX compiles only the launches whose case it matches; one that matches nothing is refused."""
    class FakeLaunch:
        name = "_k"

        def __init__(self, case):
            self.case = case

        def configs(self):
            return []

        def variant(self):
            return ""

    cases = ["attention bfloat16 hd256 Tq=1024", "attention bfloat16 hd128 Tq=1024", "rope bfloat16 hd256"]
    monkeypatch.setattr(compile_check, "capture", lambda quick, half, tma: [FakeLaunch(c) for c in cases])
    _, judged = compile_check.run_check(90, cases=r"attention .* hd256", workers=1, log=lambda *a: None)
    assert [case for case, _, _ in judged] == ["attention bfloat16 hd256 Tq=1024"]
    _, judged = compile_check.run_check(90, workers=1, log=lambda *a: None)
    assert len(judged) == 3
    with pytest.raises(compile_check.UserError, match="--cases 'hd512' matches no launch"):
        compile_check.run_check(90, cases="hd512", workers=1, log=lambda *a: None)
    with pytest.raises(SystemExit):  # argparse's error, naming the pattern
        compile_check.main(["--cases", "hd(256"])


def test_cases_matching_nothing_is_a_one_line_error(monkeypatch, capsys):
    """Found only in `bench compile`'s child process, after the capture: one line, as the command line's other
    errors, not argparse's usage under the module's own file name (compile_check.py: error: ...)."""
    import subprocess

    from tritongpt import cli

    monkeypatch.setattr(compile_check, "_require_compiled_mode", lambda: None)
    monkeypatch.setattr(compile_check, "capture", lambda quick, half, tma: [])
    assert compile_check.main(["--cases", "hd512"]) == 2
    assert capsys.readouterr().err == "error: --cases 'hd512' matches no launch\n"
    with pytest.raises(SystemExit):
        compile_check.main(["--cases", "hd(256"])
    assert "tritongpt bench compile: error: --cases 'hd(256' is not a regular" in capsys.readouterr().err
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compile_check started"))
    assert cli.main(["bench", "compile", "--cases", "hd(256"]) == 2  # refused before the child process
    err = capsys.readouterr().err
    assert err.startswith("error: --cases 'hd(256' is not a regular expression: ") and err.count("\n") == 1


_TMA_PROBE = r"""
import json
from tritongpt.bench import compile_check as cc
launches = cc.capture(quick=True, tma=True)
jobs = []
for name in ("_matmul_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
    launch = next(l for l in launches if l.name == name)
    tma = [(launch, label, kw) for label, kw in launch.configs() if kw.get("USE_TMA")]
    jobs += tma[:1]
    print(name, len(tma))
cc._JOBS[:] = jobs
print(json.dumps([cc._compile(i, 90) for i in range(len(jobs))]))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
@pytest.mark.timeout(600)
def test_the_tma_configs_build_for_sm90_with_tma_copies():
    """One TMA config of the MLP matmul and of each attention kernel built for sm_90 (bench compile --quick leaves
    them out): clean, and their PTX copies through the tensor memory accelerator (a descriptor Triton lowered to
    plain loads would show 0). The capture offers the matmul 4 of them a launch, each attention kernel 3."""
    proc = subprocess.run([sys.executable, "-c", _TMA_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[:4] == ["_matmul_kernel 4", "_attn_fwd 3", "_attn_bwd_dkdv 3", "_attn_bwd_dq 3"]
    rows = json.loads(lines[-1])
    assert [r["kernel"] for r in rows] == ["_matmul_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    for r in rows:
        assert r["status"] == "ok" and r["tma_copies"] > 0 and "USE_TMA=True" in r["config"], r


@pytest.fixture(scope="module")
def capture_run():
    """The quick capture's launches, made once for the tests below (a subprocess: capture needs the interpreter off
    from Triton's import on), with TRITONGPT_MLP_MATMUL=torch in its environment (what it must not follow): name,
    case, the flags they read, int8's N and K, and the (BLOCK_M, BLOCK_K) pairs its configs offer for the quantized
    matmuls; mlp.MLP_MATMUL after the capture; and the full capture's attention launches with their tiles (the
    configs each would time after its prune)."""
    code = ("from tritongpt.bench import compile_check as cc; from tritongpt.kernels import mlp; import json; "
            "keys = ('GRAD', 'STORE_ACT', 'GELU_ERF', 'RELU2', 'GATE_GELU', 'ACTIVATION', 'G', 'EPILOGUE', "
            "'B_GELU', 'B_SWIGLU', 'SUM2', 'HAS_SINKS', 'HAS_BIAS'); "
            "ls = [[l.name, l.case, {k: l.kwargs[k] for k in keys if k in l.kwargs}, "
            "l.args[6:8] if l.name == '_int8_linear_kernel' else None, "
            "sorted({(c['BLOCK_M'], c['BLOCK_K']) for _, c in l.configs()}) if '_linear' in l.name else None] "
            "for l in cc.capture(quick=True)]; "
            "tma = lambda target: [sorted({c['USE_TMA'] for _, c in l.configs()}) "
            "for l in cc.capture(quick=True, tma=target) if l.name == '_matmul_kernel']; "
            "matmul_tma = {'sm_90': tma(True), 'sm_80': tma(False)}; "
            "tiles = [{'case': l.case, 'kernel': l.name, 'block_d': l.kwargs['BLOCK_D'], 'tiles': "
            "[(kw['BLOCK_M'], kw['BLOCK_N'], kw['num_warps'], kw['num_stages']) for _, kw in l.configs()]} "
            "for l in cc.capture() if l.name in ('_attn_fwd', '_attn_bwd_dkdv', '_attn_bwd_dq')]; "
            "print(json.dumps({'launches': ls, 'setting': mlp.MLP_MATMUL, 'attention_tiles': tiles, "
            "'matmul_tma': matmul_tma}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "TRITONGPT_MLP_MATMUL": "torch"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def captured(capture_run):
    return capture_run["launches"]


def test_capture_keeps_the_plain_products_on_our_matmul_whatever_the_setting(capture_run):
    """TRITONGPT_MLP_MATMUL=torch in the environment still captures the MLPs' plain products (EPILOGUE 0, no
    prologue, no SUM2) for the sm_90 build: a GPU's "auto" may launch them."""
    plain = [k for name, _, k, _, _ in capture_run["launches"] if name == "_matmul_kernel"
             and k["EPILOGUE"] == 0 and not (k["B_GELU"] or k["B_SWIGLU"] or k["SUM2"])]
    assert plain and capture_run["setting"] == "torch"  # captured, and the setting left as found


def test_only_the_sm90_capture_builds_the_matmuls_tma_configs(capture_run):
    """Hopper's build times the matmul's TMA configs beside its pointer ones for every (16-bit, aligned) launch of
    the quick capture; a target without TMA gets the pointer configs only."""
    tma = capture_run["matmul_tma"]
    assert tma["sm_90"] and all(kinds == [False, True] for kinds in tma["sm_90"]), tma["sm_90"]
    assert len(tma["sm_80"]) == len(tma["sm_90"]) and all(kinds == [False] for kinds in tma["sm_80"])


def test_capture_names_every_kernel_and_the_split_passes(captured):
    """The launches capture makes are of KERNELS, every one of them (the slow sm_90 build above asserts its rows
    against that set, so a kernel the capture gained must be named there); the split paths' Triton passes among
    them: the GELU MLP's (both GELUs, and relu^2) and the gated MLPs' (both gates), forward and backward (storing
    a)."""
    launches = [[name, case, kw.get("GRAD"), kw.get("STORE_ACT"), kw.get("GELU_ERF", kw.get("GATE_GELU"))]
                for name, case, kw, _, _ in captured]
    # the GELU pass with RELU2 too (the squared-ReLU MLP split), forward and backward storing a
    assert {(kw["GRAD"], kw["STORE_ACT"]) for name, _, kw, _, _ in captured
            if name == "_gelu_pointwise_kernel" and kw["RELU2"]} == {(False, False), (True, True)}
    assert {name for name, *_ in launches} == KERNELS
    passes = {(name, *flags) for name, case, *flags in launches if name.endswith("_pointwise_kernel")}
    assert passes == {(name, grad, grad, flag) for name in ("_gelu_pointwise_kernel", "_gate_pointwise_kernel")
                      for grad in (False, True) for flag in (False, True)}
    assert all(case.endswith(("split", "split gelu")) for name, case, *_ in launches
               if name.endswith("_pointwise_kernel"))


def test_int8_linear_launches_take_decode_or_prefill_tiles(captured):
    """int8_linear's captured launches (decode rows 1 and 8, a 4096-row prefill; GPT-2 small's fc1 with its GELU and
    fc2, with a bias; bf16 and fp16 on sm_90, a scale a row and group scales at int4's groups: G 128 in both, G 32 in
    bf16; and without a bias, a GGUF-kept Llama layer's G 32 or a GPTQ folder's per-row, at a Llama width, rows 1 and
    4096 in bf16; the squared-ReLU fc1's, per row in bf16) are offered the 16-row decode tiles up to 16 rows and only the prefill ones above, grouped ones
    none with a K step of more than MAX_GROUPS_A_STEP groups."""
    launches = [[case, kw["ACTIVATION"], kw["G"], *nk, kw["HAS_BIAS"], blocks]
                for name, case, kw, nk, blocks in captured if name == "_int8_linear_kernel"]
    want = [(f"int8_linear {dt}{f' G{g}' if g else ''} M={m} {k}->{n}" + (" gelu_tanh" if k == 768 else ""),
             k == 768, g, n, k, True) for dt, groups in (("bfloat16", (0, 128, 32)), ("float16", (0, 128)))
            for g in groups for m in (1, 8, 4096) for k, n in ((768, 3072), (3072, 768))]
    want += [(f"int8_linear bfloat16{f' G{g}' if g else ''} M={m} 4096->14336 no bias", False, g, 14336, 4096, False)
             for g in (0, 32) for m in (1, 4096)]
    want += [(f"int8_linear bfloat16 M={m} 768->3072 relu2", True, 0, 3072, 768, True) for m in (1, 8, 4096)]
    assert sorted(tuple(launch[:6]) for launch in launches) == sorted(want)
    for case, _, g, _, _, _, blocks in launches:
        assert {m for m, _ in blocks} == ({16} if "M=4096" not in case else {64, 128}), (case, blocks)
        assert not g or all(k // g <= 8 for _, k in blocks), (case, blocks)


def test_int4_linear_launches_take_decode_or_prefill_tiles_a_group_fits(captured):
    """int4_linear's captured launches (int8's rows and shapes with a bias; G 128 in bf16 and fp16, G 32 in bf16; and
    a GGUF-kept Llama layer's without, G 32 at rows 1 and 4096 in bf16; the squared-ReLU fc1's, G 128 in bf16) are
    offered the decode tiles up to 16 rows, the prefill ones above, none with a K step of more than
    MAX_GROUPS_A_STEP groups."""
    launches = [[case, kw["G"], blocks] for name, case, kw, _, blocks in captured if name == "_int4_linear_kernel"]
    biased = {case: kw["HAS_BIAS"] for name, case, kw, _, _ in captured if name == "_int4_linear_kernel"}
    assert sorted((case.split()[1], case.split()[2], case.split()[3], g, biased[case]) for case, g, _ in launches) \
        == sorted([(dt, f"G{g}", f"M={m}", g, True) for dt, g in (("bfloat16", 128), ("bfloat16", 32),
                                                                  ("float16", 128)) for m in (1, 8, 4096)
                   for _ in range(2)] + [("bfloat16", "G32", f"M={m}", 32, False) for m in (1, 4096)]
        + [("bfloat16", "G128", f"M={m}", 128, True) for m in (1, 8, 4096)])  # (fc1's relu2 epilogue)
    for case, g, blocks in launches:
        assert {m for m, _ in blocks} == ({16} if "M=4096" not in case else {64, 128}), (case, blocks)
        assert all(k // g <= 8 for _, k in blocks), (case, blocks)



def test_quantized_dx_launches_take_few_row_or_training_tiles_a_group_fits(captured):
    """int8_linear's and int4_linear's dx launches (8 rows and a 16384-token training step; fc1 and fc2; int8 and
    int4 G 128 in bf16 and fp16, G 32 in bf16, and int8 with a scale a row in both) are offered the 16-row tiles at 8
    rows, the taller ones at 16384, none with a K tile of more than MAX_GROUPS_A_STEP groups."""
    launches = [[name, case, kw.get("G"), blocks] for name, case, kw, _, blocks in captured
                if name.endswith("_linear_dx_kernel")]
    shapes = [(m, k, n) for m in (8, 16384) for k, n in ((768, 3072), (3072, 768))]
    want = [f"int8_linear dx {dt} M={m} {n}->{k}" for dt in ("bfloat16", "float16") for m, k, n in shapes]
    want += [f"int8_linear dx {dt} G{g} M={m} {n}->{k}" for dt, g in (("bfloat16", 128), ("bfloat16", 32),
                                                                      ("float16", 128)) for m, k, n in shapes]
    want += [f"int4_linear dx {dt} G{g} M={m} {n}->{k}" for dt, g in (("bfloat16", 128), ("bfloat16", 32),
                                                                      ("float16", 128)) for m, k, n in shapes]
    want += [f"{kernel} dx bfloat16{g} M={m} 14336->4096 llama" for kernel, g in (("int8_linear", ""),
                                                                                  ("int8_linear", " G32"),
                                                                                  ("int4_linear", " G32"))
             for m in (8, 16384)]  # (at the bias-free int8 and int4 Linears' Llama width)
    assert sorted(case for _, case, _, _ in launches) == sorted(want)
    for name, case, g, blocks in launches:
        assert {m for m, _ in blocks} == ({16} if "M=8 " in case else {64, 128}), (case, blocks)
        assert not g or all(k // g <= 8 for _, k in blocks), (case, blocks)  # (int8's G 0: a scale a row)


def test_capture_builds_the_sinks_launches(captured):
    """gpt-oss's attention sinks (HAS_SINKS) in the quick capture: the forward of the training case (its heads 4 to a
    KV head, its window of 128), the split-KV decode's combine, and a graph's decode step over kv_len (the combine at
    batch 1, the single pass at batch 32); no other launch has them."""
    sunk = sorted((name, case) for name, case, kw, _, _ in captured if kw.get("HAS_SINKS"))
    assert sunk == sorted([
        ("_attn_fwd", "attention bfloat16 hd64 Tq=1024 Tk=1024 sinks window=128"),
        ("_attn_fwd_combine", "attention bfloat16 hd64 decode Tq=1 Tk=16384 heads=12/12 sinks"),
        ("_attn_fwd_combine", "attention bfloat16 hd64 kv_len Tq=1 Tk_cap=16384 heads=12/12 B=1 sinks"),
        ("_attn_fwd", "attention bfloat16 hd64 kv_len Tq=1 Tk_cap=16384 heads=12/12 B=32 sinks")]), sunk


def test_run_under_the_interpreter_is_a_one_line_error(monkeypatch, capsys):
    """`python -m tritongpt.bench.compile_check` with TRITON_INTERPRET=1 (the suite's, a CPU shell's): exit 2 and one
    `error:` line saying how to run it, as the command line's other errors (was SystemExit's bare text, exit 1)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as e:
        compile_check.main(["--quick"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: compile_check needs TRITON_INTERPRET=0 (set before triton is imported); "
                                       "run it as `tritongpt bench compile`\n")
