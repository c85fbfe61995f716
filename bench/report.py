"""Results on disk: one JSON per section, a markdown table, PNG plots; and the console summary.

Layout: <out>/<device-slug>/{kernels,train,cpu,decode}.json|.md, *.png, and summary.md (targets).
"""
import json
from pathlib import Path

from tritongpt.bench.common import MODES, SCHEMA, is_ok

SECTIONS = ("kernels", "train", "cpu", "decode")
REQUIRED_ENV = ("device", "device_slug", "driver", "cuda_version", "torch", "triton", "git_commit",
                "timestamp")
TARGET_STATUSES = ("PASS", "FAIL", "N/A")


def make_result(section, env, rows, targets=(), ceilings=None, settings=None, elapsed_s=None,
                peak_flops=None, peak_flops_source=None, notes=(), autotune=()):
    """autotune: the configurations Triton's autotuner picked while this section ran
    (tritongpt.kernels._common.autotune_choices), so a reader knows which tiles were timed."""
    return {"schema": SCHEMA, "section": section, "env": env, "settings": settings or {},
            "ceilings": ceilings or {}, "peak_flops": peak_flops,
            "peak_flops_source": peak_flops_source, "rows": list(rows), "targets": list(targets),
            "elapsed_s": elapsed_s, "notes": list(notes), "autotune": list(autotune)}


def validate_result(d: dict) -> dict:
    """Raise ValueError naming the first field that breaks the schema; return d."""
    if not isinstance(d, dict):
        raise ValueError("result must be a JSON object")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"result.schema must be {SCHEMA!r}, got {d.get('schema')!r}")
    if d.get("section") not in SECTIONS:
        raise ValueError(f"result.section must be one of {SECTIONS}, got {d.get('section')!r}")
    env = d.get("env")
    if not isinstance(env, dict):
        raise ValueError("result.env must be an object")
    for key in REQUIRED_ENV:
        if key not in env:
            raise ValueError(f"result.env.{key} is missing")
    if not isinstance(d.get("rows"), list):
        raise ValueError("result.rows must be a list")
    for i, r in enumerate(d["rows"]):
        for key in ("section", "op", "provider", "config", "status"):
            if key not in r:
                raise ValueError(f"result.rows[{i}].{key} is missing")
        st = r["status"]
        if st != "ok" and not (st.startswith("skipped: ") or st.startswith("failed: ")):
            raise ValueError(f"result.rows[{i}].status must be 'ok', 'skipped: ...' or 'failed: ...', got {st!r}")
        if st == "ok" and r.get("mode") != "saved":
            ms = r.get("ms")
            if not isinstance(ms, (int, float)) or not ms > 0:
                raise ValueError(f"result.rows[{i}].ms must be a positive number for an ok row, got {ms!r}")
    for i, a in enumerate(d.get("autotune") or []):
        if not isinstance(a, dict) or not all(isinstance(a.get(k), dict) for k in ("key", "config")):
            raise ValueError(f"result.autotune[{i}] must be an object with 'key' and 'config' objects")
    if not isinstance(d.get("targets", []), list):
        raise ValueError("result.targets must be a list")
    for i, t in enumerate(d.get("targets") or []):
        if not isinstance(t, dict):
            raise ValueError(f"result.targets[{i}] must be an object")
        for key in ("target", "config", "value", "op", "threshold"):
            if key not in t:
                raise ValueError(f"result.targets[{i}].{key} is missing")
        if t.get("status") not in TARGET_STATUSES:
            raise ValueError(f"result.targets[{i}].status must be one of {TARGET_STATUSES}")
    return d


def _tuned_kernel_names() -> dict:
    """Triton function name -> (our name for it, its autotune key names), e.g. "_attn_fwd" ->
    ("attention.forward", ["HEAD_DIM", ...]), from the kernels' registry."""
    import importlib
    import pkgutil

    import tritongpt.kernels as package
    from tritongpt.kernels import _common

    # each module registers its tuners on import: all of them, or a kernel autotuned since (LayerNorm's,
    # MoE's) goes unnamed in a process that imported only this one (gpu_session.sh's save_timings)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"tritongpt.kernels.{info.name}")
    names = {}
    for name, tuner in _common.AUTOTUNED.items():
        fn = getattr(tuner, "base_fn", tuner)
        names[getattr(fn, "__name__", name)] = (name, list(getattr(tuner, "keys", None) or []))
    return names


