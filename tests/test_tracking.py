"""--report-to: every trainer's metrics rows also go to wandb (offline here) and TensorBoard, read back
from the files they write and compared with metrics.jsonl step by step."""
import json
import sys
import time
from pathlib import Path

import pytest

from tritongpt.cli import build_parser, main
from tritongpt.errors import UserError
from tritongpt.train import common
from tritongpt.train.loop import TrainArgs, Trainer, loss_eval_fn
from tritongpt.train.rlhf import RLArgs

import test_pretrain
from test_loop import args_for, loss_fn, make_get_batch, rows, synthetic_tokens, tiny_model
from test_rlhf import _tiny_rl_trainer
from test_sft import CharTokenizer, train_args

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ("loss", "lr", "grad_norm", "val_loss")  # the loop's numbers compared per step


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb that writes its runs to disk only, and none of its files outside tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # its stdout capture would hide the output from capsys


def wandb_records(path):
    """The protobuf records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: crc, length, type) after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk wandb's process is still writing: the records before it
            break  # (finished_records waits for the exit record)
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def finished_records(path, wait_s=30.0):
    """The records of a finished run's .wandb file. wandb's own process writes the file, and now and
    then had not yet when run.finish() returned (the file then held its header alone): wait for
    the run's exit record."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = wandb_records(path)
        except DecodeError:  # a record read while wandb's process was writing it: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_runs(out_dir):
    """Each offline wandb run under out_dir/wandb, oldest first, as a dict: id, name, project, config,
    history (step -> the values logged at it) and exit_code."""
    runs = []
    for folder in sorted((Path(out_dir) / "wandb").glob("offline-run-*")):
        (path,) = folder.glob("*.wandb")
        run = {"history": {}, "exit_code": None}
        for r in finished_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, project=r.run.project,
                           config={i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.run.config.update})
            elif kind == "history":
                # a key is in `key`, or (as wandb-core writes some) in the one-part `nested_key`
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                step = items.pop("_step")
                assert step not in run["history"], f"step {step} twice in one wandb run"
                run["history"][step] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
        runs.append(run)
    return runs


def tensorboard_scalars(out_dir) -> dict:
    """{tag: [(step, value)]} as TensorBoard shows them (a resumed run's purge applied)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(Path(out_dir) / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_values(out_dir, key) -> list:
    return [(r["step"], r[key]) for r in rows(out_dir) if r.get(key) is not None]


def assert_same_scalars(events, logged, key):
    """TensorBoard's (step, value) pairs are metrics.jsonl's: the same steps, the values to fp32's precision."""
    assert logged, key
    assert [s for s, _ in events] == [s for s, _ in logged], key
    assert [v for _, v in events] == pytest.approx([v for _, v in logged], rel=1e-6), key


def loop_trainer(out, **kw):
    tokens = synthetic_tokens()
    gb = make_get_batch(tokens, 3)
    args = args_for(out, **{"max_steps": 8, "ckpt_every": 4, "eval_every": 4, "eval_batches": 2, **kw})
    return Trainer(tiny_model(0), args, loss_fn, gb, eval_fn=loss_eval_fn(loss_fn, gb, 2))


def crash_after(trainer, steps):
    """The trainer's run stops (KeyboardInterrupt) while drawing the batch of step steps + 1."""
    calls, get_batch = {"n": 0}, trainer.get_batch

    def dying(split, gen):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return get_batch(split, gen)

    trainer.get_batch = dying


