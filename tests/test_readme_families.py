"""The README's "Hugging Face families at a glance" table against the code, so that it stays one true place: its
model_types are read_model_types()'s, its export names export_target's, its reward column SEQUENCE_CLASSIFIERS',
its quantized-folder column the readers that call hf_quant.folder_quantization, its GGUF column the arch tables of
gguf_export and gguf_import, and its section links README headings. A family added to the code without a row (or
a row left after a family goes) fails here by name: add the row."""
import importlib
import inspect
import re
from pathlib import Path

import pytest
from audit_formats import EXPORT_BASES, TINY
from test_cli import readme_anchors

import tritongpt
from tritongpt.commands import export_target
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.train.gguf_export import gguf_arch
from tritongpt.train.gguf_import import ARCHS
from tritongpt.train.gpt2_weights import model_type_readers
from tritongpt.train.reward import NO_CLASSIFIER, SEQUENCE_CLASSIFIERS

README = Path(tritongpt.__file__).resolve().parent.parent / "README.md"
HEADING = "### Hugging Face families at a glance"
COLUMNS = ["Family", "`model_type`", "Read", "`export` writes", "Reward export", "GPTQ / AWQ / FP8 / bnb folders",
           "GGUF (llama.cpp)", "Section"]


def family_table(text: str) -> list:
    """The table under HEADING as a list of {column: cell}, the model_types cell as a list of names."""
    assert text.count(HEADING + "\n") == 1, f"README.md has no single {HEADING!r} section"
    section = text.split(HEADING + "\n", 1)[1].split("\n#", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    assert cells and cells[0] == COLUMNS, f"the table's header is {cells[:1]}, not {COLUMNS}"
    rows = []
    for row in cells[2:]:  # (past the header and its |---| line)
        assert len(row) == len(COLUMNS), f"row {row} has {len(row)} cells, not {len(COLUMNS)}"
        row = dict(zip(COLUMNS, row))
        row["types"] = re.findall(r"`([^`]+)`", row["`model_type`"])
        rows.append(row)
    return rows


def flag(cell: str, where: str) -> bool:
    """A yes / no cell (a note may follow either): "yes..." or "—...", anything else a typo."""
    assert cell.startswith(("yes", "—")) or cell[:1].isalnum(), f"{where}: cell {cell!r}"
    return not cell.startswith("—")


def export_names() -> set:
    """The family names export_target gives: for the audit's base config of each family, and every name the
    multi-family modules' tables hold (their bases are not all in EXPORT_BASES)."""
    names = {export_target(GPTConfig(**dict(TINY, **base)))[0] for base in EXPORT_BASES.values()}
    for module in set(model_type_readers().values()):
        names |= set(getattr(importlib.import_module(f"tritongpt.train.{module}"), "_NAMES", {}).values())
    return names


@pytest.fixture(scope="module")
def rows():
    if not README.exists():
        pytest.skip("not a checkout: no README.md beside the package")
    return family_table(README.read_text())


def test_the_table_has_a_row_for_each_model_type_read_and_no_other(rows):
    listed = [t for row in rows for t in row["types"]]
    readers = model_type_readers()
    assert sorted(t for t in set(listed) if listed.count(t) > 1) == [], "a model_type in two rows"
    assert sorted(set(readers) - set(listed)) == [], "read_model_types() reads these; give each a row"
    assert sorted(set(listed) - set(readers)) == [], "rows for model_types load_checkpoint does not read"
    assert all(flag(row["Read"], row["Family"]) for row in rows)


def test_the_reward_export_column_is_the_sequence_classifiers(rows):
    wrong = [(row["Family"], row["Reward export"]) for row in rows for t in row["types"]
             if flag(row["Reward export"], row["Family"]) != (t in SEQUENCE_CLASSIFIERS)]
    assert wrong == [], "reward export says yes exactly where train/reward.py's SEQUENCE_CLASSIFIERS has the type"


def test_the_export_column_is_export_targets_family_names(rows):
    said = {row["`export` writes"].split(" (")[0]: row for row in rows if flag(row["`export` writes"], row["Family"])}
    assert sorted(said.keys() ^ export_names()) == [], "export names in the table that export_target does not give, " \
                                                       "or the reverse"
    for row in rows:
        for t in row["types"]:
            names = getattr(importlib.import_module(f"tritongpt.train.{model_type_readers()[t]}"), "_NAMES", {})
            if t in names:  # (the one-family modules name theirs inline in export_target)
                assert row["`export` writes"] == names[t], (t, row["`export` writes"])
        # a family export_target writes but transformers has no classifier for is refused by reward export by name
        name = row["`export` writes"]
        if name in said:
            assert (name in NO_CLASSIFIER) == (not flag(row["Reward export"], name)), (name, row["Reward export"])


def test_the_quantized_folder_column_is_the_readers_that_read_them(rows):
    """hf_quant.folder_quantization is how a reader takes a quantized folder; one that never calls it refuses every
    quantization_config (gpt2_weights._read_tensors). GPT-OSS's takes MXFP4 experts only."""
    for row in rows:
        cell = row["GPTQ / AWQ / FP8 / bnb folders"]
        for t in row["types"]:
            module = importlib.import_module(f"tritongpt.train.{model_type_readers()[t]}")
            reads = "folder_quantization(" in inspect.getsource(module)
            assert flag(cell, row["Family"]) == reads, f"{t}: {module.__name__} reads quantized folders: {reads}"
            assert ("MXFP4" in cell) == (t == "gpt_oss"), (t, cell)


def test_the_gguf_column_is_the_gguf_arch_tables(rows):
    written = {}
    for name in export_names():
        try:
            written[name] = gguf_arch(None, name)
        except UserError:  # (the writer's refusal of every other family)
            pass
    said = {row["Family"]: set(re.findall(r"`([^`]+)`", row["GGUF (llama.cpp)"])) for row in rows}
    for row in rows:
        arch = written.get(row["`export` writes"])
        assert arch is None or arch in said[row["Family"]], f"{row['Family']}: export --format gguf writes {arch!r}"
        assert said[row["Family"]] <= set(written.values()) | set(ARCHS), (row["Family"], said[row["Family"]])
    read = {a for row in rows for a in said[row["Family"]] if "read" in row["GGUF (llama.cpp)"]}
    assert sorted(set(ARCHS) ^ read) == [], "gguf_import.ARCHS, each marked read in some row and no other"
    assert set(written.values()) <= set().union(*said.values()), "every arch gguf_arch writes is in the table"


def test_each_section_link_is_a_readme_heading(rows):
    anchors = readme_anchors(README.read_text())
    links = [re.fullmatch(r"\[[^\]]+\]\(#([^)]+)\)", row["Section"]) for row in rows]
    assert all(links), [row["Section"] for row, m in zip(rows, links) if not m]
    assert sorted({m[1] for m in links} - anchors) == []


def test_the_table_parser_sees_a_broken_table():
    """A row dropped or a cell flipped is seen (the checks above would pass on a table they could not read)."""
    if not README.exists():
        pytest.skip("not a checkout: no README.md beside the package")
    text = README.read_text()
    rows = family_table(text)
    assert len(rows) > 30 and rows[0]["types"] == ["gpt2"]
    cut = family_table(text.replace(next(ln for ln in text.splitlines() if ln.startswith("| GPT-Neo |")) + "\n", ""))
    assert set(model_type_readers()) - {t for row in cut for t in row["types"]} == {"gpt_neo"}
    with pytest.raises(AssertionError, match="cells"):
        family_table(text.replace("| GPT-Neo | `gpt_neo` | yes |", "| GPT-Neo | `gpt_neo` yes |"))
