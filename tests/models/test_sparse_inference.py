"""Bucketed 2:4 inference: padding is exact against the unpadded model, the per-layer fallback
choice on a scripted timing table, the CLI overlay; on a GPU, graphed vs eager 2:4 logits and
the exported model's accuracy vs the masked dense model's."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from models.nm_sparsity import nm_mask, select_linears
from models import bucketed_runner
from models.sparse_inference import (DEFAULT_CONFIG, BucketedRunner, FallbackChoice, LayerTiming, Sparse24Plan,
                                     additive_mask, bucket_for, cap_buckets, check_buckets, choose_sparse_layers,
                                     hf_forward, install_direct_forward, keep_if_faster, pad_to_bucket,
                                     prepare_sparse24, restore_weights, search_alg_id, sparse24_linear)

ROOT = Path(__file__).resolve().parents[2]
ENCODER = [r"encoder\.layer\.\d+\."]


def tiny_bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, vocab_size=100, num_labels=3)
    config.update(overrides)
    return BertForSequenceClassification(BertConfig(**config)).eval()


def test_buckets_hand_worked():
    assert check_buckets([64, 32, 32, 128], "seq_buckets") == (32, 64, 128)
    assert [bucket_for(n, (32, 64, 128)) for n in (1, 32, 33, 128)] == [32, 32, 64, 128]
    assert cap_buckets((32, 64, 128, 512), 100) == (32, 64, 100)
    with pytest.raises(ValueError, match="seq_buckets: 129 is larger than the largest bucket 128"):
        bucket_for(129, (32, 64, 128), "seq_buckets")
    with pytest.raises(ValueError, match="batch_buckets"):
        check_buckets([0, 4], "batch_buckets")
    with pytest.raises(ValueError, match="batch_buckets"):
        check_buckets([], "batch_buckets")


def test_pad_to_bucket_hand_worked():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    padded_ids, padded_mask = pad_to_bucket(ids, mask, batch=3, seq=4, pad_token_id=0)
    assert padded_ids.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [0, 0, 0, 0]]
    # Real rows keep their mask, padded columns are masked; the padded row attends to one token.
    assert padded_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert pad_to_bucket(ids, None, 2, 3)[1].tolist() == [[1, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_bucket(ids, mask, batch=1, seq=4)


def test_bucketed_runner_predictions_equal_the_unpadded_model():
    net = tiny_bert()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 17, 9, 1, 12]
    ids = torch.randint(1, 100, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        # Reference: every sequence alone, at its own length, no padding and no mask at all.
        reference = torch.cat([net(input_ids=ids[i:i + 1, :n]).logits for i, n in enumerate(lengths)])
    calls = []
    forward = hf_forward(net)

    def fn(i, m):
        calls.append(tuple(i.shape))
        return forward(i, m)

    # Batch 5 > largest batch bucket 4: split into 4 + 1 rows, padded to (4, 32) and (1, 32).
    runner = BucketedRunner(fn, seq_buckets=[8, 32], batch_buckets=[1, 4])
    out = runner(ids, mask)
    assert calls == [(4, 32), (1, 32)]
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(-1), reference.argmax(-1))
    # Short batch: the (2, 8) bucket; no mask given means every token is real.
    short = ids[:2, :4].clone().clamp(min=1)
    with torch.no_grad():
        torch.testing.assert_close(runner(short), net(input_ids=short).logits, atol=1e-5, rtol=1e-5)
    assert calls[-1] == (4, 8)
    with pytest.raises(ValueError, match="seq_buckets: 40 is larger"):
        runner(torch.ones(1, 40, dtype=torch.long))


def test_a_batch_that_fills_its_bucket_runs_without_a_mask():
    net = tiny_bert()
    seen = []
    forward = hf_forward(net)

    def fn(i, m):
        seen.append(None if m is None else m.tolist())
        return forward(i, m)

    runner = BucketedRunner(fn, seq_buckets=[8], batch_buckets=[2])
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = net(input_ids=ids).logits
        torch.testing.assert_close(runner(ids), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runner(ids, torch.ones_like(ids)), reference, atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        runner(ids, mask)  # a zero in the mask: the mask is passed
        runner(ids[:1])  # fewer rows than the bucket: padded, so masked
    assert seen[:2] == [None, None]
    assert seen[2] == mask.tolist()
    assert seen[3] == [[1] * 8, [1] + [0] * 7]
    assert BucketedRunner(fn, [8], [2], drop_full_mask=False)(ids) is not None and seen[4] == [[1] * 8] * 2


def test_additive_mask_hand_worked():
    bias = additive_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert bias.flatten(1).float().tolist() == [[0.0, 0.0, low], [0.0, low, low]]


def test_fallback_choice_on_a_scripted_timing_table():
    table = {
        "l0.qkv": LayerTiming(dense_ms=0.190, sparse_ms=0.150),   # 1.27x: 2:4
        "l0.out": (0.027, 0.026),                                  # 1.04x: 2:4 at 1.0, dense at 1.05
        "l0.ffn_in": (0.050, 0.050),                               # equal: dense (not faster)
        "l0.ffn_out": (0.031, 0.495),                              # eager-like 2:4: dense
        "l1.bad": (0.030, float("nan")),                           # failed timing: dense
    }
    choice = choose_sparse_layers(table)
    assert choice.sparse == ["l0.qkv", "l0.out"]
    assert choice.dense == ["l0.ffn_in", "l0.ffn_out", "l1.bad"]
    assert choice.speedups["l0.qkv"] == pytest.approx(0.190 / 0.150)
    assert choice.speedups["l1.bad"] == 0.0
    strict = choose_sparse_layers(table, min_speedup=1.05)
    assert strict.sparse == ["l0.qkv"]
    assert "l0.out (1.04x)" in str(strict)
    with pytest.raises(ValueError, match="min_speedup"):
        choose_sparse_layers(table, min_speedup=0)


def test_whole_model_check_keeps_the_export_only_when_faster():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    dense0, dense1 = net[0].weight, net[1].weight

    def exported():  # layer 0 "exported" (its weight replaced), layer 1 a dense fallback
        net[0].weight = torch.nn.Parameter(dense0.detach() * 0.5)
        return Sparse24Plan({}, FallbackChoice(["0"], ["1"], {"0": 1.3, "1": 0.9}), {"0": dense0})

    plan = exported()
    assert keep_if_faster(net, plan, dense_ms=10.0, sparse_ms=8.0)  # 1.25x: kept
    assert net[0].weight is not dense0 and plan.choice.sparse == ["0"]
    assert plan.whole_model_ms == (10.0, 8.0)
    plan = exported()
    assert not keep_if_faster(net, plan, dense_ms=10.0, sparse_ms=9.0, min_speedup=1.2)  # 1.11x < 1.2
    assert net[0].weight is dense0 and net[1].weight is dense1
    assert plan.choice.sparse == [] and plan.choice.dense == ["0", "1"] and plan.original == {}
    plan = exported()
    assert not keep_if_faster(net, plan, dense_ms=10.0, sparse_ms=10.0)  # equal: not faster
    assert net[0].weight is dense0


def reference_cslt_mm(packed, dense_t, bias, config):
    """``models.private_hooks.cslt_sparse_mm``'s contract in float64, the dense weight itself as "packed":
    ``A (m, k) @ B (k, n) + bias[:, None]``, returned transposed as a row-major ``(n, m)``."""
    assert len(config) == 3
    out = packed.double() @ dense_t.double()
    if bias is not None:
        out = out + bias.double()[:, None]
    return out.t().contiguous()


def cpu_cusparselt_weight(dense):
    """A real ``SparseSemiStructuredTensorCUSPARSELT`` on the CPU whose ``packed`` is ``dense`` itself
    (cuSPARSELt's compression is GPU-only; the plumbing around it is what is tested)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" notice
        return SparseSemiStructuredTensorCUSPARSELT(dense.shape, packed=dense, meta=None, packed_t=None,
                                                    meta_t=None, compressed_swizzled_bitmask=None)


def test_direct_sparse_linear_plumbing_equals_f_linear_in_float64():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    bias = torch.randn(24, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
    weight = cpu_cusparselt_weight(w)
    expected = torch.nn.functional.linear(x, w, bias)
    for inp in (x, x.transpose(0, 1).contiguous().transpose(0, 1)):  # row-major and a strided view
        out = sparse24_linear(inp, weight, bias, mm=reference_cslt_mm)
        assert out.shape == (2, 8, 24) and out.is_contiguous()  # (tokens, out) row-major, as dense F.linear
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    out = sparse24_linear(x, weight, None, (7, 1, -1), mm=reference_cslt_mm)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), atol=1e-12, rtol=1e-12)
    with pytest.raises(TypeError, match="cuSPARSELt 2:4 tensor"):
        sparse24_linear(x, w, bias, mm=reference_cslt_mm)  # a dense weight is refused, not misread


