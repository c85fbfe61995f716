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


@pytest.mark.parametrize("family", list(EXPORT_BASES))
def test_config_json_says_whether_the_head_is_tied(family, tmp_path):
    """tie_word_embeddings as the model has it, in the file itself: transformers 5 unties a tied config over two
    different matrices, so a hard-coded value gives the same logits and only config.json shows it."""
    import json

    import torch

    from tritongpt.commands import export_target
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.errors import UserError

    for tie in (True, False):
        cfg = GPTConfig(**{**TINY, **EXPORT_BASES[family], "tie_weights": tie})
        name, refuse, export = export_target(cfg)
        torch.manual_seed(0)
        model = GPTModel(cfg)
        try:
            refuse(model, "a folder")
        except UserError:
            continue  # a family that cannot say this tie refuses it
        export(model, tmp_path / str(tie), None)
        d = json.loads((tmp_path / str(tie) / "config.json").read_text())
        assert d["tie_word_embeddings"] is tie, (family, tie)
