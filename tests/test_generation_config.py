"""serve --generation-config (vLLM's): a Hugging Face folder's generation_config.json gives the requests' default
sampling settings (a field a request leaves out or null), its max_new_tokens caps every answer, and its
eos_token_id list ends answers beside the tokenizer's EOS (stop_reason the id, as vLLM's stop ids); `vllm` takes no
defaults, a folder its own file, --override-generation-config overrides them; bad values refused at start, naming
the file or flag."""
import json
import shutil

import pytest

from tritongpt import cli
from tritongpt.errors import UserError

from test_serve import call, start

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")

USER = [{"role": "user", "content": "the cat sat"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_chat_template import CHATML, chat_folder

    path, theirs, _ = chat_folder(tmp_path_factory.mktemp("genconf") / "qwen", CHATML, "<|im_end|>")
    return path, theirs


def served(path, *flags):
    server = start(path, "--kernels", "reference", *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    return server


def stop(server):
    server.shutdown()
    server.server_close()


def ids_of(body):
    """The answer's token ids (return_tokens_as_token_ids' "token_id:N")."""
    return [int(t["token"].split(":")[1]) for t in body["choices"][0]["logprobs"]["content"]]


def test_the_folders_defaults_end_tokens_and_cap(folder, tmp_path):
    path, theirs = folder
    model = tmp_path / "model"
    shutil.copytree(path, model)
    plain = served(model, "--generation-config", "vllm")
    try:  # the greedy answer's ids, with no generation_config defaults
        greedy = dict(messages=USER, temperature=0, max_tokens=12, logprobs=True, return_tokens_as_token_ids=True)
        status, body = call(plain, "/v1/chat/completions", greedy)
        assert status == 200 and plain.app.defaults == {}
        answer = ids_of(body)
    finally:
        stop(plain)
    end = next(t for t in answer[2:] if t != theirs.convert_tokens_to_ids("<|im_end|>"))
    cut = answer.index(end)  # (its first place)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({
        **config, "eos_token_id": [config["eos_token_id"], end], "temperature": 0.0, "top_k": 0,
        "max_new_tokens": 40}))
    server = served(model)
    try:
        assert server.app.defaults == {"temperature": 0.0, "max_tokens": 40} and server.app.ends_too[-1] == end
        # no temperature: greedy (the folder's); the answer ends at `end`, vLLM's stop_reason its id
        status, body = call(server, "/v1/chat/completions", {**greedy, "temperature": None, "max_tokens": None})
        assert status == 200 and ids_of(body) == answer[:cut + 1]
        assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == end
        # ignore_eos: the end tokens all ignored; max_tokens above the folder's 40 is cut to it
        status, body = call(server, "/v1/chat/completions", {"messages": USER, "ignore_eos": True,
                                                             "max_tokens": 60})
        assert status == 200 and body["usage"]["completion_tokens"] == 40
        # a request's own setting wins (sampled: its seed's text, not the greedy one, for at least one seed)
        texts = {call(server, "/v1/chat/completions", {"messages": USER, "temperature": 1.5, "seed": s,
                                                       "max_tokens": 6, "ignore_eos": True})[1]["choices"][0][
            "message"]["content"] for s in range(3)}
        assert len(texts) > 1
        # min_tokens past the folder's cap: a 400 naming it (vLLM's SamplingParams), not silently cut to 40
        status, body = call(server, "/v1/chat/completions", {"messages": USER, "min_tokens": 41})
        assert status == 400 and body["error"]["param"] == "min_tokens" and "40" in body["error"]["message"]
    finally:
        stop(server)
    # --override-generation-config over the file; --generation-config FOLDER: that folder's file
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "repetition_penalty": 1.1,
                                                              "eos_token_id": 3}))
    for flags, want, ends in ((["--override-generation-config", '{"temperature": 0.7}'],
                               {"temperature": 0.7, "max_tokens": 40}, end),
                              (["--generation-config", str(other)], {"top_p": 0.5, "repetition_penalty": 1.1}, 3),
                              (["--generation-config", "vllm", "--override-generation-config", '{"top_k": 5}'],
                               {"top_k": 5}, end)):
        server = served(model, *flags)
        try:  # (the end tokens: the file read's, vLLM's try_get_generation_config; vllm mode the model's)
            assert server.app.defaults == want and server.app.ends_too[-1] == ends
        finally:
            stop(server)


