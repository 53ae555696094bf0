"""Int8Eval: the CLI's test of a 2:4-pruned checkpoint, in its own precision and in int8, at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from callbacks.int8_eval import Int8Eval
from datamodules.text_classification import TextClassification
from lit.cli import main
from models.bert_classifier import BertClassifier
from models.int8 import Int8Linear, quantize_model
from models.nm_sparsity import is_nm_sparse, select_linears
from tests.conftest import CONFIGS, cli_args

INCLUDE = [r"encoder\.layer\.\d+\."]
SMOKE = CONFIGS / "bert" / "tiny_smoke.yaml"


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """configs/bert/tiny_smoke.yaml through the CLI: a tiny BERT fine-tuned with 2:4 one-shot
    pruning on the real snippets (the CLI reads the model's class back from its checkpoints)."""
    root = tmp_path_factory.mktemp("int8_ckpt")
    cli = main(cli_args("fit", f"--config={SMOKE}", "--test_after_fit=false", "--trainer.enable_progress_bar=false",
                        tmp_path=root))
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the checkpoint comes from another run
def test_cli_tests_the_checkpoint_in_both_precisions_in_one_command(tmp_path, pruned_checkpoint):
    cli = main(cli_args("test", f"--config={SMOKE}",
                        f"--ckpt_path={pruned_checkpoint}", "--trainer.callbacks+=callbacks.Int8Eval",
                        "--trainer.enable_progress_bar=false", tmp_path=tmp_path))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ("test/acc", "test/loss", "test_int8/acc", "test_int8/loss", "test/weight_mb",
                "test_int8/weight_mb", "test/linear_mb", "test_int8/linear_mb"):
        assert key in metrics, key
    # fp32 Linear weights -> int8 codes + fp32 scales (+ kept columns): about a quarter.
    assert 0.25 < metrics["test_int8/linear_mb"] / metrics["test/linear_mb"] < 0.3
    assert metrics["test_int8/weight_mb"] < metrics["test/weight_mb"]

    # The layers are back: the model is still the 2:4 fp32 model it was.
    layers = select_linears(cli.model, INCLUDE)
    assert len(layers) == 12 and not any(isinstance(m, Int8Linear) for m in cli.model.modules())
    assert all(is_nm_sparse(m.weight, 2, 4) for m in layers.values())

    # The int8 numbers equal a hand-made int8 copy evaluated over the same test split.
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, Int8Eval))
    model = BertClassifier.load_from_checkpoint(pruned_checkpoint, map_location="cpu").eval()
    assert all(is_nm_sparse(m.weight, 2, 4) for m in select_linears(model, INCLUDE).values())
    quantize_model(model, include=INCLUDE, fp16_dims=callback.fp16_dims)
    dm = TextClassification(max_samples=120, max_length=32, batch_size=16, seed=0)
    dm.setup("test")
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
    assert metrics["test_int8/acc"] == pytest.approx(correct / n, abs=1e-6)
    assert metrics["test_int8/loss"] == pytest.approx(loss / n, rel=1e-5)
    assert abs(metrics["test_int8/acc"] - metrics["test/acc"]) <= 1 / n + 1e-9  # at most one flip


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="threshold"):
        Int8Eval(threshold=0.0)
    with pytest.raises(ValueError, match="calibration_batches"):
        Int8Eval(calibration_batches=-1)
    with pytest.raises(ValueError, match="prefix"):
        Int8Eval(prefix="test")
    with pytest.raises(ValueError, match="include"):
        Int8Eval(include=[])
    with pytest.raises(ValueError, match="input_ids"):
        Int8Eval._check((torch.zeros(2), torch.zeros(2)))
