"""_common.launch_tuned: an autotuned kernel's search runs once per key, later launches skip Triton's Autotuner, and
a key first met inside a CUDA-graph capture launches untimed. Driven on the CPU with a toy kernel whose output says
which config ran, and the stand-in timer of autotune_stub (the GPU kernels' own launchers are tested through it in
test_layernorm.py and test_cross_entropy.py)."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from tritongpt.kernels._common import launch_tuned

BLOCKS = (8, 16, 32, 64)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # read before a test pretends to capture


def _not_eight(configs, named_args, **kwargs):
    """The toy's prune: drops the first config, so "the first config left by the prune" is BLOCKS[1]."""
    return [c for c in configs if c.kwargs["BLOCK"] != 8]


@triton.autotune([triton.Config({"BLOCK": b}, num_warps=1) for b in BLOCKS], key=["N_KEY"],
                 prune_configs_by={"early_config_prune": _not_eight})
@triton.jit
def _which_block(X, Out, N, N_KEY, BLOCK: tl.constexpr):
    """Out = 2 X + BLOCK: every element says which config the launch ran."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Out + offs, tl.load(X + offs, mask=mask) * 2 + BLOCK, mask=mask)


def _run(x, n_key=None):
    out = torch.empty_like(x)
    N = x.numel()
    launch_tuned(_which_block, lambda meta: (triton.cdiv(N, meta["BLOCK"]),), x, out, N,
                 N_KEY=n_key if n_key is not None else triton.next_power_of_2(N))
    blocks = (out - 2 * x).round().unique()
    assert blocks.numel() == 1, blocks  # one config ran over every element
    return int(blocks.item())


@pytest.fixture
def searches(monkeypatch):
    """The toy's searches with BLOCKS[2] (32) timed fastest; -> the list of keys searched, in order."""
    from autotune_stub import time_as_told

    time_as_told(monkeypatch, {"toy": (_which_block, _not_eight)}, {"toy": 1})  # the 2nd left by the prune: 32
    keys, run = [], Autotuner.run

    def counting(self, *args, **kwargs):
        keys.append(kwargs["N_KEY"] if "N_KEY" in kwargs else args[3])  # by keyword, or 4th by position
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting)
    return keys


