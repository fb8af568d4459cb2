"""NVFP4 format (issue 5): bit-exact agreement with torchao's reference, options, I/O, sizes."""

from __future__ import annotations

import json

import pytest
import torch

from longlive.quant import NVFP4Tensor, load, quantize
from longlive.quant.nvfp4 import E2M1_VALUES, e2m1_decode, e2m1_encode, pack_codes, unpack_codes

torch.set_num_threads(1)

ref = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
ref_kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()  # float64: norms of 1e30- or 1e-37-sized data stay finite
    return float((x - y).norm() / x.norm())


def student_t(shape, df=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t = N(0,1) / sqrt(chi2(df) / df); chi2(2)/2 = Exponential(1).
    z = torch.randn(shape, generator=g)
    e = -torch.log(torch.rand(shape, generator=g).clamp_min(1e-12))
    return z / torch.sqrt(e)


def gauss(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def torchao_quantize(x: torch.Tensor, global_scale: torch.Tensor):
    """torchao's reference on x (reshaped to 2D as it requires), our shapes back."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    scales, packed = ref.nvfp4_quantize(x2, 16, global_scale)
    return packed.reshape(*x.shape[:-1], -1), scales.reshape(*x.shape[:-1], -1)


def _blocks_with_zeros():
    x = gauss((8, 64), seed=3)
    x[0] = 0.0  # whole zero rows
    x[1, :16] = 0.0  # one all-zero block
    x[2, ::3] = 0.0  # scattered zeros
    x[3, 5] = -0.0
    return x


CASES = {
    "normal": lambda: gauss((64, 256)),
    "normal_bf16": lambda: gauss((32, 128), seed=1).to(torch.bfloat16),
    "student_t_df2": lambda: student_t((64, 256)),
    "cauchy_like": lambda: student_t((32, 256), df=1.0, seed=5) ** 3,  # very heavy tail, still finite
    "tiny_1e-30": lambda: gauss((16, 128), seed=2) * 1e-30,
    "tiny_below_global_floor_1e-37": lambda: gauss((16, 128), seed=7) * 1e-37,
    "huge_1e30": lambda: gauss((16, 128), seed=4) * 1e30,
    "all_zero": lambda: torch.zeros(4, 64),
    "blocks_with_zeros": _blocks_with_zeros,
    "odd_shape_3x7x48": lambda: gauss((3, 7, 48), seed=6),
    "exact_ties": lambda: (torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)).reshape(1, 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bit_exact_against_torchao(name):
    x = CASES[name]()
    assert torch.isfinite(x).all()
    q = quantize(x)
    amax = x.float().abs().amax()
    if amax > 2688 * 2.0**-120:
        # Same per-tensor scale convention: torchao's per_tensor_amax_to_scale is amax / (448 * 6),
        # the scale itself (not its reciprocal), and it is what nvfp4_quantize divides by.
        assert torch.equal(q.global_scale.view(torch.int32), ref.per_tensor_amax_to_scale(amax).view(torch.int32))
    # For the all-zero tensor torchao's amax / (6 * 448) = 0 gives 0/0 = NaN scales; we floor the
    # global scale at 2**-120 (also active for amax < ~2e-33), and hand torchao that same scale.
    packed_ref, scales_ref = torchao_quantize(x, q.global_scale)
    assert q.packed.shape == packed_ref.shape and q.block_scales.shape == scales_ref.shape
    assert torch.equal(q.packed, packed_ref), f"{name}: packed codes differ"
    assert torch.equal(q.block_scales.view(torch.uint8), scales_ref.view(torch.uint8)), f"{name}: block scales differ"
    # Dequantize: same values as torchao's codes * (global * scale).
    deq_ref = ref_kernels.f4_unpacked_to_f32(ref_kernels.unpack_uint4(packed_ref.contiguous())).reshape(x.shape)
    deq_ref = (deq_ref.unflatten(-1, (-1, 16)) * (q.global_scale * scales_ref.float()).unsqueeze(-1)).flatten(-2)
    out = q.dequantize()
    assert torch.equal(out, deq_ref)
    assert torch.isfinite(out).all()
    if amax == 0:
        assert torch.equal(out, torch.zeros_like(out))
        assert (q.codes() == 0).all()  # +0 codes, not NaN-driven garbage
    else:
        assert rel_err(x.float(), out) < 0.15


def test_e2m1_encoding_matches_torchao_on_dense_grid_and_ties():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    v = torch.cat(
        [
            torch.linspace(-7.0, 7.0, 20001),
            mids, -mids,
            torch.nextafter(mids, torch.zeros(7)), torch.nextafter(mids, torch.full((7,), 9.0)),
            torch.tensor([0.0, -0.0, 1e-40, -1e-40, 6.0, -6.0, 100.0, -100.0]),
        ]
    )
    ours = e2m1_encode(v)
    assert torch.equal(ours, ref_kernels.f32_to_f4_unpacked(v.clamp(-6.0, 6.0)))
    # Ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    assert e2m1_decode(e2m1_encode(mids)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_decode(e2m1_encode(torch.tensor([7.0, -1e6]))).tolist() == [6.0, -6.0]  # saturates


def test_packing_is_low_nibble_first_like_float4_e2m1fn_x2():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).reshape(2, 16)
    packed = pack_codes(codes)
    assert packed[0, 0].item() == 0x10 and packed[0, 1].item() == 0x32  # element 0 in the low nibble
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(e2m1_decode(torch.arange(16, dtype=torch.uint8)), E2M1_VALUES)
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert packed.view(torch.float4_e2m1fn_x2).shape == (2, 8)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_input_raises(bad, word):
    x = gauss((4, 32))
    x[2, 7] = bad
    with pytest.raises(ValueError, match=word):
        quantize(x)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="16x16"):
        quantize(torch.randn(8, 32), block_2d=True)
    with pytest.raises(TypeError):
        quantize(torch.ones(4, 16, dtype=torch.int32))


def test_relative_error_gaussian_and_four_over_six_is_better():
    cases = {"gaussian": gauss((256, 1024), seed=10), "student_t_df2": student_t((256, 1024), seed=11)}
    for name, x in cases.items():
        e6 = rel_err(x, quantize(x).dequantize())
        e46 = rel_err(x, quantize(x, scale_rule="four_over_six").dequantize())
        print(f"\nNVFP4 relative error on {name}: plain (scale to 6) {e6:.4f}, four_over_six {e46:.4f}")
        assert e46 < e6
        if name == "gaussian":
            assert 0.08 <= e6 <= 0.12


def test_four_over_six_never_worse_per_block_and_uses_both():
    x = gauss((64, 256), seed=12)
    q6, q46 = quantize(x), quantize(x, scale_rule="four_over_six")
    err = lambda q: (q.dequantize() - x).square().unflatten(-1, (-1, 16)).sum(-1)  # noqa: E731
    assert (err(q46) <= err(q6)).all()
    changed = (q46.block_scales.view(torch.uint8) != q6.block_scales.view(torch.uint8)).float().mean()
    assert 0.0 < changed < 1.0


def test_fouroversix_package_cross_check():
    """Extra check against the `fouroversix` package when installed (not a dependency)."""
    fos = pytest.importorskip("fouroversix")
    fn = getattr(fos, "quantize_to_fp4", None)
    if fn is None:
        pytest.skip("fouroversix installed but without quantize_to_fp4; API not known here")
    x = gauss((64, 256), seed=13)
    out = fn(x)
    deq = out.dequantize() if hasattr(out, "dequantize") else None
    if deq is None:
        pytest.skip("fouroversix output has no dequantize()")
    ours = rel_err(x, quantize(x, scale_rule="four_over_six").dequantize())
    theirs = rel_err(x, deq.float())
    print(f"\nfour_over_six error: ours {ours:.4f}, fouroversix {theirs:.4f}")
    assert ours <= theirs * 1.1


def test_stochastic_rounding_is_unbiased():
    x = student_t((4, 64), seed=14)
    g = torch.Generator().manual_seed(0)
    n = 2000
    acc = torch.zeros_like(x)
    for _ in range(n):
        acc += quantize(x, stochastic=True, generator=g).dequantize()
    mean = acc / n
    # Per element the quantization step is <= 2 * block_scale * global; the standard error of the
    # mean is <= step / (2 sqrt(n)). Bias would show up as an error that does not shrink with n.
    q = quantize(x, stochastic=True, generator=g)
    step = 2.0 * (q.global_scale * q.block_scales.float()).repeat_interleave(16, -1)
    assert ((mean - x).abs() <= 5 * step / (2 * n**0.5) + 1e-12).all()
    assert rel_err(x, mean) < 0.1 * rel_err(x, quantize(x).dequantize())
    # Reproducible with a seeded generator, and different from round-to-nearest.
    a = quantize(x, stochastic=True, generator=torch.Generator().manual_seed(1))
    b = quantize(x, stochastic=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.packed, b.packed)


def test_block_2d_one_scale_per_tile_and_transpose_consistent():
    w = gauss((48, 64), seed=15)
    q = quantize(w, block_2d=True)
    s = q.block_scales.view(torch.uint8).float().unflatten(0, (3, 16))  # (3 tile rows, 16, 4)
    assert (s == s[:, :1]).all()  # every row of a tile has the tile's scale
    # With square tiles, W and W^T quantize to the same values (what a backward GEMM needs).
    assert torch.equal(quantize(w.t().contiguous(), block_2d=True).dequantize(), q.dequantize().t())
    e2d = rel_err(w, q.dequantize())
    assert e2d < 0.15
    q46 = quantize(w, block_2d=True, scale_rule="four_over_six")
    s46 = q46.block_scales.view(torch.uint8).float().unflatten(0, (3, 16))
    assert (s46 == s46[:, :1]).all()
    assert rel_err(w, q46.dequantize()) <= e2d


def test_save_load_roundtrip(tmp_path):
    x = gauss((3, 16, 64), seed=16).to(torch.bfloat16)
    q = quantize(x, scale_rule="four_over_six")
    path = tmp_path / "sub" / "w.nvfp4.safetensors"
    q.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    r = load(path)
    assert isinstance(r, NVFP4Tensor) and r.shape == (3, 16, 64)
    assert torch.equal(r.packed, q.packed)
    assert torch.equal(r.block_scales.view(torch.uint8), q.block_scales.view(torch.uint8))
    assert torch.equal(r.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("block_scales").dtype == torch.uint8
    assert meta["format"] == "nvfp4" and meta["format_version"] == "1" and json.loads(meta["shape"]) == [3, 16, 64]
    # A file of another format is refused.
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an NVFP4"):
        load(other)


def test_bytes_of_a_3072_square_weight():
    w = gauss((3072, 3072), seed=17).to(torch.bfloat16)
    q = quantize(w)
    bf16 = w.numel() * 2
    assert q.nbytes == 3072 * 3072 // 2 + 3072 * 3072 // 16 + 4
    print(f"\nNVFP4 (3072, 3072): {q.nbytes} bytes = {q.nbytes / bf16:.4f}x of bf16 {bf16}")
    assert q.nbytes <= 0.30 * bf16