def autotune_timings(cache_dir, kernels=None) -> list:
    """Every search Triton's autotuner saved under cache_dir (it does with TRITON_CACHE_AUTOTUNING=1,
    as bench/gpu_session.sh sets for the bench): per kernel and key, each config's
    [median, p20, p80] ms, fastest first; None where the config could not run (out of resources).
    The bench's own JSON keeps only the pick; these timings say how close the others came.
    Kernels and keys are named as in the results' "autotune" list (kernels: _tuned_kernel_names())."""
    from tritongpt.kernels._common import named_key

    kernels = _tuned_kernel_names() if kernels is None else kernels
    out = []
    for path in sorted(Path(cache_dir).glob("*/*.autotune.json")):
        try:
            saved = json.loads(path.read_text())
            timings = []
            for cfg, ms in saved["configs_timings"]:
                ms = ms if isinstance(ms, list) else [ms]
                ok = all(isinstance(t, (int, float)) and t == t and t != float("inf") for t in ms)
                timings.append({"config": dict(cfg.get("kwargs", {}), num_warps=cfg.get("num_warps"),
                                               num_stages=cfg.get("num_stages")),
                                "ms": ms if ok else None})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not one of autotune's files, or another Triton's layout: leave it out
        timings.sort(key=lambda t: t["ms"][0] if t["ms"] else float("inf"))
        function = path.name[:-len(".autotune.json")]
        name, key_names = kernels.get(function, (function, []))
        key = list(saved.get("key") or [])
        entry = {"kernel": name, "function": function}
        if key_names and not _fits_key(key_names, key):
            # a search by an older version of the kernel (another hash folder of the same cache) whose key had
            # other names: its values are left unnamed, not given the current names they would shift under
            entry["stale_key"] = (f"{len(key)} values do not fit the kernel's key names now ({len(key_names)} "
                                  "names, then the tensors' dtypes): saved by an older version of the kernel")
            key_names = None
        values, dtypes = named_key(key_names, key) if key_names else (key, [])  # not ours: Triton's key
        out.append({**entry, "key": values, "dtypes": dtypes, "timings": timings})
    return out


def _fits_key(names, key) -> bool:
    """Triton's saved key is the named values then the tensor arguments' dtypes ("torch.float16"): it fits names
    where a dtype follows them and none is inside them."""
    def is_dtype(v):
        return isinstance(v, str) and v.startswith("torch.")
    n = len(names)
    return len(key) > n and not any(map(is_dtype, key[:n])) and all(map(is_dtype, key[n:]))


def save_autotune_timings(path, cache_dir=None) -> int:
    """Write autotune_timings(cache_dir or Triton's cache) to path as JSON; returns how many searches."""
    if cache_dir is None:
        import triton
        cache_dir = triton.knobs.cache.dir
    found = autotune_timings(cache_dir)
    Path(path).write_text(json.dumps(found, indent=1) + "\n")
    return len(found)


# -- formatting ------------------------------------------------------------------------------------------
def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def config_text(cfg: dict) -> str:
    short = {"rows": "M", "width": "N", "hidden": "H4", "batch": "B", "heads": "H", "kv_heads": "Hkv",
             "seq_len": "T", "head_dim": "D"}
    skip = {"dtype", "causal", "hidden", "steps", "warmup_steps", "n_params_non_embedding", "threads"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items() if k not in skip)


# a train row's config fields that make its model other than GPT-2 as published (train_step.model_variant):
# VARIANT_KEYS, and Llama's shape, ARCH_KEYS, which the models line puts in words
VARIANT_KEYS = ("padded_vocab", "attention_window", "window_layers", "logit_softcap", "logit_scale", "attn_softcap",
                "attention_scale_width")
ARCH_KEYS = ("norm", "mlp", "mlp_hidden", "position_encoding", "rope_theta", "n_kv_head", "bias", "attention_head_dim",
             "qk_norm", "scale_embeddings", "post_norms", "rope_local_theta", "nope_layers", "pre_norms",
             "qk_norm_width", "parallel_residual", "gelu_approximate", "rotary_dim", "shared_norm", "head_bias",
             "embed_norm", "norm_bias", "alibi_scaled", "n_experts", "experts_per_token", "moe_aux_loss",
             "embedding_multiplier", "residual_multiplier", "attention_multiplier")


