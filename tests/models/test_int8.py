"""LLM.int8() layer: against a float64 re-derivation of the paper's decomposition.

CPU tests run the plain PyTorch path (the reference); the fused Triton kernels are checked on
the CPU by ``test_int8_interpreted.py`` (Triton's interpreter) and on a GPU by the ``gpu`` tests
here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.int8 import (Int8Linear, Int8LinearSlice, OutlierCounter, absmax_quantize, int8_matmul_decomposed,
                         kept_slots, quantize_model, weight_bytes)


def planted(s: int = 37, h: int = 64, cols: tuple[int, ...] = (3, 17, 40), seed: int = 0) -> torch.Tensor:
    """N(0, 1) activations with outlier columns: |x| up to ~20 in a third of the rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, h, generator=g)
    for c in cols:
        rows = torch.arange(s)[::3]
        x[rows, c] = 8.0 + 12.0 * torch.rand(len(rows), generator=g)
    return x


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, alpha: float,
              w16_cols: set[int] | None = None, candidates: set[int] | None = None,
              fp32_codes: bool = False) -> torch.Tensor:
    """The paper's equations in float64, written out independently of models.int8.

    Outlier columns whose index is not in ``w16_cols`` use the dequantized int8 weight column
    (``None``: every outlier column has its 16-bit weight); only ``candidates`` (``None``: all
    columns) can be outlier columns. ``fp32_codes``: evaluate ``v * (127 / c)`` before rounding
    in float32 as torch does (``fl(fl(1 / c) * 127)``, then the product), the rule models.int8
    documents: its codes then match exactly (in float64 a near-.5 product can round the other
    way, moving a whole row by a code step).
    """
    x, w = x.double(), w.double()
    outl = [j for j in range(x.shape[1])
            if x[:, j].abs().max() >= alpha and (candidates is None or j in candidates)]
    rest = x.clone()
    rest[:, outl] = 0
    cx = rest.abs().max(dim=1).values  # (S,)
    cw = w.abs().max(dim=1).values  # (O,)

    def codes(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if fp32_codes:
            inv = torch.where(c > 0, torch.reciprocal(torch.where(c > 0, c, 1).float()) * 127, 0)
            return torch.round(v.float() * inv[:, None]).double()
        return torch.round(127 * v / torch.where(c > 0, c, 1)[:, None])

    xq, wq = codes(rest, cx), codes(w, cw)
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
    assert restored.kept_slot[:8].tolist() == list(range(8)) and (restored.kept_slot[8:] == -1).all()
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
    assert all(isinstance(net.get_submodule(n), (Int8Linear, Int8LinearSlice)) for n in report.converted)
    assert report.fused == [[f"bert.encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")]
                            for i in range(2)]
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


def bert_layer_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in f".{n}"]


def test_fused_qkv_equals_three_separate_int8_layers():
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    dims = {n: [5, 9] for n in bert_layer_names(tiny_bert())}
    outs = []
    for fuse in (False, True):
        net = tiny_bert()
        with torch.no_grad():
            net.bert.encoder.layer[0].attention.output.LayerNorm.weight[[5, 9]] = 30.0  # outliers in layer 1
            report = quantize_model(net, 6.0, fp16_dims=dims, fuse_qkv=fuse)
            outs.append(net.bert(input_ids=ids).last_hidden_state)
        assert len(report.converted) == 12 and len(report.fused) == (2 if fuse else 0)
    # Row-wise weight scales are per output row, so stacking Q, K, V changes no code or scale.
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    query = net.get_submodule("bert.encoder.layer.1.attention.self.query")
    assert query.layer.fp16_dims.tolist() == [5, 9] and query.layer.out_features == 3 * 64