def test_loop_reports_every_row_and_a_resume_after_a_crash_continues_one_wandb_run(tmp_path, offline_wandb):
    """Both trackers on the shared loop: killed at step 6 (checkpoint at 4), then resumed to 8. One
    wandb run (the same id in two offline folders) holds every step once, its values metrics.jsonl's
    (the resume replays bit for bit, so the crashed run's step 5 is the resumed one's); TensorBoard
    shows every step once, the crashed run's step 5 purged."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run-b"
    crashing = loop_trainer(out, report_to="wandb,tensorboard")
    crash_after(crashing, 5)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [r["step"] for r in rows(out) if "loss" in r][-1] == 5
    (first,) = wandb_runs(out)
    assert sorted(first["history"]) == [0, 1, 2, 3, 4, 5] and first["exit_code"] == 1  # finished as failed
    saved = json.loads((out / common.WANDB_RUN_FILE).read_text())
    assert saved == {"id": first["id"], "last_step": 5}

    result = loop_trainer(out, report_to="wandb,tensorboard", resume="latest").fit()
    assert result["step"] == 8
    first, second = wandb_runs(out)
    assert second["id"] == first["id"] == json.loads((out / common.WANDB_RUN_FILE).read_text())["id"]
    # the resumed process logged steps 5..8 to metrics.jsonl; step 5 was the crashed run's already
    assert sorted(second["history"]) == [6, 7, 8] and second["exit_code"] == 0
    assert (first["name"], first["project"]) == ("run-b", "tritongpt")  # --out-dir's name by default
    assert first["config"]["lr"] == 3e-3 and first["config"]["model"]["n_layer"] == 2
    history = {**first["history"], **second["history"]}
    for key in KEYS:
        logged = jsonl_values(out, key)
        assert logged and [(s, history[s][key]) for s, _ in logged] == logged, key
    assert [s for s, _ in jsonl_values(out, "loss")] == list(range(1, 9))

    scalars = tensorboard_scalars(out)
    for key in KEYS:
        assert_same_scalars(scalars[key], jsonl_values(out, key), key)
    assert "time" not in scalars and "step" not in scalars


def test_overwrite_starts_new_tracker_runs(tmp_path, offline_wandb):
    """--overwrite replaces the old run: a new wandb run id and a TensorBoard folder of the new run's steps only."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    loop_trainer(out, max_steps=3, report_to="wandb,tensorboard").fit()
    old = json.loads((out / common.WANDB_RUN_FILE).read_text())["id"]
    loop_trainer(out, max_steps=2, report_to="wandb,tensorboard", overwrite=True, run_name="again").fit()
    runs = wandb_runs(out)
    new = [r for r in runs if r["id"] != old]
    assert len(runs) == 2 and len(new) == 1 and new[0]["name"] == "again"
    assert json.loads((out / common.WANDB_RUN_FILE).read_text()) == {"id": new[0]["id"], "last_step": 2}
    assert [s for s, _ in tensorboard_scalars(out)["loss"]] == [1, 2]


def test_only_a_resume_continues_the_folders_wandb_run(tmp_path, offline_wandb):
    """A new run in a folder that holds a wandb run id but no run (one that failed before its first
    row) is a new wandb run, from step 0."""
    out = tmp_path / "run"
    out.mkdir()
    (out / common.WANDB_RUN_FILE).write_text(json.dumps({"id": "oldrun123", "last_step": 7}))
    loop_trainer(out, max_steps=2, report_to="wandb").fit()
    (run,) = wandb_runs(out)
    assert run["id"] != "oldrun123" and sorted(run["history"]) == [0, 1, 2]