def test_direct_forward_installs_and_uninstalls_and_keeps_dense_weights_on_f_linear():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    reference = layer(x)
    install_direct_forward(layer, (3, 1, -1))
    assert layer.__dict__["_sparse24_config"] == (3, 1, -1) and "forward" in layer.__dict__
    torch.testing.assert_close(layer(x), reference)  # a dense weight (not cuSPARSELt): plain F.linear
    install_direct_forward(layer, None)
    assert not {"forward", "_sparse24_config", "_sparse24_direct"} & set(layer.__dict__)
    torch.testing.assert_close(layer(x), reference)
    assert search_alg_id(layer.weight, x, layer.bias) == DEFAULT_CONFIG  # no cuSPARSELt here: the default
    with pytest.raises(ValueError, match="cuda_graphs"):
        BucketedRunner(lambda i, m: i, cuda_graphs="sometimes")


def test_direct_forward_keeps_the_packed_tensor_as_a_buffer_and_runs_the_packed_call():
    gen = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(16, 24).to(torch.bfloat16)
    dense = layer.weight.detach().clone()
    layer.weight = torch.nn.Parameter(cpu_cusparselt_weight(dense), requires_grad=False)
    install_direct_forward(layer, (5, 1, -1))
    assert layer._sparse24_packed is dense and "_sparse24_packed" not in layer.state_dict()
    x = torch.randn(8, 16, generator=gen).to(torch.bfloat16)
    # cuSPARSELt is CUDA-only, so every call refuses: the searched config, then the default, then
    # torch's own F.linear path (which refuses too on the CPU), each step said in a warning.
    with warnings.catch_warnings(record=True) as caught, pytest.raises((RuntimeError, NotImplementedError)):
        warnings.simplefilter("always")
        layer(x)
    said = [str(w.message) for w in caught]
    assert any("config (5, 1, -1) failed" in m for m in said) and any("F.linear path" in m for m in said)
    assert layer.__dict__["_sparse24_config"] == DEFAULT_CONFIG and layer.__dict__["_sparse24_direct"] is False
    install_direct_forward(layer, None)
    assert "_sparse24_packed" not in dict(layer.named_buffers()) and "forward" not in layer.__dict__


