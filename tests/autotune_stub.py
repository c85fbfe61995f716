"""A stand-in for Triton's timer in an autotune search, so the GPU branch of a launcher (its autotuned shapes, the
grid each sizes, what it does with the pick) can run on the CPU through the interpreter."""


def time_as_told(monkeypatch, tuners, fastest):
    """tuners: {name: (the triton.autotune Autotuner, its early_config_prune)}. Each search starts empty, runs every
    config its prune keeps once for real, and times the fastest[name]-th of them (in the prune's order) quickest.
    The picks _common.launch_tuned keeps on each tuner start empty too.
    -> {name: [the configs the prune kept, in the order autotune timed them]} (filled as searches run)."""
    timed = {}
    for name, (tuner, prune) in tuners.items():
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setitem(tuner.__dict__, "tritongpt_picks", {})
        timed[name], calls = [], []

        def recording(configs, named_args, name=name, prune=prune, calls=calls, **kwargs):
            kept = prune(configs, named_args, **kwargs)
            timed[name][:] = kept
            calls.clear()  # a search starts: its configs are timed next, in this order
            return kept

        def bench(fn, quantiles, name=name, calls=calls):
            fn()
            calls.append(None)
            ms = 1.0 if len(calls) - 1 == fastest[name] else 2.0
            return [ms, ms, ms]

        monkeypatch.setattr(tuner, "early_config_prune", recording)
        monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # Autotuner.do_bench is a cached_property
    return timed