def test_pretrain_cli_reports_to_tensorboard(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = ["--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1",
             "--sample-tokens", "0", "--report-to", "tensorboard"]
    assert main(["pretrain", *test_pretrain.argv(corpus, out, *flags)]) == 0
    scalars = tensorboard_scalars(out)
    for key in KEYS + ("tok_per_s", "mem_gb"):
        assert_same_scalars(scalars[key], jsonl_values(out, key), key)
    assert [s for s, _ in scalars["val_loss"]] == [0, 2, 4]
    assert "mfu" not in scalars  # None on a CPU: in the jsonl only
    assert not (out / "wandb").exists()


def test_rlhf_reports_to_wandb(tmp_path, offline_wandb):
    trainer = _tiny_rl_trainer(tmp_path / "rl", log=True, iterations=2, eval_every=1, report_to="wandb",
                               run_name="ppo-tiny", wandb_project="rl-tests")
    trainer.fit()
    (run,) = wandb_runs(tmp_path / "rl")
    assert (run["name"], run["project"], run["exit_code"]) == ("ppo-tiny", "rl-tests", 0)
    assert run["config"]["trainer"] == "rlhf-ppo" and run["config"]["iterations"] == 2
    assert sorted(run["history"]) == [0, 1, 2]
    for key in ("reward", "kl", "policy_loss", "value_loss", "eval_reward", "eval_kl"):
        logged = jsonl_values(tmp_path / "rl", key)
        assert logged and [(s, run["history"][s][key]) for s, _ in logged] == logged, key


def test_sft_reports_its_rows_before_and_after_training(tmp_path):
    """SFT logs the exact match of the model before training (step 0) and after (the last step) outside
    the Trainer's fit: both reach the trackers too."""
    pytest.importorskip("tensorboard")
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train import sft

    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(8)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    sft.run_sft(model, CharTokenizer(), recs[:6], [], recs[6:], train_args(tmp_path, max_steps=2,
                                                                             report_to="tensorboard"),
                max_new_tokens=2, eval_before=True, sample=False, template=lambda r: r["instruction"])
    scalars = tensorboard_scalars(tmp_path)
    assert_same_scalars(scalars["test_exact_match"], jsonl_values(tmp_path, "test_exact_match"), "test_exact_match")
    assert [s for s, _ in scalars["test_exact_match"]] == [0, 2]
    assert_same_scalars(scalars["loss"], jsonl_values(tmp_path, "loss"), "loss")


# -- flags and errors ----------------------------------------------------------------------------------------
TRAINERS = ("pretrain", "sft", "reward", "dpo", "kto", "rlhf")


@pytest.mark.parametrize("command", TRAINERS)
def test_every_trainer_takes_the_tracking_flags(command):
    arg_type = RLArgs if command == "rlhf" else TrainArgs
    parse = build_parser().parse_args
    required = ["--init", "runs/x"] if command == "sft" else []
    a = arg_type.from_namespace(parse([command, *required]))
    assert (a.report_to, a.run_name, a.wandb_project) == ("none", None, "tritongpt")
    a = arg_type.from_namespace(parse([command, *required, "--report-to", "wandb,tensorboard", "--run-name", "r1",
                                       "--wandb-project", "p"]))
    assert (a.report_to, a.run_name, a.wandb_project) == ("wandb,tensorboard", "r1", "p")


@pytest.mark.parametrize("text,names", [("none", ()), ("wandb", ("wandb",)), (" tensorboard ", ("tensorboard",)),
                                        ("wandb,tensorboard", ("wandb", "tensorboard")),
                                        ("tensorboard,wandb,tensorboard", ("tensorboard", "wandb"))])
def test_report_to_names(text, names):
    assert common.parse_report_to(text) == names


@pytest.mark.parametrize("text", ["mlflow", "wandb,mlflow", "none,wandb", ",", "all"])
def test_an_unknown_tracker_is_a_user_error(text):
    with pytest.raises(UserError, match="--report-to takes none, wandb, tensorboard"):
        common.parse_report_to(text)
    with pytest.raises(UserError, match="--report-to"):
        RLArgs(report_to=text).validate()


@pytest.mark.parametrize("command,tracker,modules", [
    ("pretrain", "wandb", ["wandb"]),
    ("rlhf", "tensorboard", ["tensorboard", "torch.utils.tensorboard"]),  # torch's module may be imported already
])
def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command, tracker,
                                                               modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    out = tmp_path / "run"
    extra = ["--reward", "exact"] if command == "rlhf" else []
    assert main([command, "--out-dir", str(out), "--device", "cpu", "--report-to", tracker, *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --report-to {tracker} needs the {tracker} package, which is not installed: " \
                  f"pip install {tracker}\n"
    assert not out.exists()  # nothing was written: no tokenizer, no metrics


def test_only_the_main_process_reports(tmp_path, monkeypatch):
    """Under torchrun the other ranks neither need the package nor write or send anything."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("RANK", "1")
    assert common.check_report_to("wandb") == ("wandb",)
    log = common.MetricsLog(tmp_path / "metrics.jsonl", enabled=False,
                            trackers=common.Trackers(("wandb",), tmp_path))
    log.log(step=1, loss=2.0)
    log.close()
    assert log.trackers is None and list(tmp_path.iterdir()) == []


def test_tracked_values_are_the_rows_numbers():
    row = {"step": 3, "time": 1.5, "loss": 2.0, "skipped": True, "mfu": None, "name": "x", "n": 4}
    assert common.tracked_values(row) == {"loss": 2.0, "skipped": 1.0, "n": 4.0}