def test_fused_qkv_keeps_the_names_the_union_of_fp16_dims_and_one_copy():
    net = tiny_bert()
    prefix = "bert.encoder.layer.0.attention.self."
    before = sum(weight_bytes(net.get_submodule(prefix + p)) for p in ("query", "key", "value"))
    quantize_model(net, 6.0, fp16_dims={prefix + "query": [3], prefix + "key": [7, 3], prefix + "value": []})
    attn = net.get_submodule(prefix[:-1])
    assert attn.query.layer is attn.key.layer is attn.value.layer
    assert attn.query.layer.fp16_dims.tolist() == [3, 7]  # union: kept for all three
    assert [attn.query.out_features, attn.key.out_features, attn.value.in_features] == [64, 64, 64]
    assert attn.key.state_dict() == {} and set(attn.query.state_dict()) == {
        f"fused.{k}" for k in ("weight_int8", "weight_absmax", "fp16_dims", "fp16_columns", "bias")}
    fused_bytes = 192 * 64 + 192 * 4 + 192 * 2 * 4 + 2 * 8 + 192 * 4  # codes, scales, 2 fp32 columns, dims, bias
    assert weight_bytes(attn) == fused_bytes and before == 3 * (64 * 64 + 64) * 4  # counted once; fp32 Q, K, V
    again = quantize_model(net, 6.0, include=[r"layer\.0\.attention\.self\.key"])
    assert again.converted == [] and "already" in again.skipped[prefix + "key"]


def test_fused_qkv_recomputes_out_of_order_and_after_in_place_changes():
    net = tiny_bert()
    attn = net.bert.encoder.layer[0].attention.self
    separate = {p: Int8Linear.from_linear(getattr(attn, p), 6.0) for p in ("query", "key", "value")}
    quantize_model(net, 6.0)
    x, other = planted(s=10, h=64), planted(s=10, h=64, seed=3)
    with torch.no_grad():
        got = {"value": attn.value(x), "query": attn.query(x)}  # any order: value first
        got["key"] = attn.key(other)  # another input: computed for it
        x.mul_(2)  # changed in place: what was kept for the old values is not used
        got["late query"] = attn.query(x)
        for part, inp in (("value", x / 2), ("query", x / 2), ("key", other), ("late query", x)):
            torch.testing.assert_close(got[part], separate[part.split()[-1]](inp), rtol=0, atol=1e-5)


def test_converted_layers_weigh_at_most_055_of_bf16():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072)
    net = BertModel(cfg, add_pooling_layer=False).to(torch.bfloat16).eval()
    names = bert_layer_names(net)
    report = quantize_model(net, 6.0, fp16_dims={n: range(0, 768, 96) for n in names})  # 8 kept columns each
    assert report.bytes_after / report.bytes_before <= 0.55
    # All that the converted layers hold, the unsaved kept_slot included:
    layers = {id(m): m for m in net.modules() if isinstance(m, Int8Linear)}.values()
    held = sum(t.numel() * t.element_size() for m in layers for t in m.buffers())
    assert 0.5 < held / report.bytes_before <= 0.55, held / report.bytes_before


def test_kept_slots_give_each_kept_dimension_its_position():
    slot = kept_slots(torch.tensor([4, 1, 6]), 8)
    assert slot.tolist() == [-1, 1, -1, -1, 0, -1, 2, -1] and slot.dtype == torch.int32


# -------------------------------------------------------------------------------------------- GPU


def on_gpu(test):
    """``gpu`` marker (``-m gpu``), a skip without CUDA, and the untimed GEMM choice."""
    test = pytest.mark.usefixtures("untimed_gemm")(test)
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@pytest.fixture
def untimed_gemm(monkeypatch):
    """The shape heuristic instead of timing every GEMM variant: fewer Triton compilations."""
    from models import int8_triton

    monkeypatch.setattr(int8_triton, "AUTOTUNE", False)


