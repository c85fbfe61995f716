"""`tritongpt bench decode` (bench/decode.py): greedy KV-cache decode steps, eager against a CUDA-graph replay.

On the CPU the graph is emulated as tests/test_decode_graph.py emulates it (make_fx records the step once, the
replay runs the recorded ops on the same tensors); a tiny model, a 5-token prompt and a few steps keep each run
under a few seconds. The command itself measures nothing without CUDA: its GPU path runs here on a stand-in
that times the tiny model on the CPU."""
import json
import re

import pytest
import torch

from test_decode_graph import fx_capture, weight_cache_asks
from tritongpt.bench import decode
from tritongpt.bench.common import Budget
from tritongpt.model.config import GPTConfig

PROMPT, NEW = 5, 6


def tiny():
    return GPTConfig(vocab_size=97, context_length=24, n_layer=2, n_head=4, n_embd=32)


def run(providers=("reference", "reference+graphs"), batches=(1, 2), budget=None, capture=fx_capture, log=None,
        **kw):
    return decode.run_decode("cpu", budget or Budget(None), torch.float32, "tiny-test", batches, PROMPT, NEW,
                             providers, log=log or (lambda s: None), capture=capture, repeats=2, config=tiny(), **kw)


def one_layer_rows(providers, **kw):
    """run_decode's rows on a one-layer model: one row, a 4-token prompt, 2 new tokens, each provider timed once."""
    cfg = GPTConfig(vocab_size=97, context_length=24, n_layer=1, n_head=2, n_embd=32)
    return decode.run_decode("cpu", Budget(None), torch.float32, "tiny-test", (1,), 4, 2, providers,
                             log=lambda s: None, capture=fx_capture, repeats=1, config=cfg, **kw)


def test_rows_time_each_provider_and_batch_and_the_graph_draws_the_eager_tokens():
    """Providers given graph first still run eager first (the graph's speed-up and tokens are measured against
    it); tokens/s is batch * 1000 / ms; a graph row has its build time, its speed-up over the eager row and
    same_tokens True (the emulated graph replays the step exactly)."""
    rows = run(providers=("reference+graphs", "reference"))
    assert [(r["provider"], r["config"]["batch"]) for r in rows] == [
        ("reference", 1), ("reference+graphs", 1), ("reference", 2), ("reference+graphs", 2)]
    for r in rows:
        assert r["status"] == "ok" and r["section"] == "decode" and r["op"] == "generate" and r["mode"] == "decode"
        assert r["config"] == {"model": "tiny-test", "batch": r["config"]["batch"], "prompt_len": PROMPT,
                               "new_tokens": NEW, "dtype": "fp32", "repeats": 2}
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["tokens_per_s"] == pytest.approx(r["config"]["batch"] * 1000 / r["ms"])
    for eager, graph in (rows[0:2], rows[2:4]):
        assert eager["capture_ms"] is None and "same_tokens" not in eager
        assert graph["capture_ms"] > 0
        assert graph["same_tokens"] is True and graph["first_difference"] is None
        assert graph["speedup"] == pytest.approx(eager["ms"] / graph["ms"])
        assert graph["note"].startswith(f"{graph['speedup']:.2f}x over reference, capture ")
        assert graph["note"].endswith("same tokens")


def test_a_graph_alone_is_compared_with_an_eager_decode_it_runs_itself(monkeypatch):
    """Without its eager row, the graph row decodes eagerly (untimed) for the tokens to compare with; a graph that
    replays the position it was captured at (the host's pos baked in) draws other tokens: reported, not failed."""
    from tritongpt.model.gpt import KVCache

    (good,) = run(providers=("reference+graphs",), batches=(1,))
    assert good["status"] == "ok" and good["same_tokens"] is True and good["speedup"] is None
    assert good["note"].startswith("capture ")
    monkeypatch.setattr(KVCache, "extent", lambda self, T: (torch.arange(self.pos, self.pos + T),
                                                            torch.full((1,), self.pos + T)))
    eager, frozen = run(batches=(1,))
    assert eager["status"] == frozen["status"] == "ok"
    assert frozen["same_tokens"] is False and 0 <= frozen["first_difference"] < NEW
    assert frozen["note"].endswith(f"tokens differ from step {frozen['first_difference']} on")