def test_runner_backends_resolve_and_run_eagerly_on_the_cpu(monkeypatch):
    assert BucketedRunner(lambda i, m: i).backend == bucketed_runner.DEFAULT_GRAPHS in ("hand", "compile")
    monkeypatch.setattr(bucketed_runner, "DEFAULT_GRAPHS", "compile")  # the one switch
    assert BucketedRunner(lambda i, m: i, cuda_graphs=True).backend == "compile"
    assert BucketedRunner(lambda i, m: i, cuda_graphs=False).backend == "eager"
    for backend in ("hand", "compile", "eager", "auto"):
        assert BucketedRunner(lambda i, m: i, cuda_graphs=backend).backend == backend
    with pytest.raises(ValueError, match="cuda_graphs: expected true, false, 'hand', 'compile'"):
        BucketedRunner(lambda i, m: i, cuda_graphs="graphs")
    net = tiny_bert()
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = net(input_ids=ids).logits
    for backend in ("hand", "compile"):  # CPU inputs: no graph, no compile, the same numbers
        runner = BucketedRunner(hf_forward(net), [8], [4], cuda_graphs=backend)
        for _ in range(3):
            torch.testing.assert_close(runner(ids), reference, atol=1e-5, rtol=1e-5)
            assert runner.last_call_replayed is False and runner.last_call_captured is False
        assert runner.captured == [] and runner.setup_s == {}


