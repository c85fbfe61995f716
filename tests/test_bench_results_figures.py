"""The H200 run's headline figures, as README.md and bench/results/nvidia-h200/README.md word them, against the
results files they were read from (kernels.json, train.json, autotune-timings.json in that folder). A result
counts only as measured: a figure edited in the words, or a results file replaced under them, fails here.
A quoted figure agrees when it is the data rounded to the digits quoted (211k is 211,060 tokens/s).
The CPU folders' READMEs: the commit and versions each results file's env holds."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "bench" / "results" / "nvidia-h200"


def _load(name):
    return json.loads((H200 / name).read_text())


class Rows:
    """A results file's measured rows, looked up by op, mode, provider and config fields."""

    def __init__(self, name):
        self.data = _load(name)
        self.rows = [r for r in self.data["rows"] if r["status"] == "ok"]

    def get(self, op, mode, provider, **config):
        found = [r for r in self.rows if (r["op"], r["mode"], r["provider"]) == (op, mode, provider)
                 and all(r["config"].get(k) == v for k, v in config.items())]
        assert len(found) == 1, f"{len(found)} measured rows for {op} {mode} {provider} {config}"
        return found[0]

    def ms(self, op, mode, provider, **config):
        return self.get(op, mode, provider, **config)["ms"]


def _autotune_ms(kernel, **key):
    """The fastest config's median ms of the one autotune search of kernel whose key has these fields."""
    found = [e for e in _load("autotune-timings.json")
             if e["kernel"] == kernel and all(e["key"].get(k) == v for k, v in key.items())]
    assert len(found) == 1, f"{len(found)} autotune searches of {kernel} with {key}"
    return found[0]["timings"][0]["ms"][0]  # fastest first; [median, p20, p80]


def _section(path, heading):
    """The text under a markdown heading, whitespace folded (line breaks fall anywhere in a sentence)."""
    text = path.read_text()
    start = text.find(heading)
    assert start >= 0, f"{path} has no heading {heading!r} (renamed? this test reads its figures under it)"
    end = text.find("\n#", start + len(heading))
    return " ".join(text[start:end if end > 0 else None].split())


def _agrees(quoted, value):
    q = quoted.replace(",", "")
    scale = 1000 if q.endswith("k") else 1
    q = q.rstrip("k")
    decimals = len(q.split(".")[1]) if "." in q else 0
    return abs(float(q) - value / scale) <= 0.5 * 10 ** -decimals + 1e-9


def _check(text, pattern, *values):
    """Each number pattern's groups capture in text against its value; the mismatches, as messages."""
    m = re.search(pattern, text)
    if m is None:  # a reworded sentence is not a pass: its figures would go unchecked
        return [f"no sentence matches {pattern!r} (reworded? give this test its new wording)"]
    return [f"{pattern!r}: says {q}, the data {v:.4g}" for q, v in zip(m.groups(), values, strict=True)
            if not _agrees(q, v)]


def _train():
    t = Rows("train.json")
    step = {p: t.get("step", "fwd+bwd", p, model="gpt2-small")
            for p in ("reference", "triton", "reference+compile+sdpa", "triton+compile")}
    return t, step


def test_readme_quickstart_h200_training_step_is_train_json():
    _, step = _train()
    ref, tri, sdpa = step["reference"], step["triton"], step["reference+compile+sdpa"]
    text = " ".join((ROOT / "README.md").read_text().split())
    bad = _check(text, r"On one H200 \(`bench/results/nvidia-h200/train.md`\), GPT-2 124M's training step "
                       r"\(B 16, T 1024, bf16\) ran at (\d+k) tokens/s on the Triton path: ([\d.]+)x reference "
                       r"eager, at ([\d.]+)x its memory. Reference \+ torch.compile \+ SDPA ran at (\d+k) tokens/s",
                 tri["tokens_per_s"], ref["ms"] / tri["ms"], tri["peak_mem_bytes"] / ref["peak_mem_bytes"],
                 sdpa["tokens_per_s"])
    assert not bad, "\n".join(bad)


