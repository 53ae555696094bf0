"""Each private torch / transformers API behind ``models.private_hooks``, checked against the installed
libraries: a failure here names the hook an upgrade broke (see the hook's docstring for what
then degrades). CPU where the library allows it; ``gpu`` tests need CUDA."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch

from models import private_hooks as hooks
from models.bucketed_runner import compile_bucket, hf_forward
from models.sparse24_export import install_direct_forward

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, vocab_size=100, num_labels=3)).eval()


def sdpa_masks(monkeypatch) -> list:
    """Record the ``attn_mask`` of every SDPA call (transformers calls it through ``torch.nn.functional``)."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    return seen


class Recorder:
    """A dynamo backend that keeps every FX graph it is given and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calls(self, name: str) -> list:
        return [n for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


# ---------------------------------------------------------------- cuSPARSELt

def test_cslt_sparse_mm_takes_the_arguments_cslt_sparse_mm_passes():
    assert callable(torch._cslt_sparse_mm)
    schema = torch.ops.aten._cslt_sparse_mm.default._schema
    args = {a.name: str(a.type) for a in schema.arguments}
    assert [a.name for a in schema.arguments[:2]] == ["compressed_A", "dense_B"]
    for name, kind in {"bias": "Optional[Tensor]", "transpose_result": "bool", "alg_id": "int",
                       "split_k": "int", "split_k_mode": "int"}.items():
        assert args.get(name) == kind, f"_cslt_sparse_mm lost or changed {name!r}: {schema}"
    assert [str(r.type) for r in schema.returns] == ["Tensor"]


def test_cslt_search_bindings_exist_with_the_arguments_we_pass():
    doc = torch._C._cusparselt.mm_search.__doc__  # pybind11 signature line
    assert doc.startswith("mm_search(") and len(re.findall(r"arg\d", doc.split("->")[0])) == 6, doc
    assert re.search(r"->\s*\w*\[int, int, int, int\]", doc), f"mm_search no longer returns 4 ints: {doc}"
    schema = torch.ops.aten._cslt_sparse_mm_search.default._schema  # the older search, our fallback
    assert [a.name for a in schema.arguments[:2]] == ["compressed_A", "dense_B"]
    assert {"bias", "transpose_result"} <= {a.name for a in schema.arguments}
    assert [str(r.type) for r in schema.returns] == ["int"]


def cpu_cusparselt(dense: torch.Tensor) -> torch.Tensor:
    """A real ``SparseSemiStructuredTensorCUSPARSELT`` on the CPU whose ``packed`` is ``dense``
    (cuSPARSELt's compression is GPU-only; what is tested is the class and its fields)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" notice
        return SparseSemiStructuredTensorCUSPARSELT(dense.shape, packed=dense, meta=None, packed_t=None,
                                                    meta_t=None, compressed_swizzled_bitmask=None)


def test_cusparselt_packed_reads_the_packed_field_of_the_cusparselt_class_only():
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT

    assert "packed" in SparseSemiStructuredTensor.__slots__
    assert issubclass(SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensor)
    packed = torch.randn(32, 16, dtype=torch.bfloat16)
    assert hooks.cusparselt_packed(cpu_cusparselt(packed)) is packed
    assert hooks.cusparselt_packed(torch.nn.Parameter(cpu_cusparselt(packed), requires_grad=False)) is packed
    assert hooks.cusparselt_packed(packed) is None and hooks.cusparselt_packed(None) is None


def test_the_custom_op_has_a_fake_kernel_with_the_layers_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    schema = str(torch.ops.lit.sparse24_linear.default._schema)
    assert schema.startswith("lit::sparse24_linear(Tensor x2, Tensor packed, Tensor? bias, SymInt out_features")
    with FakeTensorMode():  # the 1-D packed layout of cuSPARSELt: its length says nothing of the rows
        x2 = torch.empty(64, 32, dtype=torch.bfloat16)
        out = hooks.sparse24_linear_op(x2, torch.empty(1234, dtype=torch.bfloat16),
                                       torch.empty(48, dtype=torch.bfloat16), 48, (17, -1, 2))
    assert out.shape == (64, 48) and out.dtype == torch.bfloat16


def test_an_exported_layer_traces_into_one_graph_around_the_custom_op():
    class Traced(Exception):
        pass

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced  # the real op needs cuSPARSELt: only the trace is checked here
        return run

    layer = torch.nn.Linear(16, 24).to(torch.bfloat16)
    layer.weight = torch.nn.Parameter(cpu_cusparselt(layer.weight.detach()), requires_grad=False)
    install_direct_forward(layer, (17, -1, 2))
    assert layer._sparse24_packed is layer.weight.packed  # a plain buffer, the subclass stays out
    with pytest.raises(Traced), torch.no_grad():
        torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)(torch.randn(2, 8, 16).bfloat16())
    (gm,) = graphs
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.lit.sparse24_linear.default]
    assert op.args[3:] == (24, 17, -1, 2)
    assert tuple(op.meta["example_value"].shape) == (16, 24)  # (N tokens, out): as F.linear
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert tuple(out.meta["example_value"].shape) == (2, 8, 24)
    install_direct_forward(layer, None)
    assert "_sparse24_packed" not in dict(layer.named_buffers())


