"""The fused LLM.int8() kernels compile for Hopper (sm_90) without a GPU.

Triton's own ``ptxas`` builds the kernels ahead of time; the SASS of every bf16 GEMM tile that
``"auto"`` chooses from must use the int8 warpgroup MMA (``IGMMA``) in its main loop and spill
nothing. Slow (about 20 s): Triton compiles each kernel on the CPU.
"""

from __future__ import annotations

import os
import subprocess

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow


def compile_for_hopper(fn, signature: dict, constexprs: dict, aligned: list[str], warps: int, stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    signature = {**signature, **{n: "constexpr" for n in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass(compiled, tmp_path) -> str:
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("Triton's cuobjdump is not bundled here")
    return subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def test_every_bf16_gemm_tile_compiles_to_int8_wgmma_without_spills(tmp_path):
    from models import int8_triton

    signature = {"Q": "*i8", "W": "*i8", "CX": "*fp32", "CW": "*fp32", "X": "*bf16", "FP16C": "*bf16", "WS": "*i32",
                 "BIAS": "*bf16", "OUT": "*bf16", "S": "i32", "O": "i32", "H": "i32", "D": "i32", "stride_x": "i32"}
    aligned = ["Q", "W", "CX", "CW", "X", "FP16C", "WS", "BIAS", "OUT", "O", "H", "stride_x"]
    for bm, bn, bk, warps, stages in int8_triton.GEMM_CONFIGS:
        constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=True, OUTLIERS=True, HAS_BIAS=True,
                          IEEE=False)
        code = sass(compile_for_hopper(int8_triton._int8_gemm_kernel, signature, constexprs, aligned, warps, stages),
                    tmp_path)
        assert "IGMMA" in code, (bm, bn, bk)  # int8 tensor cores (Hopper wgmma), not a fallback
        assert "HGMMA" in code, (bm, bn, bk)  # the 16-bit outlier products of the epilogue
        assert "STL" not in code, f"tile {(bm, bn, bk)} spills registers"


def test_the_quantize_and_column_kernels_compile(tmp_path):
    from models import int8_triton

    for h in (768, 16384):  # one pass over the row, and two
        block_h = min(triton.next_power_of_2(h), 4096)
        compile_for_hopper(int8_triton._quantize_kernel,
                           {"X": "*bf16", "WS": "*i32", "SLOT": "*i32", "Q": "*i8", "CX": "*fp32", "S": "i32",
                            "H": "i32", "stride_x": "i32", "threshold": "fp32"},
                           dict(BLOCK_S=max(1, 4096 // block_h), BLOCK_H=block_h, BLOCK_L=1024, OUTLIERS=True,
                                ONE_PASS=block_h >= h), ["X", "Q", "H", "stride_x"], 8, 3)
    for gather in (False, True):
        compile_for_hopper(int8_triton._colmax_kernel,
                           {"X": "*bf16", "DIMS": "*i64", "WS": "*i32", "S": "i32", "NCOLS": "i32", "stride_x": "i32"},
                           dict(BLOCK_S=32, BLOCK_C=128 if not gather else 16, GATHER=gather), ["X", "stride_x"], 4, 3)
    code = sass(compile_for_hopper(
        int8_triton._dequantize_kernel,
        {"ACC": "*i32", "W": "*i8", "CX": "*fp32", "CW": "*fp32", "X": "*bf16", "FP16C": "*bf16", "WS": "*i32",
         "BIAS": "*bf16", "OUT": "*bf16", "S": "i32", "O": "i32", "H": "i32", "D": "i32", "stride_x": "i32",
         "stride_acc": "i32"},
        dict(BLOCK_M=64, BLOCK_N=128, OUTLIERS=True, HAS_BIAS=True, IEEE=False), ["ACC", "OUT", "O", "stride_acc"], 4, 3),
        tmp_path)
    assert "STL" not in code