def test_callback_timing_shape():
    from callbacks import Sparse24Eval

    assert Sparse24Eval(timing_tokens=4096).timing_shape() == (32, 128)
    assert Sparse24Eval(timing_tokens=16384).timing_shape() == (128, 128)
    assert Sparse24Eval(timing_tokens=4096, seq_buckets=[256, 512], batch_buckets=[4, 8]).timing_shape() == (8, 256)
    assert Sparse24Eval(timing_tokens=100, seq_buckets=[64], batch_buckets=[2, 4]).timing_shape() == (2, 64)
    assert Sparse24Eval(timing_tokens=4096).timing_shape(max_positions=64) == (64, 64)


def test_prepare_without_a_gpu_names_the_reason():
    net = tiny_bert()
    with pytest.raises(ValueError, match="include: no nn.Linear"):
        prepare_sparse24(net, ["nothing_matches"], fallback=False)
    for fallback in (False, True):  # refused before any timing: fp32 weights, not 2:4, on the CPU
        with pytest.raises(ValueError, match=r"12 layer\(s\) cannot be exported to 2:4") as err:
            prepare_sparse24(net, ENCODER, fallback=fallback)
        assert "bert.encoder.layer.0.attention.self.query: needs float16 or bfloat16" in str(err.value)


def test_callback_rejects_bad_arguments():
    from callbacks import Sparse24Eval

    with pytest.raises(ValueError, match="min_speedup"):
        Sparse24Eval(min_speedup=-1.0)
    with pytest.raises(ValueError, match="seq_buckets"):
        Sparse24Eval(seq_buckets=[])
    with pytest.raises(ValueError, match="prefix"):
        Sparse24Eval(prefix="test")
    with pytest.raises(ValueError, match="timing_tokens"):
        Sparse24Eval(timing_tokens=0)


def test_cli_accepts_the_sparse24_overlay(capsys):
    from lit.cli import main

    base = ROOT / "configs/bert/minilm_2to4_oneshot.yaml"
    overlay = ROOT / "configs/bert/sparse24_inference.yaml"
    assert "bert/minilm_2to4_oneshot.yaml" in overlay.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(base), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    callback = printed["trainer"]["callbacks"][0]
    assert callback["class_path"] == "callbacks.Sparse24Eval"
    assert callback["init_args"]["timing_tokens"] == 4096
    assert printed["trainer"]["precision"] == "bf16-true"


# ---------------------------------------------------------------- GPU (run with -m gpu)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (2:4 kernels)")


def pruned_bert_cuda(hidden=256, layers=2, heads=4, labels=2):
    net = tiny_bert(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * hidden, max_position_embeddings=512, vocab_size=1000,
                    num_labels=labels).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for layer in select_linears(net, ENCODER).values():
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    return net


def ragged_batch(batch=24, seq=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq) < lengths[:, None]).long()
    ids = torch.randint(1, 1000, (batch, seq), generator=gen) * mask
    return ids.cuda(), mask.cuda()


