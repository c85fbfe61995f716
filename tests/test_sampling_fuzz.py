"""Differential fuzz of generation's logits processing against the libraries the commands claim to match:
sampling_logits against transformers' LogitsProcessor chain in its _get_logits_processor order (generate's flags),
the masks, bias and penalties against vLLM's sampler (serve's fields, written out here from vllm/v1/sample/sampler.py
and model_executor/layers/utils.py apply_penalties), and sample_next's Triton path against its reference path.

The logits are continuous random numbers: no two tie, so the kept sets are defined. At a tie on the top-p edge
transformers keeps whichever of the tied tokens its unstable ascending sort puts last (no fixed rule, seen to vary
with the row), we keep the earliest in vocabulary order (test_sampling_kernel's ties tests); not fuzzed here.
The cuts' order: transformers' (top-k, top-p, min-p) by default, generate's; vLLM applies min_p after the temperature
and BEFORE top-k / top-p (top-p then weighs only the tokens min_p left): sampling_logits(min_p_first=True), serve's."""
import math
import random

import pytest
import torch

from tritongpt.train.generate import sample_next, sampling_logits


def transformers_chain(transformers, seen, scores, s):
    """transformers' processed scores for settings s, its processors in _get_logits_processor's order."""
    steps = []
    if s.get("repetition_penalty"):
        steps.append(transformers.RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
    if s.get("no_repeat_ngram_size"):
        steps.append(transformers.NoRepeatNGramLogitsProcessor(s["no_repeat_ngram_size"]))
    if s["temperature"] != 1.0:
        steps.append(transformers.TemperatureLogitsWarper(s["temperature"]))
    for key, cls in (("top_k", "TopKLogitsWarper"), ("top_p", "TopPLogitsWarper"), ("min_p", "MinPLogitsWarper"),
                     ("typical_p", "TypicalLogitsWarper"), ("epsilon_cutoff", "EpsilonLogitsWarper"),
                     ("eta_cutoff", "EtaLogitsWarper")):
        if key in s:
            steps.append(getattr(transformers, cls)(s[key]))
    for step in steps:
        scores = step(seen, scores)
    return scores


def random_settings(rng, V):
    s = dict(temperature=rng.choice([0.7, 1.0, 1.5, 3.0]))
    choices = dict(top_k=[1, 5, 40, V + 3], top_p=[0.3, 0.9, 0.95, rng.random()], min_p=[0.05, 0.2, rng.random()],
                   repetition_penalty=[0.6, 1.3, 2.0], no_repeat_ngram_size=[2, 3])
    for key, values in choices.items():
        if rng.random() < 0.5:
            s[key] = rng.choice(values)
    # the rarer warpers, one at most (each cuts on what the ones before left)
    key = rng.choice(["typical_p", "epsilon_cutoff", "eta_cutoff", None, None])
    if key:
        s[key] = rng.choice([0.5, 0.9]) if key == "typical_p" else rng.choice([3e-4, 3e-3])
    return s


def test_sampling_logits_keep_transformers_tokens_with_its_probabilities():
    """40 random settings over rows of 37, 1000 and one of GPT-2's 50257 tokens: the same tokens kept (-inf the
    others) and the same distribution as transformers' chain (greedy's ids too, on the penalized logits)."""
    transformers = pytest.importorskip("transformers")
    rng = random.Random(0)
    for case in range(40):
        V = 50257 if case == 0 else rng.choice([37, 1000])
        g = torch.Generator().manual_seed(case)
        logits = torch.randn(2, V, generator=g) * rng.choice([1.0, 4.0])
        # few distinct ids: repeated n-grams and penalized tokens among the likeliest
        seen = torch.randint(0, rng.choice([6, V]), (2, rng.choice([3, 12])), generator=g)
        s = random_settings(rng, V)
        ours = sampling_logits(logits.clone(), seen=seen, **s)
        theirs = transformers_chain(transformers, seen, logits.clone(), s)
        assert torch.equal(ours > -math.inf, theirs > -math.inf), (case, s)
        torch.testing.assert_close(torch.softmax(ours.double(), -1), torch.softmax(theirs.double(), -1),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{case} {s}: {m}")
        greedy = {k: v for k, v in s.items() if k in ("repetition_penalty", "no_repeat_ngram_size")}
        want = transformers_chain(transformers, seen, logits.clone(), dict(greedy, temperature=1.0)).argmax(-1)
        assert torch.equal(sample_next(logits.clone(), seen=seen, **greedy)[:, 0], want), (case, s)


def vllm_processed(logits, prompt, output, s):
    """vLLM's sampler before the temperature, per row: allowed_token_ids, bad_words (matched on the output ids
    only), logit_bias, then the repetition penalty (prompt and output ids), frequency and presence (output ids)."""
    x = logits.clone()
    if s.get("allowed_token_ids"):
        outside = torch.ones(x.size(1), dtype=torch.bool)
        outside[s["allowed_token_ids"]] = False
        x[:, outside] = -math.inf
    for b, out in enumerate(output):
        for word in s.get("bad_words", ()):
            if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]):
                x[b, word[-1]] = -math.inf
    for t, bias in s.get("logit_bias", {}).items():
        x[:, t] += bias
    for b, out in enumerate(output):
        for t in set(prompt[b]) | set(out):
            p = s.get("repetition_penalty", 1.0)
            x[b, t] = x[b, t] / p if x[b, t] > 0 else x[b, t] * p
        for t in set(out):
            x[b, t] -= s.get("frequency_penalty", 0.0) * out.count(t) + s.get("presence_penalty", 0.0)
    return x


