"""Text generation: greedy, temperature, top-k, top-p and min-p sampling, a repetition penalty, frequency and
presence penalties and a no-repeat n-gram ban, with a preallocated KV cache. The logits go through them in
this order, on the raw logits first (greedy decoding too): the repetition penalty, then the frequency and the
presence penalty (vLLM's sampler order: repetition, frequency, presence), then the n-gram ban (after the
repetition penalty, as in transformers' generate; it sets -inf, which the others leave at -inf, so its place
among them changes nothing); then temperature, top-n-sigma, top-k, top-p, min-p, typical-p, the epsilon and
the eta cutoff (transformers' _get_logits_processor order; top-n-sigma, which transformers lacks, first, as
llama.cpp's sampler chain has it before top-k). Settings transformers' generate has (all but the frequency and
presence penalties and top-n-sigma) draw from the distribution it draws from.

With the cache, the prompt is run once (prefill) and each new token costs one position.
Positions are absolute (learned embeddings), so when the window is full it cannot slide:
we crop to the last context_length tokens and prefill again, which gives exactly what the
uncached model computes on the cropped window.

Speculative decoding (draft=, Leviathan et al. 2023, Chen et al. 2023): a small draft model proposes
num_draft_tokens tokens, the model scores them all in one forward and keeps those it would have drawn;
greedy output is the model's own token for token, sampled output is distributed as the model's.
Prompt lookup decoding (prompt_lookup=, Saxena 2023) is the same with a draft that needs no model: the tokens
that followed the text's last n-gram where it occurred before (see lookup_proposals); a predicted output
(draft=Prediction(ids), OpenAI's Predicted Outputs) proposes a given text's tokens where the answer stands in it.
"""
import contextlib
import functools
import math

import torch