def close_on_gpu(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to the re-derivation (float32 codes) up to the output dtype's rounding and float32
    accumulation."""
    ref = ref.to(out.device)
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=1e-5 * float(ref.abs().max()) + 1e-6)


OUTLIER_COLS = (3, 17, 40) + tuple(range(50, 64 * 12, 37))[:20]  # 23: two chunks of the epilogue


def check_fused_path(dtype: torch.dtype, mode: str, shapes: list[tuple[int, int, int]]) -> None:
    for s, h, o in shapes:
        cols = tuple(c for c in OUTLIER_COLS if c < h)
        kept = cols[::2]
        x, lin = planted(s=s, h=h, cols=cols), linear(h, o)
        x16, lin16 = x.to(dtype), lin.to(dtype)
        layer = Int8Linear.from_linear(lin16, 6.0, fp16_dims=kept, outliers=mode).cuda()
        out = layer(x16.cuda())
        assert out.dtype == dtype and out.shape == (s, o)
        ref = reference(x16.float(), lin16.weight.float(), lin16.bias.float(), 6.0, w16_cols=set(kept),
                        candidates=set(kept) if mode == "calibrated" else None, fp32_codes=True)
        close_on_gpu(out, ref)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("gemm", ["triton", "int_mm"])
@pytest.mark.parametrize("mode", ["dynamic", "calibrated"])
def test_fused_cuda_path_matches_the_float64_rederivation(dtype, gemm, mode, monkeypatch):
    from models import int8_triton

    variant = int8_triton.GEMM_CONFIGS[0] if gemm == "triton" else int8_triton.INT_MM
    monkeypatch.setattr(int8_triton, "FORCE_CONFIG", variant)
    check_fused_path(dtype, mode, [(37, 64, 24), (512, 768, 2304), (300, 1024, 4096)])


@on_gpu
def test_every_triton_tile_matches_the_float64_rederivation(monkeypatch):
    from models import int8_triton

    for config in int8_triton.GEMM_CONFIGS:  # the tiles "auto" chooses from (bf16, as benchmarked)
        monkeypatch.setattr(int8_triton, "FORCE_CONFIG", config)
        check_fused_path(torch.bfloat16, "dynamic", [(512, 768, 2304)])


def outlier_inputs(s: int, h: int) -> list[torch.Tensor]:
    """0, 3 and 103 outlier columns (kept ones and others), on the same shape."""
    clean = torch.randn(s, h, generator=torch.Generator().manual_seed(5)).clamp(-5, 5)
    many = planted(s=s, h=h, cols=(3, 17, 40) + tuple(range(100, 700, 6)), seed=2)
    return [clean, planted(s=s, h=h, cols=(3, 17, 40), seed=1), many]


@on_gpu
def test_one_captured_cuda_graph_follows_the_outlier_set():
    from models.sparse_inference import warm_up_for_capture

    lin = linear(768, 3072).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40]).cuda()
    inputs = [x.to("cuda", torch.bfloat16) for x in outlier_inputs(256, 768)]
    static = inputs[2].clone()
    warm_up_for_capture(lambda: layer(static))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(static)
    for x in [*inputs, inputs[0]]:  # outliers appear, grow, disappear
        static.copy_(x)
        graph.replay()
        ref = reference(x.float().cpu(), lin.weight.float(), lin.bias.float(), 6.0, w16_cols={3, 17, 40},
                        fp32_codes=True)
        close_on_gpu(out, ref)
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)  # the eager call: the same kernels


@on_gpu
def test_compiled_layer_follows_the_outlier_set_without_recompiling():
    import torch._dynamo.testing

    lin = linear(768, 768).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40]).cuda()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for x in outlier_inputs(256, 768):
        x = x.to("cuda", torch.bfloat16)
        ref = reference(x.float().cpu(), lin.weight.float(), lin.bias.float(), 6.0, w16_cols={3, 17, 40},
                        fp32_codes=True)
        close_on_gpu(compiled(x), ref)
    assert counter.frame_count == 1


@on_gpu
def test_fused_qkv_bert_through_bucketed_runner_padded_and_unpadded():
    import models.int8
    from models.sparse_inference import BucketedRunner, hf_forward

    net = tiny_bert().bert.to("cuda", torch.bfloat16)
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith("LayerNorm"):
                module.weight[[3, 40]] = 4.0  # planted systematic outliers
    quantize_model(net, 6.0, fp16_dims={n: [3, 40] for n in bert_layer_names(net)})
    fn = hf_forward(net, "last_hidden_state")
    runner = BucketedRunner(fn, seq_buckets=(16,), batch_buckets=(4,))
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 11:], mask[3, 5:] = 0, 0
    for batch_mask in (None, mask.cuda()):
        for _ in range(2):  # the first call captures, the second replays on new tokens
            ids = torch.randint(1, 100, (4, 16), generator=gen).cuda()
            with torch.no_grad():
                graphed = runner(ids, batch_mask)
                eager = fn(ids, batch_mask)
                models.int8.FUSED = False
                try:
                    plain = fn(ids, batch_mask)  # the PyTorch reference path, same padded batch
                finally:
                    models.int8.FUSED = True
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
            keep = (batch_mask if batch_mask is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(graphed[keep].float(), plain[keep].float(), rtol=0.02, atol=0.05)


@on_gpu
@pytest.mark.parametrize("shape", [(37, 64, 24), (5, 20, 12), (512, 768, 3072)])
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_path_matches_the_cpu_path(shape, fused, monkeypatch):
    import models.int8

    monkeypatch.setattr(models.int8, "FUSED", fused)  # Triton kernels, or the PyTorch ops
    s, h, o = shape
    x, lin = planted(s=s, h=h, cols=(3, 17)), linear(h, o)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3])
    cpu = layer(x)
    gpu_out = layer.cuda()(x.cuda()).cpu()
    # Both evaluate x * (127 / c_x) as torch does (float32 reciprocal, then products): the same codes.
    torch.testing.assert_close(gpu_out, cpu, rtol=0, atol=1e-5 * float(cpu.abs().max()))
    x16 = x.cuda().to(torch.bfloat16)
    layer16 = Int8Linear.from_linear(lin.cuda().to(torch.bfloat16), 6.0, fp16_dims=[3])
    torch.testing.assert_close(layer16(x16).float(), layer16.cpu()(x16.cpu()).float().cuda(), rtol=0.01, atol=0.02)


@on_gpu
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


@on_gpu
def test_gemm_choice_is_timed_once_per_shape_and_kept(monkeypatch):
    from models import int8_triton

    monkeypatch.setattr(int8_triton, "AUTOTUNE", True)

    layer = Int8Linear.from_linear(linear(768, 3072).to(torch.bfloat16), 6.0, fp16_dims=[3]).cuda()
    x = planted(s=1000, h=768, cols=(3, 9)).to("cuda", torch.bfloat16)
    layer(x)
    key = (1024, 3072, 768, torch.bfloat16, True, True, "auto", x.device)
    assert int8_triton.CHOSEN[key] in int8_triton.gemm_candidates(1000, 768, 3072, x.device)
    chosen = dict(int8_triton.CHOSEN)
    layer(x[:900])  # same power-of-two bucket: no new timing
    assert int8_triton.CHOSEN == chosen


@on_gpu
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


@on_gpu
def test_int8_eval_runs_the_int8_copy_from_cuda_graphs_with_the_eager_numbers(tmp_path):
    """callbacks.Int8Eval on a GPU (its default cuda_graphs=True) scores the int8 copy through a
    BucketedRunner in the module's own test loop: the same accuracy and loss as the eager copy
    (cuda_graphs=False), padded and unpadded batches."""
    import lightning as L

    from callbacks.int8_eval import Int8Eval
    from models.bert_classifier import BertClassifier

    config = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
              "vocab_size": 200, "max_position_embeddings": 64}
    model = BertClassifier(pretrained=None, config=config, num_labels=2)
    with torch.no_grad():
        for name, module in model.net.named_modules():
            if name.endswith("LayerNorm"):
                module.weight[[3, 40]] = 8.0  # planted outlier dimensions, |x| well past 6
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(6):
        ids = torch.randint(1, 200, (8, 32), generator=gen)
        mask = torch.ones_like(ids)
        if i % 2:
            mask[:, 20 + i:] = 0  # padded batches
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (8,), generator=gen)})
    results = {}
    for graphs in (True, False):
        callback = Int8Eval(calibration_batches=0, cuda_graphs=graphs, seq_buckets=[32], batch_buckets=[8])
        trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-true", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                            default_root_dir=tmp_path)
        trainer.test(model, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
        results[graphs] = callback.results
        if graphs:
            assert callback.runner is None  # released at the end of the loop
    assert results[True]["test_int8/acc"] == results[False]["test_int8/acc"]
    assert results[True]["test_int8/loss"] == pytest.approx(results[False]["test_int8/loss"], rel=2e-2)
