"""Wan 2.1 VAE against the official code's outputs (tiny random checkpoint, fp32 CPU)."""
from __future__ import annotations

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
