"""What counts as a number in an argument: numpy's scalars too (they come out of arrays and
configs), a bool never (True is an int to Python, but a flag is no size or rate)."""
import numbers


def is_int(value) -> bool:
    """An integer of any kind PyTorch takes as one (int, numpy integers), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int, float, numpy scalars), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
