"""The kernels' docstrings and their reference modules point at each other by names that exist.

Each kernels/*.py opens with a "Reference:" (or "Reference module:") sentence a learner follows to the textbook
twin, and the twin's docstring (or its module's) names the kernel file back. The names in that sentence are written
`tritongpt.package.module.name`, resolved here, or `Class.member` for a class of a module the sentence names (a
method, or an attribute its __init__ sets); a bare `name` does not say where to look, and no test would notice it
go stale. model/'s "kernels/x.py `name`" links are resolved too. A renamed or removed name fails here instead of
leaving a docstring that points nowhere.
"""
import importlib
import inspect
import re
from pathlib import Path

import pytest

import tritongpt.kernels

KERNELS = sorted(p.stem for p in Path(tritongpt.kernels.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
# the sentence after "Reference:", up to its full stop (a dotted name's dots have no space after them)
CLAUSE = re.compile(r"Reference(?: modules?)?:\s(.*?)\.(?:\s|$)", re.S)
NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def resolve(dotted: str):
    """tritongpt.a.b.C.d -> the object: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError: the test fails naming it
        return obj
    raise ImportError(dotted)


def has_member(cls, member: str) -> bool:
    """A class attribute, or one its methods set on self (GPTModel.out_head)."""
    return hasattr(cls, member) or re.search(rf"self\.{member}\s*=", inspect.getsource(cls)) is not None


def reference_clauses(stem: str) -> list:
    doc = importlib.import_module(f"tritongpt.kernels.{stem}").__doc__ or ""
    return CLAUSE.findall(doc)


def referenced(clause: str, stem: str) -> list:
    """The objects a clause names, checked: [(dotted name, object)] of its fully qualified names."""
    names = NAME.findall(clause)
    full = [(n, resolve(n)) for n in names if n.startswith("tritongpt.")]
    assert full, f"kernels/{stem}.py: its Reference sentence names nothing as tritongpt.<module>.<name>: {clause!r}"
    modules = [inspect.getmodule(obj) for _, obj in full]
    for n in names:
        if n.startswith("tritongpt."):
            continue
        assert "." in n, (f"kernels/{stem}.py: `{n}` in its Reference sentence is a bare name; write it as "
                          f"tritongpt.<module>.{n} so that a reader (and this test) can find it")
        cls_name, member = n.split(".", 1)
        owners = [getattr(m, cls_name) for m in modules if inspect.isclass(getattr(m, cls_name, None))]
        assert owners, f"kernels/{stem}.py: `{n}`: no class {cls_name} in the modules its Reference sentence names"
        assert has_member(owners[0], member), f"kernels/{stem}.py: `{n}`: {cls_name} has no {member}"
    return full


@pytest.mark.parametrize("stem", KERNELS)
def test_kernel_names_its_reference_and_the_reference_names_it_back(stem):
    clauses = reference_clauses(stem)
    assert clauses, f"kernels/{stem}.py's docstring has no 'Reference:' sentence naming its textbook twin"
    back = (f"kernels/{stem}.py", f"tritongpt.kernels.{stem}")
    for clause in clauses:
        for name, obj in referenced(clause, stem):
            docs = (obj.__doc__ or "") + (inspect.getmodule(obj).__doc__ or "")
            assert any(b in docs for b in back), f"{name} (nor its module) names kernels/{stem}.py in its docstring"


def test_a_bare_reference_name_is_refused():
    """The check itself: a bare name, a class the sentence's modules lack, a missing member and a dangling full
    name each fail; an attribute set in __init__ passes."""
    clause = "`tritongpt.model.layers.LayerNorm` and `{}`"
    referenced(clause.format("LayerNorm.add_and_norm"), "x")
    referenced("`tritongpt.model.gpt.lm_loss` after `GPTModel.out_head`", "x")
    for bad in ("lora_rows_reference", "Nowhere.forward", "LayerNorm.no_such_method"):
        with pytest.raises(AssertionError):
            referenced(clause.format(bad), "x")
    with pytest.raises(AttributeError):
        referenced(clause.format("tritongpt.model.layers.NoSuchModule"), "x")


MODEL_LINK = re.compile(r"kernels/(\w+)\.py(?:'s)?`?\s+\(?`([A-Za-z_]\w*)`")


@pytest.mark.parametrize("package", ["model", "train"])
def test_model_links_to_kernel_functions_resolve(package):
    """'kernels/layernorm.py `add_layer_norm`' in model/ and train/: the kernel module has that name."""
    root = Path(tritongpt.kernels.__file__).parent.parent / package
    links = [(p.name, *m.groups()) for p in sorted(root.glob("*.py")) for m in MODEL_LINK.finditer(p.read_text())]
    for path, stem, name in links:
        assert hasattr(importlib.import_module(f"tritongpt.kernels.{stem}"), name), \
            f"{package}/{path} links kernels/{stem}.py `{name}`, which that module does not have"
    if package == "model":
        assert len(links) >= 5  # the pattern still matches how model/layers.py writes its links
