"""A model folder's named chat templates (train/chat_template.py templates_from_config, template_name): a
"default" one and a "tool_use" one (Hermes-2-Pro's, Command-R's), in tokenizer_config.json's list or as
transformers >= 4.43 saves them (chat_template.jinja and additional_chat_templates/<name>.jinja). A chat with tools
renders in "tool_use", as transformers' apply_chat_template and vLLM pick it; one without, in "default"; serve, the
run's tokenizer and export keep both. On the tiny instruct folder of test_chat_template (nothing downloaded)."""
import copy
import json
import shutil

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.train.chat_template import render, tool_prompt, turn_end_id
from tritongpt.train.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

from test_chat_template import CHATML, chat_folder  # noqa: E402

# tool_use: a tools line, tool calls and results, and turns ended by <|eot_id|> (default's: <|im_end|>), so that
# which template rendered a prompt, and which end stops its answer, can be seen
TOOL_USE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools:' }}{%- for tool in tools %}{{- ' ' + tool.function.name }}"
    "{%- endfor %}{{- '<|eot_id|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>tool\\n' + message.content + '<|eot_id|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}{{- call.function.name + (call.function.arguments | tojson) }}"
    "{%- endfor %}{{- '<|eot_id|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
USER = [{"role": "user", "content": "the cat sat"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """transformers' own save of the two templates: chat_template.jinja and additional_chat_templates/tool_use.jinja
    (-> folder, transformers' tokenizer)."""
    path, theirs, _ = chat_folder(tmp_path_factory.mktemp("named") / "hermes", {"default": CHATML,
                                                                              "tool_use": TOOL_USE}, "<|im_end|>")
    assert (path / "additional_chat_templates" / "tool_use.jinja").is_file()
    return path, theirs


def hf_text(theirs, messages, **kw):
    return theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)


def test_tools_render_in_tool_use_and_a_chat_without_them_in_default(folder, tmp_path):
    """Both layouts (jinja files; tokenizer_config.json's list): with tools, tool_use's text; without, default's,
    each transformers' own; a tool_use template that ignores the tools is refused (the check renders the template
    that renders the prompt, not the default one)."""
    path, theirs = folder
    listed = shutil.copytree(path, tmp_path / "listed")
    shutil.rmtree(listed / "additional_chat_templates")
    (listed / "chat_template.jinja").unlink()
    cfg = json.loads((listed / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOL_USE}]
    (listed / "tokenizer_config.json").write_text(json.dumps(cfg))
    for source in (path, listed):
        tok = get_tokenizer(source)
        with_tools = render(tok, USER, True, tools=TOOLS)
        assert with_tools == hf_text(theirs, USER, tools=TOOLS) and "# Tools: add<|eot_id|>" in with_tools
        assert render(tok, USER, True) == hf_text(theirs, USER) and "<|im_end|>" in render(tok, USER, True)
        assert tool_prompt(tok, USER, TOOLS) == with_tools
        assert tok.chat_template == CHATML and tok.chat_templates == {"tool_use": TOOL_USE}
        assert turn_end_id(tok) == tok.special_tokens["<|im_end|>"]
        assert turn_end_id(tok, "tool_use") == tok.special_tokens["<|eot_id|>"]
    # (the check renders the template the prompt is in: without tools, tool_use's text would differ from default's)
    blind = copy.copy(tok)
    blind.chat_templates = {"tool_use": "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"}
    with pytest.raises(UserError, match="renders no tools"):
        tool_prompt(blind, USER, TOOLS)


def test_a_named_template_that_is_no_string_or_does_not_compile_is_named(folder, tmp_path):
    path, _ = folder
    broken = shutil.copytree(path, tmp_path / "broken")
    (broken / "additional_chat_templates" / "tool_use.jinja").write_text("{% for m in messages %}")
    with pytest.raises(UserError, match=rf"the chat template 'tool_use' in {broken}/additional_chat_templates/"
                                        r"tool_use.jinja is not valid Jinja \(line 1"):
        get_tokenizer(broken)
    from tritongpt.train.chat_template import templates_from_config
    from tritongpt.train.tokenizer import load_tokenizer

    get_tokenizer(path).save(tmp_path / "tokenizer.json")  # (a run's: the named ones in its field of their own)
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**d, "chat_templates": {"tool_use": 3}}))
    with pytest.raises(UserError, match="field 'chat_templates': chat template 'tool_use' must be a Jinja string"):
        load_tokenizer(tmp_path / "tokenizer.json")

    named = {"chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": 3}]}
    with pytest.raises(UserError, match="cfg.json: chat template 'tool_use' must be a Jinja string, got int"):
        templates_from_config(named, "cfg.json")


