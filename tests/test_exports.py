"""Every family's export, across families: what each family's own tests check one at a time, here for all."""
import pytest

from audit_formats import EXPORT_BASES, TINY, check_export

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tie", ["as the family's base", "the other way"])
@pytest.mark.parametrize("family", list(EXPORT_BASES))
def test_a_padded_vocabulary_exports_its_real_rows_only(family, tie):
    """vocab_multiple pads the embedding (and an untied head) past the tokenizer's vocabulary (96 -> 128 rows);
    the export writes the 96 real rows, so transformers' model is the tokenizer's size and gives our logits.
    Tied and untied both (a family that cannot say the other way refuses it by name)."""
    fields = dict(TINY, **EXPORT_BASES[family], vocab_multiple=64)
    if tie == "the other way":
        fields["tie_weights"] = not fields.get("tie_weights", True)
    status, said = check_export(fields)
    assert status == "ok" or status == "refused" and tie == "the other way", said
