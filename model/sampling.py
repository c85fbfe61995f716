"""Structured outputs' token mask, the reference: a grammar matcher (xgrammar's GrammarMatcher) says which tokens may
come next as a bitmask, and the logits of the others become -inf before sampling. Its Triton twin is
`tritongpt.kernels.token_mask.apply_token_bitmask_` (in place); `apply_token_bitmask(..., triton=True)` picks it.

The bitmask is xgrammar's layout (`xgrammar.allocate_token_bitmask`, `GrammarMatcher.fill_next_token_bitmask`):
int32 [rows, ceil(V / 32)], bit j of word w set = token 32 * w + j allowed; the bits past V in the last word are
ignored. A row whose every bit is 0 gives every logit -inf (sampling from it is the caller's problem: a matcher that
has terminated bans everything).

Sampling's draw, the reference: `draw_with_uniform` takes one uniform number a row and returns the token where the
row's cumulative probability (vocabulary order) passes it (inverse CDF), so a draw is a function of the logits and u,
the same on either path. Its Triton twin, with the temperature and the top-k, top-p and min-p cuts fused in (without a
sort), is `tritongpt.kernels.sampling.sample_tokens`; `train/generate.py`'s sample_next picks between them.
"""
from typing import Optional, Sequence

import torch

from tritongpt.errors import UserError

MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bitmask_words(vocab_size: int) -> int:
    """Words a bitmask row takes: ceil(V / 32)."""
    return -(vocab_size // -32)


def check_token_bitmask(who: str, logits, bitmask, indices: Optional[Sequence[int]]) -> None:
    """Every refusal both paths make, each a UserError naming the argument. indices are host ints, checked on the host
    (no device sync): each a row of logits and of bitmask (xgrammar's semantics: row i masked by bitmask row i)."""
    for name, t in (("logits", logits), ("bitmask", bitmask)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise UserError(f"{who}: {name} must be 2-D [rows, {'V' if name == 'logits' else 'ceil(V / 32)'}], "
                            f"got shape {tuple(t.shape)}")
    if logits.dtype not in MASK_DTYPES:
        raise UserError(f"{who}: logits has dtype {str(logits.dtype).replace('torch.', '')}; expected float32, "
                        "bfloat16 or float16")
    if bitmask.dtype != torch.int32:
        raise UserError(f"{who}: bitmask has dtype {str(bitmask.dtype).replace('torch.', '')}; expected int32 "
                        "(xgrammar.allocate_token_bitmask's)")
    if bitmask.device != logits.device:
        raise UserError(f"{who}: bitmask is on {bitmask.device}, logits on {logits.device}: both on one device")
    B, V = logits.shape
    if bitmask.shape[1] != bitmask_words(V):
        raise UserError(f"{who}: bitmask has shape {tuple(bitmask.shape)}, logits {tuple(logits.shape)}: a bitmask "
                        f"row takes ceil(V / 32) = {bitmask_words(V)} int32 words for V = {V}")
    if indices is None:
        if bitmask.shape[0] != B:
            raise UserError(f"{who}: bitmask has {bitmask.shape[0]} rows, logits {B}: without indices each logits "
                            "row takes the bitmask row of its own index")
        return
    if isinstance(indices, torch.Tensor) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise UserError(f"{who}: indices must be a host list of ints (xgrammar's), got {type(indices).__name__}")
    rows = min(B, bitmask.shape[0])
    for k, i in enumerate(indices):
        if not 0 <= i < rows:
            raise UserError(f"{who}: indices[{k}] = {i} is outside [0, {rows}): logits has {B} rows, bitmask "
                            f"{bitmask.shape[0]}")


def pack_token_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [N, V] (True = allowed) -> int32 [N, ceil(V / 32)] in xgrammar's layout: token 32 w + j is bit j of word
    w. The bits past V are 0."""
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.dim() != 2:
        raise UserError(f"pack_token_bitmask: allowed must be a bool tensor [N, V], got "
                        f"{getattr(allowed, 'dtype', type(allowed).__name__)} {tuple(getattr(allowed, 'shape', ()))}")
    N, V = allowed.shape
    W = bitmask_words(V)
    bits = torch.zeros(N, W * 32, dtype=torch.int64, device=allowed.device)
    bits[:, :V] = allowed.long()
    words = (bits.view(N, W, 32) << torch.arange(32, device=allowed.device)).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits, as int32


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [N, ceil(V / 32)] -> bool [N, V], True where the token is allowed (pack_token_bitmask's inverse)."""
    # (int32 shifts: an arithmetic shift of a negative word still brings bit j to bit 0, and int64 would move twice
    # the bytes of a 50k-token row)
    bits = (bitmask[..., None] >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], bitmask.shape[1] * 32)[:, :vocab_size].bool()


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor,
                                  indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """New logits, -inf where the token's bit is 0. indices: the logits rows to mask (row i by bitmask row i), the
    others as they were; None masks every row (bitmask rows == logits rows)."""
    check_token_bitmask("apply_token_bitmask_reference", logits, bitmask, indices)
    if indices is None:
        return logits.masked_fill(~unpack_token_bitmask(bitmask, logits.shape[1]), float("-inf"))
    rows = list(indices)
    allowed = unpack_token_bitmask(bitmask[rows], logits.shape[1])
    out = logits.clone()
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


def sampling_with_triton(model) -> bool:
    """Whether the model's token mask and sampling draw run their Triton kernels: under its "cross_entropy" kernel
    name, the LM head's logits' kernels (model/toggle.py has no name of its own for either)."""
    return "cross_entropy" in getattr(model, "kernels", ())


def rows_overlap(logits: torch.Tensor) -> bool:
    """Whether rows of [B, V] logits (unit stride on V) share memory, an expand()ed row's say: masked in place,
    each would take every row's bans."""
    return logits.dim() == 2 and logits.size(0) > 1 and logits.stride(0) < logits.size(1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: Optional[Sequence[int]] = None,
                        triton: bool = False) -> torch.Tensor:
    """The masked logits: triton=True masks logits in place with the Triton kernel (kernels/token_mask.py) and returns
    it (a copy of logits whose rows share memory: each row takes its own bans); else the reference's new tensor
    (logits untouched)."""
    if not isinstance(triton, bool):  # a truthy "no" would mask the caller's logits in place
        raise UserError(f"apply_token_bitmask: triton must be a bool, got {type(triton).__name__} {triton!r}")
    if triton:
        from tritongpt.kernels.token_mask import apply_token_bitmask_
        if rows_overlap(logits):
            # (the engine's n samples of one prompt draw their first token from its one prefill row, expand()ed)
            logits = logits.contiguous()
        return apply_token_bitmask_(logits, bitmask, indices)
    return apply_token_bitmask_reference(logits, bitmask, indices)


def draw_with_uniform(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token for each row of logits [B, V] (cut tokens -inf), drawn from their softmax by inverse CDF at u [B] in
    [0, 1): ids [B] int64 (draw_from_probs). In float32; float64 logits in float64 (the tests' reference)."""
    return draw_from_probs(torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1), u)


def draw_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: for each row of probs [B, V] (>= 0, any positive total) the first token, in vocabulary order,
    whose cumulative sum passes u [B] x the row's total: ids [B] int64. That token always has a probability above 0;
    where u x the total rounds up to it, the last such token. A row with nothing to draw (all 0, or NaN) gives token
    0 (the Triton kernel's answer too)."""
    cdf = probs.cumsum(-1)
    V = probs.size(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    last = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
    drawable = cdf[:, -1] > 0  # (False for NaN)
    return torch.where(drawable, torch.where(idx < V, idx, last), torch.zeros_like(idx))
