"""OutlierFeatures: planted systematic dimensions in a tiny BERT are found, random spikes are not."""

from __future__ import annotations

import csv
import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from callbacks.outlier_features import OutlierFeatures, heatmap, layer_consistency, systematic_outliers
from models.bert_classifier import BertClassifier

TINY = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 64}
PLANTED = [5, 21]
SPIKE_DIM, SPIKE_TOKEN = 40, 7


def planted_model() -> BertClassifier:
    """Every LayerNorm scales dims 5 and 21 by 20: the residual stream carries them into every
    layer's input (the paper's systematic outliers). Token 7's embedding is a spike in dim 40."""
    torch.manual_seed(0)
    model = BertClassifier(pretrained=None, config=TINY, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    with torch.no_grad():
        for name, module in model.net.named_modules():
            if name.endswith("LayerNorm"):
                module.weight[PLANTED] *= 20.0
        word = model.net.bert.embeddings.word_embeddings.weight
        word[SPIKE_TOKEN] = 0.0
        word[SPIKE_TOKEN, SPIKE_DIM] = 100.0
    return model.eval()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(4):
        ids = torch.randint(8, 100, (8, 16), generator=g)  # never the spike token ...
        mask = torch.ones(8, 16, dtype=torch.long)
        mask[:, 12:] = 0  # padding: not counted
        ids[mask == 0] = 0
        if b == 1:
            ids[3, 4] = SPIKE_TOKEN  # ... except at one position of 384
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (8,), generator=g)})
    return out


def test_finds_planted_systematic_dims_and_not_a_random_spike(tmp_path):
    model, data = planted_model(), batches()
    callback = OutlierFeatures()
    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="o"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, dataloaders=DataLoader(data, batch_size=None), verbose=False)

    summary = callback.summary
    assert summary["systematic_dims"] == PLANTED
    assert summary["layers"] == 8 and summary["tokens"] == 4 * 8 * 12  # query + intermediate x 4; no padding
    assert all(r["layers"] == r["group_layers"] == 8 and r["mean_fraction"] > 0.5 for r in summary["systematic"])
    assert summary["consistency"][64] > 0.9

    # Independently: the fraction of real positions where |x| >= 6 in layer 0's query input
    # (the embeddings' output), from transformers' own hidden states.
    with torch.no_grad():
        hidden = [model.net.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 output_hidden_states=True).hidden_states[0][b["attention_mask"].bool()]
                  for b in data]
    real = torch.cat(hidden)  # (positions, 64)
    expected = (real.abs() >= 6).double().mean(dim=0)
    torch.testing.assert_close(callback.fractions["net.bert.encoder.layer.0.attention.self.query"], expected)
    assert 0 < expected[SPIKE_DIM] < 0.01  # the spike is there, at one position

    rows = list(csv.DictReader(open(tmp_path / "o" / "version_0" / "outlier_features_test.csv")))
    spike = [r for r in rows if int(r["dim"]) == SPIKE_DIM]
    assert spike and all(float(r["fraction_of_positions"]) < 0.01 for r in spike)
    assert SPIKE_DIM not in summary["systematic_dims"]
    assert "| 64 | 5 | 8/8 |" in (tmp_path / "o" / "version_0" / "outlier_features_test.md").read_text()
    assert float(trainer.callback_metrics["outliers/test/systematic_dims"]) == 2


def test_systematic_rule_on_a_hand_worked_case():
    # 4 layers of width 3: dim 0 at 10% of positions in 1 layer (25%: systematic), dim 1 at 5%
    # everywhere (below 6%), dim 2 at 50% in layer 3 only and 7% in layer 2.
    fr = {f"l{i}": torch.tensor(v, dtype=torch.float64) for i, v in
          enumerate([[0.10, 0.05, 0.0], [0.0, 0.05, 0.0], [0.0, 0.05, 0.07], [0.0, 0.05, 0.5]])}
    fr["wide"] = torch.zeros(5)
    rows = systematic_outliers(fr, min_layers=0.25, min_positions=0.06)
    assert [(r["dim"], r["layers"]) for r in rows] == [(0, 1), (2, 2)]
    assert rows[1]["mean_fraction"] == pytest.approx(0.285)
    assert [r["dim"] for r in systematic_outliers(fr, min_layers=0.5)] == [2]
    # Sets {0}, {}, {2}, {2}: pairs (0,2) (0,3) (2,3) (1,2) (1,3) (0,1) -> 0, 0, 1, 0, 0, 0 (6 pairs).
    consistency = layer_consistency(fr)
    assert consistency[3] == pytest.approx(1 / 6) and math.isnan(consistency[5])


def test_heatmap_is_an_rgb_image_of_layers_by_dims():
    img = heatmap(torch.tensor([[0.0, 1.0, 0.5]]), row_height=4)
    assert img.shape == (4, 3, 3) and img.dtype == torch.uint8
    assert not torch.equal(img[0, 0], img[0, 1])


def test_bad_configuration_is_rejected():
    for kwargs, field in (({"threshold": -1.0}, "threshold"), ({"include": []}, "include"),
                          ({"min_layers": 0.0}, "min_layers"), ({"min_positions": 1.5}, "min_positions")):
        with pytest.raises(ValueError, match=field):
            OutlierFeatures(**kwargs)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[OutlierFeatures(include=["no_such_layer"])])
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        trainer.test(planted_model(), dataloaders=DataLoader(batches(), batch_size=None), verbose=False)
