"""The channels-last streaming decoder (longlive.inference.fast_vae) against the reference StreamingDecoder
(diffusers' modules, frame by frame): the same frames for any chunking, float32 on the CPU."""

import pytest
import torch

from longlive.config import load_preset
from longlive.inference.fast_vae import FastStreamingDecoder, supports
from longlive.models.vae import WanVAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    v = WanVAE(load_preset("tiny").vae).eval()
    with torch.no_grad():  # non-trivial norms and biases (a fresh model has gamma 1, bias 0)
        for name, p in v.model.decoder.named_parameters():
            if "gamma" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return v


def decode(dec, latents, chunks):
    outs, i = [], 0
    for n in chunks:
        outs.append(dec.decode(latents[:, :, i : i + n]))
        i += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("chunks,fpc", [([1, 1, 1, 1, 1], 1), ([1, 4], 1), ([1, 2, 2], 2), ([3, 2], 4)])
def test_equals_the_reference_streaming_decode(vae, chunks, fpc):
    z = torch.randn(1, vae.z_dim, sum(chunks), 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = decode(vae.streaming_decoder(clamp=False), z, [sum(chunks)])  # one call, frame by frame inside
        got = decode(FastStreamingDecoder(vae, clamp=False, frames_per_call=fpc, compile_norms=False), z, chunks)
    assert got.shape == ref.shape == (1, 3, 1 + 4 * (sum(chunks) - 1), 32, 48)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert got.is_contiguous()


def test_reset_starts_a_new_video_and_the_modules_are_untouched(vae):
    z = torch.randn(1, vae.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    dec = FastStreamingDecoder(vae, compile_norms=False)
    with torch.no_grad():
        a = dec.decode(z)
        dec.reset()
        b = dec.decode(z)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(v.is_contiguous() and torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_refuses_a_vae_without_the_wan22_layout():
    cfg = load_preset("tiny").vae.model_copy(update={"is_residual": False, "patch_size": 1,
                                                     "decoder_base_dim": None})
    v = WanVAE(cfg)
    assert not supports(v)
    with pytest.raises(ValueError, match="streaming_decoder"):
        FastStreamingDecoder(v)
