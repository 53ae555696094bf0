"""LLM.int8() layer: against a float64 re-derivation of the paper's decomposition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.int8 import Int8Linear, OutlierCounter, absmax_quantize, int8_matmul_decomposed, quantize_model, weight_bytes


def planted(s: int = 37, h: int = 64, cols: tuple[int, ...] = (3, 17, 40), seed: int = 0) -> torch.Tensor:
    """N(0, 1) activations with outlier columns: |x| up to ~20 in a third of the rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, h, generator=g)
    for c in cols:
        rows = torch.arange(s)[::3]
        x[rows, c] = 8.0 + 12.0 * torch.rand(len(rows), generator=g)
    return x


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, alpha: float,
              w16_cols: set[int] | None = None, candidates: set[int] | None = None) -> torch.Tensor:
    """The paper's equations in float64, written out independently of models.int8.

    Outlier columns whose index is not in ``w16_cols`` use the dequantized int8 weight column
    (``None``: every outlier column has its 16-bit weight); only ``candidates`` (``None``: all
    columns) can be outlier columns.
    """
    x, w = x.double(), w.double()
    outl = [j for j in range(x.shape[1])
            if x[:, j].abs().max() >= alpha and (candidates is None or j in candidates)]
    rest = x.clone()
    rest[:, outl] = 0
    cx = rest.abs().max(dim=1).values  # (S,)
    cw = w.abs().max(dim=1).values  # (O,)
    xq = torch.round(127 * rest / torch.where(cx > 0, cx, 1)[:, None])
    wq = torch.round(127 * w / cw[:, None])
    y = (xq @ wq.T) * cx[:, None] * cw[None, :] / 127**2
    for j in outl:
        col = w[:, j] if w16_cols is None or j in w16_cols else wq[:, j] * cw / 127
        y += x[:, j:j + 1] * col[None, :]
    return y + (b.double() if b is not None else 0)


def linear(h: int = 64, o: int = 24, bias: bool = True, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(h, o, bias=bias).requires_grad_(False)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # fp32 dequantization vs float64: relative 1e-5 of the output scale.
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-5 * float(b.abs().max()) + 1e-6)


def test_decomposition_matches_float64_rederivation():
    x, lin = planted(), linear()
    layer = Int8Linear.from_linear(lin, threshold=6.0, fp16_dims=[3, 17, 40])
    close(layer(x), reference(x, lin.weight, lin.bias, 6.0))
    # Same numbers with leading batch dimensions.
    close(layer(x.reshape(1, 37, 64)).reshape(37, 24), reference(x, lin.weight, lin.bias, 6.0))


def test_outlier_columns_without_16bit_weights_use_the_dequantized_column():
    x, lin = planted(), linear()
    layer = Int8Linear.from_linear(lin, threshold=6.0, fp16_dims=[17])  # 3 and 40 not kept
    close(layer(x), reference(x, lin.weight, lin.bias, 6.0, w16_cols={17}))


def test_decomposition_is_more_accurate_than_plain_int8_on_outliers():
    x, lin = planted(), linear()
    exact = lin(x).double()
    mixed = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40])(x).double()
    plain = Int8Linear.from_linear(lin, math.inf)(x).double()
    # Plain int8 spreads an outlier's scale over its whole row: on those rows several times the
    # error (the rest is the int8 weights' error, common to both).
    rows = slice(0, None, 3)
    assert (mixed - exact)[rows].abs().mean() * 3 < (plain - exact)[rows].abs().mean()


def test_threshold_inf_is_plain_rowwise_int8():
    x, lin = planted(), linear(bias=False)
    out = Int8Linear.from_linear(lin, threshold=math.inf, fp16_dims=[3])(x)
    xq, cx = absmax_quantize(x.double())  # int8 codes of every column
    cw = lin.weight.double().abs().max(dim=1).values
    wq = torch.round(127 * lin.weight.double() / cw[:, None])
    close(out, (xq.double() @ wq.T) * cx[:, None] * cw[None, :] / 127**2)
    close(out, reference(x, lin.weight, None, math.inf))


def test_threshold_below_every_value_gives_the_16bit_result():
    x, lin = planted(), linear()
    layer = Int8Linear.from_linear(lin, threshold=1e-9, fp16_dims=range(64))
    close(layer(x), x.double() @ lin.weight.double().T + lin.bias.double())