# ---------------------------------------------------------------- nn.Module

def test_override_forward_shadows_the_class_forward_eagerly_and_under_dynamo():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    hooks.override_forward(layer, lambda self, inp: torch.nn.functional.linear(inp, self.weight) * 2)
    torch.testing.assert_close(layer(x), 2 * x @ layer.weight.t())
    recorder = Recorder()
    torch.testing.assert_close(torch.compile(layer, backend=recorder, fullgraph=True)(x), 2 * x @ layer.weight.t())
    assert recorder.calls("mul")  # dynamo traced the override, not Linear.forward
    hooks.override_forward(layer, None)
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias)


# ---------------------------------------------------------------- transformers masking

def test_transformers_decides_the_unmasked_skip_in_the_function_we_patch(monkeypatch):
    from transformers import masking_utils

    original = masking_utils._ignore_bidirectional_mask_sdpa
    params = inspect.signature(original).parameters
    assert list(params) == ["padding_mask", "kv_length", "local_attention_size"]
    assert params["local_attention_size"].default is None
    assert original(None, 8) is True  # eager, nothing padded: skipped
    net, ids = tiny_bert(), torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    masks = sdpa_masks(monkeypatch)
    with torch.no_grad():
        net(input_ids=ids)
        monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)
        net(input_ids=ids)  # the module global decides: refusing the skip materialises a mask
    assert masks[:2] == [None, None]
    assert all(m is not None and m.shape[-2:] == (8, 8) and bool(m.all()) for m in masks[2:]) and len(masks) == 4


def test_the_masking_hook_keeps_sdpa_unmasked_while_transformers_thinks_it_traces(monkeypatch):
    from transformers import masking_utils

    net, ids = tiny_bert(), torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = net(input_ids=ids).logits
    masks = sdpa_masks(monkeypatch)
    # What a CUDA graph capture looks like to transformers 5.17: every "is tracing?" check says yes.
    assert callable(masking_utils.is_tracing)
    monkeypatch.setattr(masking_utils, "is_tracing", lambda *a, **k: True)
    original = masking_utils._ignore_bidirectional_mask_sdpa
    padded = torch.tensor([[True] * 7 + [False]])
    with torch.no_grad(), hooks.no_mask_while_capturing(active=True):
        assert masking_utils._ignore_bidirectional_mask_sdpa(None, 8) is True
        assert masking_utils._ignore_bidirectional_mask_sdpa(None, 8, 4) == original(None, 8, 4)  # a window
        assert masking_utils._ignore_bidirectional_mask_sdpa(padded, 8) == original(padded, 8)  # padding
        with hooks.no_mask_while_capturing(active=True):  # nested: the same replacement, restored once
            pass
        out = net(input_ids=ids).logits
    assert masking_utils._ignore_bidirectional_mask_sdpa is original  # restored
    assert len(masks) == 2 and all(m is None for m in masks)  # both layers: SDPA without a mask
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    with hooks.no_mask_while_capturing():  # not capturing: nothing is patched
        assert masking_utils._ignore_bidirectional_mask_sdpa is original


