"""What counts as a number in an argument: numpy's scalars too (they come out of arrays and
configs), a bool never (True is an int to Python, but a flag is no size or rate)."""
import math
import numbers


def is_int(value) -> bool:
    """An integer of any kind PyTorch takes as one (int, numpy integers), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int, float, numpy scalars), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def loss_options(label_smoothing, z_loss, names=("label_smoothing", "z_loss")) -> tuple[float, float]:
    """The LM loss's options as floats: label_smoothing in [0, 1] (as F.cross_entropy takes it),
    z_loss a coefficient >= 0 (PaLM's 1e-4). Anything else is refused by name (`names`: the two as
    the caller spells them, e.g. the flags), on both paths (lm_loss and kernels/cross_entropy.py),
    before it reaches a kernel."""
    for name, value, high in ((names[0], label_smoothing, 1.0), (names[1], z_loss, math.inf)):
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= value <= high:
            raise ValueError(f"{name} must be in [0, {high:g}], got {value!r}")
    return float(label_smoothing), float(z_loss)


def softcap_value(value, name: str = "softcap") -> float:
    """A logit soft cap as a float: c > 0 (logits become c * tanh(logits / c), Gemma 2's and
    modded-nanogpt's), or 0 for none. Anything else is refused by name."""
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0: no cap), got {value!r}")
    return float(value)


def temperature_value(value, name: str = "temperature") -> float:
    """A softmax temperature as a float: the logits are divided by it (RL's log-probs of the distribution its
    rollouts were sampled from), so it must be a finite number > 0. Anything else is refused by name."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