def test_a_failing_capture_or_an_out_of_memory_fails_its_row_and_the_run_goes_on(monkeypatch):
    from tritongpt.model.gpt import GPTModel

    why = "no graphs here, " + "a cause as long as a Triton signature's TypeError " * 2

    def no_graphs(fn, device=None):
        raise RuntimeError(why)

    rows = run(capture=no_graphs)
    # the cause whole after DecodeGraph's words (reason_of's default 160 characters would cut it)
    assert [r["status"] for r in rows] == ["ok", "failed: UserError: this model's decode step could not be captured "
                                           f"in a CUDA graph: RuntimeError: {why.strip()}"] * 2
    real = GPTModel.new_cache

    def small_memory(self, batch_size, *a, **k):
        if batch_size == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch_size, *a, **k)
    monkeypatch.setattr(GPTModel, "new_cache", small_memory)
    rows = run()
    assert [r["status"] for r in rows] == ["ok", "ok", "failed: out of memory", "failed: out of memory"]


def test_the_triton_path_runs_through_the_interpreter_eager_and_as_a_graph():
    """The Triton path's eager steps and its graph (flash_attention's kv_len; the interpreter, one layer, two
    steps): both rows ok, the replay's tokens the eager ones."""
    rows = one_layer_rows(("triton", "triton+graphs", "reference"))
    assert [r["provider"] for r in rows] == ["reference", "triton", "triton+graphs"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[2]["same_tokens"] is True


def test_the_int8_rows_decode_a_quantized_copy_and_compare_with_its_own_eager_row(monkeypatch):
    """reference+int8, triton+int8 and triton+int8+graphs decode a quantize_int8 copy of the same weights (the
    float rows the model itself, unquantized): the graph's tokens and speed-up are against triton+int8's row."""
    from tritongpt.model.quant import Int8Linear

    seen = []
    real = decode.bench_decode_row
    monkeypatch.setattr(decode, "bench_decode_row", lambda model, provider, *a: seen.append(
        (provider, isinstance(model.out_head, Int8Linear), id(model))) or real(model, provider, *a))
    rows = one_layer_rows(("triton+int8+graphs", "reference", "triton+int8", "reference+int8"))
    assert [r["provider"] for r in rows] == ["reference", "reference+int8", "triton+int8", "triton+int8+graphs"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [(p, q) for p, q, _ in seen] == [("reference", False), ("reference+int8", True), ("triton+int8", True),
                                            ("triton+int8+graphs", True)]
    assert len({i for _, q, i in seen if q}) == 1  # one quantized copy for every int8 row
    graph = rows[3]
    assert graph["same_tokens"] is True and graph["speedup"] == pytest.approx(rows[2]["ms"] / graph["ms"])
    assert graph["note"].startswith(f"{graph['speedup']:.2f}x over triton+int8, capture ")
    assert decode.parse_provider("triton+int8+graphs") == ("triton", True, "int8")
    assert decode.parse_provider("reference+graphs") == ("reference", True, None)
    assert decode.parse_provider("reference+int4") == ("reference", False, "int4")


def test_the_budget_skips_the_rows_it_has_no_time_for():
    rows = run(budget=Budget(0))
    assert [r["status"] for r in rows] == ["skipped: time budget (--max-minutes)"] * 4
    budget = Budget(None)
    # interrupted once the first row is measured (its result logged): the others are skipped unrun
    rows = run(budget=budget, log=lambda s: budget.interrupt() if "tok/s" in s else None)
    assert [r["status"] for r in rows] == ["ok"] + ["skipped: interrupted (Ctrl-C or a hard time limit)"] * 3


def test_bad_arguments_are_refused_by_name():
    from tritongpt.errors import UserError

    with pytest.raises(ValueError, match=re.escape("unknown decode provider 'triton+compile'")):
        run(providers=("reference", "triton+compile"))
    with pytest.raises(UserError, match=r"prompt 5 \+ new tokens 20 > tiny-test's context \(24\)"):
        decode.run_decode("cpu", Budget(None), torch.float32, "tiny-test", (1,), PROMPT, 20, config=tiny())


def test_the_command_needs_cuda_and_checks_its_flags_first(monkeypatch, capsys):
    """On this CPU machine: the CUDA message, exit 0, nothing measured; bad flags exit 2 naming what is wrong."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    monkeypatch.setattr(decode, "run_decode", lambda *a, **k: pytest.fail("measured without CUDA"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "decode"]) == 0
    assert "decode timings need CUDA" in capsys.readouterr().out
    for argv, said in ((["--providers", "reference,bogus"], "--providers: unknown ['bogus']"),
                       (["--seq-len", "1000"], "--seq-len 1000 + --new-tokens 128 > gpt2-small's context (1024)"),
                       (["--models", "gpt2-small,gpt2-medium"], "bench decode takes one model"),
                       (["--new-tokens", "0"], "--new-tokens must be positive"),
                       (["--batch", "1,x"], "--batch must be comma-separated integers")):
        assert cli.main(["bench", "decode", *argv]) == 2
        assert said in capsys.readouterr().err, argv
    parse = cli.build_parser().parse_args
    # --seq-len's own default (1024, the training step's) is not the prompt's: 128 unless given
    assert bcli.decode_names(parse(["bench", "decode"])) == ("gpt2-small", (1, 8), 128, 128, decode.DECODE_PROVIDERS)
    assert bcli.decode_names(parse(["bench", "decode", "--seq-len", "64", "--new-tokens", "32", "--batch", "4",
                                    "--providers", "triton,triton+graphs", "--models", "gpt2-medium"])) == \
        ("gpt2-medium", (4,), 64, 32, ("triton", "triton+graphs"))


def test_the_command_on_cuda_writes_json_markdown_and_a_plot(monkeypatch, tmp_path, capsys):
    """_run_decode's CUDA path, the timing a stand-in on the CPU (the tiny model, the emulated graph, a capture that
    fails for the Triton provider): decode.json passes the schema, decode.md and the table show every row."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli
    from tritongpt.bench.report import validate_result

    real, seen = decode.run_decode, {}

    def on_the_cpu(device, budget, dtype, model_name, batches, prompt_len, new_tokens, providers, log):
        seen.update(device=device, dtype=dtype, model=model_name, batches=batches, prompt=prompt_len,
                    new=new_tokens, providers=providers)
        return real("cpu", budget, torch.float32, model_name, (1,), PROMPT, NEW,
                    ("reference", "reference+graphs"), log, capture=fx_capture, repeats=2, config=tiny()) + \
            [decode.make_row("decode", "generate", "triton+graphs", {"model": model_name, "batch": 1}, "decode",
                             "failed: UserError: this model's decode step could not be captured")]
    monkeypatch.setattr(decode, "run_decode", on_the_cpu)
    args = cli.build_parser().parse_args(["bench", "decode", "--out", str(tmp_path), "--batch", "1,8"])
    assert bcli._run_decode(args, cuda=True) == 0
    assert seen == dict(device=torch.device("cuda"), dtype=torch.bfloat16, model="gpt2-small", batches=(1, 8),
                        prompt=128, new=128, providers=decode.DECODE_PROVIDERS)
    (folder,) = tmp_path.iterdir()
    result = validate_result(json.loads((folder / "decode.json").read_text()))
    assert result["section"] == "decode" and len(result["rows"]) == 3
    assert (folder / "decode.png").stat().st_size > 0
    md = (folder / "decode.md").read_text()
    assert md.startswith("# tritongpt bench: decode")
    assert "> Greedy decode of a randomly initialised gpt2-small: fp32 weights under bf16 autocast" in md
    graph = result["rows"][1]
    assert f"| generate | model=gpt2-small B=1 prompt_len={PROMPT} new_tokens={NEW} repeats=2 | decode | " \
           f"reference+graphs | " in md
    assert f"ok ({graph['note']})" in md and "tok/s" in md
    assert "| triton+graphs | - | - | - | - | failed: UserError: this model's decode step could not be captured |" in md
    out = capsys.readouterr().out
    assert "reference+graphs" in out and f"wrote {folder}/ (decode.json, decode.md, decode.png)" in out


def test_gpu_session_decode_stage_runs_bench_decode_on_its_own(tmp_path):
    """`bash bench/gpu_session.sh decode` runs `bench decode` within DECODE_MINUTES into results-decode/ and packs
    it, no tests; `all` does not run it. The command parses with the bench's defaults. Python is a stand-in."""
    from session_stub import SCRIPT, run_gpu_session
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    for sub in ("decode", "all"):
        (tmp_path / sub).mkdir()
    runs, work, stdout = run_gpu_session(tmp_path / "decode", "decode", DECODE_MINUTES="0.8")
    (bench,) = [c[2:] for c in runs if c[:2] == ["-m", "tritongpt.cli"]]
    assert bench == ["bench", "decode", "--max-minutes", "0.8", "--out", f"{work}/results-decode"]
    assert bcli.decode_names(build_parser().parse_args(bench)) == \
        ("gpt2-small", (1, 8), 128, 128, decode.DECODE_PROVIDERS)
    assert not any("pytest" in c for c in runs)
    assert "== tritongpt bench decode (budget 0.8 min)" in stdout
    assert (tmp_path / "decode" / "out" / "session.tgz").is_file()
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert "|bloom|decode|serve]" in header and "decode (not part of all)" in header
    runs, _, _ = run_gpu_session(tmp_path / "all", "all", BENCH_MINUTES="0.1", TEST_SECONDS="5")
    assert [c[2:4] for c in runs if c[:2] == ["-m", "tritongpt.cli"]] == [["bench", "all"]]


def test_the_notes_of_an_fp32_run_say_there_was_no_autocast(monkeypatch, tmp_path):
    """--dtype fp32 runs without autocast (train/common.py's autocast is a no-op for fp32): the note says so, not
    "fp32 weights under fp32 autocast"."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    real = decode.run_decode
    monkeypatch.setattr(decode, "run_decode", lambda device, budget, dtype, model_name, batches, prompt_len,
                        new_tokens, providers, log: real("cpu", budget, torch.float32, model_name, (1,), PROMPT, NEW,
                                                         ("reference",), log, repeats=1, config=tiny()))
    args = cli.build_parser().parse_args(["bench", "decode", "--out", str(tmp_path), "--dtype", "fp32",
                                          "--no-plots"])
    assert bcli._run_decode(args, cuda=True) == 0
    (folder,) = tmp_path.iterdir()
    md = (folder / "decode.md").read_text()
    assert "> Greedy decode of a randomly initialised gpt2-small: fp32 weights without autocast" in md
    assert "fp32 autocast" not in md


def test_the_graph_rows_keep_the_weight_cache_as_generates_graph_does(monkeypatch):
    """The graph is replayed only inside its row's autocast region, the weights unchanged: as generate's own, it keeps
    autocast's weight cache (DecodeGraph(weight_cache=True)), so the rows time what `generate --cuda-graphs` runs."""
    asked = weight_cache_asks(monkeypatch)
    rows = run(batches=(1,))
    assert [r["status"] for r in rows] == ["ok", "ok"] and asked == [True]


def test_the_int4_rows_decode_their_own_quantized_copy_and_a_group_that_does_not_fit_fails_only_them(monkeypatch):
    """reference+int4 and triton+int4(+graphs) decode a quantize_int4 copy (group_size=), apart from int8's copy;
    where the group size divides no width (128 on a 32-wide model) those rows fail saying why and the rest run."""
    from tritongpt.model.quant import Int4Linear, Int8Linear

    seen = []
    real = decode.bench_decode_row
    monkeypatch.setattr(decode, "bench_decode_row", lambda model, provider, *a: seen.append(
        (provider, type(model.out_head), id(model))) or real(model, provider, *a))
    rows = one_layer_rows(("reference", "reference+int8", "reference+int4", "triton+int4", "triton+int4+graphs"),
                          group_size=16)
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert [t for _, t, _ in seen] == [torch.nn.Linear, Int8Linear, Int4Linear, Int4Linear, Int4Linear]
    assert len({i for _, t, i in seen if t is Int4Linear}) == 1 and seen[1][2] != seen[2][2]
    assert rows[4]["same_tokens"] is True and rows[4]["note"].startswith(f"{rows[4]['speedup']:.2f}x over triton+int4")
    rows = one_layer_rows(("reference", "reference+int4"))
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("failed: quantizing to int4: trf_blocks.0.att.W_query: int4 quantization "
                                        "with group size 128 needs in_features a multiple of it, got 32")


def test_the_kv8_rows_decode_the_float_model_over_an_int8_cache(monkeypatch):
    """triton+kv8 and triton+kv8+graphs: the same float model, its cache int8 (about half the float cache's bytes,
    said in kv_cache_bytes); the graph's tokens and speed-up against triton+kv8's own eager row."""
    from tritongpt.model.gpt import GPTModel

    made = []
    real = GPTModel.new_cache
    monkeypatch.setattr(GPTModel, "new_cache", lambda self, *a, **kw: made.append(kw.get("kv_dtype", "auto")) or
                        real(self, *a, **kw))
    rows = one_layer_rows(("triton+kv8+graphs", "triton", "triton+kv8"))
    assert [r["provider"] for r in rows] == ["triton", "triton+kv8", "triton+kv8+graphs"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert made == ["auto", "int8", "int8"]
    # fp32: 16 four-byte values a head and position, against 16 bytes and a four-byte scale
    assert rows[1]["kv_cache_bytes"] == rows[2]["kv_cache_bytes"] == rows[0]["kv_cache_bytes"] * 20 // 64
    graph = rows[2]
    assert graph["same_tokens"] is True and graph["note"].startswith(f"{graph['speedup']:.2f}x over triton+kv8, ")
    assert decode.kv_cache_dtype("triton+kv8+graphs") == "int8" and decode.kv_cache_dtype("triton+int8") == "auto"
    assert decode.parse_provider("triton+kv8+graphs") == ("triton", True, None)