def variant_text(config: dict, keys=VARIANT_KEYS + ARCH_KEYS) -> str:
    """A row config's variant fields as text (" attention_window=256 window_layers=odd"), or ""."""
    return "".join(f" {k}={config[k]}" for k in keys if k in config)


def architecture_text(config: dict) -> str:
    """A row config's ARCH_KEYS in words ("RMSNorm, SwiGLU (hidden 2048), RoPE (theta 10000), 4 KV heads,
    no biases", Qwen3's "heads of 128, q/k norms", Gemma's "scaled embeddings, sandwich norms, local RoPE
    theta 10000"), or ""."""
    name = {"rmsnorm": "RMSNorm", "swiglu": "SwiGLU", "geglu": "GeGLU", "rope": "RoPE", "alibi": "ALiBi"}
    words = []
    if "norm" in config:
        words.append(name.get(config["norm"], config["norm"]))
    if "mlp" in config:
        words.append(f"{name.get(config['mlp'], config['mlp'])} (hidden {config.get('mlp_hidden')})")
    if "position_encoding" in config:
        pe = config["position_encoding"]
        rotated = f", {config['rotary_dim']} dimensions of each head" if config.get("rotary_dim") else ""
        # ALiBi has no base (its rows carry no rope_theta)
        words.append(f"{name.get(pe, pe)} (theta {config['rope_theta']:g}{rotated})" if "rope_theta" in config
                     else name.get(pe, pe))
    if "n_kv_head" in config:
        words.append(f"{config['n_kv_head']} KV heads")
    if config.get("bias") is False:
        words.append("no biases")
    if "attention_head_dim" in config:
        words.append(f"heads of {config['attention_head_dim']}")
    if config.get("qk_norm"):
        words.append({"all": "q/k norms over all heads", "each": "per-head q/k norms"}.get(config.get("qk_norm_width"),
                                                                                           "q/k norms"))
    if config.get("scale_embeddings"):
        words.append("scaled embeddings")
    if config.get("post_norms"):
        words.append("norms after each sublayer only" if config.get("pre_norms") is False else "sandwich norms")
    if "rope_local_theta" in config:
        words.append(f"local RoPE theta {config['rope_local_theta']:g}")
    if "nope_layers" in config:
        words.append(f"no RoPE in layers {config['nope_layers']}")
    if config.get("parallel_residual"):
        words.append("parallel attention and MLP" + (" on one norm" if config.get("shared_norm") else ""))
    if config.get("head_bias"):
        words.append("LM-head bias")
    if config.get("embed_norm"):
        words.append("embedding norm")
    if config.get("norm_bias") is False:
        words.append("no norm biases")
    if config.get("alibi_scaled"):
        words.append("ALiBi scaled with the scores")
    if config.get("gelu_approximate") == "none":
        words.append("exact GELU")
    if config.get("n_experts"):
        aux = f", aux loss {config['moe_aux_loss']:g}" if config.get("moe_aux_loss") else ""
        words.append(f"{config['n_experts']} experts (top {config.get('experts_per_token')}{aux})")
    muP = [f"{what} x{config[key]:g}" for key, what in (("embedding_multiplier", "embeddings"),
                                                        ("residual_multiplier", "residual branches"),
                                                        ("attention_multiplier", "attention scores"))
           if key in config]
    if muP:
        words.append("Granite's multipliers: " + ", ".join(muP))
    return ", ".join(words)


def models_line(rows) -> str:
    """The models a training section timed, each named with its variant fields (every provider of a
    run times the same one), so a local or Llama-shaped model's table is not read as plain GPT-2's."""
    seen = []
    for r in rows:
        c = r.get("config") or {}
        arch = architecture_text(c)
        text = c.get("model", "?") + (variant_text(c, VARIANT_KEYS) + (f" with {arch}" if arch else "")
                                      or " (the preset as it is)")
        if text not in seen:
            seen.append(text)
    return "Models timed, the same for every provider: " + "; ".join(seen) if seen else ""


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; cells are str()-ed and '|' escaped."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def collapse_unmeasured(rows):
    """Rows in order, but a provider skipped/failed the same way in several modes of a config
    shows once, its modes joined ("fwd,bwd,fwd+bwd")."""
    out, index = [], {}
    for r in rows:
        if is_ok(r) or r.get("mode") == "saved":
            out.append(r)
            continue
        key = (r["op"], repr(sorted(r["config"].items())), r["provider"], r["status"])
        if key in index:
            first = out[index[key]]
            out[index[key]] = dict(first, mode=f"{first.get('mode')},{r.get('mode')}")
            continue
        index[key] = len(out)
        out.append(r)
    return out