@pytest.mark.gpu
@needs_cuda
def test_graphed_24_logits_equal_eager_24_logits():
    net = pruned_bert_cuda()
    plan = prepare_sparse24(net, ENCODER, fallback=False)
    assert plan.choice.sparse and not plan.choice.dense
    ids, mask = ragged_batch()

    fn = hf_forward(net)
    eager = BucketedRunner(fn, [128], [32], cuda_graphs=False)
    graphed = BucketedRunner(fn, [128], [32], cuda_graphs=True)
    expected = eager(ids, mask)
    for _ in range(2):  # the first call captures, the second replays with new inputs copied in
        out = graphed(ids, mask)
        assert graphed.captured == [(32, 128)]
        # Same kernels, same inputs: equal up to bf16 rounding of a different launch order.
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1.6e-2)
        ids, mask = ids.flip(0), mask.flip(0)
        expected = eager(ids, mask)
    restore_weights(net, plan)
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.layout == torch.strided
               and not hasattr(m.weight, "packed") and "forward" not in m.__dict__
               for m in select_linears(net, ENCODER).values())


@pytest.mark.gpu
@needs_cuda
def test_exported_accuracy_equals_masked_dense_within_bf16_noise():
    net = pruned_bert_cuda(labels=4)
    batches = [ragged_batch(seed=s) for s in range(8)]
    with torch.no_grad():
        dense = torch.cat([net(input_ids=i, attention_mask=m).logits.float() for i, m in batches])
    # Labels: the float64 argmax of the masked dense model (an independent reference for accuracy).
    labels = dense.argmax(-1)
    prepare_sparse24(net, ENCODER, fallback=False)
    runner = BucketedRunner(hf_forward(net), [128], [32])
    sparse = torch.cat([runner(i, m).float() for i, m in batches])
    assert (sparse - dense).abs().max() < 0.05 * dense.abs().max() + 0.05
    # Predictions may flip only where the dense top-2 margin is within bf16 noise.
    top2 = dense.topk(2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1]) < 0.05
    flipped = sparse.argmax(-1) != labels
    assert not (flipped & ~close).any()
    acc_dense, acc_sparse = 1.0, float((sparse.argmax(-1) == labels).float().mean())
    assert acc_sparse >= acc_dense - float(close.float().mean())


@pytest.mark.gpu
@needs_cuda
def test_timing_table_and_fallback_on_the_gpu():
    net = pruned_bert_cuda()
    plan = prepare_sparse24(net, ENCODER, tokens=1024, min_speedup=1.0)
    layers = select_linears(net, ENCODER)
    assert set(plan.table) == set(layers)
    assert sorted(plan.choice.sparse + plan.choice.dense) == sorted(layers)
    for name in plan.choice.sparse:
        assert plan.table[name].sparse_ms < plan.table[name].dense_ms
        assert hasattr(layers[name].weight, "packed")
    for name in plan.choice.dense:
        assert not hasattr(layers[name].weight, "packed")


def test_bert_classifier_eval_forward_goes_through_its_inference_runner():
    from models.bert_classifier import BertClassifier

    module = BertClassifier(pretrained=None, num_labels=3, config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, vocab_size=100)).eval()
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        reference = torch.cat([module.net(input_ids=ids[i:i + 1, :n]).logits for i, n in enumerate([10, 6, 10])])
        calls = []
        runner = BucketedRunner(hf_forward(module.net), [16], [4])
        module.inference_runner = lambda i, m: calls.append(i.shape) or runner(i, m)
        torch.testing.assert_close(module(ids, mask), reference, atol=1e-5, rtol=1e-5)
        assert calls == [ids.shape]
        module.train()  # training never uses the runner
        module(ids, mask)
        assert len(calls) == 1