def test_zero_rows_and_all_outlier_rows_stay_finite():
    lin = linear()
    layer = Int8Linear.from_linear(lin, threshold=6.0, fp16_dims=range(64))
    x = torch.zeros(4, 64)
    torch.testing.assert_close(layer(x), lin.bias.expand(4, -1))  # zero rows: bias only
    x[1] = 50.0  # every column is an outlier: the whole product in 16-bit
    out = layer(x)
    assert torch.isfinite(out).all()
    close(out, x.double() @ lin.weight.double().T + lin.bias.double())


def test_calibrated_mode_checks_only_the_kept_columns():
    x, lin = planted(cols=(3, 17, 40)), linear()
    x[:, 50] = 0.5  # a kept column that is not an outlier in this call: stays in the int8 part
    dynamic = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40, 50])
    calibrated = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40, 50], outliers="calibrated")
    close(calibrated(x), dynamic(x))
    close(calibrated(x), reference(x, lin.weight, lin.bias, 6.0))
    # Column 17 was not calibrated: it stays in the int8 part (as in plain int8).
    partial = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 40], outliers="calibrated")
    close(partial(x), reference(x, lin.weight, lin.bias, 6.0, candidates={3, 40}))
    nothing_kept = Int8Linear.from_linear(lin, 6.0, outliers="calibrated")
    close(nothing_kept(x), reference(x, lin.weight, lin.bias, math.inf))


def test_bfloat16_activations_keep_their_dtype():
    x, lin = planted(), linear()
    layer = Int8Linear.from_linear(lin.to(torch.bfloat16), 6.0, [3, 17, 40])
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.fp16_columns.dtype == torch.bfloat16
    ref = reference(x.to(torch.bfloat16).float(), lin.weight.float(), lin.bias.float(), 6.0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.02 * float(ref.abs().max()))


def test_state_dict_is_about_half_the_16bit_bytes():
    lin = nn.Linear(768, 768).half()
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=range(8))  # 8 kept columns, as in BERT
    ratio = weight_bytes(layer) / weight_bytes(lin)
    assert 0.5 <= ratio < 0.52, ratio
    # int8 codes + float32 scales + 8 fp16 columns + index + bias, byte for byte:
    assert weight_bytes(layer) == 768 * 768 + 768 * 4 + 768 * 8 * 2 + 8 * 8 + 768 * 2
    restored = Int8Linear(768, 768, num_fp16_dims=8)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(5, 768)
    torch.testing.assert_close(restored(x.half()), layer(x.half()))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_quantize_model_inside_bert_keeps_the_logits():
    net = tiny_bert()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(input_ids=ids).logits
        hidden = net.bert(input_ids=ids).last_hidden_state
        report = quantize_model(net, threshold=6.0)
        out = net(input_ids=ids).logits
        hidden_q = net.bert(input_ids=ids).last_hidden_state
    assert len(report.converted) == 12  # Q, K, V, attention out, FFN in, FFN out x 2 layers
    assert all(isinstance(net.get_submodule(n), Int8Linear) for n in report.converted)
    assert isinstance(net.classifier, nn.Linear) and isinstance(net.bert.pooler.dense, nn.Linear)
    assert 0.25 < report.bytes_after / report.bytes_before < 0.3  # fp32 -> int8 + scales
    # int8 noise is ~1% of the hidden state's scale; the logits follow.
    assert (hidden_q - hidden).abs().max() < 0.05 * hidden.abs().max()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_quantize_model_reports_unsupported_layers_and_refuses_packed_weights():
    net = tiny_bert()
    report = quantize_model(net, include=[r"embeddings\.word_embeddings", r"layer\.0\.output\.dense"])
    assert report.converted == ["bert.encoder.layer.0.output.dense"]
    assert "Embedding" in report.skipped["bert.embeddings.word_embeddings"]
    again = quantize_model(net, include=[r"layer\.0\.output\.dense"])
    assert again.converted == [] and "already" in again.skipped["bert.encoder.layer.0.output.dense"]

    net = tiny_bert()
    packed = net.bert.encoder.layer[1].intermediate.dense
    packed.weight = nn.Parameter(packed.weight.detach().to_sparse(), requires_grad=False)
    with pytest.raises(ValueError, match=r"layer\.1\.intermediate\.dense.*export_sparse_24"):
        quantize_model(net)
    assert not any(isinstance(m, Int8Linear) for m in net.modules())  # nothing converted