HOST_BOUND = 0.8  # host ms per call over the GPU median from which a row is called host-bound


def rows_table(rows) -> str:
    headers = ["op", "config", "mode", "provider", "median ms [p20, p80]", "throughput",
               "% ceiling", "peak mem", "status"]
    body = []
    for r in collapse_unmeasured(rows):
        if r.get("mode") == "saved":
            continue
        ok = is_ok(r)
        timing = f"{fmt(r['ms'])} [{fmt(r.get('ms_p20'))}, {fmt(r.get('ms_p80'))}]" if ok else "-"
        if not ok:
            thr = "-"
        elif r.get("gbps") is not None:
            thr = f"{fmt(r['gbps'])} GB/s"
        elif r.get("tokens_per_s") is not None:
            thr = f"{fmt(r['tokens_per_s'])} tok/s"
        elif r.get("tflops") is not None:
            thr = f"{fmt(r['tflops'])} TFLOPS"
        else:
            thr = "-"
        pct = r.get("pct_of_copy_bw", r.get("pct_of_matmul"))
        if r.get("mfu") is not None:
            pct = 100 * r["mfu"]
        notes = [r["note"]] if r.get("note") else []
        if ok and r.get("host_ms") is not None:
            # host-bound: the CPU's time per call reaches the GPU median, which then times the CPU
            notes.append(f"host {fmt(r['host_ms'])} ms" + (": host-bound" if r["host_ms"] >= HOST_BOUND * r["ms"] else ""))
        body.append([r["op"], config_text(r["config"]), r.get("mode") or "-", r["provider"], timing, thr,
                     f"{pct:.1f}%" if pct is not None else "-", fmt_bytes(r.get("peak_mem_bytes")),
                     r["status"] + (f" ({'; '.join(notes)})" if notes else "")])
    return markdown_table(headers, body)


def saved_table(rows) -> str:
    saved = [r for r in rows if r.get("mode") == "saved"]
    if not saved:
        return ""
    body = [[config_text(r["config"]), r["config"].get("dtype", "-"), r["provider"],
             fmt_bytes(r.get("saved_bytes")) if is_ok(r) else "-",
             fmt(r.get("saved_bytes")) if is_ok(r) else "-", r["status"]] for r in saved]
    return markdown_table(["config", "dtype", "provider", "saved for backward", "bytes", "status"], body)


def autotune_table(choices) -> str:
    def pairs(d):
        return " ".join(f"{k}={v}" for k, v in d.items())

    body = [[a.get("kernel"), pairs(a["key"]), ", ".join(a.get("dtypes") or []), pairs(a["config"])]
            for a in choices]
    return markdown_table(["kernel", "autotune key", "dtypes", "chosen config"], body)


def targets_table(targets) -> str:
    body = []
    for t in targets:
        unit = t.get("unit", "")
        val = "-" if t["value"] is None else f"{fmt(t['value'])}{(' ' + unit) if unit else ''}"
        body.append([t["target"], t["config"], val, f"{t['op']} {fmt(t['threshold'])}", t["status"],
                     t.get("note", "")])
    return markdown_table(["target", "config", "value", "needed", "result", "note"], body)


def env_lines(env) -> str:
    keys = ("device", "driver", "cuda_version", "torch", "triton", "liger_kernel", "flash_attn", "flash_attn_3",
            "git_commit", "timestamp", "cpu", "cpu_threads", "load_avg_1m")
    return "\n".join(f"- {k}: {env.get(k)}" for k in keys if k in env)


