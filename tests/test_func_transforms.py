"""torch.func transforms and the Triton kernels: refused with a message naming the kernel (torch's
own error, "must override the setup_context staticmethod", asked the caller to change the
library), except vmap of flash_attention, which PyTorch runs once per batch element."""
import pytest
import torch

from tritongpt.kernels.attention import flash_attention
from tritongpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from tritongpt.kernels.layernorm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from tritongpt.kernels.mlp import gelu_mlp


def _calls(device):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    w, b, W1, b1, W2, b2, head = rand(16), rand(16), rand(32, 16), rand(32), rand(16, 32), rand(16), rand(30, 16)
    targets = torch.tensor([1, 2, 3], device=device)
    return {
        "layer_norm": (lambda x: layer_norm(x, w, b).sum(), rand(2, 3, 16)),
        "add_layer_norm": (lambda x: add_layer_norm(x, x * 2, w, b)[1].sum(), rand(2, 3, 16)),
        "rms_norm": (lambda x: rms_norm(x, w).sum(), rand(2, 3, 16)),
        "add_rms_norm": (lambda x: add_rms_norm(x, x * 2, w)[1].sum(), rand(2, 3, 16)),
        "gelu_mlp": (lambda x: gelu_mlp(x, W1, b1, W2, b2).sum(), rand(2, 3, 16)),
        "cross_entropy": (lambda x: cross_entropy(x, targets[: x.shape[-2]]), rand(2, 3, 30)),
        "linear_cross_entropy": (lambda x: linear_cross_entropy(x, head, targets[: x.shape[-2]]), rand(2, 3, 16)),
        "flash_attention": (lambda x: flash_attention(x, x, x).sum(), rand(2, 1, 1, 8, 16)),
    }


@pytest.mark.parametrize("kernel", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "gelu_mlp",
                                    "cross_entropy", "linear_cross_entropy", "flash_attention"])
def test_func_transforms_name_the_kernel(device, kernel):
    fn, x = _calls(device)[kernel]
    transforms = {"grad": lambda: torch.func.grad(fn)(x[0]),
                  "jacrev": lambda: torch.func.jacrev(fn)(x[0]),
                  "jvp": lambda: torch.func.jvp(fn, (x[0],), (torch.ones_like(x[0]),)),
                  "vmap of grad": lambda: torch.func.vmap(torch.func.grad(fn))(x)}
    if kernel != "flash_attention":
        transforms["vmap"] = lambda: torch.func.vmap(fn)(x)
    for name, call in transforms.items():
        with pytest.raises(RuntimeError, match=f"{kernel}: the Triton kernel does not support torch.func"):
            call()
    # torch.autograd, as the message advises, gives the gradient
    xx = x[0].clone().requires_grad_()
    fn(xx).backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all()


def test_vmap_of_flash_attention_runs_per_element(device):
    fn, x = _calls(device)["flash_attention"]
    # PyTorch warns of its per-element fallback (a Python warning in 2.14, a C++ one in 2.11)
    out = torch.func.vmap(lambda t: flash_attention(t, t, t))(x)
    assert torch.equal(out, torch.stack([flash_attention(t, t, t) for t in x]))
