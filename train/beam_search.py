"""Beam search, as transformers' generate(num_beams=N) runs it (transformers 5.x generation/utils.py
GenerationMixin._beam_search and its helpers _get_top_k_continuations, _get_running_beams_for_next_iteration,
_update_finished_beams, _check_early_stop_heuristic, _beam_search_has_unfinished_sequences), step for step:

- a beam's score is the sum of its tokens' log-softmax log-probabilities (fp32, over the model's whole vocabulary;
  ids past vocab_limit are then never chosen, as transformers' suppress_tokens), after the logits processors
  transformers applies to them: the repetition penalty, then the no-repeat n-gram ban (on the log-probabilities,
  not the logits, as transformers' beam search does);
- each step keeps the max(2, 1 + end tokens) * N best continuations over all N beams of a prompt (transformers'
  beams_to_keep: 2 * N with one EOS), enough to go on if N of them end: those ending in an end token (the EOS or one
  of stop_token_ids) or at max_new_tokens among the first N become finished hypotheses, scored
  sum_logprobs / (generated ** length_penalty), generated counting the end token; the N best others run on (a
  finished candidate outside the first N is dropped);
- N finished hypotheses are kept per prompt, the best first; early_stopping True stops a prompt once it has N,
  False once its best running beam, at its current length, cannot beat the worst of them, "never" the same with the
  length that beam could still reach where length_penalty > 0 (transformers' heuristic, not an exact bound).

The N beams of a prompt are rows of one batch and one KV cache: each step runs one forward over all of them (one
new token a row) and the cache's rows are reordered to follow the beams kept (a LongRoPE model's cache is computed
again once the beams pass its original context, as transformers' Phi-3 and generate() do).
"""
import torch

from tritongpt._types import is_int, is_real
from tritongpt.errors import UserError
from tritongpt.train.generate import (ban_repeated_ngrams, check_cache_dtype, check_eos_id, check_prompt,
                                      check_sampling, crosses_longrope, end_rule, new_cache, penalize_repeats)

EARLY_STOPPING = (True, False, "never")


def check_beam_search(num_beams, length_penalty, early_stopping, num_return_sequences, flags: bool = False):
    """The beam settings, checked before any work. flags: name them as command-line flags."""
    name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
    if not is_int(num_beams) or num_beams < 1:
        raise UserError(f"{name('num_beams')} must be a positive integer (1 = no beam search), got {num_beams!r}")
    if not is_real(length_penalty) or length_penalty != length_penalty or abs(length_penalty) == float("inf"):
        raise UserError(f"{name('length_penalty')} must be a finite number, got {length_penalty!r}")
    # `is`: transformers tests `early_stopping is True`, so 1 would silently mean False there
    if not any(early_stopping is e for e in EARLY_STOPPING):
        raise UserError(f"{name('early_stopping')} must be True, False or 'never', got {early_stopping!r}")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise UserError(f"{name('num_return_sequences')} must be an integer in [1, {name('num_beams')} "
                        f"{num_beams}], got {num_return_sequences!r}")


def length_penalty_overflows(length_penalty, max_new_tokens: int) -> bool:
    """Whether a hypothesis' divisor, generated ** length_penalty (generated 1..max_new_tokens), leaves a float's
    range: past it Python's power raises OverflowError, and a negative penalty's underflows to 0 (scores -inf or
    NaN, which no ranking survives). The longest hypothesis' is the extreme either way."""
    try:
        return not float(max_new_tokens) ** float(length_penalty) > 0.0
    except OverflowError:
        return True