def render_markdown(result) -> str:
    out = [f"# tritongpt bench: {result['section']}", "", env_lines(result["env"]), ""]
    for note in result.get("notes") or []:
        out += [f"> {note}", ""]
    c = result.get("ceilings") or {}
    if c:
        out.append("## Ceilings measured in this run")
        cp, mm = c.get("copy", {}), c.get("matmul", {})
        if "gbps" in cp:
            out.append(f"- device copy: {fmt(cp['gbps'])} GB/s ({fmt_bytes(cp['bytes'])} moved, "
                       f"{fmt(cp['ms'])} ms)")
        elif cp:
            out.append(f"- device copy: {cp.get('status')}")
        if "tflops" in mm:
            out.append(f"- {mm['dtype']} matmul {mm['n']}^3: {fmt(mm['tflops'])} TFLOPS ({fmt(mm['ms'])} ms)")
        elif mm:
            out.append(f"- matmul: {mm.get('status')}")
        out.append("")
    if result.get("peak_flops"):
        out += [f"MFU denominator: {fmt(result['peak_flops'] / 1e12)} TFLOPS "
                f"({result.get('peak_flops_source')})", ""]
    if result["section"] == "train" and result["rows"]:
        out += [models_line(result["rows"]), ""]
    if result.get("targets"):
        out += ["## Targets", "", targets_table(result["targets"]), ""]
    if result["rows"]:
        out += ["## Results", "", rows_table(result["rows"]), ""]
        st = saved_table(result["rows"])
        if st:
            out += ["## GELU-MLP activations saved for backward (parameters excluded)", "", st, ""]
    if result.get("autotune"):
        out += ["## Configs autotune chose in this section", "", autotune_table(result["autotune"]), ""]
    if result.get("elapsed_s") is not None:
        out.append(f"_elapsed: {result['elapsed_s']:.1f} s_")
    return "\n".join(out) + "\n"


