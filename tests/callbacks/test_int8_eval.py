"""Int8Eval: test/acc and test_int8/acc from one test loop, the int8 numbers against a float64
re-derivation of LLM.int8() from the paper's equations on the real Rotten Tomatoes snippets; the
CLI's test of a 2:4-pruned checkpoint in both precisions at once; bad configuration."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.int8_eval import Int8Eval
from callbacks.outlier_features import OutlierFeatures
from datamodules.text_classification import TextClassification
from lit.cli import main
from models.bert_classifier import BertClassifier
from models.int8 import Int8Linear
from models.nm_sparsity import is_nm_sparse, select_linears
from tests.conftest import CONFIGS, cli_args

INCLUDE = [r"encoder\.layer\.\d+\."]
SMOKE = CONFIGS / "bert" / "tiny_smoke.yaml"
THRESHOLD = 6.0
CALIBRATION_BATCHES, KEEP_MIN_FRACTION = 2, 0.5
DATA = dict(max_samples=600, max_length=32, batch_size=16, seed=0)  # 120 test, 60 validation snippets
# Dim 3 of the residual stream >= 6 at almost every position (a kept 16-bit column), dim 17 at
# some (an outlier column multiplied with its dequantized int8 weights): LayerNorm gains, as the
# paper's systematic outliers. The last LayerNorm (the classifier's input) is left alone.
KEPT_DIM, RARE_DIM = 3, 17


def planted_bert(data: TextClassification) -> BertClassifier:
    """A random tiny BERT with planted outlier dims whose predictions depend on the text:
    larger attention value / output weights (a random BERT's [CLS] barely reads the other
    tokens) and a classifier bias that splits the validation snippets in two halves."""
    torch.manual_seed(0)
    model = BertClassifier(pretrained=None, config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, max_position_embeddings=64)).eval()
    net = model.net
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith("LayerNorm") and not name.startswith("bert.encoder.layer.1.output"):
                module.weight[KEPT_DIM], module.weight[RARE_DIM] = 30.0, 6.0
            if name.endswith(("value", "attention.output.dense")):
                module.weight.mul_(20.0)
        net.classifier.weight.mul_(50.0)
        margin = torch.cat([model(b["input_ids"], b["attention_mask"]) for b in data.val_dataloader()])
        net.classifier.bias[0] -= (margin[:, 0] - margin[:, 1]).median()
    return model


class PaperInt8Linear(nn.Module):
    """One Linear layer in LLM.int8(), re-derived in float64 from the paper's equations.

    For the call's activations ``X`` (every token of the batch, padding included) and ``W``
    ``(O, H)``: outlier columns ``Oc = {j : max_i |X_ij| >= alpha}``; ``X[:, not Oc]`` row-wise
    absmax int8, ``W`` absmax int8 per output row; their product exact (integers in float64);
    dequantized by ``c_x c_w / 127^2``; plus ``X[:, Oc]`` times the original weight column where
    the column is kept (``kept``) and the dequantized int8 column elsewhere (models/int8.py).
    """

    def __init__(self, linear: nn.Linear, kept: torch.Tensor) -> None:
        super().__init__()
        self.w = linear.weight.detach().double()  # (O, H)
        self.b = linear.bias.detach().double()
        self.kept = torch.zeros(self.w.shape[1], dtype=torch.bool)
        self.kept[kept] = True
        self.hits = {"kept": 0, "dequantized": 0}  # outlier columns seen, by which weights they used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double().reshape(-1, x.shape[-1])  # (S, H)
        outlier = x64.abs().amax(dim=0) >= THRESHOLD  # (H,)
        self.hits["kept"] += int((outlier & self.kept).sum())
        self.hits["dequantized"] += int((outlier & ~self.kept).sum())
        inner = x64.masked_fill(outlier, 0.0)
        c_x = inner.abs().amax(dim=1, keepdim=True)  # (S, 1)
        q_x = torch.round(127.0 * inner / torch.where(c_x > 0, c_x, torch.ones_like(c_x)))
        c_w = self.w.abs().amax(dim=1, keepdim=True)  # (O, 1)
        q_w = torch.round(127.0 * self.w / c_w)
        assert q_x.abs().max() <= 127 and q_w.abs().max() <= 127
        y = (q_x @ q_w.t()) * (c_x * c_w.t()) / 127.0**2  # exact integer sums: |sum| < 2^53
        w_16 = torch.where(self.kept[None, :], self.w, q_w * c_w / 127.0)  # (O, H)
        y = y + x64[:, outlier] @ w_16[:, outlier].t() + self.b
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def calibrated_dims(model: BertClassifier, data: TextClassification) -> dict[str, torch.Tensor]:
    """Per selected layer, the dims >= THRESHOLD at more than KEEP_MIN_FRACTION of the real
    (unpadded) positions of the first validation batches: the columns the paper keeps 16-bit."""
    layers = select_linears(model, INCLUDE)
    counts, positions, hooks = {}, {}, []
    mask = {}

    def hook(name):
        def count(module, args):
            x = args[0][mask["now"].bool()]  # (tokens, H)
            counts[name] = counts.get(name, 0) + (x.abs() >= THRESHOLD).sum(dim=0)
            positions[name] = positions.get(name, 0) + x.shape[0]
        return count

    hooks = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == CALIBRATION_BATCHES:
                break
            mask["now"] = batch["attention_mask"]
            model(batch["input_ids"], batch["attention_mask"])
    for h in hooks:
        h.remove()
    return {name: torch.nonzero(counts[name] / positions[name] > KEEP_MIN_FRACTION).squeeze(1) for name in layers}


class SeenBatches(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.sizes.append(len(batch["labels"]))


def test_int8_variant_equals_a_float64_rederivation_in_the_same_test_loop(tmp_path):
    data = TextClassification(**DATA)
    data.setup("fit")
    model = planted_bert(data)
    callback = Int8Eval(threshold=THRESHOLD, include=INCLUDE, calibration_batches=CALIBRATION_BATCHES,
                        keep_min_fraction=KEEP_MIN_FRACTION)
    batches, outliers = SeenBatches(), OutlierFeatures(save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback, batches, outliers])
    metrics = trainer.test(model, datamodule=TextClassification(**DATA), verbose=False)[0]
    assert batches.sizes == [16] * 7 + [8]  # one test loop, which scored both passes

    # The kept 16-bit columns are the calibration the paper describes (not counted in padding).
    dims = calibrated_dims(model, data)
    assert {n: d.tolist() for n, d in callback.fp16_dims.items()} == {n: d.tolist() for n, d in dims.items()}
    assert all(KEPT_DIM in d.tolist() for d in dims.values() if len(d))

    # The reference: the same network, its selected layers replaced by the float64 re-derivation.
    reference = copy.deepcopy(model.net)
    paper = {name: PaperInt8Linear(layer, dims[name]) for name, layer in select_linears(model, INCLUDE).items()}
    for name, layer in paper.items():
        reference.set_submodule(name.removeprefix("net."), layer)
    logits, fp32_logits, labels = [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            logits.append(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
            fp32_logits.append(model(batch["input_ids"], batch["attention_mask"]))
            labels.append(batch["labels"])
    logits, fp32_logits, labels = torch.cat(logits).double(), torch.cat(fp32_logits).double(), torch.cat(labels)
    assert all(sum(layer.hits[k] for layer in paper.values()) > 0 for k in ("kept", "dequantized"))
    # The outlier analysis hooked the module's own layers: it saw the module's pass, not the int8 copy's.
    assert outliers.summary["tokens"] == sum(int(b["attention_mask"].sum()) for b in data.test_dataloader())
    predictions = logits.argmax(-1)
    assert 0.2 < float(predictions.float().mean()) < 0.8  # the predictions depend on the text

    accuracy = float((predictions == labels).double().mean())
    assert metrics["test_int8/acc"] == pytest.approx(accuracy, abs=1e-6)  # equal (logged in float32)
    # Tight: the loss moves by 1.5e-6 if every outlier column used its 16-bit weights, and by
    # 1e-4 if none did; the float32 mean over the loop's batches is within 1e-7 of float64.
    assert metrics["test_int8/loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), abs=3e-7)
    fp32_accuracy = float((fp32_logits.argmax(-1) == labels).double().mean())
    assert metrics["test/acc"] == pytest.approx(fp32_accuracy, abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(float(F.cross_entropy(fp32_logits, labels)), rel=1e-5)
    assert abs(metrics["test_int8/loss"] - metrics["test/loss"]) > 1e-5  # the int8 pass is not the fp32 one
    assert callback.results["test_int8/acc"] == metrics["test_int8/acc"]

    # The module is as it was: no variant left, its own layers untouched.
    assert model.eval_variants == [] and len(model.eval_variant_acc) == 0
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(type(layer) is nn.Linear for layer in select_linears(model, INCLUDE).values())


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
    # 12 fp32 Linear layers (32x32 x4 + 64x32 + 32x64 per layer, with biases) by hand, and as
    # int8 codes + fp32 scales + fp32 bias (+ kept columns): about a quarter.
    linear_bytes = 2 * 4 * (4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32))
    assert metrics["test/linear_mb"] == pytest.approx(linear_bytes / 2**20, rel=1e-6)
    assert 0.25 < metrics["test_int8/linear_mb"] / metrics["test/linear_mb"] < 0.3
    saved = metrics["test/linear_mb"] - metrics["test_int8/linear_mb"]
    assert metrics["test/weight_mb"] - metrics["test_int8/weight_mb"] == pytest.approx(saved, rel=1e-4)

    # The module's own layers never changed: still the 2:4 fp32 model it was.
    layers = select_linears(cli.model, INCLUDE)
    assert len(layers) == 12 and not any(isinstance(m, Int8Linear) for m in cli.model.modules())
    assert all(is_nm_sparse(m.weight, 2, 4) for m in layers.values())
    assert abs(metrics["test_int8/acc"] - metrics["test/acc"]) <= 1 / 24 + 1e-9  # at most one flip of 24


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
    with pytest.raises(ValueError, match="needs a models.BertClassifier"):
        Int8Eval().on_test_start(None, nn.Linear(2, 2))
