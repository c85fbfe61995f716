#!/usr/bin/env bash
# A GPU session's device work in one call: install this checkout, fill Triton's cache in
# parallel, run the CUDA-marked tests, then `tritongpt bench all`. Device time is scarce (a
# lent H100/H200 for ~15 minutes a session, at most 10 a call), so everything is time-boxed
# and every result lands in $OUT/session.tgz.
#
#   TRITONGPT_GIT_COMMIT=<hash of HEAD> bash bench/gpu_session.sh \
#     [all|tests|bench|profile|kernels-extra|graphs|padded|lora|window|llama|qwen3|gemma3|gemma2|olmo|smollm3|pythia|
#      phi|falcon|moe|bloom|decode|serve]
#   (default: all)
#   profile (not part of all): `bench profile` of the GPT-2 124M step (B=16, T=1024, bf16): the eager Triton path,
#   it compiled with CUDA graphs (triton+compile+cudagraphs), the compiled SDPA baseline and the Triton path
#   compiled, in that order, each under torch.profiler: host vs device ms per step, the top kernels and ops, the
#   syncs, a Chrome trace each, into results-profile/ (profile.json, profile.md, profile-traces/), within
#   PROFILE_MINUTES (default 6: three compiled providers at ~1-2 min each)
#   kernels-extra (not part of all): `bench kernels` of the ops `bench all` runs last, which its budget has not
#   reached: decode_attention (one KV-cache decode step, the split-KV path against triton-1pass, SDPA and
#   flash-attn), matmul (our matmul against cuBLAS per operand layout), int8_linear (the weight-only int8
#   linear, a scale a row and group scales, against bf16 F.linear and torch's int8 matmul), int4_linear (the int4 one, against F.linear and
#   torch's int4 matmul), lora (the multi-LoRA shrink + expand against the gather + bmm's), token_mask
#   (structured outputs' grammar mask against the reference and xgrammar's own kernels) and sampling (the fused
#   sampling kernel against sort-based top-p, torch.multinomial, torch.compile and flashinfer's), rl_logprobs
#   (RL's log-probs and entropies through the loss kernel against torch's fp32 log_softmax) and sink_attention
#   (gpt-oss's attention with sinks, causal and over its window of 128, against the reference module), within
#   EXTRA_MINUTES (default 1.5),
#   into results-extra/ and autotune-timings-extra.json
#   graphs (not part of all): `bench kernels --cuda-graphs` of LayerNorm, attention and the loss, each row timed
#   as CUDA-graph replays (device time without the host's; the eager rows of small ops time the host), within
#   EXTRA_MINUTES, into results-graphs/
#   padded (not part of all): the GPT-2 124M training step again with the vocabulary padded to
#   50304 (--vocab-multiple 64, every provider alike), into results-vocab64/ in the archive
#   lora (not part of all): the GPT-2 124M training step with and without a rank-8 LoRA update
#   (model/lora.py), eager reference and Triton, into results-lora/
#   window (not part of all): the GPT-2 124M
#   training step with GPT-Neo's local attention, a window of 256 in the odd layers (--attention-window 256
#   --window-layers odd, every provider alike), into results-window/
#   llama (not part of all; the last of the extra runs, so a short budget drops it first): the GPT-2 124M
#   training step with Llama's shape at GPT-2's widths: RMSNorm,
#   SwiGLU (hidden 2048), RoPE, 4 KV heads for the 12 query heads, no biases (--norm rmsnorm --mlp swiglu
#   --position-encoding rope --n-kv-head 4 --no-bias, every provider alike), into results-llama/
#   qwen3 (not part of all; after llama): the llama run's model with Qwen3's attention: 12 heads of 128
#   (1536 wide over GPT-2's 768) and q/k norms (--attention-head-dim 128 --qk-norm), into results-qwen3/
#   gemma3 (not part of all; after qwen3): Gemma 3's shape at GPT-2's depth and width: GeGLU, scaled
#   embeddings, sandwich norms, q/k norms, 12 heads of 256 on one KV head, RoPE 1e6 in the global
#   layers (5 and 11) and 10000 in the ten local ones, a window of 512, no biases, into results-gemma3/
#   gemma2 (not part of all; after gemma3): Gemma 2's shape at GPT-2's depth and width: GeGLU, scaled
#   embeddings, sandwich norms, 12 heads of 256 on 6 KV heads, the attention scores soft-capped at 50 and
#   the logits at 30, a window of 512 in the even layers, into results-gemma2/; SDPA cannot cap the
#   scores, so reference+compile (torch.compile of the eager math) is the baseline there
#   olmo (not part of all; after gemma2): OLMo 2's shape at GPT-2's depth and width: the llama run's
#   RMSNorm, SwiGLU and RoPE (theta 500000) on 12 KV heads, each block normalized after its sublayers
#   only and q/k norms over all heads at once (--no-pre-norms --post-norms --qk-norm --qk-norm-width all),
#   into results-olmo/
#   smollm3 (not part of all; after olmo): the llama run's model without RoPE in every fourth layer
#   (--nope-layers 3,7,11: SmolLM3's NoPE layers), into results-smollm3/
#   pythia (not part of all; after smollm3): Pythia's shape at GPT-2's depth and width: RoPE on 16 of each
#   head's 64 dimensions, attention and MLP in parallel, the exact GELU (LayerNorms and biases as GPT-2's),
#   into results-pythia/
#   phi (not part of all; after pythia): Phi-2's shape at GPT-2's depth and width: RoPE on 32 of each head's 64
#   dimensions, parallel blocks on one shared LayerNorm, the tanh GELU (GPT-2's) and a bias on the LM head
#   (the fused loss's bias path), into results-phi/
#   falcon (not part of all; after phi): Falcon-7B's shape at GPT-2's depth and width: RoPE on whole heads,
#   parallel blocks on one shared LayerNorm, one KV head for the 12 query heads (multi-query), the exact GELU,
#   no biases, into results-falcon/
#   moe (not part of all; after falcon): the llama run's model with Mixtral's mixture of experts in every block: 8
#   SwiGLU experts of hidden 2688 (Mixtral's 3.5 x n_embd), each token routed to 2 (the grouped-GEMM kernel,
#   kernels/moe.py, on the Triton path; MFU counts the 2 experts a token meets), into results-moe/
#   bloom (not part of all; after moe): BLOOM's shape at GPT-2's depth and width: ALiBi (the flash kernel's
#   HAS_ALIBI) and a LayerNorm on the token embeddings, into results-bloom/
#   serve (not part of all): `bench serve` of GPT-2 124M's shape (random weights) served on the GPU, 64 streamed
#   completions of 128 prompt tokens and 128 out, all at once: one request at a time (--max-batch 1), continuous
#   batching at 32, the same over 4 random rank-16 LoRA adapters (--random-loras 4: their overhead), with a paged
#   cache, with CUDA-graph buckets, with prefix caching, with n-gram speculation (K 8, N 2); then lm-eval's
#   loglikelihood
#   load (--scoring: 32 requests of 8 prompts of 128) at --max-batch 1 and 32; each load within SERVE_SECONDS
#   (default 60), into results-serve/<device>/serve-LABEL.{json,md,png}
#   decode (not part of all): `bench decode`: GPT-2 124M's greedy KV-cache decode steps (bf16 autocast, batches 1
#   and 8, a 128-token prompt then 128 steps), eager and replayed from a CUDA graph (DecodeGraph), on the reference
#   and the Triton path, within DECODE_MINUTES (default 1), into results-decode/ (decode.json, .md, .png)
#   env: OUT (default ./gpu-out), WORK (default /tmp/tritongpt-gpu), WARM_SECONDS (90),
#        TEST_SECONDS (120), BENCH_MINUTES (4), PROFILE_MINUTES (6), EXTRA_MINUTES (1.5), DECODE_MINUTES (1),
#        SERVE_SECONDS (60),
#        PYTHON (python3)
# The device gets a copy of the working tree without .git, so name the commit: results record it.
#
# Everything is written under $WORK and packed into ONE file, $OUT/session.tgz, after every stage
# and every 20 s during the bench (the device returns at most 8 files from $OUT; a call cut short
# still returns what it had). The bench stops starting work at its budget, and at its hard limit
# (budget + 45 s) a SIGINT makes it write the rows measured so far within the 15 s grace.
# Worst case: 90 + (120 + 15) + (4 min + 45 + 15 s) + install and imports ~ 9.3 min, inside
# one call's 10 (give the call a timeout of 580 s or more).
#
# Optional packages the device image lacks (Liger-Kernel, a bench provider) travel as wheels in
# .whl/ (git-ignored; name it in the run's `carry`). Fetch them on the development machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel
#
# Afterwards, on the development machine: unpack session.tgz, copy its results/<device>/ to
# bench/results/ (with autotune-timings.json into that folder) and commit it with the test log;
# bench/results/README.md says what each file holds. An extra run's results-NAME/<device>/ goes to
# bench/results/<device>/NAME/ (its train.md names the model timed).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/tmp/tritongpt-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
# write beside, then rename: a call killed mid-pack still returns the previous whole archive
# (GNU tar exits 1 when a file grew while read, e.g. bench.log mid-run: that archive is still good)
pack() {
    tar czf "$OUT/session.tgz.part" -C "$WORK" . 2>/dev/null
    [ $? -le 1 ] && mv -f "$OUT/session.tgz.part" "$OUT/session.tgz"
}
# the bench's hard limit: its budget plus 45 s for imports and the last timing (awk: BENCH_MINUTES
# may be fractional)
bench_limit=$(awk -v m="${BENCH_MINUTES:-4}" 'BEGIN { printf "%d", m * 60 + 45 }')
# pack every 20 s while a long stage runs (its results files appear as it goes), until stopped
# by stop_packing: it lets a pack in progress finish, so no stale archive replaces a newer one (polled
# every 0.2 s: a whole second made each stage, and each test of this script, wait ~1 s at its end)
packing() { local n=0; while [ ! -e "$WORK.stop" ]; do sleep 0.2; n=$((n + 1)); [ $((n % 100)) -eq 0 ] && pack; done; }
stop_packing() { touch "$WORK.stop"; wait "$1" 2>/dev/null; rm -f "$WORK.stop"; }
rm -f "$WORK.stop"

