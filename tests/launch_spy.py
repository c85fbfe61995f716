"""Which products a kernel module's backward launches: wrap its launcher and keep each call's keyword arguments."""


def record_launches(monkeypatch, module, name="_matmul"):
    """Wrap module.<name> for the test; -> the list of its calls' keyword arguments (the launches' flags:
    epilogue, store_act, b_gelu, ...), in order, filled as the wrapped launcher runs."""
    launched, launch = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: launched.append(k) or launch(*a, **k))
    return launched