@pytest.mark.parametrize("bad", [0.0, -6.0, float("nan"), "six"])
def test_bad_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear.from_linear(linear(), threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        quantize_model(tiny_bert(), threshold=bad)


def test_bad_layers_and_arguments_are_refused():
    with pytest.raises(ValueError, match="Conv1d, not an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="fp16_dims"):
        Int8Linear.from_linear(linear(), fp16_dims=[64])
    with pytest.raises(ValueError, match="outliers"):
        Int8Linear.from_linear(linear(), outliers="static")
    with pytest.raises(ValueError, match="include: no nn.Linear"):
        quantize_model(tiny_bert(), include=["nothing_matches"])
    with pytest.raises(ValueError, match="fp16_dims: names"):
        quantize_model(tiny_bert(), fp16_dims={"bert.pooler.dense": [0]})


def test_outlier_counter_counts_positions_in_bounded_memory():
    lin = linear()
    x = planted(s=30)  # outlier rows 0, 3, ..., 27 in columns 3, 17, 40: 10 of 30 positions
    counter = OutlierCounter({"l": lin}, threshold=6.0)
    with counter:
        lin(x)
        lin(x)
        counter.set_mask(torch.arange(30) < 15)  # 5 outlier rows among the first 15
        lin(x)
    lin(x)  # detached: not counted
    assert counter.tokens["l"] == 75
    frac = counter.fractions()["l"]
    assert frac.shape == (64,)
    expected = (x.abs() >= 6).sum(0) * 2 + (x[:15].abs() >= 6).sum(0)
    torch.testing.assert_close(counter.counts["l"], expected)
    assert counter.outlier_dims(0.1)["l"].tolist() == [3, 17, 40]
    torch.testing.assert_close(counter.absmax["l"], x.abs().amax(0))


def test_int8_matmul_decomposed_on_an_empty_batch():
    lin = linear()
    layer = Int8Linear.from_linear(lin)
    assert layer(torch.zeros(0, 64)).shape == (0, 24)
    out = int8_matmul_decomposed(torch.zeros(2, 0, 64), layer.weight_int8, layer.weight_absmax)
    assert out.shape == (2, 0, 24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(37, 64, 24), (5, 20, 12), (512, 768, 3072)])
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_int_mm_path_matches_the_cpu_path(shape, fused, monkeypatch):
    import models.int8

    monkeypatch.setattr(models.int8, "FUSED", fused)  # Triton kernels, or the PyTorch ops
    s, h, o = shape
    x, lin = planted(s=s, h=h, cols=(3, 17)), linear(h, o)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3])
    cpu = layer(x)
    gpu = layer.cuda()(x.cuda()).cpu()
    # CPU and GPU may round x * 127 / c_x differently in the last bit: a code can then differ
    # by one at an exact .5, moving an output by one code step of that row.
    step = 1.01 * float(x.abs().max()) * float(lin.weight.abs().max()) / 127
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=step)
    assert ((gpu - cpu).abs() > 1e-5).double().mean() < 0.01
    ref = reference(x, lin.weight, lin.bias, 6.0, w16_cols={3})
    torch.testing.assert_close(gpu.double(), ref, rtol=0, atol=step)
    x16 = x.cuda().to(torch.bfloat16)  # bf16 activations: the codes match the CPU path's
    layer16 = Int8Linear.from_linear(lin.cuda().to(torch.bfloat16), 6.0, fp16_dims=[3])
    torch.testing.assert_close(layer16(x16).float(), layer16.cpu()(x16.cpu()).float().cuda(), rtol=0.01, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_in_calibrated_mode():
    x, lin = planted(s=256, h=768, cols=(3, 17, 40)), linear(768, 768)
    layer = Int8Linear.from_linear(lin.cuda().half(), 6.0, fp16_dims=[3, 17, 40], outliers="calibrated")
    xs = x.cuda().half()
    eager = layer(xs)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(xs)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = layer(xs)
    graph.replay()
    torch.testing.assert_close(captured, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_2to4_exported_layer_is_refused():
    from models.nm_sparsity import export_sparse_24, nm_mask

    net = tiny_bert().cuda().half()
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.Linear) and "encoder" in name:
                m.weight.mul_(nm_mask(m.weight, 2, 4))
    export_sparse_24(net, [r"encoder\.layer\.0\.intermediate"])
    with pytest.raises(ValueError, match="2:4-exported"):
        quantize_model(net)