def _rand(n, dtype=torch.float32, seed=0):
    """Fresh values (the output minus twice them gives the BLOCK); on the GPU when there is one."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype) + 3.0


def test_one_search_per_key_then_the_pick_without_the_autotuner(searches):
    assert _run(_rand(100)) == 32 and searches == [128]
    assert _run(_rand(97, seed=1)) == 32 and searches == [128]  # the same key: the pick, no search
    assert set(_which_block.tritongpt_picks.values()) == {_which_block.cache[next(iter(_which_block.cache))]}
    assert _run(_rand(300, seed=2)) == 32 and searches == [128, 512]  # a new key value
    assert _run(_rand(100, torch.float16, seed=3)) == 32 and searches == [128, 512, 128]  # a new dtype
    assert len(_which_block.tritongpt_picks) == 3


def test_key_arguments_and_tensors_count_whether_passed_by_position_or_keyword(searches):
    """The real launchers pass most key arguments (M_BUCKET, N, W...) by position and flags by keyword; Triton's key
    is the same either way, and so must ours be: a key value or dtype missed in one form would reuse a pick made
    for another shape."""
    def run(x, n_key, by_keyword):
        out, N = torch.empty_like(x), x.numel()
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
        if by_keyword:
            launch_tuned(_which_block, grid, X=x, Out=out, N=N, N_KEY=n_key)
        else:
            launch_tuned(_which_block, grid, x, out, N, n_key)
        return int((out - 2 * x).round().unique().item())

    assert run(_rand(100), 128, by_keyword=False) == 32 and searches == [128]
    assert run(_rand(90, seed=1), 128, by_keyword=True) == 32 and searches == [128]  # the same key either way
    assert run(_rand(300, seed=2), 512, by_keyword=False) == 32 and searches == [128, 512]  # positional: new value
    assert run(_rand(100, torch.float16, seed=3), 128, by_keyword=True) == 32
    assert searches == [128, 512, 128]  # a tensor passed by keyword: its dtype is in the key
    assert len(_which_block.tritongpt_picks) == 3


def test_a_pick_other_than_the_first_config_is_what_later_launches_run(monkeypatch, searches):
    """The pick is launched with its own meta-parameters: a later launch that ran the kernel's default (first)
    config, or the first one the prune leaves, would say 8 or 16 here."""
    _run(_rand(100))
    monkeypatch.setattr(Autotuner, "run", lambda *a, **k: pytest.fail("searched again"))
    assert [_run(_rand(n, seed=n)) for n in (65, 90, 128)] == [32, 32, 32]


def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_a_key_first_met_inside_a_capture_launches_untimed_and_is_not_kept(monkeypatch, searches):
    _capturing(monkeypatch)
    with pytest.warns(UserWarning, match="first met inside a CUDA-graph capture"):
        assert _run(_rand(100)) == 16  # the first config the prune leaves: no search, no timing
    assert searches == [] and not _which_block.tritongpt_picks
    monkeypatch.undo()  # the capture is over (and the stand-in timer gone: set it up again)
    from autotune_stub import time_as_told
    time_as_told(monkeypatch, {"toy": (_which_block, _not_eight)}, {"toy": 1})
    assert _run(_rand(100)) == 32  # the next eager launch of the key searches


def _refusing(monkeypatch, blocks):
    """The GPU refuses these BLOCKs as Triton does a tile too big for its shared memory: OutOfResources, raised by the
    launch before anything is enqueued (autotune's search times such a config as inf and picks another)."""
    run = _which_block.fn.run

    def refuse(*args, **kwargs):
        if kwargs["BLOCK"] in blocks:
            raise triton.OutOfResources(1 << 20, 99 << 10, "shared memory")
        return run(*args, **kwargs)

    monkeypatch.setattr(_which_block.fn, "run", refuse)


def test_inside_a_capture_a_config_this_gpu_refuses_is_skipped(monkeypatch, searches):
    """A GPU with less shared memory (sm_86/89's 99 KB) refuses the first tiles of some lists (attention's in fp32):
    the untimed launch goes on to the next config the prune leaves, as the search would have, rather than failing
    the capture with on_tensor_device's "no tile of this Triton kernel fits"."""
    _refusing(monkeypatch, {16})
    _capturing(monkeypatch)
    with pytest.warns(UserWarning, match="launched untimed with BLOCK: 32") as warned:
        assert _run(_rand(100)) == 32
    assert [w.filename for w in warned] == [__file__]  # the launcher that met the shape (here _run), not _common
    assert searches == [] and not _which_block.tritongpt_picks
    _refusing(monkeypatch, {16, 32, 64})  # none fits: Triton's own error, for on_tensor_device to word
    with pytest.raises(triton.OutOfResources):
        _run(_rand(100))


def test_a_key_picked_before_the_capture_launches_its_pick_there_quietly(monkeypatch, searches, recwarn):
    _run(_rand(100))
    _capturing(monkeypatch)
    assert _run(_rand(90, seed=4)) == 32 and searches == [128]
    assert not [w for w in recwarn if "capture" in str(w.message)]


def test_anything_but_an_autotuner_is_launched_as_kernel_grid():
    """The interpreter's plain JITFunction (attention's kernels are not autotuned there) and tests' stand-ins."""
    launched = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args, kwargs))

    launch_tuned(StandIn(), (3,), 1, 2, FLAG=True)
    assert launched == [((3,), (1, 2), {"FLAG": True})]


@pytest.mark.cuda
def test_a_layernorm_shape_first_met_in_a_cuda_graph_capture_runs_untimed_there():
    """The real thing on a GPU: a LayerNorm shape no eager call has met, first launched inside torch.cuda.graph. The
    capture must not break (autotune would synchronize there); the replay gives the float64 result; the key stays
    unpicked, so the next eager call searches."""
    import torch.nn.functional as F

    from tritongpt.kernels import layernorm as ln

    gen = torch.Generator().manual_seed(5)
    M, N = 3001, 1000  # a rows bucket (4096) and width no other test uses
    x = torch.randn(M, N, generator=gen).to("cuda", torch.bfloat16)
    w, b = (torch.randn(N, generator=gen).cuda() for _ in range(2))
    picked = dict(getattr(ln._fwd_tuned, "tritongpt_picks", {}))
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(UserWarning, match="first met inside a CUDA-graph capture"):
        with torch.cuda.graph(graph):
            y = ln.layer_norm(x, w, b)
    x.copy_(torch.randn(M, N, generator=gen).to("cuda", torch.bfloat16))  # replay on fresh values
    graph.replay()
    torch.cuda.synchronize()
    ref = F.layer_norm(x.double(), (N,), w.double(), b.double())
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert getattr(ln._fwd_tuned, "tritongpt_picks", {}) == picked  # nothing kept from the capture
