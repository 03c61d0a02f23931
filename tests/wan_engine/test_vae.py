"""Wan 2.1 VAE against the official code's outputs (tiny random checkpoint, fp32 CPU)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import ORACLE_DIR, load_ref, rel_err
from wan_engine.vae import LATENT_MEAN, LATENT_STD, WanVAE21

TOL = 1e-4
VAE_FILE = ORACLE_DIR / "t2v-A14B-tiny" / "Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(VAE_FILE, map_location="cpu")


@pytest.fixture(scope="module")
def vae(state_dict) -> WanVAE21:
    with torch.device("meta"):
        model = WanVAE21(dim=WanVAE21.dim_from_state_dict(state_dict))
    model.load_state_dict(state_dict, assign=True, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_ref("c_vae.pt")["vae2_1"]


def test_meta_build_loads_every_parameter(vae, state_dict):
    assert WanVAE21.dim_from_state_dict(state_dict) == 4
    assert set(vae.state_dict()) == set(state_dict)
    assert not any(t.is_meta for t in vae.state_dict().values())


def test_latent_statistics_are_the_published_ones(ref):
    torch.testing.assert_close(torch.tensor(LATENT_MEAN), ref["mean"], rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(LATENT_STD), ref["std"], rtol=0, atol=0)


def test_wrong_shape_names_the_key(state_dict):
    bad = dict(state_dict)
    bad["decoder.head.2.weight"] = torch.zeros(3, 4, 3, 3, 1)
    with torch.device("meta"):
        model = WanVAE21(dim=4)
    with pytest.raises(RuntimeError, match=r"decoder\.head\.2\.weight"):
        model.load_state_dict(bad, assign=True)


def test_encode_matches_official_batched(vae, ref):
    # T2V video and I2V conditioning input (frame 0 then zeros) as one batch.
    z = vae.encode(torch.stack([ref["video"], ref["i2v_input"]]))  # [2, 16, 2, 8, 8]
    assert z.shape == (2, 16, 2, 8, 8)
    assert rel_err(z[0], ref["z"]) < TOL
    assert rel_err(z[1], ref["z_i2v_input"]) < TOL


def test_encode_single_frame_matches_official(vae, ref):
    z = vae.encode(ref["video"][None, :, :1])  # [1, 16, 1, 8, 8]
    assert rel_err(z[0], ref["z_first_frame"]) < TOL


def test_decode_matches_official(vae, ref):
    video = vae.decode(ref["z"][None])  # [1, 3, 5, 64, 64]
    assert video.shape == (1, 3, 5, 64, 64)
    assert rel_err(video[0], ref["decoded"]) < TOL
    assert rel_err(video[0], ref["decoded_raw"].clamp(-1, 1)) < TOL


def test_decode_three_latent_frames_matches_official(vae, ref):
    video = vae.decode(ref["z_rand"][None])  # [1, 3, 9, 64, 64]
    assert video.shape == (1, 3, 9, 64, 64)
    assert video.abs().max() <= 1
    assert rel_err(video[0], ref["decoded_rand_raw"].clamp(-1, 1)) < TOL


def test_encode_rejects_frame_counts_not_1_plus_4k(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))


def test_decode_chunk_length_leaves_the_video_unchanged(vae, ref, monkeypatch):
    # One latent frame per chunk (as the official code) and all frames in one chunk: one causal pass.
    videos = []
    for budget in (0, 1 << 40):
        monkeypatch.setattr(vae, "decode_chunk_bytes", budget)
        videos.append(vae.decode(ref["z_rand"][None]))  # [1, 3, 9, 64, 64]
    assert vae.decode_frames_per_chunk(8, 8) > 2
    assert rel_err(videos[1], videos[0]) < 1e-6
    assert rel_err(videos[1][0], ref["decoded_rand_raw"].clamp(-1, 1)) < TOL


def test_decode_dtype_is_the_default_dtype_argument(vae, ref, monkeypatch):
    z = ref["z"][None]
    fast = vae.decode(z, dtype=torch.bfloat16)  # [1, 3, 5, 64, 64]
    monkeypatch.setattr(vae, "decode_dtype", torch.bfloat16)
    assert fast.dtype == torch.float32
    assert torch.equal(vae.decode(z), fast)
    # Widths of 4..16 channels round coarsely (5e-2 here): a bound against gross breakage only;
    # the closeness is checked at a wider width below and at the real width in the benchmark.
    assert rel_err(fast[0], ref["decoded"]) < 1e-1


def test_bfloat16_decode_within_2e_2_of_float32():
    # bf16 convolutions keep norms and residual sums in float32: at the real width (96) the
    # benchmark sees ~1e-2; width 16 (64 channels at the latent) rounds about the same.
    torch.manual_seed(0)
    model = WanVAE21(dim=16).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    z = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        exact, fast = model.decode(z), model.decode(z, dtype=torch.bfloat16)  # [1, 3, 9, 16, 16]
    assert fast.dtype == torch.float32
    assert rel_err(fast, exact) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_matches_official(vae, ref):
    model = copy.deepcopy(vae).cuda()  # the fixture stays on the CPU for the other tests
    z = ref["z_rand"][None].cuda()
    expected = ref["decoded_rand_raw"].clamp(-1, 1)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        assert rel_err(model.decode(z)[0].cpu(), expected) < TOL
    assert rel_err(model.decode(z, dtype=torch.bfloat16)[0].cpu(), expected) < 1e-1
