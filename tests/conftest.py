import os
import sys

# No network in tests (netguard.py): installed before anything imports a client. huggingface_hub and datasets read
# their offline switches once, at import: a model or dataset a test fakes is then never looked for on the Hub.
_NETGUARD = os.path.join(os.path.dirname(__file__), "netguard")
sys.path.insert(0, _NETGUARD)
import netguard  # noqa: E402

netguard.install(owner=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
# the processes the tests start run netguard/sitecustomize.py (and log what they tried to netguard's file)
os.environ["PYTHONPATH"] = os.pathsep.join([_NETGUARD] + [p for p in [os.environ.get("PYTHONPATH")] if p])

# Triton reads TRITON_INTERPRET once, at import: set it before anything imports triton.
import tritongpt  # noqa: F401  (sets TRITON_INTERPRET=1 when there is no GPU)

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# At most 2 intra-op threads, and under pytest-xdist the cores shared among its workers: with -n 2 on 2 cores, two
# threads a worker spin against each other (measured: the same tests ~10% slower than at one thread a worker).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_network():
    """A test that tried the network fails, even where the client (or the package: hub_datasets falls back to the
    Hub cache on any error) swallowed the guard's error, and where a process the test started tried it."""
    mark = netguard.mark()
    yield
    tried = netguard.tried_since(mark)
    if tried:
        pytest.fail("\n".join(tried), pytrace=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean slate: torch.compile keeps compiled frames per code object
    (GPTModel.forward...) for the life of the process, and after 8 models' guards fail a
    fullgraph compile in a later test of the same worker hits the recompile limit."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU through Triton's interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: two OpenMP threads spin against each other and
    make a step several times slower than one thread does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-layer model of the embedded tokenizer's vocabulary (the tiny preset, context 32) saved as a file, one a
    test module: what the commands' tests (generate, quantize, beam search, CUDA graphs, the int8 cache) load."""
    from tritongpt.model.config import GPTConfig, get_config
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    GPTModel(GPTConfig(**{**get_config("tiny").to_dict(), "n_layer": 1, "context_length": 32})).save(path)
    return path


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """torch.empty / empty_like give NaN-filled float tensors for the test: a result read from a
    buffer nothing wrote then fails, where memory that happened to hold zeros would pass."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def poisoned(*a, _real=real, **kw):
            out = _real(*a, **kw)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(torch, name, poisoned)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A slice of the embedded corpus as a text file, and a small BPE trained on it (for pretrain
    runs in tests: parity.pretrain_argv)."""
    from types import SimpleNamespace

    from tritongpt.train.data import load_text
    from tritongpt.train.tokenizer import BPETokenizer

    d = tmp_path_factory.mktemp("corpus")
    text = load_text("pydoc")[:16000]
    (d / "small.txt").write_text(text)
    BPETokenizer.train(text, 300, name="small").save(d / "tok.json")
    return SimpleNamespace(text=d / "small.txt", tok=d / "tok.json", cache=d / "cache")


@pytest.fixture
def forced_splits(monkeypatch):
    """force(n): every attention forward without dropout runs n KV splits (1: the single pass, _attn_fwd), as
    _num_splits never chooses under the interpreter; returns {"launches": split-path launches so far}."""
    from tritongpt.kernels import attention

    state = {"launches": 0}
    launch = attention._fwd_split_launch

    def counted(*args):
        state["launches"] += 1
        return launch(*args)

    monkeypatch.setattr(attention, "_fwd_split_launch", counted)

    def force(n):
        monkeypatch.setattr(attention, "_num_splits", lambda B, H, Tq, Tk, device: n)
        return state

    return force


@pytest.fixture(scope="session")
def hf_copy(tmp_path_factory):
    """hf_copy(build, to, *args, **kw): the folder build(folder, *args, **kw) saves (a family test's tiny random
    transformers model; the builders seed themselves and return (model, weights file)) copied into `to`. -> the
    weights file's copy in `to`. Built once a worker for each build and arguments: a refusal test edits its own
    copy's config.json and needs no model of its own (building and saving one is most of such a test's time,
    repeated for each of its dozen cases). A build that fails is not kept: the next test builds again."""
    import shutil

    built = {}

    def copy(build, to, *args, **kw):
        key = (build.__module__, build.__qualname__, repr(args), repr(sorted(kw.items())))
        if key not in built:  # (recorded once built: a half-saved folder would be every later test's model)
            folder = tmp_path_factory.mktemp("hf")
            built[key] = folder, build(folder, *args, **kw)[1].name
        folder, name = built[key]
        shutil.copytree(folder, to, dirs_exist_ok=True)
        return to / name

    return copy