@pytest.mark.gpu
@needs_cuda
def test_sparse24_eval_callback_tests_and_predicts_through_lightning():
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from callbacks import Sparse24Eval
    from models.bert_classifier import BertClassifier

    module = BertClassifier(pretrained=None, num_labels=2, config=dict(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=128, vocab_size=1000))
    with torch.no_grad():
        for layer in select_linears(module, ENCODER).values():
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):
        n = int(torch.randint(4, 49, (1,), generator=gen))
        ids = torch.zeros(48, dtype=torch.long)
        ids[:n] = torch.randint(1, 1000, (n,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids[0] % 2})
    callback = Sparse24Eval(seq_buckets=[64], batch_buckets=[16], timing_tokens=1024, min_speedup=1.0)
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-true", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback])
    results = trainer.test(module, dataloaders=DataLoader(rows, batch_size=16))[0]
    for key in ("test/acc", "test_dense/acc", "test_24/acc", "test_24/tokens_per_s", "test_24/speedup"):
        assert key in results
    # One test loop scored all three passes; each variant timed its replays only: of the batches
    # (16, 16, 8 rows of 48 tokens) the second, whose (16, 64) graph the first captured.
    for key in ("test_dense/tokens_per_s", "test_24/tokens_per_s"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert module.eval_variants == []
    # The graphed dense pass is the model's own (eager) test pass up to bf16 rounding; the 2:4
    # pass differs from it only by the sparse kernel's rounding (same pruned weights).
    assert results["test_dense/loss"] == pytest.approx(results["test/loss"], abs=0.02)
    assert results["test_24/loss"] == pytest.approx(results["test_dense/loss"], abs=0.05)
    assert results["test_24/dense_fallbacks"] == len(callback.plan.choice.dense)
    assert all(not hasattr(m.weight, "packed") for m in select_linears(module, ENCODER).values())
    predictions = trainer.predict(module, dataloaders=DataLoader(rows, batch_size=16))
    assert torch.cat(predictions).shape == (40,)
    assert module.inference_runner is None
    assert all(not hasattr(m.weight, "packed") for m in select_linears(module, ENCODER).values())


@pytest.mark.gpu
@needs_cuda
def test_a_full_bucket_is_captured_without_a_mask():
    net = pruned_bert_cuda()
    prepare_sparse24(net, ENCODER, fallback=False)
    eager = BucketedRunner(hf_forward(net), [128], [32], cuda_graphs=False)
    graphed = BucketedRunner(hf_forward(net), [128], [32])
    full = torch.randint(1, 1000, (32, 128), device="cuda")  # fills the bucket: the unmasked graph
    out = graphed(full)
    torch.testing.assert_close(out, eager(full), atol=1e-3, rtol=1.6e-2)
    assert graphed.drop_full_mask and graphed.captured == [(32, 128)]  # no fallback to masked graphs
    ids, mask = ragged_batch(batch=32, seq=128)  # padded: the masked graph of the same bucket
    torch.testing.assert_close(graphed(ids, mask), eager(ids, mask), atol=1e-3, rtol=1.6e-2)
    assert graphed.captured == [(32, 128), (32, 128)]


@pytest.mark.gpu
@needs_cuda
def test_direct_sparse_linear_equals_dense_and_a_bad_alg_falls_back_per_layer():
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512).to("cuda", torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    w64, b64 = layer.weight.double(), layer.bias.double()
    expected = (x.double() @ w64.t() + b64)  # float64 reference of the pruned layer
    ws = to_sparse_semi_structured(layer.weight.detach())
    out = sparse24_linear(x, ws, layer.bias.detach())
    assert out.shape == (4, 64, 512) and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)
    config = search_alg_id(ws, x, layer.bias.detach())
    torch.testing.assert_close(sparse24_linear(x, ws, layer.bias.detach(), config).double(), expected,
                               atol=0.05, rtol=0.02)
    layer.weight = torch.nn.Parameter(ws, requires_grad=False)
    install_direct_forward(layer, (10 ** 6, 1, -1))  # an alg id no plan has: this layer falls back to alg 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # never an error
    if any("using the default" in str(w.message) for w in caught):  # refused (cuSPARSELt 0.8 does)
        assert layer.__dict__["_sparse24_config"] == DEFAULT_CONFIG
        torch.testing.assert_close(layer(x).double(), expected, atol=0.05, rtol=0.02)
    net = pruned_bert_cuda()
    plan = prepare_sparse24(net, ENCODER, fallback=False)  # every exported layer takes the direct call
    assert all("forward" in m.__dict__ for m in select_linears(net, ENCODER).values())
    restore_weights(net, plan)
    assert not any("forward" in m.__dict__ for m in select_linears(net, ENCODER).values())