from tritongpt._types import is_int, is_real
from tritongpt.errors import FieldError, UserError
from tritongpt.model.layers import KV_CACHE_DTYPES
from tritongpt.model.sampling import draw_from_probs, draw_with_uniform, sampling_with_triton


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   flags: bool = False, min_p: float | None = None, repetition_penalty: float | None = None,
                   frequency_penalty: float | None = None, presence_penalty: float | None = None,
                   no_repeat_ngram_size: int | None = None, typical_p: float | None = None,
                   epsilon_cutoff: float | None = None, eta_cutoff: float | None = None,
                   top_n_sigma: float | None = None, logit_bias: dict | None = None, allowed_token_ids=None,
                   bad_words=None, min_p_first: bool = False) -> None:
    """The sampling settings, checked before any work (also those greedy decoding ignores: a
    typo should not wait for the first sample). flags: name them as command-line flags."""
    name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
    if not is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature > torch.finfo(torch.float32).max:  # the logits are fp32: divided by it, every one is 0 or NaN
        raise UserError(f"{name('temperature')} must be at most fp32's largest number (3.4e38), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise UserError(f"{name('top_k')} must be a positive integer, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise UserError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if min_p is not None and (not is_real(min_p) or not 0.0 <= min_p <= 1.0):
        raise UserError(f"{name('min_p')} must be in [0, 1], got {min_p!r}")
    if repetition_penalty is not None and (not is_real(repetition_penalty) or
                                           not (math.isfinite(repetition_penalty) and repetition_penalty > 0)):
        raise UserError(f"{name('repetition_penalty')} must be a finite number > 0 (1 = none), "
                        f"got {repetition_penalty!r}")
    for key, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        # OpenAI's and vLLM's range (nan and infinities fail the comparison)
        if value is not None and (not is_real(value) or not -2.0 <= value <= 2.0):
            raise UserError(f"{name(key)} must be a number in [-2, 2] (0 = none), got {value!r}")
    if no_repeat_ngram_size is not None and (not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0):
        raise UserError(f"{name('no_repeat_ngram_size')} must be an integer >= 0 (0 = off), "
                        f"got {no_repeat_ngram_size!r}")
    # transformers' ranges: TypicalLogitsWarper takes (0, 1), generate skips it at 1; Epsilon- and EtaLogitsWarper
    # take (0, 1), generate skips them at 0 (and would skip 1 and past silently: refused here)
    if typical_p is not None and (not is_real(typical_p) or not 0.0 < typical_p <= 1.0):
        raise UserError(f"{name('typical_p')} must be in (0, 1] (1 = off), got {typical_p!r}")
    for key, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if value is not None and (not is_real(value) or not 0.0 <= value < 1.0):
            raise UserError(f"{name(key)} must be in [0, 1) (0 = off), got {value!r}")
    if top_n_sigma is not None and (not is_real(top_n_sigma) or
                                    not (math.isfinite(top_n_sigma) and top_n_sigma > 0)):
        raise UserError(f"{name('top_n_sigma')} must be a finite number > 0, got {top_n_sigma!r}")
    if logit_bias is not None and (not isinstance(logit_bias, dict) or not all(
            is_int(t) and t >= 0 and is_real(b) and -100 <= b <= 100 for t, b in logit_bias.items())):
        raise UserError(f"{name('logit_bias')} must map token ids (integers >= 0) to biases in [-100, 100] "
                        f"(OpenAI's range), got {logit_bias!r}")
    if allowed_token_ids is not None and (not isinstance(allowed_token_ids, (list, tuple)) or not allowed_token_ids
                                          or not all(is_int(t) and t >= 0 for t in allowed_token_ids)):
        raise UserError(f"{name('allowed_token_ids')} must be a non-empty list of token ids (integers >= 0), "
                        f"got {allowed_token_ids!r}")
    if bad_words is not None and (not isinstance(bad_words, (list, tuple)) or not all(
            isinstance(w, (list, tuple)) and w and all(is_int(t) and t >= 0 for t in w) for w in bad_words)):
        raise UserError(f"{name('bad_words')} must be a list of tokenized words (non-empty lists of token ids >= 0), "
                        f"got {bad_words!r}")
    if not isinstance(min_p_first, bool):  # (a truthy "no" would pick vLLM's order)
        raise UserError(f"{name('min_p_first')} must be a bool, got {type(min_p_first).__name__} {min_p_first!r}")


def check_prompt(idx) -> None:
    """generate()'s and beam_search's prompt: a [batch, time] tensor of integer ids with a row and a token (the model
    checks the ids' range). A bool one was read as ids 0 and 1, a batch of none failed in the KV cache's check."""
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        what = f"a {idx.dtype} tensor" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise UserError(f"prompt must be a [batch, time] tensor of token ids, got {what}")
    if idx.dim() != 2 or 0 in idx.shape:
        raise UserError(f"prompt must be a non-empty [batch, time] tensor, got shape {tuple(idx.shape)}")


def check_eos_id(eos_id, vocab=None) -> None:
    """eos_id None or a token id below vocab: one past it was never drawn (no row stopped) and padded a row stopped
    otherwise with an id the model refuses, a string failed deep in torch.full."""
    if eos_id is not None and not (is_int(eos_id) and 0 <= eos_id < (vocab or float("inf"))):
        raise UserError(f"eos_id must be a token id (an integer in [0, {vocab or 'vocabulary'})), got {eos_id!r}")


def check_logprobs(logprobs) -> None:
    """logprobs (generate's and the engine's): None, or the likeliest tokens given with each drawn one, k >= 0."""
    if logprobs is not None and (not is_int(logprobs) or logprobs < 0):
        raise UserError(f"logprobs must be an integer >= 0 (the top tokens given with each drawn one), "
                        f"got {logprobs!r}")


def end_rule(eos_id, stop_token_ids=None, min_tokens: int = 0, ignore_eos: bool = False, vocab=None,
             hold_ids=None) -> tuple:
    """vLLM's stop_token_ids, min_tokens and ignore_eos as decode_step takes them: (pad, the id a finished row is
    padded with: eos_id, or the first stop token without one; ends, the ids that end a row: eos_id unless
    ignore_eos, and stop_token_ids; hold, (min_tokens, the ids a row draws only after min_tokens new tokens: the EOS,
    ignored or not, the stop tokens and hold_ids, as vLLM's MinTokensLogitsProcessor its all_stop_token_ids) or
    None). hold_ids: ids held back for min_tokens that end nothing (with ignore_eos, a generation config's other end
    tokens: vLLM's update_from_generation_config keeps them in all_stop_token_ids, not in stop_token_ids). Checked
    here, before any work: vocab, the tokens drawn from, bounds the stop tokens."""
    named = (("stop_token_ids", stop_token_ids), ("hold_ids", hold_ids))
    for name, ids in named:
        if ids is not None and not isinstance(ids, (list, tuple)):
            raise UserError(f"{name} must be a list of token ids, got {ids!r}")
    check_eos_id(eos_id, vocab)
    for name, ids in named:
        if not all(is_int(t) and 0 <= t < (vocab or float("inf")) for t in ids or []):
            raise UserError(f"{name} must be token ids (integers in [0, {vocab or 'vocabulary'})), got {ids!r}")
    stop_token_ids = list(stop_token_ids or [])
    if not is_int(min_tokens) or min_tokens < 0:
        raise UserError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if not isinstance(ignore_eos, bool):
        raise UserError(f"ignore_eos must be a bool, got {ignore_eos!r}")
    pad = eos_id if eos_id is not None else stop_token_ids[0] if stop_token_ids else None
    ends = tuple(dict.fromkeys(([] if eos_id is None or ignore_eos else [eos_id]) + stop_token_ids))
    held = tuple(dict.fromkeys(([] if eos_id is None else [eos_id]) + stop_token_ids + list(hold_ids or [])))
    return pad, ends, (int(min_tokens), held) if min_tokens and held else None


def penalize_repeats(logits, seen, penalty: float):
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor: every
    token id in seen [B, T] (the prompt and what was drawn) has its logit divided by penalty where positive and
    multiplied by it where negative, so a penalty > 1 makes it less likely either way. Ids past the logits
    (a vocab_limit) are left out."""
    logits = logits.float()
    V = logits.size(-1)
    # which ids were seen, one mark each however often: an id past V marks a spare column, dropped
    marks = torch.zeros(logits.size(0), V + 1, dtype=torch.bool, device=logits.device)
    marks = marks.scatter(-1, seen.clamp(max=V), True)[:, :V]
    return torch.where(marks, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def penalize_counts(logits, seen, start, frequency: float = 0.0, presence: float = 0.0):
    """OpenAI's and vLLM's frequency and presence penalties: logit[t] -= frequency * count(t) + presence *
    (count(t) > 0), count(t) how often t is among the row's GENERATED ids: those of seen [B, T] from column
    start on (an int, or a [B] tensor where rows' prompts end at different columns); the prompt's ids do not
    count (as vLLM's). Ids past the logits (a vocab_limit) are left out. In fp32 at least (float64 stays)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    B, V = logits.shape
    start = torch.as_tensor(start, device=seen.device).reshape(-1, 1)
    counted = torch.arange(seen.size(1), device=seen.device) >= start  # [B, T] (or [1, T]): generated
    # an id past V counts in a spare column, dropped
    counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add(-1, seen.clamp(max=V), counted.expand_as(seen).to(logits.dtype))[:, :V]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def ban_repeated_ngrams(logits, seen, n: int, live=None, strict: bool = True):
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already in the row
    (seen [B, T], the prompt's ids included) gets -inf; n = 1 bans every id seen. Ids past the logits are left
    out. live [B] (None: all): the rows still drawing; a finished row (its token replaced by the EOS) whose every
    token is banned (or every one its logits do not have -inf already: allowed_token_ids') keeps its logits, where
    a live one is an error. strict False: no error, such a row is all -inf
    (a beam search beam, dropped for the others, as transformers' beam search leaves it)."""
    B, V = logits.shape
    T = seen.size(1)
    if T < n:  # no n-gram in the row yet: none to repeat
        return logits
    windows = seen.unfold(1, n, 1)  # [B, T - n + 1, n]: every n-gram so far
    # those whose first n - 1 ids are the row's last n - 1: their last id would repeat them
    match = (windows[:, :, :-1] == seen[:, T - n + 1:].unsqueeze(1)).all(dim=-1)
    banned = torch.where(match, windows[:, :, -1].clamp(max=V), V)  # unmatched -> the spare column
    marks = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    marks = marks.scatter(-1, banned, True)[:, :V]
    # left nothing: every id banned, or every one the masks before left (allowed_token_ids, bad_words, min_tokens'),
    # where a draw would take token 0, outside them
    full = (marks | (logits == float("-inf"))).all(dim=-1, keepdim=True)
    if live is not None:
        marks = marks & ~(full & ~live.view(-1, 1))
        full = full & live.view(-1, 1)
    if strict and bool(full.any()):  # nothing left to draw: multinomial's NaN error, or greedy's id 0, otherwise
        row = int(full.squeeze(-1).nonzero()[0])
        left = "" if bool(marks[row].all()) else " the masks leave it (allowed_token_ids, bad_words, min_tokens')"
        raise UserError(f"--no-repeat-ngram-size {n} bans every token of a row's vocabulary ({V}){left}: the text "
                        "has repeated all it may; use a larger N, or fewer new tokens")
    return logits.masked_fill(marks, float("-inf"))


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None, min_p: float | None = None,
                repetition_penalty: float | None = None, seen=None, frequency_penalty: float | None = None,
                presence_penalty: float | None = None, no_repeat_ngram_size: int | None = None, generated_from=None,
                live=None, typical_p: float | None = None, epsilon_cutoff: float | None = None,
                eta_cutoff: float | None = None, top_n_sigma: float | None = None, logit_bias: dict | None = None,
                allowed_token_ids=None, bad_words=None, triton: bool = False, min_p_first: bool = False):
    """Pick one token per row from logits [B, V]: [B, 1]. temperature 0 means greedy (argmax). seen [B, T]: the ids a
    repetition_penalty and no_repeat_ngram_size apply to; those from column generated_from on (an int or a [B]
    tensor), the generated ones, are what frequency_penalty and presence_penalty count.
    A sample is drawn by inverse CDF from one uniform number a row (the generator's torch.rand), so both paths draw
    the same token from the same logits and seed: triton=False sampling_logits then draw_with_uniform; triton=True
    the Triton kernel (kernels/sampling.py) with the temperature, top_k, top_p and min_p cuts fused into the draw (no
    sort of the vocabulary; the biases and penalties before it stay torch's, and with typical_p, epsilon_cutoff,
    eta_cutoff or top_n_sigma cutting, late_cut's, the whole of sampling_logits runs first and the kernel only draws). min_p_first:
    sampling_logits'."""
    settings = dict(repetition_penalty=repetition_penalty, seen=seen, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    generated_from=generated_from, live=live, logit_bias=logit_bias,
                    allowed_token_ids=allowed_token_ids, bad_words=bad_words)
    greedy = temperature < torch.finfo(torch.float32).tiny
    if triton and not greedy and not late_cut(dict(typical_p=typical_p, epsilon_cutoff=epsilon_cutoff,
                                                   eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma)):
        check_sampling(temperature, top_k, top_p, min_p=min_p, min_p_first=min_p_first)
        # biased and penalized only (greedy's logits): the kernel tempers, cuts and draws
        logits = sampling_logits(logits, **settings)
        u = torch.rand(logits.size(0), generator=generator, device=logits.device)
        from tritongpt.kernels.sampling import sample_tokens
        return sample_tokens(logits, u, temperature, None if top_k is None else int(top_k), top_p, min_p,
                             min_p_first=min_p_first)[:, None]
    logits = sampling_logits(logits, temperature, top_k, top_p, min_p, typical_p=typical_p,
                             epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma,
                             min_p_first=min_p_first, **settings)
    return _draw(logits, greedy, generator, triton)


def sampling_logits(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None, seen=None, *,
                    frequency_penalty: float | None = None, presence_penalty: float | None = None,
                    no_repeat_ngram_size: int | None = None, generated_from=None, live=None,
                    typical_p: float | None = None, epsilon_cutoff: float | None = None,
                    eta_cutoff: float | None = None, top_n_sigma: float | None = None, logit_bias: dict | None = None,
                    allowed_token_ids=None, bad_words=None, min_p_first: bool = False):
    """The logits [B, V] sample_next draws from (softmax of them): biased, penalized, tempered and cut, -inf for a
    token it never draws. Greedy (temperature 0): only biased and penalized (and n-grams banned). logit_bias {token
    id: bias}: added to those logits first (OpenAI's logit_bias: -100 all but bans a token, +100 all but forces it),
    after vLLM's allowed_token_ids and bad_words (allow_and_ban), greedy's too.
    The cuts in transformers' order (its _get_logits_processor's: top_k, top_p, min_p, then the rarer ones), which
    generate and the other commands claim; min_p_first: vLLM's order (serve's), min_p right after the temperature
    (and top_n_sigma, which vLLM has not), before top_k and top_p (vllm/v1/sample/sampler.py Sampler.sample: the argmax-invariant logits processors,
    MinPLogitsProcessor, before topk_topp_sampler), so top_p weighs only the tokens min_p kept.
    Triton twin of the temperature, top_k, top_p and min_p cuts (with the draw fused in): kernels/sampling.py."""
    check_sampling(temperature, top_k, top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                   no_repeat_ngram_size=no_repeat_ngram_size, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff,
                   eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma, logit_bias=logit_bias,
                   allowed_token_ids=allowed_token_ids, bad_words=bad_words, min_p_first=min_p_first)
    if allowed_token_ids or bad_words:  # vLLM's sampler: these masks first, before logit_bias and the penalties
        logits = allow_and_ban(logits, allowed_token_ids, bad_words, seen, generated_from, live)
    if logit_bias:
        if max(logit_bias) >= logits.size(-1):  # (on the host: a GPU's max would sync every step)
            raise UserError(f"logit_bias has token id {max(logit_bias)}, outside the {logits.size(-1)} tokens drawn "
                            "from")
        # made on the host and sent without waiting: torch.tensor(..., device=cuda) is a blocking copy, which waits
        # for the GPU's queue (the forward) in every decode step
        ids = torch.tensor(list(logit_bias), dtype=torch.long).to(logits.device, non_blocking=True)
        bias = torch.tensor(list(logit_bias.values()), dtype=torch.float32).to(logits.device, non_blocking=True)
        logits = logits.float().index_add(-1, ids, bias.expand(logits.size(0), -1))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if seen is None:
            raise UserError("a repetition_penalty needs the ids seen so far (seen)")
        logits = penalize_repeats(logits, seen, repetition_penalty)
    if frequency_penalty or presence_penalty:
        if seen is None or generated_from is None:
            raise UserError("a frequency_penalty or presence_penalty needs the ids so far (seen) and where the "
                            "generated ones start (generated_from)")
        logits = penalize_counts(logits, seen, generated_from, frequency_penalty or 0.0, presence_penalty or 0.0)
    if no_repeat_ngram_size:
        if seen is None:
            raise UserError("a no_repeat_ngram_size needs the ids seen so far (seen)")
        logits = ban_repeated_ngrams(logits, seen, no_repeat_ngram_size, live)
    # below fp32's smallest normal number the division rounds the temperature to 0: greedy is
    # the limit it tends to anyway
    if temperature < torch.finfo(torch.float32).tiny:
        return logits
    logits = logits.float()
    # from the row's max down: a tiny temperature then gives -inf, never inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_n_sigma is not None:
        logits = cut_top_n_sigma(logits, top_n_sigma)
    # vLLM's order: top_p below then weighs only what min_p kept. After top_n_sigma, which stays right after the
    # temperature: its std is over the whole row's finite logits, and min_p's -inf would shrink it (min_p and
    # top_n_sigma, two cuts from the max, then keep what they keep in transformers' order)
    if min_p and min_p_first:
        logits = cut_min_p(logits, min_p)
    if top_k is not None:
        kth = torch.topk(logits, min(int(top_k), logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # stable: tokens tied at the cut rank in vocabulary order, so which of them it keeps is defined (and the
        # Triton kernel's, kernels/sampling.py)
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        # in float64: the mass above a token near the boundary is a sum of tens of thousands of
        # probabilities, and fp32's rounding of it (and of softmax's normaliser) moved the cut
        # by a token or more in about one row in five at GPT-2's vocabulary; and a top_p below
        # fp32's smallest number, compared in fp32, was 0 and dropped every token
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the sum of those
        # above, made directly, not as cumsum - p, which rounds across the boundary)
        above = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
        sorted_logits = sorted_logits.masked_fill(above >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if min_p and not min_p_first:
        logits = cut_min_p(logits, min_p)
    if typical_p is not None and typical_p < 1.0:
        logits = cut_typical(logits, typical_p)
    if epsilon_cutoff:
        logits = cut_below(logits, epsilon_cutoff)
    if eta_cutoff:
        # eta = min(eta_cutoff, sqrt(eta_cutoff) * exp(-entropy)): a flat distribution (high entropy) is cut less
        logp = torch.log_softmax(logits.double(), dim=-1)
        entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)  # nansum: 0 * -inf of a cut token
        logits = cut_below(logits, torch.clamp(math.sqrt(eta_cutoff) * torch.exp(-entropy), max=eta_cutoff))
    return logits


def cut_min_p(logits, min_p: float):
    """min-p (Nguyen et al. 2024): -inf for what is less likely than min_p times the row's likeliest token."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


# sample_rows: the settings it takes a row at a time; a warp that cuts with any of LATE_CUTS is drawn alone
# (sample_next)
ROW_CUTS = ("temperature", "top_k", "top_p", "min_p", "min_p_first")
LATE_CUTS = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_n_sigma")


def late_cut(warp: dict) -> bool:
    """Whether a warp's LATE_CUTS cut anything: typical_p 1 and epsilon_cutoff or eta_cutoff 0 are their "off"
    (check_sampling's; sampling_logits skips them, as transformers' generate does), so a request that spells them
    out draws what one leaving them None draws, and takes the same paths (the engine's batched draw, the fused
    Triton draw). top_n_sigma has no such value (> 0)."""
    typical = warp.get("typical_p")
    return (typical is not None and typical < 1.0) or bool(warp.get("epsilon_cutoff")) or \
        bool(warp.get("eta_cutoff")) or warp.get("top_n_sigma") is not None


def sample_rows(logits, warps, generators, sizes, triton: bool = False):
    """sample_next's draw for several requests' rows at once: request j's sizes[j] rows of logits [B, V] (biased and
    penalized already, as sampling_logits leaves them at temperature 0) with its own temperature, top_k, top_p, min_p
    and min_p_first (warps[j]) and generator (generators[j]; None: torch's default) -> [B, 1].
    Why: the serving engine drew each request alone, some 15 torch ops a request a step, on a GPU a kernel launch
    each (at 64 requests more launches than a small model's forward); here the cuts and the draw run once for the
    whole step on per-row tensors of the settings, plus one torch.rand a seeded request.
    A seeded request draws the very tokens it draws alone: its sampled rows' uniforms come from its generator as
    _draw takes them (one torch.rand of its n rows; none for a greedy request), and each row is rounded as
    sampling_logits rounds it (sorts, a topk's k-th value and softmaxes are a row's own; top_p is compared in
    float64, min_p and the temperature are fp32 as torch casts a Python float, and a CUDA tensor divided by a
    Python float is multiplied by its fp32 reciprocal, so here too). Greedy rows (a temperature below fp32's tiny,
    sample_next's rule) are the logits' argmax. The settings are not checked again: the engine's submit did.
    triton: sample_next's triton=True, the sampled rows' cuts and draw in one launch of the Triton kernel with each
    row's settings (kernels/sampling.py sample_token_rows), each row's token the one sample_next(triton=True) draws
    for its request alone from the same uniform."""
    V, device = logits.size(-1), logits.device
    greedy = [w.get("temperature", 0.0) < torch.finfo(torch.float32).tiny for w in warps]

    def rows(value):  # a request's setting on each of its sampled rows
        return [value(w) for w, g, n in zip(warps, greedy, sizes) if not g for _ in range(n)]

    def at(flags):  # the rows a cut applies to: all, or their index, sent without waiting (as logit_bias's)
        return slice(None) if all(flags) else torch.tensor([i for i, f in enumerate(flags) if f]).to(
            device, non_blocking=True)

    nxt = logits.argmax(dim=-1, keepdim=True) if any(greedy) else None
    if all(greedy):
        return nxt
    sampled = at([not g for g, n in zip(greedy, sizes) for _ in range(n)])

    def uniforms():  # the sampled rows' u: the unseeded requests' from one torch.rand, then each seeded one's own
        unseeded = sum(n for g, gr, n in zip(generators, greedy, sizes) if g is None and not gr)
        shared = torch.rand(unseeded, device=device) if unseeded else None
        u, row = [], 0
        for g, gr, n in zip(generators, greedy, sizes):
            if g is None and not gr:
                u.append(shared[row:row + n])
                row += n
            elif not gr:
                u.append(torch.rand(n, generator=g, device=device))
        return torch.cat(u) if len(u) > 1 else u[0]

    if triton:
        from tritongpt.kernels.sampling import sample_token_rows
        # the settings as sample_next hands them to sample_tokens, a row each (host tensors: checked on the host,
        # sent without waiting); top_k V and top_p 1 are no cut, as there. A top_p below 1e-30 (0 in fp32, which
        # sample_token_rows refuses) is 1e-30, as sample_tokens' launch makes it: the likeliest token kept
        drawn = sample_token_rows(
            logits[sampled], uniforms(), torch.tensor(rows(lambda w: w["temperature"]), dtype=torch.float32),
            torch.tensor(rows(lambda w: 0 if w.get("top_k") is None else min(int(w["top_k"]), V)),
                         dtype=torch.int64),
            torch.tensor(rows(lambda w: min(max(w["top_p"], 1e-30), 1.0) if w.get("top_p") is not None else 1.0),
                         dtype=torch.float32),
            torch.tensor(rows(lambda w: w.get("min_p") or 0.0), dtype=torch.float32),
            torch.tensor(rows(lambda w: bool(w.get("min_p_first"))), dtype=torch.bool))[:, None]
        return drawn if nxt is None else nxt.index_put((sampled,), drawn)
    temperature = torch.tensor(rows(lambda w: w["temperature"]), dtype=torch.float32)
    if device.type == "cuda":
        temperature = 1 / temperature  # (on the host, in fp32: the CUDA kernel's reciprocal of a Python float)
    top_k = rows(lambda w: 0 if w.get("top_k") is None else min(int(w["top_k"]), V))
    top_p = rows(lambda w: w["top_p"] if w.get("top_p") is not None and w["top_p"] < 1.0 else 1.0)
    first = rows(lambda w: (w.get("min_p") or 0.0) if w.get("min_p_first") else 0.0)
    later = rows(lambda w: 0.0 if w.get("min_p_first") else (w.get("min_p") or 0.0))
    # a setting a row of one table, in float64 (exact for each: fp32 temperatures, ints, top_p as Python compares
    # it), sent in one copy without waiting
    table = torch.tensor([temperature.tolist(), top_k, top_p, first, later], dtype=torch.float64).to(
        device, non_blocking=True)
    temperature_row, top_k_row, top_p_row, first_row, later_row = table  # (its rows, by name: views of the one copy)
    # the sampled rows only, and each cut on the rows that ask for it: on a CPU the cost is the FLOPs, and a sort
    # of every row for one row's top_p made the step slower than drawing each request alone
    x = logits[sampled].float()
    x = x - x.amax(dim=-1, keepdim=True)
    x = x * temperature_row[:, None].float() if device.type == "cuda" else x / temperature_row[:, None].float()
    if any(first):
        i = at([m > 0 for m in first])
        x[i] = cut_min_p(x[i], first_row[i, None].float())
    if any(top_k):
        i = at([k > 0 for k in top_k])
        y, k = x[i], top_k_row[i].long()
        kth = torch.topk(y, max(top_k)).values.gather(-1, (k - 1)[:, None])
        x[i] = y.masked_fill(y < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        i = at([p < 1.0 for p in top_p])
        y = x[i]
        sorted_y, order = torch.sort(y, descending=True, stable=True)
        probs = torch.softmax(sorted_y.double(), dim=-1)
        above = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
        sorted_y = sorted_y.masked_fill(above >= top_p_row[i, None], float("-inf"))
        x[i] = torch.full_like(y, float("-inf")).scatter(-1, order, sorted_y)
    if any(later):
        i = at([m > 0 for m in later])
        x[i] = cut_min_p(x[i], later_row[i, None].float())
    drawn = draw_with_uniform(x, uniforms())[:, None]
    if nxt is None:
        return drawn
    return nxt.index_put((sampled,), drawn)


def allow_and_ban(logits, allowed_token_ids=None, bad_words=None, seen=None, generated_from=None, live=None):
    """vLLM's allowed_token_ids and bad_words (SamplingParams; vllm/v1/sample/ops/bad_words.py) on logits [B, V]:
    every id outside allowed_token_ids -inf; a bad word's (a list of ids) last id -inf where its other ids end the
    row's generated text (seen [B, T] from column generated_from: vLLM matches its output tokens, not the prompt),
    a one-id word's always. live [B] (None: all): a live row left nothing to draw (a grammar's mask before, or a
    word banning the last allowed id) is an error, not NaN (one host sync a step, only with these settings)."""
    B, V = logits.shape
    ids = list(allowed_token_ids or ()) + [t for word in bad_words or () for t in word]
    if ids and max(ids) >= V:  # (on the host: no sync)
        raise UserError(f"allowed_token_ids or bad_words have token id {max(ids)}, outside the {V} tokens drawn from")
    singles = tuple(word[0] for word in bad_words or () if len(word) == 1)
    ban = static_ban(tuple(allowed_token_ids) if allowed_token_ids else None, singles, V, logits.device)
    ban = ban.expand(B, V)
    words, hits, static = [word for word in bad_words or () if len(word) > 1], [], ban
    if words:  # (the cached mask is shared: the rows' own bans on a copy)
        ban = ban.clone()
    for word in words:
        need = len(word) - 1
        if seen is None or generated_from is None:
            raise UserError("a bad word of several tokens needs the ids so far (seen) and where the generated ones "
                            "start (generated_from)")
        T = seen.size(1)
        if T < need:
            continue
        prefix = torch.tensor(word[:-1]).to(seen.device, non_blocking=True)
        hit = (seen[:, T - need:] == prefix).all(-1) & (T - generated_from >= need)
        ban[:, word[-1]] |= hit
        hits.append((word, hit))

    def why(row):  # (the error's path only) the words of several tokens that banned the row's last drawable ones
        left = logits[row].masked_fill(static[row], float("-inf")) > float("-inf")
        named = [word for word, hit in hits if bool(hit[row]) and bool(left[word[-1]])]
        return words_emptied(named) if named else None
    masked = logits.masked_fill(ban, float("-inf"))
    check_drawable(masked, live, why)
    return masked


class DrawError(FieldError):
    """check_drawable's: a live row left no token to draw; field: the setting to change where one alone did (serve's
    400 param), else None."""


def words_emptied(named) -> DrawError:
    """The error of bad words of several tokens (named: [[ids], ...]) whose last tokens, banned after their others,
    were all a row had left: a grammar's end allows only its end tokens, so a word of a text's last tokens and an
    end token leaves a text that ends with those nothing there. (masked_ends, before any token, sees one-token words
    only: whether a text ends with a word's other tokens is the draw's.)"""
    named = [list(w) for w in dict.fromkeys(map(tuple, named))]  # a word listed twice is named once
    one = len(named) == 1
    ends = list(dict.fromkeys(word[-1] for word in named))
    return DrawError(f"bad_words {', '.join(map(str, named))} ban{'s' * one} token{'s' * (len(ends) > 1)} "
                     f"{', '.join(map(str, ends))} after {'its' if one else 'their'} other tokens, which the text ends "
                     "with, and that leaves a row no token to draw: the other masks allow no other there (a "
                     "grammar's end only its end tokens, allowed_token_ids only its ids); ban other words",
                     "bad_words")


def bad_words_tokens(encode, words) -> list:
    """vLLM's bad_words tokenized as its SamplingParams.update_from_tokenizer does: each word (its leading spaces
    stripped) as it is, and with one leading space where that gives a different first token and as many tokens (the
    word in the middle of the text). encode(text) -> ids: without a BOS, a special token's spelling its id (vLLM's
    tokenizer's reading). -> [[ids], ...] (serve's bad_words, generate's --bad-words)"""
    out = []
    for word in words:
        for prefix in ("", " "):
            ids = encode(prefix + word.lstrip())
            if ids and (not prefix or (ids[0] != out[-1][0] and len(ids) == len(out[-1]))):
                out.append(ids)
    return out


@functools.lru_cache(maxsize=16)
def static_ban(allowed: tuple | None, singles: tuple, V: int, device) -> torch.Tensor:
    """allow_and_ban's mask [V] of the ids banned at every step (outside allowed, the one-token bad words), on
    device: built once for a request's ids and reused each decode step (cached by them; built anew each step, it
    was ~37 ms on the host at 50k allowed ids of GPT-2's vocabulary, and a [rows, V] copy to the device). Shared:
    never written."""
    ban = torch.zeros(V, dtype=torch.bool)
    if allowed:
        ban[:] = True
        ban[list(allowed)] = False
    ban[list(singles)] = True
    return ban.to(device)


def check_drawable(logits, live=None, why=None) -> None:
    """allow_and_ban's check on logits [B, V]: a live row (live [B], None: all) whose every logit is -inf is an
    error (a DrawError), not NaN or a silent token 0 (one host sync). why(row): the first such row's own error, or
    None for the general one."""
    empty = (logits == float("-inf")).all(-1)
    if live is not None:
        empty = empty & live
    if bool(empty.any()):
        raise (why and why(int(empty.nonzero()[0]))) or DrawError(
            "allowed_token_ids and bad_words leave a row no token to draw (with the other masks: a grammar's, "
            "min_tokens'): allow more tokens, or ban fewer")


def masked_ends(ends, allowed_token_ids=None, bad_words=None, name=lambda n: n, whose="the structured outputs'",
                wake=None):
    """A grammar's text ends with one of `ends` (end_rule's: the EOS and the stop tokens; the grammar's end allows
    the special ones, Guide.begin, and a text stop token ends the text where the grammar takes it as text):
    allowed_token_ids that leave them all out, or bad_words of one token that ban the rest, leave every text
    reaching the grammar's end no token to draw, an error only then (check_drawable's), mid-text (as a word of several
    tokens ending in one does where the text ends with its others: words_emptied's, not refused here). (The field to
    name, the error) before any token, or None; None too where only a text stop token is left (a text may end at
    it before the grammar's end, as it did). name: how a field is named (serve's quoted, the commands' flags),
    whose: the grammar's. wake: the token the grammar waits for (Guide.wake): masks that leave it out too never
    wake it, so a text never reaches its end (it runs to its budget, as without a grammar): None."""
    if wake is not None and masked_ends([wake], allowed_token_ids, bad_words) is not None:
        return None
    ends = list(dict.fromkeys(ends or ()))

    def said(ids):
        return f"token {ids[0]}, the end" if len(ids) == 1 else f"tokens {', '.join(map(str, ids))}, the ends"
    left = [e for e in ends if not allowed_token_ids or e in allowed_token_ids]
    if not left:
        return "allowed_token_ids", (f"{name('allowed_token_ids')} leaves out {said(ends)} of the text, which "
                                     f"{whose} grammar ends it with: allow {'it' if len(ends) == 1 else 'one'} too")
    if set(left) <= {w[0] for w in bad_words or () if len(w) == 1}:
        rest = len(ends) - len(left)  # (the ends allowed_token_ids left out: named apart, bad_words bans the others)
        also = f" ({name('allowed_token_ids')} leaves out the other{'s' * (rest > 1)})" if rest else ""
        return "bad_words", (f"{name('bad_words')} bans {said(left)} of the text{also}, which {whose} grammar ends "
                             "it with: ban other words")
    return None


def check_masks_reach_end(ends, allowed_token_ids, bad_words, wake=None) -> None:
    """masked_ends' refusal as a FieldError naming its field (generate() and Engine.submit; serve, which refuses it
    before, names the field in its 400 as well)."""
    masked = masked_ends(ends, allowed_token_ids, bad_words, wake=wake)
    if masked is not None:
        raise FieldError(masked[1], masked[0])


def cut_top_n_sigma(logits, n: float):
    """Top-n-sigma (Tang et al. 2024, "Top-nσ: Not All Logits Are You Need"): keep the tokens whose logit is at
    least max - n * std of the row's logits, as llama.cpp's llama_sampler_top_n_sigma_apply (the population std
    over the finite logits: an n-gram ban's -inf left out). Scaling the logits scales max and std alike, so the
    tokens kept do not depend on the temperature."""
    x = logits.double()
    finite = torch.isfinite(x)
    count = finite.sum(dim=-1, keepdim=True)
    mean = torch.where(finite, x, 0.0).sum(dim=-1, keepdim=True) / count
    std = (torch.where(finite, x - mean, 0.0) ** 2).sum(dim=-1, keepdim=True).div(count).sqrt()
    return logits.masked_fill(x < x.amax(dim=-1, keepdim=True) - n * std, float("-inf"))


def cut_typical(logits, mass: float):
    """Locally typical sampling (Meister et al. 2022), as transformers' TypicalLogitsWarper (min_tokens_to_keep
    1): the tokens ranked by how far their surprisal -log p is from the entropy, nearest first, are kept until
    their probabilities sum to mass (the one that reaches it included). In float64 (as top-p here)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)  # nansum: 0 * -inf of a cut token
    distance = (-logp - entropy).abs()  # inf for a cut token: ranked last
    sorted_distance, order = torch.sort(distance, dim=-1)
    mass_so_far = logp.gather(-1, order).exp().cumsum(dim=-1)
    # the first rank whose running mass reaches `mass` (the last where rounding leaves the sum short of it)
    last = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    drop = sorted_distance > sorted_distance.gather(-1, last)  # ties with the last token kept stay
    drop[:, 0] = False  # the nearest token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def cut_below(logits, threshold):
    """Truncation sampling (Hewitt et al. 2022), as transformers' EpsilonLogitsWarper and EtaLogitsWarper
    (min_tokens_to_keep 1): drop the tokens less likely than threshold (a number, or one per row [B, 1]), but
    never the likeliest."""
    probs = torch.softmax(logits.double(), dim=-1)
    drop = (probs < threshold) & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, vocab_limit: int | None = None, on_token=None,
             min_p: float | None = None, repetition_penalty: float | None = None, stop=None,
             frequency_penalty: float | None = None, presence_penalty: float | None = None,
             no_repeat_ngram_size: int | None = None, draft=None, num_draft_tokens: int | None = None,
             stats: dict | None = None, typical_p: float | None = None, epsilon_cutoff: float | None = None,
             eta_cutoff: float | None = None, top_n_sigma: float | None = None, prompt_lookup: int | None = None,
             cuda_graph: bool = False, kv_cache_dtype: str = "auto", logit_bias: dict | None = None,
             logprobs: int | None = None, stop_token_ids=None, min_tokens: int = 0, ignore_eos: bool = False,
             guide=None, allowed_token_ids=None, bad_words=None, hold_ids=None, min_p_first: bool = False):
    """Extend idx [B, T] by up to max_new_tokens tokens; rows stop after emitting eos_id.

    Returns [B, T + n]. Rows that finished early are padded with eos_id. vocab_limit: only ids
    below it are drawn (a tokenizer smaller than the model's vocabulary cannot decode the rest).
    on_token: called with each step's new tokens [B, 1] as they are drawn (to stream the text).
    repetition_penalty: on every id of the row so far, the prompt's included (transformers' too).
    frequency_penalty, presence_penalty (each in [-2, 2], 0 = none, as OpenAI's and vLLM's): logit[t] -= F *
    count(t) + P * (count(t) > 0), count(t) how often t is among the ids this call generated in that row, the
    prompt's NOT counted (vLLM's output tokens). Every row's generated ids start at column idx.size(1): prompts
    of different lengths batched together must be left-padded to one width, their padding then counts as prompt.
    no_repeat_ngram_size N: a token that would complete an N-gram already in the row (prompt included, as
    transformers' no_repeat_ngram_size) is never drawn.
    typical_p (in (0, 1], 1 = off), epsilon_cutoff and eta_cutoff (in [0, 1), 0 = off): transformers' locally typical
    sampling and truncation sampling; top_n_sigma n > 0: only tokens whose logit is within n standard deviations of
    the row's largest (see sampling_logits for the order).
    stop: called with the rows so far [B, T + n] after each step, returns which rows are finished [B] (a stop
    string drawn, say): those stop as at eos_id (padded with it where there is one).
    draft: a smaller model of the same vocabulary for speculative decoding (with the cache, the text within the
    model's context): it proposes num_draft_tokens tokens a step, which the model checks in one forward over all
    rows. Every setting above applies as without it. stats: a dict, filled with the target forwards run and the
    draft tokens proposed and accepted, summed over the rows live at each (accepted_per_forward: their mean a
    forward and row). num_draft_tokens: default 4 with a draft, 10 with prompt_lookup (transformers' default).
    prompt_lookup N: prompt lookup decoding, a draft without a model (not with draft): each row proposes up to
    num_draft_tokens tokens that followed the most recent earlier occurrence of its last n-gram, n from N down to 1
    (transformers' max_matching_ngram_size; 2 is its default), in the prompt or the text generated so far; a row
    that finds none runs a plain step. draft=Prediction(ids): a predicted output (OpenAI's), another draft without
    a model: the rows propose the prediction's tokens where their text stands in it (Prediction).
    cuda_graph: each decode step after the prefill (one token a row) a replay of a CUDA graph captured at the first
    (DecodeGraph): the same tokens, without the host's per-launch cost. CUDA only, with the cache, not with a draft.
    kv_cache_dtype: "auto" (the cache in the model's compute dtype) or "int8" (KVCache's int8 values with a scale per
    vector, about half the bytes; every attention, the prefill's too, reads the values back from it). With a draft
    model only the model's own cache is int8: the draft's stays float (it only proposes). Needs use_cache.
    logit_bias {token id: bias in [-100, 100]}: added to the logits before the settings above (sampling_logits).
    allowed_token_ids [ids], bad_words [[ids], ...] (vLLM's SamplingParams, tokenized): only allowed ids drawn, and
    never a bad word's last id after its other ids (allow_and_ban; before logit_bias; drafts' proposals judged alike).
    logprobs k >= 0: on_token is called as on_token(nxt, step_logprobs(...)): the drawn tokens' log-probabilities
    under the model's raw distribution and the k likeliest tokens' (not with a draft).
    stop_token_ids, min_tokens, ignore_eos (vLLM's SamplingParams; see end_rule): rows also stop after drawing one
    of stop_token_ids (padded with eos_id, or the first of them without one); a row's first min_tokens new tokens
    are never the EOS nor a stop token (their logits -inf where it draws); ignore_eos: the EOS ends no row.
    hold_ids: more ids held back for min_tokens, which end no row (end_rule's).
    min_p_first: min_p before top_k and top_p, vLLM's order (serve's), not transformers' (sampling_logits).
    guide: structured outputs (train/structured.py: Grammars.guide's, not begun): each row's text what its grammar
    allows, ended by an end token at the grammar's end; the logits of the tokens the grammar does not allow are
    -inf before anything else (the logprobs' too, as vLLM's). With a draft or prompt_lookup each verified position
    is masked by the grammar after the drafts before it (verify_step); not with no_repeat_ngram_size there.
    """
    check_prompt(idx)
    # an int (numpy's too): a float or None failed in range() or a comparison with a bare TypeError
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                   no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=logit_bias,
                   allowed_token_ids=allowed_token_ids, bad_words=bad_words, min_p_first=min_p_first)
    check_logprobs(logprobs)
    if logprobs is not None and (draft is not None or prompt_lookup is not None):
        raise UserError("logprobs are given by a one-token decode step: not with a draft or prompt_lookup")
    if vocab_limit is not None and (not is_int(vocab_limit) or vocab_limit <= 0):  # it slices the logits
        raise UserError(f"vocab_limit must be a positive integer, got {vocab_limit!r}")
    if draft is not None and prompt_lookup is not None:
        raise UserError("draft and prompt_lookup are two drafts: pass one")
    # (a stand-in model's config may have no vocab_size)
    vocab = vocab_limit or getattr(model.config, "vocab_size", None)
    pad, ends, hold = end_rule(eos_id, stop_token_ids, min_tokens, ignore_eos, vocab, hold_ids)
    if hold is not None and (draft is not None or prompt_lookup is not None):
        raise UserError("min_tokens masks a one-token decode step's logits: not with a draft or prompt_lookup")
    if guide is not None:
        if (draft is not None or prompt_lookup is not None) and no_repeat_ngram_size:
            raise UserError("structured outputs with a draft or prompt_lookup do not take no_repeat_ngram_size (a "
                            "grammar's text repeats its own n-grams: without a draft it yields to the grammar)")
        guide.begin(idx.size(0), ends, vocab, sampling_with_triton(model))
        check_masks_reach_end(ends, allowed_token_ids, bad_words, guide.wake)
    if not isinstance(cuda_graph, bool):  # (1 and 0.0 would pass `in (True, False)`)
        raise UserError(f"cuda_graph must be a bool, got {cuda_graph!r}")
    if cuda_graph and (draft is not None or prompt_lookup is not None or not use_cache):
        raise UserError("cuda_graph replays a one-token decode step over the KV cache: it takes use_cache=True and "
                        "no draft or prompt_lookup (their steps check several tokens)")
    if cuda_graph:
        check_graphable(model)
    check_cache_dtype(kv_cache_dtype, use_cache)
    if prompt_lookup is not None:
        draft = PromptLookup(prompt_lookup)
    if num_draft_tokens is None:
        num_draft_tokens = 10 if isinstance(draft, MODELLESS) else 4
    if draft is not None:
        check_draft(model, draft, idx, max_new_tokens, num_draft_tokens, use_cache)
    if isinstance(draft, Prediction):
        draft.begin(idx.size(0), model.config.vocab_size)
    lookup = isinstance(draft, MODELLESS)
    was_training = model.training, draft is not None and not lookup and draft.training
    model.eval()
    if draft is not None and not lookup:
        draft.eval()
    try:
        warp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma,
                    logit_bias=logit_bias, allowed_token_ids=allowed_token_ids, bad_words=bad_words,
                    min_p_first=min_p_first)
        if draft is not None:
            return _speculative(model, draft, idx, max_new_tokens, warp, pad, generator, vocab_limit, on_token,
                                stop, num_draft_tokens, stats, kv_cache_dtype, ends, guide)
        return _generate(model, idx, max_new_tokens, warp, pad, use_cache, generator, vocab_limit, on_token, stop,
                         cuda_graph, kv_cache_dtype, logprobs, ends, hold, guide)
    finally:
        model.train(was_training[0])
        if draft is not None and not lookup:
            draft.train(was_training[1])


def check_cache_dtype(kv_cache_dtype, use_cache: bool = True) -> None:
    """generate()'s (and beam_search's) kv_cache_dtype: "auto" or "int8", the latter with the cache (the commands'
    --kv-cache-dtype is checked by its parser's choices)."""
    name = "kv_cache_dtype"
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"{name} must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype != "auto" and not use_cache:
        raise UserError(f"{name} {kv_cache_dtype} is the KV cache's storage: it needs use_cache=True")


def new_cache(model, batch_size: int, max_len: int, kv_cache_dtype: str = "auto"):
    """model.new_cache, int8 (kv_dtype) when asked: "auto" calls it as before, so a model (or a test's stand-in)
    whose new_cache takes no kv_dtype decodes as it did."""
    if kv_cache_dtype == "auto":
        return model.new_cache(batch_size, max_len)
    return model.new_cache(batch_size, max_len, kv_dtype=kv_cache_dtype)


def check_draft(model, draft, idx, max_new_tokens: int, num_draft_tokens: int, use_cache: bool = True,
                flags: bool = False) -> None:
    """What speculative decoding needs, checked before any work. flags: name them as command-line flags."""
    name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
    k_name = "--draft-tokens" if flags else "num_draft_tokens"
    lookup = isinstance(draft, MODELLESS)
    what = name("prompt_lookup") if isinstance(draft, PromptLookup) else \
        "a prediction" if isinstance(draft, Prediction) else name("draft")
    if not is_int(num_draft_tokens) or num_draft_tokens < 1:
        raise UserError(f"{k_name} must be a positive integer, got {num_draft_tokens!r}")
    if not use_cache:
        raise UserError(f"speculative decoding ({what}) needs the KV cache (use_cache=True): the model's cache is "
                        "cropped back to the draft tokens it accepts")
    target_vocab, draft_vocab = model.config.vocab_size, getattr(getattr(draft, "config", None), "vocab_size", None)
    if not lookup and draft_vocab != target_vocab:
        raise UserError(f"the {name('draft')} model's vocabulary has {draft_vocab} tokens, the model's "
                        f"{target_vocab}: a draft must share the model's tokenizer")
    ctx = model.config.context_length
    if max_new_tokens and idx.size(1) + max_new_tokens - 1 > ctx:
        # past the context the window slides and every step prefills it again: nothing left to speculate on
        raise UserError(f"speculative decoding ({what}) keeps the text within the model's context: "
                        f"prompt {idx.size(1)} + {name('max_new_tokens')} {max_new_tokens} - 1 > context length "
                        f"{ctx} (without {what} the window slides)")


def crosses_longrope(cfg, cached: int, length: int) -> bool:
    """Whether a LongRoPE model (Phi-3's 128k ones) whose cache holds `cached` positions, all within the original
    context and so rotated with the short factors, now runs `length` positions, past it: the long factors rotate
    every position then, so the cache is computed again, as transformers' Phi-3 generate does (once)."""
    scaling = cfg.rope_scaling
    if not scaling or scaling["rope_type"] != "longrope":
        return False
    original = scaling["original_max_position_embeddings"]
    return cached <= original < length


def last_logits(model, ids, cache=None, keep: int = 1):
    """The logits of ids' last `keep` positions only, [B, keep, V]: a GPTModel runs its LM head on those positions
    alone (transformers' logits_to_keep), so a prefill of T prompt tokens makes B x V logits, not B x T x V (an
    8k-token prompt on a 152k vocabulary: 4.9 GB in fp32); any other module (a wrapper) runs whole."""
    h, head, _ = hidden_and_head(model, ids, cache)
    return head(h[:, -keep:])


def capture_cuda_graph(fn, device):
    """torch's recipe (torch.cuda.graphs): fn run twice on a side stream (the first runs pick autotuned kernels and
    cuBLAS's handles, which a capture cannot), then captured once. -> replay(), which relaunches fn's kernels and
    returns fn's output: the same tensors each time, rewritten by each replay. device: where fn's tensors are."""
    if device.type != "cuda":
        raise UserError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
    # All on fn's device, which need not be the current one (--device cuda:1): its streams, and the capture on a
    # stream of its own (torch.cuda.graph's default is one stream for the process, on the device current when it
    # was made: a capture there would record none of this device's kernels)
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def check_graphable(model):
    """Refuses by name a model whose decode step a CUDA graph cannot replay (DecodeGraph's; generate and the
    --cuda-graphs commands ask before any token is drawn, not at the first decode step)."""
    cfg = model.config
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "longrope":
        raise UserError("CUDA-graph decoding does not take LongRoPE models: their RoPE factors switch at a "
                        "length the host decides")
    if cfg.n_experts:
        raise UserError("CUDA-graph decoding does not take mixture-of-experts models: their routing sizes each "
                        "expert's work on the host, which a graph cannot replay")


class DecodeGraph:
    """One KV-cache decode step, tokens [B, 1] -> logits [B, 1, V], captured in a CUDA graph and replayed.

    Why: a decode step of a small model is hundreds of small launches, and their Python costs more than the GPU's
    work (~0.45 ms of host time a layer on the Triton path, launches stubbed); a replay sends them all at once, as
    gpt-fast's and vLLM's CUDA graphs do. The step runs with the cache on_device (KVCache): no host int in it,
    the fill read from cache.fill, which each call sets to cache.pos before the replay, so one capture serves every
    position (and a cache reset or crop). The logits are the graph's own buffer, rewritten by the next call.
    capture(fn, device) -> replay(): capture_cuda_graph by default; tests pass one that records fn on the CPU.
    Not for LongRoPE (its factors follow the length, a host int) nor for MoE models (their routing sizes the
    experts' work on the host).
    Under autocast the step runs without autocast's cache of the weights' 16-bit casts: a graph would read the
    warm-up's casts, stale once the weights change in place and freed when the autocast region ends (torch's rule
    for graphed callables), so each replay casts the weights again. weight_cache=True keeps the cache, and a replay
    casts nothing: only for a graph dropped inside the autocast region it was captured in, the weights unchanged
    meanwhile (generate's own, gone when the call returns; ~6 bytes a parameter a step saved).
    row_fill=True: the cache has a fill a row (KVCache's, or a PagedKVCache; the batching engine's, train/engine.py)
    which the caller sets and advances: the graph reads cache.fill as it is and leaves pos alone, and the caller
    keeps every row's fill within max_len - 1. The warm-up steps write each row's keys at its fill, as the first
    call does again.
    """

    def __init__(self, model, cache, capture=None, weight_cache=False, row_fill=False):
        check_graphable(model)
        self.weight_cache, self.row_fill = weight_cache, row_fill
        if row_fill and cache.fill.shape != (cache.batch_size,):
            raise UserError(f"row_fill needs a fill a row ([{cache.batch_size}]), got shape {tuple(cache.fill.shape)}")
        if not row_fill and cache.pos >= cache.max_len:
            raise UserError(f"the KV cache is full ({cache.pos} of {cache.max_len} positions): no step to capture")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros((cache.batch_size, 1), dtype=torch.long, device=cache.k.device)
        if not row_fill:
            cache.fill.fill_(cache.pos)  # the warm-up steps write at the next position, which the first call rewrites
        try:
            self._replay = (capture or capture_cuda_graph)(self._step, cache.k.device)
        except UserError:
            raise
        except Exception as e:  # a host sync or a CPU tensor in some layer: say which model cannot be captured
            raise UserError(f"this model's decode step could not be captured in a CUDA graph: "
                            f"{type(e).__name__}: {e}") from e

    def _step(self):
        pos, on_device = self.cache.pos, self.cache.on_device  # (a paged cache's is always on)
        self.cache.on_device = True
        device = self.cache.k.device.type
        # (the class's docstring: autocast's weight cache off unless weight_cache; a 16-bit model casts nothing)
        autocast = torch.autocast(device, torch.get_autocast_dtype(device), cache_enabled=False) \
            if torch.is_autocast_enabled(device) and not self.weight_cache else contextlib.nullcontext()
        try:
            with autocast:
                return last_logits(self.model, self.tokens, self.cache)
        finally:  # (an on_device forward leaves pos alone: the calls advance it, once a replay)
            self.cache.on_device = on_device
            self.cache.pos = pos

    def __call__(self, tokens):
        cache = self.cache
        if tokens.shape != self.tokens.shape:
            raise UserError(f"this decode graph steps {tuple(self.tokens.shape)} tokens (one a row), "
                            f"got {tuple(tokens.shape)}")
        if self.row_fill:  # the caller's fill, the caller's to advance
            self.tokens.copy_(tokens)
            return self._replay()
        if cache.pos >= cache.max_len:
            raise UserError(f"KV cache overflow: {cache.pos + 1} positions > capacity {cache.max_len}")
        self.tokens.copy_(tokens)
        cache.fill.fill_(cache.pos)
        logits = self._replay()
        cache.pos += 1
        return logits


def _generate(model, idx, max_new_tokens, warp: dict, eos_id, use_cache, generator, vocab_limit, on_token, stop,
              cuda_graph=False, kv_cache_dtype="auto", logprobs=None, ends=None, hold=None, guide=None):
    ctx = model.config.context_length
    # as long as this call can fill: a whole-context cache of a 131072-position model is gigabytes
    cache = new_cache(model, idx.size(0), min(ctx, idx.size(1) + max_new_tokens), kv_cache_dtype) if use_cache else None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    fed = 0  # how many tokens of idx the cache already holds
    graph = None  # cuda_graph: the decode step's, captured at the first step after the prefill
    start = idx.size(1)  # where every row's generated ids begin (what the frequency/presence penalties count)
    for _ in range(max_new_tokens):
        if cache is None:
            logits = last_logits(model, idx[:, -ctx:])
        else:
            if cache.pos == 0 or idx.size(1) > ctx or crosses_longrope(model.config, cache.pos, idx.size(1)):
                # (re)prefill: first step, the window is full and positions must shift, or LongRoPE's factors
                # switch from short to long and the cached keys' rotation with them
                cache.reset()
                window = idx[:, -ctx:]
                logits = last_logits(model, window, cache)
                fed = idx.size(1)
                if idx.size(1) >= ctx:
                    cache.reset()  # the next step must prefill the shifted window again
            elif cuda_graph:
                if graph is None:
                    # dropped when this call returns, inside the caller's autocast region, the weights unchanged:
                    # the warm-up's cached casts serve every replay
                    graph = DecodeGraph(model, cache, weight_cache=True)
                logits = graph(idx[:, fed:])
                fed = idx.size(1)
            else:
                logits = model(idx[:, fed:], cache)
                fed = idx.size(1)
        idx, finished, _ = decode_step(logits[:, -1, :vocab_limit], idx, start, done, warp, eos_id, generator,
                                       on_token, stop, logprobs, ends, hold, guide, sampling_with_triton(model))
        if finished:
            break
    return idx


def decode_step(logits, idx, start: int, done, warp: dict, eos_id, generator, on_token, stop, logprobs=None, ends=None,
                hold=None, guide=None, triton: bool = False):
    """One step of decoding after the forward, shared by _generate and the serving engine (train/engine.py), which
    runs it on each request's rows of a batched forward: a token for each row of idx [B, T] drawn from logits [B, V]
    (sample_next with warp, the penalties counting from column start), a row done [B] (updated in place) padded
    with eos_id, on_token(nxt [B, 1]) called, stop(idx) asked. -> append_token's (idx [B, T + 1], whether every row
    is done, the rows done on the host).
    logprobs k (not None): on_token(nxt, step_logprobs(logits, nxt, k)) instead, from the very logits drawn from.
    ends, hold: end_rule's (ends None: eos_id alone ends a row). hold (m, ids): while the rows have fewer than m new
    tokens (idx.size(1) - start, a host int: no sync) ids' logits are -inf before the draw; the logprobs stay the
    raw logits' (vLLM's default raw_logprobs are taken before its min_tokens processor too).
    guide (structured outputs, begun): its grammars' mask first, on the logits the logprobs are taken from too
    (vLLM's: its grammar bitmask is applied before the sampler); where min_tokens would then leave a row nothing
    (its grammar at its end: only end tokens allowed), the grammar wins, as where no_repeat_ngram_size would ban
    every token it allows (and allowed_token_ids and bad_words allow). The drawn tokens then advance the grammars
    (one more read of the step's tokens on the host). triton: sample_next's (the model's sampling_with_triton)."""
    if guide is not None:
        logits = guide.mask(logits)
    drawn = logits
    if hold is not None and idx.size(1) - start < hold[0]:
        drawn = held_back(logits, hold[1])
        if guide is not None:  # (on the device: no sync)
            drawn = torch.where((drawn == float("-inf")).all(-1, keepdim=True), logits, drawn)
    if guide is not None and warp.get("no_repeat_ngram_size"):  # (the grammar wins here too: its text repeats
        # its own n-grams, JSON's '": ' after each key, and a ban of all it allows would leave nothing to draw)
        if warp.get("allowed_token_ids") or warp.get("bad_words"):
            # their masks first, as sample_next's: the ban yields to what they and the grammar leave, not to what
            # the grammar alone does (its unbanned tokens all outside allowed_token_ids: nothing left to draw)
            drawn = allow_and_ban(drawn, warp.get("allowed_token_ids"), warp.get("bad_words"), idx, start, ~done)
        banned = ban_repeated_ngrams(drawn, idx, warp["no_repeat_ngram_size"], ~done, strict=False)
        drawn = torch.where((banned == float("-inf")).all(-1, keepdim=True), drawn, banned)
        # (applied: not again in sample_next, whose check of the rows would be a second host sync a step)
        warp = {**warp, "no_repeat_ngram_size": None, "allowed_token_ids": None, "bad_words": None}
    nxt = sample_next(drawn, generator=generator, seen=idx, generated_from=start, live=~done, triton=triton, **warp)
    return take_step(logits, idx, nxt, done, eos_id, on_token, stop, logprobs, ends, guide)


def take_step(logits, idx, nxt, done, eos_id, on_token, stop, logprobs=None, ends=None, guide=None):
    """decode_step's after its draw of nxt [B, 1] from logits [B, V] (the logprobs' raw logits): append_token's,
    on_token given the logprobs with logprobs k, the guide advanced. (The engine's batched draw does its work for
    all its requests at once: take_rows, then append_taken a request.)"""
    if logprobs is not None and on_token is not None:
        on_token = (lambda f: lambda new: f(new, step_logprobs(logits, new, logprobs)))(on_token)
    idx, finished, ended = append_token(idx, nxt, done, eos_id, on_token, stop, ends)
    if guide is not None:
        guide.accept(idx[:, -1].tolist(), ended)
    return idx, finished, ended


def take_rows(logits, nxt, done, pads, ends, reads, logprobs):
    """take_step's batch work for several requests' rows at once (the engine's batched draw, Engine._take_plain):
    request j's raw logits[j] [n_j, V_j] (take_step's), drawn tokens nxt[j] [n_j, 1], done[j] [n_j], pads[j] (its
    eos_id: the padding id; None: nothing pads or ends a row), ends[j] (end_rule's; None: the EOS alone), reads[j]
    (whether its rows' done must be known on the host: an EOS or a stop rule) and logprobs[j] (k or None).
    -> per request (tokens [n_j, 1] padded as append_token pads them, done's host list before the step (None when
    no request reads), the rows the step's EOS or ends end (None without an EOS), step_logprobs' tuple or None),
    for append_taken.
    Why: take_step a request at a time runs a where, a comparison an end and a cat, and done.tolist(): on a GPU a
    host sync a request a step, each waiting for the device. Here the step's tokens and done rows come to the host
    in one copy (none when no request reads), the padding and the ends are decided there, and the logprobs run once
    for the rows of each width and k: the same ops (step_logprobs') on the same rows, so a row's values are those it
    gets alone (a log-softmax, topk and gather are a row's own)."""
    sizes = [x.size(0) for x in nxt]
    drawn = torch.cat(nxt) if len(nxt) > 1 else nxt[0]
    out = [[x, None, None, None] for x in nxt]
    if any(reads):
        # the one read of the step: its tokens and its done rows (as ints), side by side
        rows = torch.cat([drawn, torch.cat(done).to(drawn.dtype)[:, None]], dim=1).tolist()
        padded, row = [], 0
        for j, (n, pad) in enumerate(zip(sizes, pads)):
            part = rows[row:row + n]
            was = [bool(d) for _, d in part]
            toks = [pad if d and pad is not None else t for t, d in part]  # (append_token's where)
            out[j][1] = was
            if pad is not None:  # (append_token's comparisons with each end)
                end_ids = (pad,) if ends[j] is None else ends[j]
                out[j][2] = [d or t in end_ids for t, d in zip(toks, was)]
            padded += toks
            row += n
        if any(pad is not None and any(out[j][1]) for j, pad in enumerate(pads)):  # a row padded: sent, no wait
            drawn = torch.tensor(padded, dtype=drawn.dtype).to(drawn.device, non_blocking=True)[:, None]
            row = 0
            for j, n in enumerate(sizes):
                out[j][0], row = drawn[row:row + n], row + n
    groups = {}
    for j, k in enumerate(logprobs):
        if k is not None:
            groups.setdefault((logits[j].size(-1), k), []).append(j)
    for (_, k), js in groups.items():
        lp = step_logprobs(torch.cat([logits[j] for j in js]), torch.cat([out[j][0] for j in js]), k)
        row = 0
        for j in js:
            out[j][3], row = tuple(t[row:row + sizes[j]] for t in lp), row + sizes[j]
    return [tuple(o) for o in out]


def append_taken(idx, nxt, done, was, ended, on_token, stop, logprobs=None):
    """append_token's for a request's rows after take_rows (nxt padded, was and ended its host lists, logprobs its
    step_logprobs' tuple or None): idx grown, on_token called, stop(idx) asked, done written (on the device, sent
    without waiting) only where a row ended. -> append_token's (idx, whether every row is done, done's host list or
    None)."""
    idx = torch.cat([idx, nxt], dim=1)
    if on_token is not None:
        if logprobs is None:
            on_token(nxt)
        else:
            on_token(nxt, logprobs)
    if stop is not None:
        # (the caller's rule: it reads the ids itself; its answer joined to done on the host, as append_token's |=)
        flags = torch.tensor(ended if ended is not None else was)
        flags |= stop(idx).cpu()
        ended = flags.tolist()
    if ended is not None and ended != was:
        done.copy_(torch.tensor(ended), non_blocking=True)
    return idx, ended is not None and all(ended), ended


def held_back(logits, ids):
    """logits [B, V] with the token ids' -inf (min_tokens' EOS and stop tokens): the ids checked on the host and sent
    without waiting, as logit_bias's, so a decode step does not wait for the GPU here."""
    if max(ids) >= logits.size(-1):
        raise UserError(f"min_tokens holds back token id {max(ids)} (an EOS or stop token), outside the "
                        f"{logits.size(-1)} tokens drawn from")
    return logits.index_fill(-1, torch.tensor(ids).to(logits.device, non_blocking=True), float("-inf"))


def step_logprobs(logits, nxt, k: int, rank: bool = False):
    """The raw log-softmax of logits [B, V] (the model's own distribution, before any bias, penalty, temperature or
    cut: vLLM's default "raw_logprobs") at the tokens nxt [B, 1], and its k likeliest tokens: (logprob [B],
    top ids [B, k], top logprobs [B, k], sorted likeliest first), in float32 on the logits' device: a copy to the
    CPU here would wait for the GPU in every decode step; the consumer's tolist() waits in its own thread, as for
    the drawn tokens. rank: a fourth, each token's rank in its distribution [B] (vLLM's Logprob.rank: the tokens at
    least as likely as it, itself included: 1 the likeliest, a tie counted ahead)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
    lp = logp.gather(-1, nxt).squeeze(-1)
    return (lp, top.indices, top.values) + (((logp >= lp[:, None]).sum(-1, dtype=torch.int32),) if rank else ())


# prompt logprobs (serve's echo, the engine's prompt_logprobs): the LM head and an fp32 log-softmax run on this many
# elements of logits at a time (rows of the vocabulary's width): 64 MB of fp32, where the whole of a 32k-token prompt
# on a 128k vocabulary would be 16 GB
ECHO_CHUNK_ELEMENTS = 2**24


def hidden_and_head(model, ids, cache=None) -> tuple:
    """(ids' hidden states [B, T, C], the LM head as a function of them, the head's width): a GPTModel's apart, so a
    caller runs the head on the positions it needs only (a prefill's last, a scored prompt's in chunks); any other
    module (a wrapper) runs whole, its logits the "hidden states" and the head the identity."""
    from tritongpt.model.gpt import GPTModel

    if isinstance(model, GPTModel):
        return model.hidden(ids, cache), model.logits, model.config.vocab_size
    out = model(ids, cache)
    return out, (lambda x: x), out.size(-1)


def score_positions(h, head, width: int, targets, k: int, limit=None, chunk: int | None = None) -> tuple:
    """step_logprobs' (logprob [m], top ids [m, k], top logprobs [m, k], rank [m]) of hidden states h [>= m, C]
    at targets [m] (each position's next token): the LM head and the log-softmax on `chunk` rows at a time
    (default: ECHO_CHUNK_ELEMENTS of logits, by the head's width: it makes every column, the limit's cut comes
    after), so no [m, V] logits are ever made whole; limit: the vocabulary's tokens (vocab_limit)."""
    chunk = chunk or max(1, ECHO_CHUNK_ELEMENTS // width)
    m = targets.size(0)
    parts = [step_logprobs(head(h[a:min(a + chunk, m)])[:, :limit], targets[a:a + chunk, None], k, rank=True)
             for a in range(0, m, chunk)] or [step_logprobs(head(h[:0])[:, :limit], targets[:0, None], k, rank=True)]
    return tuple(torch.cat(p) for p in zip(*parts))


def prompt_logprobs(model, ids, targets, k: int, limit=None, chunk: int | None = None) -> tuple:
    """ids [1, t] forwarded -> score_positions' rows of its first m positions at targets [m] (vLLM's prompt_logprobs
    give them): the hidden states once (hidden_and_head), the head in chunks. (The batching engine scores a
    prefill's chunks from its own forward: Engine._forward.)"""
    h, head, width = hidden_and_head(model, ids)
    return score_positions(h[0], head, width, targets, k, limit, chunk)


def append_token(idx, nxt, done, eos_id, on_token, stop, ends=None):
    """nxt [B, 1] after idx [B, T], the rows already done padded with eos_id; done [B] updated in place (an EOS,
    or one of ends where given, drawn; stop(idx) asked), on_token(nxt) called. -> (idx [B, T + 1], whether every
    row is done, done as a host list of bools, None when neither an EOS nor a stop rule can end a row): decode_step's
    and the speculative loop's way to take a token. (The list is the one copy to the host the finished check needs
    anyway: the batching engine reads which rows ended from it without a sync of its own.)"""
    if eos_id is not None:
        nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, eos_id), nxt)
        for end in (eos_id,) if ends is None else ends:  # (a few ids: a comparison each, on the device)
            done |= nxt.squeeze(1) == end
    idx = torch.cat([idx, nxt], dim=1)
    if on_token is not None:
        on_token(nxt)
    if stop is not None:
        done |= stop(idx).to(done.device)
    ended = done.tolist() if eos_id is not None or stop is not None else None
    return idx, ended is not None and all(ended), ended


def _feed(model, cache, ids, keep: int = 1):
    """The logits of the last `keep` of the ids the cache does not hold yet (ids [B, n] the whole text so far), the
    cache advanced over them all. LongRoPE's switch from short to long factors computes the cache again, as
    _generate."""
    if crosses_longrope(model.config, cache.pos, ids.size(1)):
        cache.reset()
    return last_logits(model, ids[:, cache.pos:], cache, keep)


def _draw(logits, greedy: bool, generator, triton: bool = False):
    """sample_next's draw from sampling_logits' logits [B, V]: [B, 1]. A sample: one uniform a row from the
    generator, then draw_with_uniform, or (triton) the Triton kernel's draw, which cuts nothing more at temperature 1
    (sampling_logits' logits are already tempered)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    u = torch.rand(logits.size(0), generator=generator, device=logits.device)
    if triton:
        from tritongpt.kernels.sampling import sample_tokens
        return sample_tokens(logits, u, 1.0)[:, None]
    return draw_with_uniform(logits, u)[:, None]


def accept_drafts(p_logits, q_logits, drafted, greedy: bool, generator=None):
    """Speculative sampling's verdict on k draft tokens drafted [B, k]: p_logits [B, k + 1, V], the model's
    logits at each drafted position and the one after, and q_logits [B, k, V], the draft's, both as
    sampling_logits gives them (the distributions sample_next would draw from). Returns (n [B], the number of
    leading draft tokens kept, and nxt [B, 1], the model's token after them).

    Greedy: the draft tokens equal to the model's argmax, then the model's argmax. Sampling: x_j is kept with
    probability min(1, p(x_j) / q(x_j)); at the first one refused, the token comes from norm(max(0, p - q)),
    and after all k from p: each token is then distributed exactly as p (Leviathan et al. 2023, theorem 1)."""
    k = drafted.size(1)
    if greedy:
        want = p_logits.argmax(dim=-1)  # [B, k + 1]
        n = (want[:, :k] == drafted).long().cumprod(dim=-1).sum(dim=-1)
        return n, want.gather(1, n.unsqueeze(1))
    p = torch.softmax(p_logits.float(), dim=-1)
    q = torch.softmax(q_logits.float(), dim=-1)
    px = p[:, :k].gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # [B, k]
    qx = q.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # > 0: the draft drew x from q
    r = torch.rand(px.shape, generator=generator, device=px.device)
    # r < p / q, multiplied out (r uniform on [0, 1): probability min(1, p / q))
    kept = r * qx < px
    n = kept.long().cumprod(dim=-1).sum(dim=-1)  # the leading run of kept tokens
    residual = (p[:, :k] - q).clamp(min=0)
    # a refusal needs p(x) < q(x), so the residual has mass p - q elsewhere; fp32 rounding could leave none
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, :k])
    # row b draws from its residual at n[b] where it refused a token, from p after the last when it kept all
    dist = torch.cat([residual, p[:, k:]], dim=1)[torch.arange(p.size(0), device=p.device), n]
    return n, draw_from_probs(dist, torch.rand(dist.size(0), generator=generator, device=dist.device))[:, None]


class PromptLookup:
    """generate(prompt_lookup=N)'s draft: no model, the text's own n-grams up to max_ngram (lookup_proposals)."""

    def __init__(self, max_ngram: int):
        # checked here: generate(draft=PromptLookup(N)) takes it as prompt_lookup=N does
        if not is_int(max_ngram) or max_ngram < 1:
            raise UserError(f"prompt_lookup (the longest n-gram looked up) must be a positive integer, "
                            f"got {max_ngram!r}")
        self.max_ngram = int(max_ngram)

    def propose(self, idx, start: int, k: int, vocab_limit=None):
        """This step's proposals for idx [B, T] (generated from column start): lookup_draft's."""
        return lookup_draft(idx, self.max_ngram, k, vocab_limit)


class Prediction:
    """A predicted output (OpenAI's Predicted Outputs: chat's `prediction`), a draft without a model: the tokens the
    answer is expected to repeat mostly (a file being edited, say). Each row keeps where its answer stands in them:
    while the answer follows the prediction a step proposes its next k tokens (the first step its first k); where
    the answer departs from it the row looks for its last n-gram, n from max_ngram down to 1, in the prediction (its
    first occurrence ending past the token the row refused there: the rest of an edited text comes after the edit,
    and the place it departed from, or one before it, would propose what it just refused again) and goes on from
    there, proposing nothing until one is found (nor past the prediction's end). The model verifies every proposal
    (verify_step), so a prediction changes how fast the answer comes, never what it is.

    One per call (generate's rows, an engine request's n rows): it keeps each row's place. accepted, rejected: the
    proposals the model kept and refused so far, summed over the rows (OpenAI's usage accepted_prediction_tokens and
    rejected_prediction_tokens; a refused token is one the model computed and did not keep)."""

    def __init__(self, ids, max_ngram: int = 8):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in ids):
            raise UserError(f"a prediction must be a list of token ids (ints >= 0), got {str(ids)[:80]}")
        if not is_int(max_ngram) or max_ngram < 1:
            raise UserError(f"a prediction's max_ngram must be a positive integer, got {max_ngram!r}")
        self.ids, self.max_ngram = [int(t) for t in ids], int(max_ngram)
        self.starts = {}  # token id -> the positions it starts at in ids (where an n-gram match can begin)
        for j, t in enumerate(self.ids):
            self.starts.setdefault(t, []).append(j)
        self.at = self.seen = None  # each row's place (None: lost), the generated tokens read so far
        self.accepted = self.rejected = 0

    def begin(self, rows: int, vocab_size: int | None = None) -> None:
        """Checked before any work, then this call's rows' places (generate's, an engine request's): a token past the
        model's vocabulary would fail the verifying forward (in the engine every request in its batch), and a
        Prediction already in use holds another call's places (its rows, where their answers stand). vocab_size
        None: not checked (propose's own start, for a caller that never began it)."""
        if self.at is not None:
            raise UserError("a Prediction keeps where each row's answer stands in it: one Prediction a call "
                            "(generate's, an engine request's), this one is in use; make a new one")
        bad = next((t for t in self.ids if vocab_size is not None and t >= vocab_size), None)
        if bad is not None:
            raise UserError(f"a prediction's token id {bad} is outside the model's vocabulary [0, {vocab_size})")
        self.at, self.seen, self.lost = [0] * rows, 0, [0] * rows  # lost: where a row departed (resync's `after`)

    def count(self, offered: int, kept: int) -> None:
        """A verified step's tally: offered proposals, kept of them."""
        self.accepted, self.rejected = self.accepted + kept, self.rejected + offered - kept

    def _resync(self, tail: list, after: int):
        """The place after tail's longest suffix (up to max_ngram tokens) found in the prediction ending past
        `after`, with a token after it (the first such match), or None."""
        P = self.ids
        for n in range(min(self.max_ngram, len(tail)), 0, -1):
            gram = tail[-n:]
            for j in self.starts.get(gram[0], ()):
                if after < j + n < len(P) and P[j:j + n] == gram:
                    return j + n
        return None

    def propose(self, idx, start: int, k: int, vocab_limit=None):
        """This step's proposals for idx [B, T] (generated from column start), as lookup_draft's: (drafted [B, k'],
        lens [B]). Reads the tokens generated since its last call to the host, and the rows' last max_ngram tokens
        (two small copies a step)."""
        B = idx.size(0)
        if self.at is None:  # (not begun: its ids taken as they are)
            self.begin(B)
        new = idx[:, start + self.seen:].tolist()
        self.seen = idx.size(1) - start
        P = self.ids
        tails = idx[:, -self.max_ngram:].tolist() if any(new) else None
        rows = []
        for b in range(B):
            at = self.at[b]
            for t in new[b]:
                if at is not None and at < len(P) and P[at] == t:
                    at += 1
                else:
                    if at is not None:
                        self.lost[b] = at
                    at = None
            if at is None and new[b]:
                at = self._resync(tails[b], self.lost[b])
            self.at[b] = at
            got = [] if at is None else P[at:at + k]
            if vocab_limit is not None:  # (a token never drawn ends the proposals, as lookup_draft's)
                cut = next((i for i, t in enumerate(got) if t >= vocab_limit), len(got))
                got = got[:cut]
            rows.append(got)
        width = max(map(len, rows), default=0)
        drafted = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=idx.dtype).view(B, width)
        return drafted.to(idx.device), torch.tensor([len(r) for r in rows], device=idx.device)


MODELLESS = (PromptLookup, Prediction)  # the drafts that run no model: they propose (propose), verify_step judges


def lookup_proposals(idx, max_ngram: int, k: int):
    """Prompt lookup decoding's draft (Saxena 2023, "Prompt Lookup Decoding"; transformers'
    PromptLookupCandidateGenerator, generation/candidate_generator.py): for each row of idx [B, T], its last n-gram
    for n from max_ngram (at most T - 1) down to 1, the first n that occurred earlier in the row (the last n-gram
    itself not counted); the proposals are the up to k tokens that followed its most recent earlier occurrence, cut
    at the end of the text. Returns drafted [B, k'] and lens [B]: row b proposes drafted[b, :lens[b]] (0: no n-gram
    found), the rest is padding; k' is the most a row proposes.

    Two deviations from transformers': it (and the paper's code) takes the FIRST occurrence; the most recent one
    here, the text's latest use of it (a loop being repeated, the copy just edited). And transformers cuts the
    proposals before an EOS (its batch of one would otherwise keep tokens past it); here an EOS kept ends the row as
    a drawn one does, the tokens after it padding."""
    B, T = idx.shape
    start = torch.full((B,), -1, dtype=torch.long, device=idx.device)  # where a row's proposals begin; -1: none yet
    for n in range(min(max_ngram, T - 1), 0, -1):
        windows = idx[:, :-1].unfold(1, n, 1)  # [B, T - n, n]: the n-grams some token follows (not the last)
        match = (windows == idx[:, T - n:].unsqueeze(1)).all(dim=-1)
        latest = T - n - 1 - match.flip(1).long().argmax(dim=1)  # argmax: the first of the flipped, the last match
        start = torch.where((start < 0) & match.any(dim=1), latest + n, start)
    lens = torch.where(start >= 0, (T - start).clamp(max=k), 0)
    pos = start.unsqueeze(1) + torch.arange(int(lens.max()), device=idx.device)
    drafted = idx.gather(1, pos.clamp(0, T - 1))
    return drafted.masked_fill(pos >= (start + lens).unsqueeze(1), 0), lens


def accept_lookup(p_logits, drafted, lens, greedy: bool, generator=None):
    """accept_drafts' verdict on lookup_proposals' drafted [B, k], row b's first lens[b] tokens (the rest padding,
    never kept), p_logits [B, k + 1, V] as there. A lookup's q is one-hot at its token x: x is kept with probability
    min(1, p(x) / 1) = p(x), a refusal draws from norm(max(0, p - q)), p without x; a row that kept all its own
    draws from p at the next position. Greedy: the proposals equal to the model's argmax, then its argmax.

    transformers' _assisted_decoding samples without candidate logits otherwise ("Case 2"): it draws y_j from p at
    every position and keeps x_j while y_j == x_j, then emits the first y_j that differs: x_j kept with probability
    p(x_j), and the token emitted then distributed as p given y != x_j, norm(p without x_j): the same distribution."""
    B, k, V = drafted.size(0), drafted.size(1), p_logits.size(-1)
    q_logits = torch.full((B, k, V), float("-inf"), device=p_logits.device)
    q_logits = q_logits.scatter(-1, drafted.unsqueeze(-1), 0.0)  # softmax: one-hot at each proposal
    n, nxt = accept_drafts(p_logits, q_logits, drafted, greedy, generator)
    # a row that kept its lens < k proposals: its token is p's at lens (accept_drafts' was the padding's residual's).
    # Drawn for those rows alone: a row proposing k (or none at k = 0) uses the generator as a plain step would
    need = (n >= lens) & (lens < k)
    if bool(need.any()):
        rows = need.nonzero().squeeze(1)
        nxt = nxt.index_put((rows,), _draw(p_logits[rows, lens[rows]], greedy, generator))
    return torch.minimum(n, lens), nxt


def _speculative(model, draft, idx, max_new_tokens, warp: dict, eos_id, generator, vocab_limit, on_token, stop,
                 num_draft_tokens: int, stats: dict | None, kv_cache_dtype: str = "auto", ends=None, guide=None):
    """generate() with a draft model (check_draft's conditions hold: the text within the context), B rows at once.

    Both caches hold the text but its last token; each step the draft proposes k tokens for every row (one draft
    forward a position), the model runs the last token and them in one forward over all rows (k + 1 logits), and
    both caches are cropped back to the text kept. The caches have one length for all rows, so every row keeps the
    same number of new tokens a step: m + 1, m the fewest draft tokens a live row accepted (see keep_common).
    A PromptLookup or a Prediction runs no forward and has no cache: each row proposes its own (their propose), up
    to k, and accept_lookup rules on them. kv_cache_dtype: the model's cache's; the draft's own stays float (it only
    proposes, and its cache is the small one). guide: structured outputs, the model's distributions masked by the
    grammars (verify_step), the draft's too (Guide.mask_after: speculative sampling keeps the model's distribution
    whatever the draft's, so this only raises how many drafts are accepted)."""
    greedy = warp["temperature"] < torch.finfo(torch.float32).tiny
    B, cap = idx.size(0), idx.size(1) + max_new_tokens
    cache = new_cache(model, B, min(model.config.context_length, cap), kv_cache_dtype)
    lookup = isinstance(draft, MODELLESS)
    draft_cache = None if lookup else draft.new_cache(B, min(draft.config.context_length, cap))
    start = idx.size(1)  # where the generated ids begin (the frequency/presence penalties count from it)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # rows that ended (EOS, a stop), carried along
    forwards = row_forwards = proposed = accepted = 0
    orig = model.config.rope_scaling and model.config.rope_scaling.get("original_max_position_embeddings")
    longrope = bool(model.config.rope_scaling) and model.config.rope_scaling["rope_type"] == "longrope"
    no_row = torch.zeros(B, dtype=torch.bool, device=idx.device)
    while idx.size(1) - start < max_new_tokens:
        L = idx.size(1)
        # the step's last token is the model's own: k + 1 new tokens at most; the model runs L + k positions,
        # the draft L + k - 1, each within its context
        k = draft_width(L, start, max_new_tokens, num_draft_tokens, model.config.context_length)
        if not lookup:
            k = min(k, draft.config.context_length - L + 1)
        if longrope and L <= orig:
            # LongRoPE rotates a whole forward by its length's factors: the step must not cross the original
            # context, or the positions before it would see the long factors _generate gave them the short ones
            k = min(k, orig - L)
        k = max(k, 0)
        text, q_logits = idx, []
        if lookup:  # rows propose on their own: lens[b] tokens, the rest padding
            drafted, lens = draft.propose(idx, start, k, vocab_limit)
            k = drafted.size(1)
            text = torch.cat([idx, drafted], dim=1)
        for _ in range(0 if lookup else k):
            logits = _feed(draft, draft_cache, text)[:, -1, :vocab_limit]
            if guide is not None:  # (the draft proposes what the grammar allows: more of it is accepted)
                logits = guide.mask_after(logits, text[:, L:])
            # live False: where the n-gram ban leaves a drafted path nothing, its logits stay unbanned rather than
            # raising (a path plain decoding may never take); raised below only if the text kept reaches it
            w = sampling_logits(logits, seen=text, generated_from=start, live=no_row, **warp)
            q_logits.append(w)
            text = torch.cat([text, _draw(w, greedy, generator)], dim=1)
        logits = _feed(model, cache, text, keep=k + 1)[:, -(k + 1):, :vocab_limit]
        idx, m, _, _, live, offered, took = verify_step(logits, text, L, start, done, warp, generator, eos_id,
                                                         on_token, stop, ends, lens if lookup else None,
                                                         None if lookup else q_logits, guide,
                                                         draft if isinstance(draft, Prediction) else None)
        forwards, row_forwards, proposed, accepted = forwards + 1, row_forwards + live, proposed + offered, \
            accepted + took
        if (eos_id is not None or stop is not None) and bool(done.all()):
            break
        # the caches keep the text before the step's last token, which neither has run
        cache.crop(L + m)
        if not lookup:
            draft_cache.crop(min(draft_cache.pos, L + m))
    if stats is not None:
        # per row: a batch's figure is the mean over its rows, each counted for the forwards it was live in
        stats.update(target_forwards=forwards, drafted=proposed, accepted=accepted,
                     accepted_per_forward=accepted / row_forwards if row_forwards else 0.0)
    return idx


def draft_width(L: int, start: int, max_new_tokens: int, num_draft_tokens: int, context: int) -> int:
    """The draft tokens a speculative step of text length L may propose: the step's last token is the model's own,
    so k + 1 new tokens at most within the budget, and the model runs L + k positions within its context."""
    return max(min(num_draft_tokens, max_new_tokens - (L - start) - 1, context - L), 0)


def lookup_draft(idx, max_ngram: int, k: int, vocab_limit=None):
    """A PromptLookup step's proposals (lookup_proposals), a token never drawn ending a row's (transformers' lookup
    ends them at a token its logits processors forbid): (drafted [B, k'], lens [B]), k' the most a row proposes."""
    drafted, lens = lookup_proposals(idx, max_ngram, k)
    if vocab_limit is not None:
        lens = torch.minimum(lens, (drafted < vocab_limit).long().cumprod(dim=1).sum(dim=1))
        drafted = drafted[:, :int(lens.max())].clamp(max=vocab_limit - 1)
    return drafted, lens


def verify_step(logits, text, L: int, start: int, done, warp: dict, generator, eos_id, on_token, stop, ends=None,
                lens=None, q_logits=None, guide=None, prediction=None):
    """A speculative step after the model's forward (_speculative's, and the batching engine's with prompt lookup):
    text [B, L + k] the text and its k draft tokens, logits [B, k + 1, V] the model's at its last k + 1 positions
    (vocab-limited). Each position warped as _generate would (the penalties, the n-gram ban), the drafts judged
    (accept_lookup with lens, a lookup's; else accept_drafts with the draft's q_logits), every row keeping the
    common m (keep_common), its tokens appended one at a time (append_token: EOS, stop, on_token). -> (idx, m,
    whether every row is done, append_token's host list of done rows, the live rows, the tokens they proposed,
    the draft tokens they kept).
    guide: structured outputs (Guide.mask_drafts: each position masked by the grammar after the drafts before it;
    each kept token accepted on the grammars as it is appended).
    prediction: the Prediction that proposed (lens'), its counts told the proposals kept: the m every live row
    keeps, and a row's (m + 1)-th where it accepted more (its last token: in the answer, though not in `accepted`)."""
    if guide is not None:
        logits = guide.mask_drafts(logits, text[:, L:], lens)
    greedy = warp.get("temperature", 0.0) < torch.finfo(torch.float32).tiny  # (the engine's: only the ones given)
    k, ban = text.size(1) - L, warp.get("no_repeat_ngram_size")
    no_row = torch.zeros(text.size(0), dtype=torch.bool, device=text.device)
    # each position warped with the tokens before it: the penalties and the n-gram ban as _generate applies them
    p_logits = torch.stack([sampling_logits(logits[:, j], seen=text[:, :L + j], generated_from=start,
                                            live=no_row, **warp) for j in range(k + 1)], dim=1)
    # a live row that takes its token at a position the masks left nothing is plain decoding's error there, not token
    # 0 (accept_drafts' argmax, or draw of nothing; a grammar then refused it as a bug): the positions where a row has
    # nothing (all -inf, or NaN once tempered), read once, checked below as the rows take their tokens; the n-gram
    # ban's at every position (live=no_row left a row it empties as it was: no error where no row reaches it)
    masks = {key: warp[key] for key in ("allowed_token_ids", "bad_words") if warp.get(key)}
    empty = (~(p_logits > float("-inf")).any(-1)).any(0).tolist() if masks else [False] * (k + 1)
    if lens is not None:
        n, nxt = accept_lookup(p_logits, text[:, L:], lens, greedy, generator)
    else:
        q_logits = torch.stack(q_logits, dim=1) if k else p_logits[:, :0]
        n, nxt = accept_drafts(p_logits, q_logits, text[:, L:], greedy, generator)
    m, kept = keep_common(n, nxt, text[:, L:], done)
    live = int((~done).sum())
    offered = int(lens[~done].sum()) if lens is not None else k * live
    idx, finished, ended, accepted, kept_drafts = text[:, :L], False, None, 0, 0
    for j, tok in enumerate(kept.split(1, dim=1)):  # as _generate does, a token at a time
        if ban or empty[j]:  # the kept text is plain decoding's: where the masks and the ban leave it nothing here,
            # plain decoding's error (the words named), its masks on the text before the position
            sampling_logits(logits[:, j], seen=idx, generated_from=start, live=~done, no_repeat_ngram_size=ban, **masks)
        # the m draft tokens every row keeps (not after an EOS or a stop): a row's accepted (m + 1)-th is the step's
        # own token in the place of the model's, so accepted_per_forward + 1 is the tokens a forward gives a row
        accepted += int((~done).sum()) if j < m else 0
        kept_drafts += int((~done).sum()) if j < m else int((~done & (n > m)).sum())
        idx, finished, ended = append_token(idx, tok, done, eos_id, on_token, stop, ends)
        if guide is not None:
            guide.accept(idx[:, -1].tolist(), ended)
        if finished:
            break
    if prediction is not None:
        prediction.count(offered, kept_drafts)
    return idx, m, finished, ended, live, offered, accepted


def keep_common(n, nxt, drafted, done):
    """The tokens every row keeps this step, [B, m + 1], and m: the fewest draft tokens a live row accepted (n [B]
    and nxt [B, 1] accept_drafts', drafted [B, k]; done [B] the rows already finished, which do not hold the others
    back: their tokens become padding). Every row keeps its first m draft tokens, all accepted; then a row that
    accepted exactly m takes its own next token nxt (the residual's draw, or the model's after all k), and a row
    that accepted more keeps its (m + 1)-th draft token, which it accepted too.

    Why that is the model's distribution (the standard argument for stopping speculative sampling early): a row's
    speculative step emits y_0, y_1, ... one position at a time: y_j is draft x_j if kept (probability
    min(1, p/q)), else a draw from norm(max(0, p - q)) that ends the step; given y_<j, each emitted y_j is
    distributed as p(. | y_<j) (Leviathan et al. 2023, theorem 1, at position j). Ending the step after y_m
    instead, m set by the other rows' draws (independent of this row's) or by this row's own refusal, is a stopping
    rule that reads only what is drawn already: the tokens kept are still the model's own, token by token, and the
    next step starts afresh from them. (transformers' assisted generation refuses a batch: generation/utils.py
    _assisted_decoding, "only supported for batch_size = 1".)"""
    live = ~done
    m = int(n[live].min()) if bool(live.any()) else int(n.min())
    own = n == m
    last = torch.where(own.unsqueeze(1), nxt, drafted[:, m:m + 1]) if m < drafted.size(1) else nxt
    return m, torch.cat([drafted[:, :m], last], dim=1)