def test_bad_generation_configs_are_refused_at_start_by_name(folder, tmp_path, capsys):
    path, _ = folder
    model = tmp_path / "model"
    shutil.copytree(path, model)
    config = json.loads((model / "generation_config.json").read_text())
    base = ["serve", "--weights", str(model), "--port", "0", "--device", "cpu", "--kernels", "reference"]
    cases = [({"temperature": -1}, [], "generation_config.json: temperature must be a finite number >= 0"),
             ({"temperature": 3}, [], "generation_config.json: temperature must be in [0, 2]"),
             ({"top_p": 0}, [], "generation_config.json: top_p must be in (0, 1]"),
             ({"max_new_tokens": 0}, [], "generation_config.json: max_new_tokens must be a positive integer"),
             ({"eos_token_id": [2, 10 ** 6]}, [], "eos_token_id must be token ids of the model's"),
             ({}, ["--override-generation-config", '{"seed": 1}'], "--override-generation-config: 'seed' is not "
                                                                    "taken"),
             ({}, ["--override-generation-config", "[1]"], "--override-generation-config must be a JSON object"),
             ({}, ["--override-generation-config", "{temperature: 0}"],  # not JSON: named too, not a traceback
              "--override-generation-config must be a JSON object, got '{temperature: 0}' (Expecting property name"),
             ({}, ["--override-generation-config", '{"min_p": 2}'], "--override-generation-config: min_p must be"),
             ({}, ["--generation-config", str(tmp_path)], "no generation_config.json there")]
    for extra, flags, said in cases:
        (model / "generation_config.json").write_text(json.dumps({**config, **extra}))
        assert cli.main([*base, *flags]) == 2, (extra, flags)
        err = capsys.readouterr().err
        assert said in err, (extra, flags, err)
    with pytest.raises(UserError, match="top_k must be a positive integer"):
        from tritongpt.train.serve import generation_config, override_generation_config

        generation_config(type("A", (), {"weights": None, "tokenizer": None, "generation_config": "vllm"})(), None, 10,
                          override_generation_config('{"top_k": 2.5}'))


def test_a_bad_override_is_not_told_to_use_vllm_which_keeps_it():
    """--generation-config vllm drops the file's defaults, not the override's: only a bad file's refusal suggests it."""
    from tritongpt.train.serve import generation_config, override_generation_config

    args = type("A", (), {"weights": None, "generation_config": "vllm"})()
    with pytest.raises(UserError) as e:
        generation_config(args, None, 10, override_generation_config('{"top_p": 0}'))
    assert str(e.value).startswith("--override-generation-config: top_p") and "vllm" not in str(e.value)


def test_a_response_says_the_temperature_and_top_p_it_was_drawn_with(folder):
    """/v1/responses' object echoes temperature and top_p as drawn: the --generation-config default where the request
    leaves them out (vLLM's from_request reads its sampling params), the request's own where it gives them."""
    path, _ = folder
    server = served(path, "--generation-config", "vllm", "--override-generation-config",
                    '{"temperature": 0.5, "top_p": 0.75}')
    try:
        status, body = call(server, "/v1/responses", {"input": "the cat", "max_output_tokens": 1})
        assert status == 200 and (body["temperature"], body["top_p"]) == (0.5, 0.75), body
        status, body = call(server, "/v1/responses", {"input": "the cat", "max_output_tokens": 1, "temperature": 0.25,
                                                      "top_p": None})
        assert status == 200 and (body["temperature"], body["top_p"]) == (0.25, 0.75), body
    finally:
        stop(server)


def test_a_run_reads_no_other_folders_file(folder, tmp_path):
    """A run's checkpoint (no generation_config.json beside it) takes nothing from the folder its tokenizer was
    once read from (the tokenizer's recorded source): vLLM reads the model's folder alone; so does --tokenizer
    elsewhere. --pretrained's own tokenizer (its Hub snapshot, the model's folder) is read."""
    from tritongpt.train.serve import generation_config

    path, _ = folder
    tok = type("T", (), {"info": {"source": str(path)}})()
    run = tmp_path / "run"
    run.mkdir()
    args = type("A", (), {"weights": str(run / "ckpt.pt"), "tokenizer": None, "generation_config": "auto"})()
    assert generation_config(args, tok, 10 ** 6, {}) == ({}, [])
    args.weights, args.tokenizer = None, str(path)  # (--pretrained with --tokenizer elsewhere)
    assert generation_config(args, tok, 10 ** 6, {}) == ({}, [])
    args.tokenizer = None  # (--pretrained: the snapshot's tokenizer and file)
    assert generation_config(args, tok, 10 ** 6, {})[1] != []