def test_h200_readme_what_the_numbers_say_is_the_run_data():
    k = Rows("kernels.json")
    t, step = _train()
    text = _section(H200 / "README.md", "## What the numbers say")
    fb = "fwd+bwd"

    def ratio(op, num, den, mode=fb, **config):
        return k.ms(op, mode, num, **config) / k.ms(op, mode, den, **config)

    def attn(d, seq):
        return {"head_dim": d, "seq_len": seq}

    ref, tri, comp = step["reference"], step["triton"], step["triton+compile"]
    gib = 2 ** 30
    attn128 = [ratio("attention", "reference", "triton", **attn(128, s)) for s in (256, 512, 1024, 2048, 4096, 8192)]
    cudnn_long = [ratio("attention", "sdpa-cudnn", "triton", **attn(64, s)) for s in (4096, 8192)]
    mlp = [ratio("mlp", "torch", "triton", width=w) for w in (768, 1024, 1280, 1600)]
    ln = [ratio("layernorm", "torch", "triton", width=w) for w in (768, 1024, 1280, 1600)]
    mfu_target = {x["target"]: x for x in t.data["targets"]}["train MFU"]
    bad = []
    # Where reference eager beats ours fwd+bwd, of every (op, config) both timed: the two widths the words name.
    ours = [r for r in k.rows if r["provider"] == "triton" and r["mode"] == fb]
    lost = [(r["op"], r["config"].get("width")) for r in ours for x in k.rows
            if (x["provider"], x["mode"], x["op"], x["config"]) == ("reference", fb, r["op"], r["config"])
            and x["ms"] < r["ms"]]
    if [op for op, _ in lost] != ["mlp", "mlp"]:
        bad.append(f"reference eager beats ours fwd+bwd at {lost}, not at two GELU-MLP widths as the words say")
    else:
        bad += _check(text, r"wins everywhere except the GELU-MLP at widths (\d+) and (\d+):",
                      *sorted(w for _, w in lost))
    bad += _check(text, r"LayerNorm fwd\+bwd ([\d.]+)x \(width 768\) to ([\d.]+)x \(1600\)",
                  ratio("layernorm", "reference", "triton", width=768),
                  ratio("layernorm", "reference", "triton", width=1600))
    bad += _check(text, r"attention at head dim 64 ([\d.]+)x \(T 256\) to ([\d.]+)x \(T 8192\) \(([\d.]+)x to "
                        r"([\d.]+)x at 128\)",
                  ratio("attention", "reference", "triton", **attn(64, 256)),
                  ratio("attention", "reference", "triton", **attn(64, 8192)), min(attn128), max(attn128))
    bad += _check(text, r"the loss ([\d.]+)x, the 124M", ratio("cross_entropy", "reference", "triton"))
    bad += _check(text, r"training step ([\d.]+)x \(([\d.]+) vs ([\d.]+) ms\) with ([\d.]+)x the peak memory "
                        r"\(([\d.]+) vs ([\d.]+) GiB\)",
                  ref["ms"] / tri["ms"], tri["ms"], ref["ms"], tri["peak_mem_bytes"] / ref["peak_mem_bytes"],
                  tri["peak_mem_bytes"] / gib, ref["peak_mem_bytes"] / gib)
    bad += _check(text, r"Attention fwd\+bwd at head dim (\d+) is ([\d.]+)x cuDNN's SDPA at T 256 and "
                        r"([\d.]+)-([\d.]+)x at T 4096-8192", 64,
                  ratio("attention", "sdpa-cudnn", "triton", **attn(64, 256)), min(cudnn_long), max(cudnn_long))
    bad += _check(text, r"forward alone reaches (\d+) TFLOPS at T 1024 \(target (\d+)\) and (\d+) at 8192",
                  k.get("attention", "fwd", "triton", **attn(64, 1024))["tflops"],
                  {x["target"]: x for x in k.data["targets"]}["attention forward TFLOPS"]["threshold"],
                  k.get("attention", "fwd", "triton", **attn(64, 8192))["tflops"])
    bad += _check(text, r"The GELU-MLP is ([\d.]+)-([\d.]+)x PyTorch's addmm", min(mlp), max(mlp))
    # dW2 = dy^T gelu(h) with gelu recomputed on the B tiles, and dW1 = dh^T x: both [768, 3072] over 16384 rows.
    bad += _check(text, r"\(([\d.]+) ms where dW1's plain product of the same size runs in ([\d.]+) ms",
                  _autotune_ms("mlp.matmul", M_BUCKET=1024, N=3072, K_BUCKET=16384, B_GELU=True),
                  _autotune_ms("mlp.matmul", M_BUCKET=4096, N=768, K_BUCKET=16384, B_GELU=False))
    bad += _check(text, r"LayerNorm fwd\+bwd is ([\d.]+)-([\d.]+)x F.layer_norm", min(ln), max(ln))
    bad += _check(text, r"The loss beats Liger \(([\d.]+)x\) and F.cross_entropy \(([\d.]+)x\)",
                  ratio("cross_entropy", "liger", "triton"), ratio("cross_entropy", "torch", "triton"))
    bad += _check(text, r"attention T 1024: ([\d.]+) \+ ([\d.]+) vs ([\d.]+) ms",
                  *(k.ms("attention", m, "triton", **attn(64, 1024)) for m in ("fwd", "bwd", fb)))
    bad += _check(text, r"attention fwd at T 256 takes ([\d.]+) ms where autotune timed its kernel at ([\d.]+)",
                  k.ms("attention", "fwd", "triton", **attn(64, 256)),
                  _autotune_ms("attention.forward", HEAD_DIM=64, Q_BUCKET=256))
    bad += _check(text, r"reference \+ torch.compile \+ SDPA ([\d.]+) ms, Triton eager ([\d.]+) ms, Triton \+ "
                        r"torch.compile ([\d.]+) ms \(MFU ([\d.]+) % of the (\d+) TFLOPS datasheet peak; the run's "
                        r"own 8192\^3 bf16 matmul reached (\d+) TFLOPS\)",
                  step["reference+compile+sdpa"]["ms"], tri["ms"], comp["ms"], 100 * mfu_target["value"],
                  t.data["peak_flops"] / 1e12, t.data["ceilings"]["matmul"]["tflops"])
    assert not bad, "\n".join(bad)