def test_masks_bias_and_penalties_are_vllms():
    """40 random combinations of serve's allowed_token_ids, bad_words, logit_bias, repetition, frequency and
    presence penalties: the logits vLLM's sampler gives them before the temperature (greedy's logits here)."""
    rng = random.Random(1)
    for case in range(40):
        V = rng.choice([37, 1000])
        g = torch.Generator().manual_seed(100 + case)
        logits = torch.randn(2, V, generator=g) * 3
        P, L = rng.choice([0, 4]), rng.choice([0, 1, 5])
        seen = torch.randint(0, 8, (2, P + L), generator=g)  # ids < 8: repeats, and words' prefixes that match
        s = {}
        for key, values in dict(repetition_penalty=[0.6, 1.3], frequency_penalty=[-1.5, 0.7, 2.0],
                                presence_penalty=[-2.0, 0.5, 1.5]).items():
            if rng.random() < 0.5:
                s[key] = rng.choice(values)
        if rng.random() < 0.4:
            s["logit_bias"] = {rng.randrange(V): rng.uniform(-100, 100) for _ in range(3)}
        if rng.random() < 0.3:
            s["allowed_token_ids"] = rng.sample(range(V), 6) + [0]  # (0: never all banned by the words below)
        if rng.random() < 0.4:
            s["bad_words"] = [[rng.randrange(1, 8) for _ in range(rng.randint(1, 3))] for _ in range(2)]
        ours = sampling_logits(logits.clone(), seen=seen, generated_from=P, **s)
        want = vllm_processed(logits, seen[:, :P].tolist(), seen[:, P:].tolist(), s)
        assert torch.equal(ours == -math.inf, want == -math.inf), (case, s)
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-5, msg=lambda m: f"{case} {s}: {m}")


def test_the_triton_path_draws_the_reference_paths_tokens():
    """sample_next's two paths (the kernel through the interpreter, small) draw the same token from one seed under
    random cuts, penalties and masks together."""
    rng = random.Random(2)
    for case in range(5):
        V = 37
        g = torch.Generator().manual_seed(200 + case)
        logits = torch.randn(3, V, generator=g) * 3
        seen = torch.randint(0, 8, (3, 7), generator=g)
        s = dict(temperature=rng.choice([0.5, 1.0, 2.0]), top_k=rng.choice([None, 3, 20]),
                 top_p=rng.choice([None, 0.3, 0.8]), min_p=rng.choice([None, 0.1]),
                 repetition_penalty=rng.choice([None, 1.5]), frequency_penalty=rng.choice([None, 0.7]),
                 no_repeat_ngram_size=rng.choice([None, 2]), logit_bias=rng.choice([None, {1: 4.0, V - 1: -3.0}]),
                 bad_words=rng.choice([None, [[2], [3, 4]]]))
        drawn = [sample_next(logits.clone(), generator=torch.Generator().manual_seed(case), seen=seen,
                             generated_from=3, triton=triton, **s) for triton in (False, True)]
        assert torch.equal(*drawn), (case, s)