def texts_possible(vocab: int, max_new_tokens: int, eos: int = 0) -> int:
    """How many continuations of at most max_new_tokens tokens a vocabulary makes, capped where it passes any number
    of beams: more returned sequences than that were filled with the search's empty slots, each a copy of another
    text scored -1e9, printed as beams. Without an EOS vocab ** max_new_tokens; with eos end tokens (True: one) a text
    ends at its first, so it makes fewer: eos * (vocab - eos) ** (k - 1) texts end there at token k < max_new_tokens,
    beside the (vocab - eos) ** (max_new_tokens - 1) * vocab of max_new_tokens tokens."""
    eos = min(int(eos), vocab)
    if max_new_tokens == 0:  # one text: the prompt, nothing after it
        return 1
    if not eos:
        return vocab ** min(max_new_tokens, 64)
    if vocab - eos <= 1:  # (no growth to cap: every text ends at its first token, or eos more texts a token)
        return vocab if vocab == eos else eos * (max_new_tokens - 1) + vocab
    ended, running = 0, 1  # the texts that ended at an end token, and those without one yet
    for _ in range(min(max_new_tokens - 1, 64)):
        ended, running = ended + running * eos, running * (vocab - eos)
    return ended + running * vocab


def check_return_sequences(num_return_sequences: int, vocab: int, max_new_tokens: int, eos_id, flags: bool = False,
                           stop_token_ids=()):
    """More return sequences than the texts there are (texts_possible: vocab tokens, ending at eos_id if any, or
    one of stop_token_ids) refused. flags: name them as command-line flags."""
    name = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
    texts = texts_possible(vocab, max_new_tokens, len({eos_id, *stop_token_ids} - {None}))
    if max_new_tokens == 0 and num_return_sequences > 1:
        # (each "beam" was the prompt, scored 0: R copies of one text)
        raise UserError(f"{name('num_return_sequences')} {num_return_sequences} with {name('max_new_tokens')} 0: "
                        "no token is generated, so there is one text, the prompt, not "
                        f"{num_return_sequences} beams")
    if num_return_sequences > texts:
        ends = "" if eos_id is None else f" (a text ends at its first EOS, id {eos_id})"
        ends = f" (a text ends at its first end token, ids {sorted({eos_id, *stop_token_ids} - {None})})" \
            if set(stop_token_ids) - {eos_id} else ends
        raise UserError(f"{name('num_return_sequences')} {num_return_sequences} is more than the {texts} texts of "
                        f"{name('max_new_tokens')} {max_new_tokens} there are{ends}: the rest would be empty beams "
                        "(score -1e9)")


