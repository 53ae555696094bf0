"""Sparse24Eval on the CPU: the variants' timer leaves out each shape's first eager call (on a GPU:
every call that captured a graph), against tokens counted by hand; the GPU-only and model checks
name the fix. The GPU runs are in tests/models/test_sparse_inference.py (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.sparse24_eval import ReplayTimer, Sparse24Eval
from models.bert_classifier import BertClassifier
from models.sparse_inference import BucketedRunner, hf_forward

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def test_replay_timer_leaves_out_first_calls():
    torch.manual_seed(0)
    module = BertClassifier(pretrained=None, config=TINY).eval()
    runner = BucketedRunner(hf_forward(module.net), [16], [4])
    timer = ReplayTimer(runner)
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        first = timer(ids, mask)  # a new shape: not timed (on a GPU it captures the bucket's graph)
        assert timer.timed_calls == 0 and timer.seconds == 0.0 and torch.isnan(torch.tensor(timer.tokens_per_s))
        second = timer(ids, mask)
        timer(ids[:2], None)  # another new shape
        timer(ids[:2], None)
    torch.testing.assert_close(first, module(ids, mask))  # the runner's output, unchanged
    torch.testing.assert_close(second, first)
    assert timer.timed_calls == 2 and timer.tokens == (3 * 10 - 3) + 2 * 10
    assert timer.seconds > 0 and timer.tokens_per_s == timer.tokens / timer.seconds


def test_the_callback_needs_a_bert_classifier_on_a_gpu():
    callback = Sparse24Eval()
    with pytest.raises(ValueError, match="needs a models.BertClassifier, got Linear"):
        callback.on_test_start(None, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="GPU-only; run with --trainer.accelerator gpu"):
        callback.on_test_start(None, BertClassifier(pretrained=None, config=TINY))
    with pytest.raises(ValueError, match="prefix: must be non-empty and differ from 'test'/'test_dense'"):
        Sparse24Eval(prefix="test_dense")
    with pytest.raises(ValueError, match="cuda_graphs: expected true, false or one of"):
        Sparse24Eval(cuda_graphs="sometimes")
    assert Sparse24Eval(cuda_graphs="compile").cuda_graphs == "compile"  # every runner backend
