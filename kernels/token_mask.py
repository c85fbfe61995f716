"""Structured outputs' token mask in Triton: logits[r, t] = -inf where bit t % 32 of bitmask[r, t // 32] is 0, in
place (xgrammar's apply_token_bitmask_inplace). Reference: `tritongpt.model.sampling.apply_token_bitmask_reference`
(the bitmask's layout is described there).

Memory-bound and write-only on the logits: a program takes BLOCK_W words of ROWS rows (grid (cdiv(W, BLOCK_W),
cdiv(rows, ROWS))); for each of its rows it loads the BLOCK_W words once, expands them in registers to a
[BLOCK_W, 32] tile of bits (token 32 w + j at word w, bit j: the tile's row-major order is the logits' own, so the
store is coalesced), and stores -inf where a bit is 0 and the token is below V. The logits are never read. A block
whose tokens are all allowed (a JSON string's body: nearly every token) skips its store altogether; a mostly banned
one writes only the banned tokens (the store's mask). indices (a host list, xgrammar's semantics: the rows to mask,
row i by bitmask row i) go to the device once as int32; then the grid's second axis walks them.

Tiles: on a GPU BLOCK_W 64 words (2048 tokens, 16 per thread on 4 warps) and ROWS 1; under the interpreter, which pays
per program, BLOCK_W 256 and ROWS 4, so a test's grid is a few programs.

Public API: `apply_token_bitmask_(logits, bitmask, indices=None) -> logits`, through the torch.library custom op
`tritongpt::apply_token_bitmask_` (mutates_args logits, a fake impl), so torch.compile keeps it as an opaque call.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.errors import UserError
from tritongpt.kernels._common import cdiv, check_runnable, custom_op, on_tensor_device
from tritongpt.model.sampling import check_token_bitmask, rows_overlap


@triton.jit
def _token_mask_kernel(Logits, Bitmask, Indices, n_rows, V, W, stride_l, stride_b, HAS_INDICES: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Logits[r, 32 w + j] = -inf where bit j of Bitmask[r, w] is 0, for this program's BLOCK_W words and its ROWS
    rows r (Indices[k] for k in its ROWS when HAS_INDICES, else k itself)."""
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 32)
    tok = offs_w[:, None] * 32 + bit[None, :]  # [BLOCK_W, 32]: the tokens in memory order
    in_vocab = tok < V
    for i in range(ROWS):
        k = tl.program_id(1) * ROWS + i
        if k < n_rows:
            row = k.to(tl.int64)
            if HAS_INDICES:
                row = tl.load(Indices + k).to(tl.int64)
            words = tl.load(Bitmask + row * stride_b + offs_w, mask=offs_w < W, other=-1)  # past W: all allowed
            banned = (((words[:, None] >> bit[None, :]) & 1) == 0) & in_vocab
            if tl.max(banned.to(tl.int32)) > 0:  # an all-allowed block writes nothing
                ninf = tl.full(tok.shape, float("-inf"), tl.float32).to(Logits.dtype.element_ty)
                tl.store(Logits + row * stride_l + tok, ninf, mask=banned)


def _tiles() -> tuple:
    """(BLOCK_W, ROWS): see the module docstring."""
    if triton_interpreting():
        return 256, 4
    return 64, 1


# (bench/compile_check.py calls this on meta tensors to compile the exact launch for sm_90.)
@on_tensor_device
def _launch(logits, bitmask, indices: Optional[torch.Tensor]):
    """The kernel on checked arguments; indices a device int32 tensor or None."""
    V = logits.shape[1]
    W = bitmask.shape[1]
    n_rows = logits.shape[0] if indices is None else indices.shape[0]
    if n_rows == 0 or V == 0:
        return
    block_w, rows = _tiles()
    _token_mask_kernel[(cdiv(W, block_w), cdiv(n_rows, rows))](
        logits, bitmask, indices, n_rows, V, W, logits.stride(0), bitmask.stride(0), HAS_INDICES=indices is not None,
        ROWS=rows, BLOCK_W=block_w, num_warps=4)


@custom_op("tritongpt::apply_token_bitmask_", mutates_args=("logits",))
def _apply_token_bitmask_op(logits: torch.Tensor, bitmask: torch.Tensor, indices: Optional[List[int]] = None) -> None:
    """logits [B, V] masked in place; apply_token_bitmask_ checks the arguments."""
    check_runnable(logits, "logits")
    idx = None
    if indices is not None:
        # pinned + non_blocking: the copy does not wait for the device (no sync), as xgrammar's own launcher
        host = torch.tensor(indices, dtype=torch.int32)
        idx = host.pin_memory().to(logits.device, non_blocking=True) if logits.is_cuda else host.to(logits.device)
    _launch(logits, bitmask, idx)


@_apply_token_bitmask_op.register_fake
def _(logits, bitmask, indices=None):
    return None


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor,
                         indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """logits[r, t] = -inf where the bitmask bans token t of row r, in place; returns logits.

    logits [B, V] float32 / bfloat16 / float16, unit stride on V (the rows may be strided); bitmask int32
    [rows, ceil(V / 32)] on logits' device, unit stride on its last dim (xgrammar's layout: bit j of word w = token
    32 w + j allowed). indices: None masks every row (bitmask rows == B); else a host list of ints, the rows to mask,
    row i by bitmask row i (xgrammar's semantics), checked on the host. An all-zero bitmask row makes the whole row
    -inf. Inference only: refused where grad is enabled and logits requires grad."""
    check_token_bitmask("apply_token_bitmask_", logits, bitmask, indices)
    for name, t in (("logits", logits), ("bitmask", bitmask)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise UserError(f"apply_token_bitmask_: {name} must have unit stride on its last dim, got strides "
                            f"{t.stride()} (its rows may be strided)")
    if rows_overlap(logits):
        raise UserError(f"apply_token_bitmask_: logits' rows overlap in memory (strides {logits.stride()}, e.g. an "
                        "expand()ed row): each row is masked in place by its own bitmask row; pass logits.contiguous()")
    if logits.requires_grad and torch.is_grad_enabled():
        raise UserError("apply_token_bitmask_: logits requires grad; the mask is for sampling (no backward): run it "
                        "under torch.no_grad() / inference_mode, or use apply_token_bitmask_reference")
    try:
        check_runnable(logits, "logits")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"apply_token_bitmask_: {e}") from None
    _apply_token_bitmask_op(logits, bitmask, None if indices is None else [int(i) for i in indices])
    return logits
