"""The fused LLM.int8() kernels (models/int8_triton.py) on the CPU, through Triton's interpreter.

Run by ``tests/models/test_int8_interpreted.py`` in a child process with ``TRITON_INTERPRET=1``
(it must be set before Triton is imported); skipped when imported without it. Every case is
checked against the float64 re-derivation of ``tests/models/test_int8.py``, never against the
PyTorch path of the same module. Triton's interpreter multiplies bfloat16 wrongly, so the
cases use float32 (IEEE dot products) and float16 activations.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton is imported")

if INTERPRETED:
    import models.int8 as int8
    from models import int8_triton
    from models.int8 import Int8Linear, quantize_model
    from tests.models.test_int8 import linear, planted, reference, tiny_bert

CONFIGS = [(32, 32, 32, 4, 1), (64, 128, 128, 4, 4), "int_mm"]  # a small tile, a Hopper tile, _int_mm


@pytest.fixture
def gemm(request, monkeypatch):
    config = request.param
    monkeypatch.setattr(int8_triton, "FORCE_CONFIG", int8_triton.INT_MM if config == "int_mm" else config)
    return config


def close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=rel * float(ref.abs().max()) + 1e-6)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("gemm", "mode"), [
    (CONFIGS[0], "dynamic"), (CONFIGS[1], "calibrated"), (CONFIGS[2], "dynamic"),
    pytest.param(CONFIGS[0], "calibrated", marks=SLOW), pytest.param(CONFIGS[1], "dynamic", marks=SLOW),
    pytest.param(CONFIGS[2], "calibrated", marks=SLOW)], indirect=["gemm"])
def test_kernels_match_the_float64_rederivation(gemm, mode):
    x, lin = planted(s=37, h=64, cols=(3, 17, 40)), linear(64, 40)
    x[5, 50] = -7.0  # an outlier column with no kept 16-bit weight: its dequantized int8 column
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17, 40, 60], outliers=mode)
    assert int8.FUSED and int8.TRITON_ON_CPU  # the layers below run the Triton kernels
    candidates = {3, 17, 40, 60} if mode == "calibrated" else None
    close(layer(x), reference(x, lin.weight, lin.bias, 6.0, w16_cols={3, 17, 40, 60}, candidates=candidates))
    # float16 activations and weights: the output is rounded to float16 once.
    lin16, x16 = linear(64, 40).half(), x.half()
    layer16 = Int8Linear.from_linear(lin16, 6.0, fp16_dims=[3, 17], outliers=mode)
    ref16 = reference(x16.float(), lin16.weight.float(), lin16.bias.float(), 6.0, w16_cols={3, 17},
                      candidates={3, 17} if mode == "calibrated" else None, fp32_codes=True)
    out16 = layer16(x16)
    assert out16.dtype == torch.float16
    close(out16, ref16, rel=2e-3)


@pytest.mark.parametrize("gemm", [CONFIGS[1], pytest.param(CONFIGS[2], marks=SLOW)], indirect=True)
def test_many_outliers_long_rows_and_few_rows(gemm):
    # H = 4100: rows quantized in two passes, outlier lists compacted in 5 chunks; 40 outlier
    # columns: 3 chunks of 16 in the GEMM epilogue, half with kept 16-bit weights; 5 rows.
    cols = tuple(range(7, 4100, 101))[:40]
    x, lin = planted(s=5, h=4100, cols=cols), linear(4100, 24, bias=False)
    x[0::3][:, list(cols)] = 9.0  # planted() uses rows 0, 3, ...
    kept = cols[::2]
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=kept)
    close(layer(x), reference(x, lin.weight, None, 6.0, w16_cols=set(kept), fp32_codes=True))


@pytest.mark.parametrize("gemm", CONFIGS[1:2], indirect=True)
def test_zero_rows_all_outlier_rows_strided_and_empty_inputs(gemm):
    lin = linear(64, 24)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=range(0, 64, 2))
    x = torch.zeros(6, 64)
    x[1] = 50.0  # every column an outlier: the whole product in 16-bit (half the columns dequantized)
    x[2, 5] = 0.25
    close(layer(x), reference(x, lin.weight, lin.bias, 6.0, w16_cols=set(range(0, 64, 2))))
    wide = planted(s=9, h=80)[:, :64]  # rows 80 apart: a row stride that is not H
    close(layer(wide), reference(wide, lin.weight, lin.bias, 6.0, w16_cols=set(range(0, 64, 2))))
    close(layer(wide.reshape(3, 3, 64)).reshape(9, 24), reference(wide, lin.weight, lin.bias, 6.0,
                                                                   w16_cols=set(range(0, 64, 2))))
    assert layer(torch.zeros(0, 64)).shape == (0, 24)
    plain = Int8Linear.from_linear(lin, math.inf)  # no outlier pass at all
    close(plain(wide), reference(wide, lin.weight, lin.bias, math.inf))
    nothing_kept = Int8Linear.from_linear(lin, 6.0, outliers="calibrated")
    close(nothing_kept(wide), reference(wide, lin.weight, lin.bias, math.inf))


@pytest.mark.slow
@pytest.mark.parametrize("gemm", CONFIGS[1:], indirect=True)
def test_one_compiled_graph_follows_the_outlier_set(gemm):
    """Traced once (fake tensors through the custom op), then run on inputs with 0, 3 and 23
    outlier columns: each equals the float64 re-derivation, with no recompilation."""
    import torch._dynamo.testing

    lin = linear(64, 24)
    layer = Int8Linear.from_linear(lin, 6.0, fp16_dims=[3, 17])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for cols in [(), (3, 17, 40), tuple(range(0, 64, 3))[:40] + (1,)]:
        x = planted(s=21, h=64, cols=cols, seed=len(cols))
        if not cols:
            x = x.clamp(-5.0, 5.0)
        close(compiled(x), reference(x, lin.weight, lin.bias, 6.0, w16_cols={3, 17}))
    assert counter.frame_count == 1


@pytest.mark.slow
def test_fused_qkv_bert_matches_the_reference_path_padded_and_unpadded():
    from models.sparse_inference import BucketedRunner, hf_forward

    net = tiny_bert().bert
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith("LayerNorm"):
                module.weight[[3, 40]] = 4.0  # planted systematic outlier dimensions
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    report = quantize_model(net, 6.0, fp16_dims={n: [3, 40] for n in
                                                  ("encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense")})
    assert len(report.fused) == 2
    runner = BucketedRunner(hf_forward(net, "last_hidden_state"), seq_buckets=(16,), batch_buckets=(4,))
    for batch_mask in (None, mask):
        with torch.no_grad():
            fused = runner(ids, batch_mask)
            int8.FUSED = False
            try:
                plain = runner(ids, batch_mask)
            finally:
                int8.FUSED = True
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


@pytest.mark.slow
def test_slices_keep_one_copy_of_the_fused_layer_on_the_interpreter_path():
    net = tiny_bert().bert
    quantize_model(net, 6.0)
    attn = net.encoder.layer[0].attention.self
    x = planted(s=8, h=64, cols=(3,)).reshape(2, 4, 64)
    fused = attn.query.layer
    with torch.no_grad():
        full = fused(x)  # (2, 4, 192): query | key | value
        q, k, v = attn.query(x), attn.key(x), attn.value(x)
    torch.testing.assert_close(torch.cat([q, k, v], dim=-1), full)
    assert attn.key.state_dict() == {} and attn.value.state_dict() == {}  # saved once, under query
    assert {k.split(".")[0] for k in attn.query.state_dict()} == {"fused"}