def test_offline_compile_counts_quoted_are_the_compile_json():
    """The whole offline compile runs' launch and config counts, as both READMEs quote them."""
    def counts(arch):
        data = json.loads((ROOT / "bench" / "results" / f"{arch}-offline" / "compile.json").read_text())
        launches, rows = data["launches"], data["rows"]
        return (sum(x["clean_config"] for x in launches), len(launches),
                sum(r["status"] == "ok" for r in rows), len(rows))

    sm90, sm80, sm89 = counts("sm90"), counts("sm80"), counts("sm89")
    readme = " ".join((ROOT / "README.md").read_text().split())
    results = " ".join((ROOT / "bench" / "results" / "README.md").read_text().split())
    assert sm90[0] == sm90[1] and sm80[0] == sm80[1] and sm89[0] == sm89[1], "a launch without a clean config"
    bad = _check(readme, r"all (\d+) launches \(counted by", sm90[1])
    bad += _check(readme, r"spills nothing; (\d+) of the (\d+) \(launch, config\) pairs are clean", *sm90[2:])
    bad += _check(readme, r"`--arch 80` \(A100, [^:]*: (\d+)/(\d+) launches clean, (\d+)/(\d+) configs", *sm80)
    bad += _check(readme, r"`--arch 89` \(L4, [^:]*: (\d+)/(\d+) launches, (\d+)/(\d+) configs", *sm89)
    bad += _check(results, r"`tritongpt bench compile --out bench/results`\): all (\d+) launches", sm90[1])
    bad += _check(results, r"`--arch 80` / `--arch 89` \((\d+) of (\d+) launches each", *sm80[:2])
    assert sm80[:2] == sm89[:2], "sm_80's and sm_89's launch counts differ: 'each' no longer holds"
    assert not bad, "\n".join(bad)


def test_cpu_readmes_name_each_files_commit_and_versions():
    """bench/results/cpu-*/README.md's table rows: each names files by glob and the commit (with +dirty where
    the run's tree was) that every JSON matching it holds in env; the Xeon's row its Python, torch and Triton too."""
    from fnmatch import fnmatch
    bad, seen = [], set()
    for folder in sorted((ROOT / "bench" / "results").glob("cpu-*")):
        lines = [ln for ln in (folder / "README.md").read_text().splitlines() if ln.startswith("| `")]
        head = next(ln for ln in (folder / "README.md").read_text().splitlines() if ln.startswith("| file"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        for line in lines:
            cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
            globs = re.findall(r"`([^`]+\.\*)`", cells[cols[0]])
            files = [f for f in folder.glob("*.json") if any(fnmatch(f.name, g.replace(".*", ".json")) for g in globs)]
            if not files:
                bad.append(f"{folder.name}: {cells[cols[0]]} matches no JSON")
            for f in files:
                env = json.loads(f.read_text())["env"]
                sha, _, dirty = env["git_commit"].partition("+")
                want = {"commit": sha[:7] + (f"+{dirty}" if dirty else ""), "Python": env["python"],
                        "torch": env["torch"], "Triton": env["triton"]}
                bad += [f"{folder.name}/{f.name}: README's {k} {cells[k]}, its env {v}"
                        for k, v in want.items() if k in cells and cells[k] != v]
                if "Python" not in cells:  # the versions said once, above the table, for every file
                    versions = "Python {Python}, torch {torch}, Triton {Triton} in every file".format(**want)
                    if versions not in " ".join((folder / "README.md").read_text().split()):
                        bad.append(f"{folder.name}/{f.name}: README does not say {versions!r}")
                seen.add(f)
        bad += [f"{folder.name}/{f.name}: in no row of the README's table"
                for f in sorted(folder.glob("*.json")) if f not in seen]
    assert not bad, "\n".join(bad)
    assert len(seen) > 2, "the CPU READMEs' tables matched almost no results file"