@torch.no_grad()
def beam_search(model, idx, max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1, eos_id: int | None = None,
                use_cache: bool = True, vocab_limit: int | None = None, repetition_penalty: float | None = None,
                no_repeat_ngram_size: int | None = None, kv_cache_dtype: str = "auto", on_step=None,
                allowed_token_ids=None, bad_words=None, stop_token_ids=None):
    """Beam search from each row of idx [B, T] (the text within the model's context: no sliding window).
    kv_cache_dtype: generate()'s ("int8": the beams' cache quantized; a reorder moves the scales with the rows).
    on_step(): called before each step after the first; what it raises ends the search (serve: a client gone).
    allowed_token_ids, bad_words (generate()'s): refused by name, as serve's use_beam_search refuses them.
    stop_token_ids: more ids that end a hypothesis beside eos_id (a model's generation config's eos_token_id list, as
    transformers' beam search ends on each of them).

    Returns (ids [B * R, T + n], scores [B * R]), R = num_return_sequences: each prompt's R best finished
    hypotheses, best first, their scores transformers' sequences_scores; shorter ones padded with eos_id
    (the first of stop_token_ids without one).
    """
    check_prompt(idx)
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_beam_search(num_beams, length_penalty, early_stopping, num_return_sequences)
    for name, value in (("allowed_token_ids", allowed_token_ids), ("bad_words", bad_words)):
        if value is not None:  # (they were a bare TypeError: an unexpected keyword)
            raise UserError(f"beam_search does not take {name}: the search scores the model's log-probabilities "
                            "unmasked (generate() draws with it)")
    check_sampling(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    if vocab_limit is not None and (not is_int(vocab_limit) or vocab_limit <= 0):
        raise UserError(f"vocab_limit must be a positive integer, got {vocab_limit!r}")
    check_cache_dtype(kv_cache_dtype, use_cache)
    check_eos_id(eos_id, vocab_limit or model.config.vocab_size)
    # (end_rule's check of them: a list of ids the search may draw)
    ends = list(end_rule(eos_id, stop_token_ids, vocab=vocab_limit or model.config.vocab_size)[1])
    check_return_sequences(num_return_sequences, min(vocab_limit or model.config.vocab_size, model.config.vocab_size),
                           max_new_tokens, eos_id, stop_token_ids=[t for t in ends if t != eos_id])
    B, T = idx.shape
    ctx = model.config.context_length
    if max_new_tokens and T + max_new_tokens - 1 > ctx:
        # the beams' positions would shift every step: each would need its own prefill
        raise UserError(f"beam search keeps the text within the model's context: prompt {T} + max_new_tokens "
                        f"{max_new_tokens} - 1 > context length {ctx}")
    if max_new_tokens and length_penalty_overflows(length_penalty, max_new_tokens):
        raise UserError(f"length_penalty {length_penalty!r} is out of range for max_new_tokens {max_new_tokens}: a "
                        f"hypothesis' score divides by its length ** length_penalty, past a float's range there")
    if max_new_tokens == 0:
        return idx.repeat_interleave(num_return_sequences, 0), torch.zeros(B * num_return_sequences, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        return _beam_search(model, idx, max_new_tokens, num_beams, float(length_penalty), early_stopping,
                            num_return_sequences, eos_id, use_cache, vocab_limit, repetition_penalty,
                            no_repeat_ngram_size, kv_cache_dtype, on_step, ends)
    finally:
        model.train(was_training)


def _beam_search(model, idx, max_new_tokens, N, length_penalty, early_stopping, R, eos_id, use_cache, vocab_limit,
                 repetition_penalty, no_repeat_ngram_size, kv_cache_dtype="auto", on_step=None, end_ids=()):
    B, T = idx.shape
    dev = idx.device
    # end_ids: every id that ends a hypothesis (eos_id among them, first; generation_config's others)
    end_ids = list(end_ids) or ([] if eos_id is None else [eos_id])
    # transformers' beams_to_keep: enough to go on if N of them end (at most every candidate there is)
    K = min(max(2, 1 + len(end_ids)) * N, N * min(vocab_limit or model.config.vocab_size, model.config.vocab_size))
    L = T + max_new_tokens
    fill = -1 if not end_ids else end_ids[0]
    # (made once: a tensor built in the loop would be one more allocation and host-to-device copy every step)
    end_set = torch.tensor(end_ids, dtype=torch.long, device=dev) if end_ids else None
    run = torch.full((B, N, L), fill, dtype=torch.long, device=dev)  # running beams
    run[:, :, :T] = idx.unsqueeze(1)
    # all beams start as the prompt: only the first's continuations count at the first step
    run_scores = torch.zeros(B, N, device=dev)
    run_scores[:, 1:] = -1e9
    # finished hypotheses: N a prompt, -1e9 an empty slot; lengths (generated tokens) to crop the output
    fin, fin_scores = run.clone(), torch.full((B, N), -1e9, device=dev)
    fin_len = torch.zeros(B, N, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, N, dtype=torch.bool, device=dev)
    unsatisfied = torch.ones(B, 1, dtype=torch.bool, device=dev)  # may a running beam still beat them
    top_n = torch.arange(K, device=dev) < N  # only the first N candidates may finish
    offset = torch.arange(B, device=dev).view(-1, 1) * N  # a prompt's first row in the flat batch
    cache = new_cache(model, B * N, min(model.config.context_length, L), kv_cache_dtype) if use_cache else None
    for cur in range(T, L):  # cur: the beams' length
        if on_step is not None and cur > T:
            on_step()
        if cache is None:
            h = model.hidden(run[:, :, :cur].reshape(B * N, cur))
        else:  # the first step prefills the prompt (in every row), then one token a step
            if crosses_longrope(model.config, cache.pos, cur):
                cache.reset()  # LongRoPE's long factors now rotate every position: the beams' keys again, as generate's
            h = model.hidden(run[:, :, cache.pos:cur].reshape(B * N, -1), cache)
        # the LM head on the last position alone (transformers' logits_to_keep=1): the prefill's whole prompt would
        # be B * N * T * V logits. The log-softmax over the whole vocabulary, then the ids past vocab_limit dropped
        # (transformers' suppress_tokens): a beam's score stays its log-probability under the model
        logp = torch.log_softmax(model.logits(h[:, -1]).float(), dim=-1)[:, :vocab_limit]
        seen = run[:, :, :cur].reshape(B * N, cur)
        if repetition_penalty is not None and repetition_penalty != 1.0:
            logp = penalize_repeats(logp, seen, repetition_penalty)
        if no_repeat_ngram_size:
            # a beam with every token banned gets -inf throughout (transformers'), no error: the others go on
            logp = ban_repeated_ngrams(logp, seen, no_repeat_ngram_size, strict=False)
        V = logp.size(-1)
        total = (logp.view(B, N, V) + run_scores.unsqueeze(-1)).view(B, N * V)
        top_scores, top_idx = torch.topk(total, K)  # [B, K], best first
        src = top_idx // V  # the beam each candidate continues
        cand = run.gather(1, src.unsqueeze(-1).expand(B, K, L)).clone()
        cand[:, :, cur] = top_idx % V
        # transformers' stopping criteria: the EOS drawn, or max_length reached (every candidate then)
        ends = torch.full((B, K), cur + 1 >= L, device=dev)
        if end_set is not None:
            ends |= torch.isin(cand[:, :, cur], end_set)
        # the N best candidates that did not end run on
        going = top_scores + ends.float() * -1e9
        keep = torch.topk(going, N).indices
        run = cand.gather(1, keep.unsqueeze(-1).expand(B, N, L))
        run_scores = going.gather(1, keep)
        # the ended ones among the first N join the finished, if they beat the worst kept (length penalized)
        scores = top_scores / ((cur + 1 - T) ** length_penalty)
        if early_stopping is True:
            scores = scores + (fin_done.all(dim=1, keepdim=True)).float() * -1e9  # full: closed
        scores = scores + (~unsatisfied).float() * -1e9
        just = ends & top_n
        scores = scores + (~just).float() * -1e9
        best = torch.topk(torch.cat([fin_scores, scores], dim=1), N).indices
        fin = torch.cat([fin, cand], dim=1).gather(1, best.unsqueeze(-1).expand(B, N, L))
        fin_scores = torch.cat([fin_scores, scores], dim=1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full((B, K), cur + 1 - T, device=dev)], dim=1).gather(1, best)
        fin_done = torch.cat([fin_done, just], dim=1).gather(1, best)
        if cache is not None:
            cache.reorder((src.gather(1, keep) + offset).view(-1))
        # transformers' heuristic: the best running beam at its length now ("never", length_penalty > 0: at the
        # longest it may reach) against the worst finished, once every slot holds one
        length = (L - T) if early_stopping == "never" and length_penalty > 0.0 else (cur + 1 - T)
        possible = run_scores[:, :1] / (length ** length_penalty)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, -1e9)
        unsatisfied = unsatisfied & (possible > worst).any(dim=-1, keepdim=True)
        if not (bool(unsatisfied.any()) and not (bool(fin_done.all()) and early_stopping is True)
                and not bool(ends.all())):
            break
    out = fin[:, :R].reshape(B * R, L)
    return out[:, :T + int(fin_len[:, :R].max())], fin_scores[:, :R].reshape(B * R)