# The device machine has torch and triton but no network: install without dependencies. If
# pip cannot (read-only environment), lay the package out by symlinks and use PYTHONPATH.
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1; then
    echo "pip install failed (see install.log); using a symlinked tritongpt on PYTHONPATH"
    # the repo root (the current directory) holds a tritongpt/ without the subpackages: keep it
    # off sys.path, or it would hide the symlinked one (Python >= 3.11)
    export PYTHONSAFEPATH=1
    farm=$(mktemp -d)/tritongpt
    mkdir -p "$farm"
    for f in tritongpt/*.py; do ln -s "$PWD/$f" "$farm/"; done
    for d in kernels model train bench; do ln -s "$PWD/$d" "$farm/$d"; done
    export PYTHONPATH="$(dirname "$farm")${PYTHONPATH:+:$PYTHONPATH}"
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tritongpt-site \
        .whl/*.whl >>"$WORK/install.log" 2>&1 && export PYTHONPATH="/tmp/tritongpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$WORK/machine.txt"
pack

if ! git rev-parse HEAD >/dev/null 2>&1 && [ -z "${TRITONGPT_GIT_COMMIT:-}" ]; then
    echo "note: no .git here and TRITONGPT_GIT_COMMIT unset: results will say git_commit 'unknown'"
fi

# Autotune compiles each config it times, one after another, in the timed process (the
# offline check's 370 configs took 386 s on 2 cores with Triton 3.6: ~2 s each, serially). `bench compile` builds the same (kernel, specialization,
# config) triples on every CPU core first, through the same binder and triton.compile, so the
# tests and the bench find them in Triton's on-disk cache (tests/test_compile_check.py checks
# that a JIT launch hits an entry the check wrote). Its report is a side product.
arch=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)" 2>/dev/null)
if [[ " 80 86 89 90 " == *" $arch "* ]]; then
    echo "== fill Triton's cache for sm_$arch on $(nproc) cores (at most ${WARM_SECONDS:-90} s)"
    # the module itself, not `tritongpt bench compile` (which would leave it running past a timeout)
    TRITON_INTERPRET=0 timeout "${WARM_SECONDS:-90}" $PY -m tritongpt.bench.compile_check --arch "$arch" \
        --workers "$(nproc)" --out "$WORK/compile" >"$WORK/compile.log" 2>&1
    tail -n 3 "$WORK/compile.log"
    pack
fi

rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    echo "== CUDA tests (at most ${TEST_SECONDS:-120} s)"
    # parallel workers: the time goes to compiling (CPU), and no CUDA test asserts a timing.
    # SIGINT at the limit: pytest then still writes the XML and names what failed so far.
    # The two quick-bench tests are left out here: `bench all` right after runs the same code at
    # full size (and on a machine of its own, not beside seven test workers).
    # Files in the order given run in that order: those whose CUDA tests the first run (H200,
    # 2026-12-04) did not reach in 120 s, or failed, go first (the whole model on both paths, the
    # trainer's mixed precision, fp32 attention with dropout, PPO) and those of paths no GPU has run
    # yet (an autotuned kernel first launched inside a CUDA-graph capture; a decode step captured and
    # replayed, the kv_len kernels at new lengths; gpt-oss's attention sinks (forward, backward, the split-KV
    # decode, a graph's decode step), its experts' MoE kernel (biases, the clamp) at gpt-oss-like sizes, a
    # .gguf file's kept Q8_0 / Q4_x layers and a tiny GPT-OSS model in bf16; the int8 and int4 weight-only
    # kernels and model (int8's group scales too), their dx kernels and QLoRA, GPTQ on the GPU, the int8 KV
    # cache in a real graph; the serving engine's batched draw and post-draw, the per-row sampling kernel and
    # 4-bit GPTQ/AWQ folders on the device), then every other file with a CUDA-marked test (a directory
    # argument would put them back in name order).
    first="tests/test_model_paths.py tests/test_loop.py tests/test_attention.py tests/test_rlhf.py tests/test_mlp.py"
    first="$first tests/test_tuned_launch.py tests/test_decode_graph.py tests/test_attention_kv_len.py"
    first="$first tests/test_attention_sinks.py tests/test_moe_kernel.py tests/test_gguf_quant.py tests/test_gpt_oss.py"
    first="$first tests/test_int8_linear.py tests/test_int4_linear.py tests/test_quantize.py"
    first="$first tests/test_quantize_int4.py tests/test_quant_dx.py tests/test_qlora.py"
    first="$first tests/test_qlora_rlhf.py tests/test_gptq.py tests/test_kv_cache_int8.py"
    first="$first tests/test_sample_rows.py tests/test_take_rows.py tests/test_sampling_kernel.py"
    first="$first tests/test_hf_quantized.py"
    rest=$(grep -l "mark\.cuda" tests/test_*.py | grep -v -x -F -e "${first// /$'\n'}" -e "" | tr '\n' ' ')
    # shellcheck disable=SC2086  # the file lists split on spaces on purpose
    timeout -s INT -k 15 "${TEST_SECONDS:-120}" $PY -m pytest -m cuda -q -p no:cacheprovider -n 8 $first $rest \
        --deselect tests/test_bench.py::test_quick_kernel_bench_on_gpu \
        --deselect tests/test_bench.py::test_quick_train_bench_on_gpu \
        --junitxml="$WORK/cuda-tests.xml" >"$WORK/cuda-tests.log" 2>&1
    trc=$?
    [ $trc -eq 124 ] && echo "CUDA tests TIMED OUT after ${TEST_SECONDS:-120} s"
    tail -n 25 "$WORK/cuda-tests.log"
    pack
    rc=$((rc | trc))
fi
# Autotune's searches during the bench are saved in Triton's cache (TRITON_CACHE_AUTOTUNING=1),
# then gathered into autotune-timings.json: every config's time, not only the pick that
# <section>.json records, to tune the config lists without device time. Not during the tests:
# eight workers share the GPU there, and their timings would be reused by the bench.
save_timings() {
    $PY -c "import sys; from tritongpt.bench.report import save_autotune_timings as s; \
print(s(sys.argv[1]), 'autotune searches saved in', sys.argv[1])" "$WORK/$1" 2>&1 | tail -n 1
}
if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== tritongpt bench all (budget ${BENCH_MINUTES:-4} min)"
    # the budget stops new work; the hard limit only catches one that overruns it badly
    packing & packer=$!
    TRITON_CACHE_AUTOTUNING=1 timeout -s INT -k 15 "$bench_limit" \
        $PY -m tritongpt.cli bench all --max-minutes "${BENCH_MINUTES:-4}" --out "$WORK/results" \
        >"$WORK/bench.log" 2>&1
    brc=$?
    stop_packing "$packer"
    tail -n 40 "$WORK/bench.log"
    save_timings autotune-timings.json
    pack
    rc=$((rc | brc))
fi
# a bench not part of all: its name (results-NAME/, bench-NAME.log, autotune-timings-NAME.json), its budget in
# minutes (the hard limit 45 s later), what the log line calls it, then the `bench` subcommand and its flags
extra_bench() {
    local name=$1 minutes=$2 label=$3
    shift 3
    echo "== tritongpt bench $label (budget $minutes min)"
    local limit
    limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 45 }')
    packing & packer=$!
    TRITON_CACHE_AUTOTUNING=1 timeout -s INT -k 15 "$limit" \
        $PY -m tritongpt.cli bench "$@" --max-minutes "$minutes" --out "$WORK/results-$name" \
        >"$WORK/bench-$name.log" 2>&1
    local xrc=$?
    stop_packing "$packer"
    tail -n 20 "$WORK/bench-$name.log"
    save_timings "autotune-timings-$name.json"
    pack
    rc=$((rc | xrc))
}
# the GPT-2 124M training step with `bench train`'s flags, within BENCH_MINUTES
extra_train_bench() {
    local name=$1
    shift
    extra_bench "$name" "${BENCH_MINUTES:-4}" "train $*" train --models gpt2-small "$@"
}
if [ "$what" = profile ]; then
    echo "== tritongpt bench profile (budget ${PROFILE_MINUTES:-6} min)"
    # its own hard limit, as the bench's: the budget plus 45 s, then SIGINT writes what was profiled
    profile_limit=$(awk -v m="${PROFILE_MINUTES:-6}" 'BEGIN { printf "%d", m * 60 + 45 }')
    packing & packer=$!
    # perf_hints: inductor says why it skipped CUDA graphs (profile.json counts the skips: cudagraph_skips)
    TORCH_LOGS=perf_hints timeout -s INT -k 15 "$profile_limit" $PY -m tritongpt.cli bench profile --models gpt2-small \
        --train-providers triton,triton+compile+cudagraphs,reference+compile+sdpa,triton+compile \
        --max-minutes "${PROFILE_MINUTES:-6}" --out "$WORK/results-profile" >"$WORK/bench-profile.log" 2>&1
    prc=$?
    stop_packing "$packer"
    tail -n 20 "$WORK/bench-profile.log"
    pack
    rc=$((rc | prc))
fi
if [ "$what" = kernels-extra ]; then
    ops=decode_attention,matmul,int8_linear,int4_linear,lora,token_mask,sampling,rl_logprobs,sink_attention
    extra_bench extra "${EXTRA_MINUTES:-1.5}" "kernels --ops $ops" kernels --ops "$ops"
fi
if [ "$what" = graphs ]; then
    extra_bench graphs "${EXTRA_MINUTES:-1.5}" "kernels --cuda-graphs" kernels --cuda-graphs \
        --ops layernorm,attention,cross_entropy
fi
if [ "$what" = padded ]; then
    extra_train_bench vocab64 --vocab-multiple 64
fi
if [ "$what" = lora ]; then
    extra_train_bench lora --train-providers reference,triton,reference+lora,triton+lora
fi
if [ "$what" = window ]; then
    extra_train_bench window --attention-window 256 --window-layers odd
fi
if [ "$what" = llama ]; then
    extra_train_bench llama --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head 4 --no-bias
fi
if [ "$what" = qwen3 ]; then
    extra_train_bench qwen3 --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head 4 --no-bias \
        --attention-head-dim 128 --qk-norm
fi
if [ "$what" = gemma3 ]; then
    extra_train_bench gemma3 --norm rmsnorm --mlp geglu --position-encoding rope --rope-theta 1000000 \
        --rope-local-theta 10000 --n-kv-head 1 --no-bias --attention-head-dim 256 --qk-norm --post-norms \
        --scale-embeddings --attention-window 512 --window-layers 0,1,2,3,4,6,7,8,9,10
fi
if [ "$what" = gemma2 ]; then
    extra_train_bench gemma2 --norm rmsnorm --mlp geglu --position-encoding rope --n-kv-head 6 --no-bias \
        --attention-head-dim 256 --post-norms --scale-embeddings --attention-window 512 \
        --window-layers 0,2,4,6,8,10 --attn-softcap 50 --logit-softcap 30 \
        --train-providers reference,triton,reference+compile,triton+compile
fi
if [ "$what" = olmo ]; then
    extra_train_bench olmo --norm rmsnorm --mlp swiglu --position-encoding rope --rope-theta 500000 --no-bias \
        --qk-norm --qk-norm-width all --post-norms --no-pre-norms
fi
if [ "$what" = smollm3 ]; then
    extra_train_bench smollm3 --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head 4 --no-bias \
        --nope-layers 3,7,11
fi
if [ "$what" = pythia ]; then
    extra_train_bench pythia --position-encoding rope --rotary-dim 16 --parallel-residual --gelu-approximate none
fi
if [ "$what" = phi ]; then
    extra_train_bench phi --position-encoding rope --rotary-dim 32 --parallel-residual --shared-norm --head-bias
fi
if [ "$what" = falcon ]; then
    extra_train_bench falcon --position-encoding rope --parallel-residual --shared-norm --n-kv-head 1 \
        --gelu-approximate none --no-bias
fi
if [ "$what" = moe ]; then
    extra_train_bench moe --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head 4 --no-bias \
        --n-experts 8 --experts-per-token 2 --mlp-hidden 2688
fi
if [ "$what" = bloom ]; then
    extra_train_bench bloom --position-encoding alibi --embed-norm
fi
if [ "$what" = decode ]; then
    extra_bench decode "${DECODE_MINUTES:-1}" "decode" decode
fi
if [ "$what" = serve ]; then
    # GPT-2 124M's shape with random weights (the device has no network for GPT-2's); the text does not matter, the
    # load's timing does. Each load is cut at SERVE_SECONDS, its files written only when it ends.
    echo "== tritongpt bench serve (GPT-2 124M shape, random weights; each load within ${SERVE_SECONDS:-60} s)"
    $PY -c "import torch; from tritongpt.model.config import get_config; from tritongpt.model.gpt import GPTModel; \
torch.manual_seed(0); GPTModel(get_config('gpt2-small')).save('$WORK/gpt2-random.safetensors')" \
        >"$WORK/serve-model.log" 2>&1 || rc=1
    # the generation loads: 64 streamed completions of 128 + 128; the scoring ones lm-eval's loglikelihood shape, 32
    # requests of 8 token-id prompts of 128 (echo, max_tokens 1, logprobs 1), 4 in flight: the engine's batched
    # prefill (one forward a step's prompts) on a GPU
    gen="--num-prompts 64 --input-len 128 --output-len 128"
    scoring="--scoring --num-prompts 32 --prompts-per-request 8 --input-len 128 --max-concurrency 4"
    # vLLM's n-gram speculation (no spaces: the flags split on them); a random model's greedy text repeats itself, so
    # its proposals are often accepted (72 % for the mini preset on the CPU)
    ngram='{"method":"ngram","num_speculative_tokens":8,"prompt_lookup_max":2}'
    # mb32-lora4: mb32's load spread over 4 random rank-16 LoRA adapters (attn,mlp), a random pick a request: the
    # adapters' cost beside mb32 (their files: 10.6 MB each, written in 0.2 s on the CPU)
    # mb32-json: mb32's load, every request held to a JSON schema (structured outputs: the grammars' host work and
    # the token mask each step); its spec in a file (its brackets would glob, unquoted)
    echo '{"json": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, '\
'"required": ["name", "age"]}}' >"$WORK/serve-schema.json"
    for run in "mb1:$gen --max-batch 1" "mb32:$gen --max-batch 32" "mb32-lora4:$gen --max-batch 32 --random-loras 4" \
               "mb32-json:$gen --max-batch 32 --structured-outputs @$WORK/serve-schema.json" \
               "mb32-paged:$gen --max-batch 32 --kv-cache-pages 2048" \
               "mb32-graphs:$gen --max-batch 32 --cuda-graphs" \
               "mb32-prefix:$gen --max-batch 32 --kv-cache-pages 2048 --enable-prefix-caching" \
               "mb32-ngram:$gen --max-batch 32 --speculative-config $ngram" \
               "scoring-mb1:$scoring --max-batch 1" "scoring-mb32:$scoring --max-batch 32"; do
        label=${run%%:*}
        # shellcheck disable=SC2086 (the flags split on purpose)
        timeout -s INT -k 15 "${SERVE_SECONDS:-60}" $PY -m tritongpt.cli bench serve \
            --weights "$WORK/gpt2-random.safetensors" \
            ${run#*:} --out "$WORK/results-serve" --label "$label" >"$WORK/bench-serve-$label.log" 2>&1 || rc=1
        tail -n 12 "$WORK/bench-serve-$label.log"
        pack
    done
fi
exit $rc
