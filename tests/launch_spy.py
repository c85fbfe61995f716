"""Which products a kernel module's backward launches: wrap its launcher and keep each call's keyword arguments."""


def record_launches(monkeypatch, module, name="_matmul"):
    """Wrap module.<name> for the test; -> the list of its calls' keyword arguments (the launches' flags:
    epilogue, store_act, b_gelu, ...), in order, filled as the wrapped launcher runs."""
    launched, launch = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: launched.append(k) or launch(*a, **k))
    return launched


class FlagSpy:
    """Stands in for a Triton kernel (kernel[grid](...)): launches it, keeping each launch's flags, the values of the
    keyword arguments named in `flags` (one value, or a tuple of several), in .launched."""

    def __init__(self, kernel, flags):
        self.kernel, self.flags, self.launched = kernel, flags, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            values = tuple(kwargs[f] for f in self.flags)
            self.launched.append(values if len(values) > 1 else values[0])
            return self.kernel[grid](*args, **kwargs)
        return run