def vllm_cuts(logits, s):
    """vLLM's sampler after the penalties, written out from vllm/v1/sample/sampler.py Sampler.sample: the temperature
    (apply_temperature), the argmax-invariant logits processors (MinPLogitsProcessor.apply: -inf where the softmax is
    under min_p x its max), then top-k and top-p on one ascending sort (ops/topk_topp_sampler.py
    apply_top_k_top_p_pytorch: below the k-th largest -inf, then -inf where the ascending cumulative probability is
    <= 1 - top_p, the likeliest always kept). In float64."""
    x = logits.double() / s["temperature"]
    if s.get("min_p"):
        probs = x.softmax(-1)
        x = x.masked_fill(probs < s["min_p"] * probs.amax(-1, keepdim=True), -math.inf)
    x_sort, order = x.sort(-1)
    if s.get("top_k"):
        kth = x_sort[:, max(x.size(1) - s["top_k"], 0)].unsqueeze(1)
        x_sort = x_sort.masked_fill(x_sort < kth, -math.inf)
    if s.get("top_p"):
        drop = x_sort.softmax(-1).cumsum(-1) <= 1 - s["top_p"]
        drop[:, -1] = False
        x_sort = x_sort.masked_fill(drop, -math.inf)
    return torch.empty_like(x_sort).scatter(-1, order, x_sort)


def random_vllm_cuts(rng):
    """serve's cuts (vLLM's fields), min_p and top_p always: where the two orders part."""
    return dict(temperature=rng.choice([0.7, 1.0, 1.5]), top_p=rng.choice([0.3, 0.5, 0.9, rng.random()]),
                min_p=rng.choice([0.05, 0.1, 0.3, rng.random()]), top_k=rng.choice([None, None, 5, 40]))


def test_min_p_first_keeps_vllms_tokens():
    """serve's order (min_p_first): 30 random settings of the temperature, top_k, top_p and min_p over 4 rows of 37
    and 1000 tokens keep vLLM's tokens with its probabilities, where transformers' order (the default) keeps others
    in many rows (top_p weighing the whole row's mass, not what min_p kept)."""
    rng = random.Random(3)
    parted = 0
    for case in range(30):
        V = rng.choice([37, 1000])
        logits = torch.randn(4, V, generator=torch.Generator().manual_seed(300 + case)) * rng.choice([1.0, 3.0])
        s = random_vllm_cuts(rng)
        ours = sampling_logits(logits.clone(), min_p_first=True, **s)
        want = vllm_cuts(logits, s)
        assert torch.equal(ours > -math.inf, want > -math.inf), (case, s)
        torch.testing.assert_close(torch.softmax(ours.double(), -1), torch.softmax(want, -1), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{case} {s}: {m}")
        parted += int(((sampling_logits(logits.clone(), **s) > -math.inf) != (want > -math.inf)).any(-1).sum())
    assert parted >= 30, parted  # (the fuzz reaches the rows where the orders part: 50 of its 120)


def test_min_p_first_on_the_triton_path_draws_the_reference_paths_tokens():
    """The kernel's top-p counts only what min_p kept in min_p_first's order: through the interpreter, 8 rows of
    37 tokens (two programs), where the orders keep different tokens, draw the reference path's tokens at a sweep
    of u; with top_k too, sample_next's two paths draw alike from one seed, not as in transformers' order."""
    from tritongpt.kernels.sampling import sample_tokens
    from tritongpt.model.sampling import draw_with_uniform
    logits = torch.randn(1, 37, generator=torch.Generator().manual_seed(0)).expand(8, -1).contiguous()
    u = (torch.arange(8) + 0.5) / 8
    cut = dict(top_p=0.5, min_p=0.2)
    want = draw_with_uniform(sampling_logits(logits, 1.0, min_p_first=True, **cut), u)
    assert sample_tokens(logits, u, 1.0, min_p_first=True, **cut).tolist() == want.tolist()
    assert draw_with_uniform(sampling_logits(logits, 1.0, **cut), u).tolist() != want.tolist()  # (the orders part)
    drawn = [sample_next(logits, 1.0, top_k=20, generator=torch.Generator().manual_seed(1), triton=triton, **cut,
                         **order) for triton, order in ((False, {"min_p_first": True}), (True, {"min_p_first": True}),
                                                        (False, {}))]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2]), drawn


def test_min_p_first_leaves_top_n_sigma_right_after_the_temperature():
    """min_p_first moves min_p before top_k and top_p only: top_n_sigma stays right after the temperature, its std
    over the whole row (min_p's -inf first shrank it: 1 to 3 tokens a row kept here, not 1 to 13). Without top_k and
    top_p the two orders keep the same tokens: min_p and top_n_sigma are both cuts from the max."""
    logits = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)) * 2
    for min_p, n in ((0.1, 1.0), (0.05, 1.5), (0.2, 0.5)):
        kept = [sampling_logits(logits, 1.0, min_p=min_p, top_n_sigma=n, min_p_first=first) > -math.inf
                for first in (False, True)]
        assert torch.equal(*kept), (min_p, n, [k.sum(-1).tolist() for k in kept])