def test_the_override_unsets_a_files_setting(tmp_path):
    """--override-generation-config's null, and top_k 0 or -1 (transformers' and vLLM's "none"), unset the file's
    setting (vLLM's: config.update(override), then its None values dropped), rather than being refused or
    leaving the file's top_k on."""
    from tritongpt.train.serve import generation_config, override_generation_config

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 20,
                                                                  "max_new_tokens": 30}))
    args = type("A", (), {"weights": str(tmp_path), "tokenizer": None, "generation_config": "auto"})()
    for text, want in (('{"top_k": 0}', {"temperature": 0.7, "max_tokens": 30}),
                       ('{"top_k": -1, "temperature": null}', {"max_tokens": 30}),
                       ('{"max_new_tokens": null}', {"temperature": 0.7, "top_k": 20})):
        assert generation_config(args, None, 10, override_generation_config(text))[0] == want, text


def test_a_requests_top_k_0_or_minus_1_lifts_the_files_top_k():
    """vLLM's top_k 0 ("disable", its preferred) or -1 in a request: every token, over generation_config's top_k
    (a request's own setting wins); out or null: the file's."""
    from tritongpt.train.serve import sampling_settings

    for top_k, want in ((0, None), (-1, None), (None, 20), (5, 5)):
        body = {"prompt": "a"} if top_k is None else {"prompt": "a", "top_k": top_k}
        assert sampling_settings(body, "completions", ("m",), None, {"top_k": 20})["top_k"] == want, top_k
    beam = {"prompt": "a", "use_beam_search": True, "n": 2, "top_k": 0}  # (every token: nothing a search changes)
    assert sampling_settings(beam, "completions", ("m",))["beam"] is not None


def test_a_beam_search_takes_the_default_repetition_penalty_and_start_says_it_takes_no_temperature(folder, capsys):
    """A beam search takes the defaults it applies (repetition_penalty: transformers' takes the model's too), not
    the sampling ones, said once at start (vLLM's search takes the temperature; ours ranks raw log-probabilities):
    a request without the field is the one that sends the default, not the one without any penalty."""
    path, _ = folder
    server = served(path, "--generation-config", "vllm", "--override-generation-config",
                    '{"temperature": 0.5, "repetition_penalty": 1.8}')
    try:
        assert "use_beam_search requests do not take the default temperature" in capsys.readouterr().err
        beams = {}
        for penalty in (None, 1.8, 1.0):
            body = {"prompt": "the cat sat", "max_tokens": 8, "n": 2, "use_beam_search": True}
            status, out = call(server, "/v1/completions", {**body, "repetition_penalty": penalty})
            assert status == 200, out
            beams[penalty] = [c["text"] for c in out["choices"]]
        assert beams[None] == beams[1.8] != beams[1.0]
    finally:
        stop(server)


def test_without_a_generation_config_json_config_jsons_eos_token_id_ends_answers(tmp_path):
    """A model folder without generation_config.json: its config.json's eos_token_id is the generation config's
    (vLLM's try_get_generation_config falls back to GenerationConfig.from_model_config, transformers' generate too),
    so its ids end answers beside the tokenizer's EOS, under auto and vllm; generation_config.json wins where there
    is one."""
    from tritongpt.train.serve import generation_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [5, 7]}))
    args = type("A", (), {"weights": str(tmp_path), "tokenizer": None, "generation_config": "auto"})()
    assert generation_config(args, None, 10, {}) == ({}, [5, 7])
    args.generation_config = "vllm"
    assert generation_config(args, None, 10, {}) == ({}, [5, 7])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert generation_config(args, None, 10, {}) == ({}, [3])
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 70]}))
    with pytest.raises(UserError, match=r"config.json: eos_token_id must be token ids of the model's 10"):
        generation_config(args, None, 10, {})


def test_an_end_token_in_a_padded_vocabularys_padding_is_left_out(tmp_path):
    """A model whose vocabulary is padded past its tokenizer's (only the tokenizer's ids are drawn): an eos_token_id
    in the padding is never drawn, so it ends nothing and is left out, by serve and by the commands
    (commands.model_end_ids), rather than refusing the folder; one past the model's vocabulary is refused."""
    from tritongpt.commands import model_end_ids
    from tritongpt.train.serve import generation_config

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 12]}))
    args = type("A", (), {"weights": str(tmp_path), "tokenizer": None, "generation_config": "auto"})()
    model = type("M", (), {"config": type("C", (), {"vocab_size": 16})()})()
    assert generation_config(args, None, 16, {}, limit=10) == ({}, [5])
    assert model_end_ids(args, None, model, 10, None) == [5] and model_end_ids(args, None, model, 10, 5) == []
    assert model_end_ids(args, None, model, None, 0) == [5, 12]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 16]}))
    with pytest.raises(UserError, match=r"config.json: eos_token_id must be token ids of the model's 16"):
        model_end_ids(args, None, model, 10, None)
