"""Triton NVFP4 kernels against their plain-PyTorch references, on the CPU through TRITON_INTERPRET=1.

* ``kernels/nvfp4_quant.py`` == ``kernels/nvfp4_quant_ref.py`` bit for bit (codes and scales), and the
  reference == ``longlive.quant.nvfp4.quantize`` (the format definition, bit-exact with torchao);
* ``kernels/nvfp4_gemm.py`` == ``kernels/nvfp4_gemm_ref.py`` within GEMM_RTOL of the output's scale
  (the two differ only in the order of float32 additions: the kernel multiplies exact float16
  ``code * block_scale`` tiles on tensor cores and applies the global scales at the end).
Shapes are small and odd (M, N not multiples of any tile; K a multiple of 16 but not of the K tile).
"""

import os

import pytest
import torch

from longlive_kernels import nvfp4_gemm, nvfp4_gemm_ref, nvfp4_quant, nvfp4_quant_ref
from longlive.quant.nvfp4 import quantize

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it when there is no GPU
    pytest.skip("these tests run the kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

GEMM_RTOL = 1e-5  # max |kernel - reference| / max |reference|; measured ~2.5e-7 at these sizes


def data(shape, seed=0, scale=1.0, dtype=torch.float32):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    x[0, :16] = 0.0  # an all-zero block
    x[min(1, shape[0] - 1), 3] = -0.0
    if shape[0] > 2:  # every E2M1 rounding tie, both signs
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
        x[2, :16] = torch.cat((ties, -ties)) * x[2, :16].abs().max() / 6
    return x.to(dtype)


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", [(37, 80), (5, 16), (33, 48), (64, 256)])
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_kernel_is_bit_exact(shape, scale, per_row):
    for dtype in (torch.float32, torch.bfloat16):
        x = data(shape, scale=scale, dtype=dtype)
        g, inv_g = nvfp4_quant_ref.global_scale(x, per_row)
        ref = nvfp4_quant_ref.quantize_rows(x, g, inv_g)
        got = nvfp4_quant.quantize_rows(x, g, inv_g, dequantized=True)
        assert torch.equal(got[0], ref[0]), "packed codes"
        assert same_bits(got[1], ref[1]), "block scales"
        assert same_bits(got[2], nvfp4_quant_ref.dequantize_rows_f16(*ref)), "float16 dequantized values"


@pytest.mark.parametrize("shape", [(37, 80), (64, 256), (3, 32)])
def test_quantize_reference_is_the_format_definition(shape):
    """One global: == quantize(x); one global per row: == quantize(row) for every row."""
    x = data(shape, seed=1)
    g, inv_g = nvfp4_quant_ref.global_scale(x, per_row=False)
    packed, scales = nvfp4_quant_ref.quantize_rows(x, g, inv_g)
    q = quantize(x)
    assert torch.equal(packed, q.packed) and same_bits(scales, q.block_scales) and torch.equal(g, q.global_scale)
    assert torch.equal(nvfp4_quant_ref.dequantize_rows(packed, scales, g), q.dequantize())

    g, inv_g = nvfp4_quant_ref.global_scale(x, per_row=True)
    packed, scales = nvfp4_quant_ref.quantize_rows(x, g, inv_g)
    deq = nvfp4_quant_ref.dequantize_rows(packed, scales, g)
    # the GEMM's float16 operand is exact: code * scale * 2**-14, so times 2**14 it is code * scale
    assert torch.equal(nvfp4_quant_ref.dequantize_rows_f16(packed, scales).double() * 2**14,
                       nvfp4_quant_ref.dequantize_rows(packed, scales, torch.ones(())).double())
    for i in range(shape[0]):
        qi = quantize(x[i : i + 1])
        assert torch.equal(packed[i], qi.packed[0]) and same_bits(scales[i], qi.block_scales[0])
        assert torch.equal(deq[i], qi.dequantize()[0])


def test_all_zero_rows_dequantize_to_zero():
    x = torch.zeros(3, 32)
    g, inv_g = nvfp4_quant_ref.global_scale(x, per_row=True)
    for impl in (nvfp4_quant_ref, nvfp4_quant):
        packed, scales = impl.quantize_rows(x, g, inv_g)[:2]
        assert torch.equal(nvfp4_quant_ref.dequantize_rows(packed, scales, g), x)


def quantized(x):
    g, inv_g = nvfp4_quant_ref.global_scale(x, per_row=False)
    return (*nvfp4_quant_ref.quantize_rows(x, g, inv_g), g)


@pytest.mark.parametrize("M,N,K", [(37, 50, 80), (1, 17, 16), (64, 48, 96), (19, 33, 48), (40, 64, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_kernel_matches_reference(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g) if bias else None
    a_ops, w_ops = quantized(x), quantized(w)
    ref = nvfp4_gemm_ref.nvfp4_gemm(*a_ops, *w_ops, b)
    got = nvfp4_gemm.nvfp4_gemm(*a_ops, *w_ops, b, out_dtype=torch.float32)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < GEMM_RTOL, err
    # A handed over dequantized (float16) instead of packed: the same numbers
    dq = nvfp4_quant_ref.dequantize_rows_f16(a_ops[0], a_ops[1])
    got16 = nvfp4_gemm.nvfp4_gemm(dq, None, a_ops[2], *w_ops, b, out_dtype=torch.float32)
    assert float((got16 - ref).abs().max() / ref.abs().max()) < GEMM_RTOL
    low = nvfp4_gemm.nvfp4_gemm(*a_ops, *w_ops, b, out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_gemm_reference_is_the_emulated_product():
    """The GEMM reference multiplies exactly dq(q(x)) @ dq(q(w))^T, the definition of the W4A4 linear."""
    x, w = data((9, 64), seed=2), data((24, 64), seed=3)
    ref = nvfp4_gemm_ref.nvfp4_gemm(*quantized(x), *quantized(w))
    assert torch.equal(ref, quantize(x).dequantize() @ quantize(w).dequantize().T)


def test_wrappers_reject_bad_shapes():
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quant.quantize_rows(x, torch.ones(()), torch.ones(()))
    a, w = quantized(torch.randn(4, 32)), quantized(torch.randn(8, 64))
    with pytest.raises(ValueError, match="same K"):
        nvfp4_gemm.nvfp4_gemm(*a, *w)
    with pytest.raises(ValueError, match="block scales"):
        nvfp4_gemm.nvfp4_gemm(a[0], None, a[2], *quantized(torch.randn(8, 32)))