@pytest.mark.gpu
@needs_cuda
def test_auto_runner_keeps_graph_or_eager_per_bucket_with_equal_outputs():
    net = pruned_bert_cuda()
    prepare_sparse24(net, ENCODER, fallback=False)
    eager = BucketedRunner(hf_forward(net), [128], [32], cuda_graphs=False)
    auto = BucketedRunner(hf_forward(net), [128], [32], cuda_graphs="auto")
    full = torch.randint(1, 1000, (32, 128), device="cuda")
    for _ in range(2):
        torch.testing.assert_close(auto(full), eager(full), atol=1e-3, rtol=1.6e-2)
    assert list(auto.modes.values()) in (["graph"], ["eager"]) and len(auto.timings) == 1
    assert auto.masked_fallback is None


@pytest.mark.gpu
@needs_cuda
def test_the_graph_of_a_full_bucket_calls_sdpa_without_a_mask_like_eager(monkeypatch):
    net = pruned_bert_cuda()
    seen = []  # (capturing?, mask is None) of every SDPA call
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        seen.append((torch.cuda.is_current_stream_capturing(), mask is None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    runner = BucketedRunner(hf_forward(net), [128], [32])
    runner(torch.randint(1, 1000, (32, 128), device="cuda"))
    assert any(capturing for capturing, _ in seen)  # the capture went through SDPA
    assert all(unmasked for _, unmasked in seen)  # warm-up and capture alike: no mask (flash-eligible)
    assert runner.masked_fallback is None


@pytest.mark.gpu
@pytest.mark.slow  # compiles a model twice (tens of seconds)
@needs_cuda
def test_compiled_and_hand_graphs_equal_eager_and_say_which_calls_replay():
    net = pruned_bert_cuda()
    prepare_sparse24(net, ENCODER, fallback=False)
    fn = hf_forward(net)
    eager = BucketedRunner(fn, [128], [32], cuda_graphs=False)
    full = torch.randint(1, 1000, (32, 128), device="cuda")
    ids, mask = ragged_batch(batch=32, seq=128)
    # inductor fuses and reorders bf16 reductions: looser than the hand graph (same kernels as eager)
    tolerance = {"hand": dict(atol=1e-3, rtol=1.6e-2), "compile": dict(atol=3e-2, rtol=3e-2)}
    # hand: captured on the 1st call; compile: compiled (+ cudagraph warm-up) 1st, recorded 2nd
    for backend, replays in (("hand", [False, True, True]), ("compile", [False, False, True])):
        runner = BucketedRunner(fn, [128], [32], cuda_graphs=backend)
        seen = []
        for _ in range(3):
            torch.testing.assert_close(runner(full), eager(full), **tolerance[backend])
            seen.append(runner.last_call_replayed)
        assert seen == replays, backend
        torch.testing.assert_close(runner(ids, mask), eager(ids, mask), **tolerance[backend])  # masked variant
        assert runner.last_call_replayed is False and runner.masked_fallback is None
        assert runner.captured == [(32, 128), (32, 128)] and len(runner.setup_s) == 2
    assert all(stats["cudagraph_skips"] == 0 for stats in runner.compile_stats.values()), runner.compile_stats