# -- plots ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(rows, ceilings, out_dir) -> list:
    """One PNG per op: throughput against size, a line per provider, a panel per mode."""
    plt = _plt()
    paths = []
    specs = {"layernorm": ("width", "gbps", "GB/s", "copy"),
             "add_layernorm": ("width", "gbps", "GB/s", "copy"),
             "rmsnorm": ("width", "gbps", "GB/s", "copy"),
             "add_rmsnorm": ("width", "gbps", "GB/s", "copy"),
             "mlp": ("width", "tflops", "TFLOPS", "matmul"),
             "swiglu": ("width", "tflops", "TFLOPS", "matmul"),
             "geglu": ("width", "tflops", "TFLOPS", "matmul"),
             "attention": ("seq_len", "tflops", "TFLOPS", "matmul"),
             "doc_attention": ("seq_len", "tflops", "TFLOPS", "matmul"),
             "window_attention": ("seq_len", "tflops", "TFLOPS", "matmul"),
             "rope": ("heads", "gbps", "GB/s", "copy"),
             "gqa_attention": ("seq_len", "tflops", "TFLOPS", "matmul"),
             "softcap_attention": ("seq_len", "tflops", "TFLOPS", "matmul"),
             "mlp_exact_gelu": ("width", "tflops", "TFLOPS", "matmul"),
             "rope_partial": ("heads", "gbps", "GB/s", "copy"),
             "cross_entropy": ("vocab", "gbps", "GB/s", "copy"),
             "rl_logprobs": ("vocab", "gbps", "GB/s", "copy"),
             "lm_head_loss": ("vocab", "tflops", "TFLOPS", "matmul"),
             "lm_head_loss_smooth_z": ("vocab", "tflops", "TFLOPS", "matmul"),
             "lm_head_loss_softcap": ("vocab", "tflops", "TFLOPS", "matmul"),
             "lm_head_loss_bias": ("vocab", "tflops", "TFLOPS", "matmul"),
             "alibi_attention": ("seq_len", "tflops", "TFLOPS", "matmul")}
    for op, (xkey, ykey, ylabel, ceil_key) in specs.items():
        op_rows = [r for r in rows if r["op"] == op and is_ok(r) and r.get(ykey) is not None]
        if not op_rows:
            continue
        modes = [m for m in MODES if any(r["mode"] == m for r in op_rows)]
        groups = sorted({r["config"].get("head_dim") for r in op_rows}, key=lambda v: (v is None, v))
        fig, axes = plt.subplots(len(groups), len(modes), figsize=(4.5 * len(modes), 3.6 * len(groups)),
                                 squeeze=False)
        ceil = (ceilings or {}).get(ceil_key, {}).get(ykey)
        # one colour per provider across the op's panels (matplotlib's cycle restarts in each), ours drawn bolder
        colour = {prov: f"C{i % 10}" for i, prov in enumerate(sorted({r["provider"] for r in op_rows}))}
        for gi, g in enumerate(groups):
            for mi, mode in enumerate(modes):
                ax = axes[gi][mi]
                sel = [r for r in op_rows if r["mode"] == mode and r["config"].get("head_dim") == g]
                for prov in sorted({r["provider"] for r in sel}):
                    pts = sorted((r["config"][xkey], r[ykey]) for r in sel if r["provider"] == prov)
                    ax.plot(*zip(*pts), marker="o", label=prov, color=colour[prov],
                            lw=2.5 if prov == "triton" else 1.5)
                if ceil:
                    ax.axhline(ceil, color="gray", ls="--", lw=1, label=f"{ceil_key} ceiling")
                title = f"{op} {mode}" + (f" D={g}" if g is not None else "")
                ax.set_title(title)
                ax.set_xlabel(xkey)
                ax.set_ylabel(ylabel)
                if xkey == "seq_len":
                    ax.set_xscale("log", base=2)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bars(rows, out_path, value_key="tokens_per_s", title="tokens/s") -> Path | None:
    """Horizontal bars, one per ok row that has value_key."""
    sel = [r for r in rows if is_ok(r) and r.get(value_key) is not None]
    if not sel:
        return None
    plt = _plt()
    labels = [f"{r['op']} {config_text(r['config'])} {r['provider']}" for r in sel]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(sel) + 1.2))
    vals = [r[value_key] for r in sel]
    ax.barh(range(len(sel)), vals)
    if max(vals) > 100 * min(vals) > 0:  # tokenizer and model tokens/s differ by orders
        ax.set_xscale("log")
    ax.set_yticks(range(len(sel)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def write_result(result, out_root, plots=True) -> list:
    """Write <out_root>/<slug>/<section>.json and .md (+ PNGs). Returns the paths written."""
    validate_result(result)
    folder = Path(out_root) / result["env"]["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    section = result["section"]
    paths = [folder / f"{section}.json", folder / f"{section}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(render_markdown(result))
    if plots:
        if section == "kernels":
            paths += plot_kernels(result["rows"], result.get("ceilings"), folder)
        else:
            p = plot_bars(result["rows"], folder / f"{section}.png")
            if p:
                paths.append(p)
    return paths


def write_summary(results, out_root) -> Path:
    """summary.md: every section's targets in one table. A GPU section this run did not
    measure keeps the targets of its last saved results (<section>.json), marked as such."""
    env = results[0]["env"]
    folder = Path(out_root) / env["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    ran = {r["section"] for r in results}
    earlier = []
    for section in ("kernels", "train"):
        path = folder / f"{section}.json"
        if section not in ran and path.is_file():
            try:
                earlier.append(validate_result(json.loads(path.read_text())))
            except (OSError, ValueError):
                pass  # an unreadable, truncated or older-format file: summarise this run only
    targets = [t for r in results + earlier for t in r.get("targets", [])]
    text = ["# tritongpt bench summary", "", env_lines(env), "", targets_table(targets) if targets
            else "(no targets in these sections)", ""]
    text += [f"{r['section']} targets are from the earlier run of {r['env'].get('timestamp')} "
             f"(git {r['env'].get('git_commit')}), saved in {r['section']}.json." for r in earlier]
    path = folder / "summary.md"
    path.write_text("\n".join(text))
    return path


def console_summary(results) -> str:
    """The short table printed at the end of a run: targets, then what was skipped or failed."""
    out = []
    targets = [t for r in results for t in r.get("targets", [])]
    if targets:
        out += [targets_table(targets), ""]
    bad = [r for res in results for r in res["rows"] if not is_ok(r)]
    if bad:
        out.append(f"{len(bad)} row(s) not measured (skipped/failed); first ones:")
        seen = set()
        for r in bad:
            key = (r["op"], r["provider"], r["status"])
            if key in seen:
                continue
            seen.add(key)
            out.append(f"  {r['op']:<16} {r['provider']:<24} {r['status']}")
            if len(seen) >= 8:
                break
    return "\n".join(out)