def test_the_files_come_before_tokenizer_config_json_as_transformers_reads_them(folder, tmp_path):
    """A folder with chat_template.jinja and a chat_template in tokenizer_config.json: transformers >= 4.43 renders
    the file's. The Hub fetch asks for a tool_use template file too."""
    from tritongpt.train.gpt2_weights import HUB_FILES

    assert "additional_chat_templates/tool_use.jinja" in HUB_FILES  # (a Hub repo's, fetched where it has one)
    path, _ = folder
    both = shutil.copytree(path, tmp_path / "both")
    shutil.rmtree(both / "additional_chat_templates")
    cfg = json.loads((both / "tokenizer_config.json").read_text())
    (both / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TOOL_USE}))
    theirs = transformers.AutoTokenizer.from_pretrained(both)
    assert theirs.chat_template == CHATML
    assert get_tokenizer(both).chat_template == CHATML


def test_the_hub_fetch_brings_every_named_template_it_lists(folder, tmp_path, monkeypatch):
    """A Hub repo's additional_chat_templates/*.jinja, as the Hub lists them (list_repo_tree, as transformers'
    list_repo_templates asks): a "rag" one is fetched beside tool_use and read as transformers reads the folder.
    Where the Hub does not list them (a 404: no such folder), the fixed tool_use name is asked for, as before. Where
    it cannot be reached (offline, after huggingface_hub's ~24 s of retries), the cache alone is read: no file it
    lacks waits for the network again, and an earlier fetch's templates are all there."""
    import huggingface_hub
    from test_hf_tokenizer import EntryNotFoundError, fake_hub

    from tritongpt.train.gpt2_weights import TEMPLATE_DIR, hub_folder

    path, _ = folder
    rag = "{% for m in messages %}[doc] {{ m.content }}<|im_end|>{% endfor %}"
    repo = shutil.copytree(path, tmp_path / "hub" / "someone" / "hermes")
    (repo / "additional_chat_templates" / "rag.jinja").write_text(rag)
    fetched, _ = fake_hub(monkeypatch, tmp_path / "hub", tmp_path / "cache")
    got = hub_folder("someone/hermes")
    assert {"additional_chat_templates/rag.jinja", "additional_chat_templates/tool_use.jinja"} <= {f for _, f in fetched}
    assert get_tokenizer(got).chat_templates == {"rag": rag, "tool_use": TOOL_USE}
    assert transformers.AutoTokenizer.from_pretrained(got).chat_template == {"default": CHATML, "rag": rag,
                                                                              "tool_use": TOOL_USE}

    def offline(*a, **kw):
        raise ConnectionError("offline")

    def unlisted(*a, **kw):
        raise EntryNotFoundError(TEMPLATE_DIR)

    download, waited = huggingface_hub.hf_hub_download, []

    def unreachable(repo, filename, cache_dir=None, local_files_only=False):
        # (hf_hub_download with no network: a cached file at once; one not in the cache after ~24 s of retries)
        if not local_files_only and not (tmp_path / "cache" / repo / filename).is_file():
            waited.append(filename)
        return download(repo, filename, cache_dir, local_files_only=True)

    fetched.clear()
    monkeypatch.setattr(huggingface_hub, "list_repo_tree", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    got = hub_folder("someone/hermes")
    assert waited == [] and fetched == []
    assert get_tokenizer(got).chat_templates == {"rag": rag, "tool_use": TOOL_USE}
    monkeypatch.setattr(huggingface_hub, "list_repo_tree", unlisted)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    shutil.rmtree(tmp_path / "cache")
    got = hub_folder("someone/hermes")
    assert "additional_chat_templates/tool_use.jinja" in {f for _, f in fetched}
    assert get_tokenizer(got).chat_templates == {"tool_use": TOOL_USE}  # (rag: not asked for by name)


def test_serve_renders_a_chat_with_tools_in_tool_use_and_stops_at_its_turn_end(folder):
    """/tokenize and /v1/chat/completions with tools: transformers' apply_chat_template(tools=)'s ids (tool_use's;
    tools [] pick it too), the answer stopped at tool_use's end of turn; without tools, default's. --chat-template
    (vLLM's override) renders every chat, tools or not. /tokenizer_info shows both templates, name -> text, as
    transformers holds them (and vLLM's TokenizerInfo returns its init_kwargs' chat_template); --chat-template's
    one, a string."""
    from test_serve import call, start

    path, theirs = folder
    eot = theirs.convert_tokens_to_ids("<|eot_id|>")
    server = start(path, "--kernels", "reference", "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, info = call(server, "/tokenizer_info")
        assert status == 200 and info["chat_template"] == {"default": CHATML, "tool_use": TOOL_USE}, info
        assert info["chat_template"] == theirs.chat_template == theirs.init_kwargs["chat_template"]
        status, body = call(server, "/tokenize", {"messages": USER, "tools": TOOLS})
        assert status == 200, body
        want = theirs.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True, return_dict=False)
        assert body["tokens"] == want
        status, body = call(server, "/tokenize", {"messages": USER})
        assert body["tokens"] == theirs.apply_chat_template(USER, add_generation_prompt=True, return_dict=False)
        # (tools [] are tools given: tool_use's ids, as the chat completion below is prompted, not default's)
        empty = theirs.apply_chat_template(USER, tools=[], add_generation_prompt=True, return_dict=False)
        assert empty != body["tokens"] and call(server, "/tokenize", {"messages": USER, "tools": []})[1]["tokens"] \
            == empty
        # (tools [] with tool_choice "none": the tools still given, tool_use's; "required" of none: a 400)
        for tools, n, choice in ((TOOLS, len(want), "none"), ([], len(empty), "none")):
            # (<|eot_id|> drawn first: tool_use's end of turn stops the answer there)
            status, body = call(server, "/v1/chat/completions", {"messages": USER, "tools": tools, "max_tokens": 3,
                                                                 "tool_choice": choice, "logit_bias": {str(eot): 100}})
            assert status == 200, body
            assert body["usage"]["prompt_tokens"] == n
            assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
        status, body = call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 3,
                                                             "logit_bias": {str(eot): 100}})
        assert body["choices"][0]["finish_reason"] == "length"  # (default's turns end at <|im_end|>)
        # a request's chat template, a name too (chat_template_kwargs' one is apply_chat_template's argument, which
        # picks the template: it was taken as a variable, and ignored): refused, as vLLM refuses it without
        # --trust-request-chat-template, naming --chat-template
        for where, asked in (("/v1/chat/completions", {"chat_template": "tool_use"}),
                             ("/v1/chat/completions", {"chat_template_kwargs": {"chat_template": "tool_use"}}),
                             ("/tokenize", {"chat_template_kwargs": {"chat_template": "tool_use"}})):
            status, body = call(server, where, {"messages": USER, **asked})
            assert status == 400 and "--trust-request-chat-template" in body["error"]["message"] and \
                "--chat-template FILE" in body["error"]["message"], (where, body)
    finally:
        server.shutdown()
        server.server_close()
    server = start(path, "--kernels", "reference", "--max-batch", "1", "--chat-template", CHATML)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, body = call(server, "/tokenize", {"messages": USER, "tools": TOOLS})
        assert status == 400 and "renders no tools" in body["error"]["message"], body
        assert call(server, "/tokenizer_info")[1]["chat_template"] == CHATML
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_and_its_export_keep_both_templates(folder, tmp_path, capsys):
    """The run's tokenizer.json keeps the named templates, and export writes them as transformers reads them: the
    exported folder renders a chat with tools (and without) as the source does."""
    from tritongpt import cli
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.tokenizer import load_tokenizer

    path, theirs = folder
    run = tmp_path / "run"
    (run / "ckpt-0000001").mkdir(parents=True)
    get_tokenizer(path).save(run / "tokenizer.json")
    tok = load_tokenizer(run / "tokenizer.json")
    assert tok.chat_template == CHATML and tok.chat_templates == {"tool_use": TOOL_USE}
    torch.manual_seed(0)
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=16, n_layer=1, n_head=2)).save(
        run / "ckpt-0000001" / "model.safetensors")
    torch.save({"step": 1, "prompt_format": "chat"}, run / "ckpt-0000001" / "state.pt")
    # (a folder's earlier named template files: read before tokenizer_config.json, so replaced as the rest is)
    (tmp_path / "hf" / "additional_chat_templates").mkdir(parents=True)
    (tmp_path / "hf" / "additional_chat_templates" / "rag.jinja").write_text("{{ messages }}")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf")]) != 0
    assert "already holds additional_chat_templates: pass --overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for kw in ({"tools": TOOLS}, {}):
        assert hf_text(exported, USER, **kw) == hf_text(theirs, USER, **kw)
    assert get_tokenizer(tmp_path / "hf").chat_templates == {"tool_use": TOOL_USE}