def test_the_compiled_unmasked_path_traces_sdpa_without_a_mask_and_masked_with_the_given_bias():
    net = tiny_bert()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        reference = net(input_ids=ids).logits
        reference_masked = net(input_ids=ids, attention_mask=mask).logits  # transformers' own 2-D mask path
        recorder = Recorder()
        run = compile_bucket(hf_forward(net), mode=None, backend=recorder)  # dynamo for real, no inductor
        out = run(ids, None)
        assert len(recorder.graphs) == 1  # no graph break
        sdpa = recorder.calls("scaled_dot_product_attention")
        assert len(sdpa) == 2 and all(n.kwargs.get("attn_mask") is None for n in sdpa)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(ids, None), reference, atol=1e-5, rtol=1e-5)
        assert len(recorder.graphs) == 1  # the hook's replacement passed dynamo's guards: no recompile
        out = run(ids, mask)  # a new variant: the 4-D additive bias reaches SDPA
        sdpa = recorder.calls("scaled_dot_product_attention")[2:]
        assert len(sdpa) == 2 and all(n.kwargs.get("attn_mask") is not None for n in sdpa)
        torch.testing.assert_close(out, reference_masked, atol=1e-5, rtol=1e-5)


def test_additive_mask_reaches_sdpa_as_given(monkeypatch):
    net = tiny_bert()
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 100, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 6:] = 0
    bias = hooks.additive_mask(mask, torch.float32)
    low = torch.finfo(torch.float32).min
    assert bias.shape == (3, 1, 1, 8) and bias[0, 0, 0].tolist() == [0.0] * 3 + [low] * 5
    with torch.no_grad():
        reference = net(input_ids=ids, attention_mask=mask).logits  # transformers builds its own mask
        masks = sdpa_masks(monkeypatch)
        out = net(input_ids=ids, attention_mask=bias).logits
    assert len(masks) == 2 and all(m is bias for m in masks)  # not rebuilt, not checked: the same tensor
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CUDA graphs and torch.compile

def test_graph_capture_and_compile_config_hooks_exist():
    params = inspect.signature(torch.cuda.graph.__init__).parameters
    assert "capture_error_mode" in params and params["capture_error_mode"].default == "global"
    assert callable(torch.cuda.CUDAGraph.replay)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: 8}):  # the config's own undo
        assert hooks.raise_recompile_limit(100) == 100 == getattr(config, name)
        assert hooks.raise_recompile_limit(10) == 100  # never lowered
    assert isinstance(getattr(config, name), int)


def test_compile_counters_see_a_graph_break():
    before = hooks.compile_counters()
    assert set(before) == {"graph_breaks", "cudagraph_skips"}

    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(broken, backend=Recorder())(torch.randn(3))
    assert hooks.compile_counters()["graph_breaks"] >= before["graph_breaks"] + 1


@pytest.mark.gpu
@needs_cuda
def test_capture_graph_records_and_replays():
    x = torch.randn(64, 64, device="cuda")
    hooks.capture_graph(lambda: x @ x)  # warm-up capture (cuBLAS handle)
    graph, out = hooks.capture_graph(lambda: x @ x)
    x.copy_(torch.eye(64, device="cuda") * 2)
    graph.replay()
    torch.testing.assert_close(out, torch.eye(64, device="cuda") * 4)


@pytest.mark.gpu
@needs_cuda
def test_cslt_hooks_on_a_real_24_weight_equal_a_float64_reference():
    from torch.sparse import to_sparse_semi_structured

    from models.nm_sparsity import nm_mask

    torch.manual_seed(0)
    w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    w = w * nm_mask(w, 2, 4)
    b = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    packed = hooks.cusparselt_packed(to_sparse_semi_structured(w))
    assert packed is not None and packed.dim() == 1  # values and metadata in one 1-D tensor
    expected = x.double() @ w.double().t() + b.double()
    config = hooks.cslt_search(packed, x.t(), b)
    assert len(config) == 3
    for cfg in (hooks.DEFAULT_CONFIG, config):
        out = hooks.cslt_sparse_mm(packed, x.t(), b, cfg)
        assert out.shape == (32, 128) and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(hooks.sparse24_linear_op(x, packed, b, 128, config).double(), expected,
                               atol=0.05, rtol=0.02)
