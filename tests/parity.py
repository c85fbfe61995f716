"""Shared numerical-parity helpers: every comparison reports max abs error and relative error."""
import torch


def report(out: torch.Tensor, ref: torch.Tensor):
    """Return (max_abs_err, ||out-ref|| / ||ref||), computed in float64."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    diff = out64 - ref64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    return max_abs, rel


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel_tol: float, name: str = "tensor"):
    """Fail on shape mismatch, any NaN/inf, or relative error above rel_tol; print the figures."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: output has NaN/inf"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf"
    max_abs, rel = report(out, ref)
    print(f"{name}: max_abs={max_abs:.3e} rel={rel:.3e} (tol {rel_tol:.0e})")
    assert rel <= rel_tol, f"{name}: relative error {rel:.3e} > {rel_tol:.0e} (max abs {max_abs:.3e})"
    return max_abs, rel