def test_serve_chat_template_takes_a_named_template_by_name(folder):
    """serve --chat-template NAME: the tokenizer's template of that name, as transformers' apply_chat_template
    (chat_template=NAME) takes it (vLLM's flag reads a file or a template only), rendering every chat, tools or not;
    /tokenizer_info shows it. A name the tokenizer has no template of is refused, naming those it has; a tokenizer
    with no named templates takes none (transformers would render the name as the template's text)."""
    from test_serve import call, start

    from tritongpt.train import serve

    path, theirs = folder
    server = start(path, "--kernels", "reference", "--max-batch", "1", "--chat-template", "tool_use")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, body = call(server, "/tokenize", {"messages": USER})
        assert status == 200, body
        want = theirs.apply_chat_template(USER, chat_template="tool_use", add_generation_prompt=True,
                                          return_dict=False)
        assert body["tokens"] == want != theirs.apply_chat_template(USER, add_generation_prompt=True,
                                                                    return_dict=False)
        assert call(server, "/tokenizer_info")[1]["chat_template"] == TOOL_USE
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(UserError, match=r"--chat-template 'rag': no such file, not a template .*, and not the name "
                                        r"of one of the tokenizer's templates \(it has 'default', 'tool_use'\)"):
        start(path, "--kernels", "reference", "--chat-template", "rag")
    tok = get_tokenizer(path)
    assert serve.chat_template_arg("default", tok) == CHATML and serve.chat_template_arg("tool_use") is None
    tok.chat_templates = None
    with pytest.raises(UserError, match=r"'default': .* tokenizer's templates \(it names none\)"):
        serve.chat_template_arg("default", tok)
