"""TI2V-5B against the official code (tiny ti2v-5B-tiny checkpoint, fp32 CPU): the DiT with per-token and
shared timesteps, the Wan 2.2 VAE, and whole 10-step loops in text-only and text+image modes through
`load_pipeline(folder).generate(...)`."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import wan_engine
from tests.conftest import ORACLE_DIR, load_ref, rel_err
from wan_engine.configs import MODEL_SPECS
from wan_engine.loading import CheckpointError
from wan_engine.pipeline import MemoryPlan, plan_memory
from wan_engine.ti2v import best_output_size, fit_image
from wan_engine.vae22 import LATENT_MEAN, LATENT_STD, WanVAE22

TOL = 1e-4
TI2V_DIR = ORACLE_DIR / "ti2v-5B-tiny"
DIT_CASES = load_ref("a_ti2v_dit_forward.pt")["cases"]


@pytest.fixture(scope="module")
def pipe():
    return wan_engine.load_pipeline(TI2V_DIR, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def vae_ref() -> dict:
    return load_ref("c_vae22.pt")


# ------------------------------------------------------------------ DiT
@pytest.mark.parametrize("case", DIT_CASES, ids=[c["name"] for c in DIT_CASES])
@torch.no_grad()
def test_dit_matches_official_forward(pipe, case):
    dit = pipe.experts["model"]
    inp = case["inputs"]
    rows = []
    handle = dit.time_projection.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    try:
        out = dit(inp["x"][0][None], inp["t"], inp["context"][0][None])
    finally:
        handle.remove()
    assert rel_err(out[0], case["output"][0]) < TOL
    # modulation rows: one for a shared t, one per latent frame when the image frame is at t = 0; never per token
    assert rows == [1 if "scalar" in case["name"] else inp["x"][0].shape[1]]


@torch.no_grad()
def test_per_frame_timesteps_equal_per_token_ones(pipe):
    case = next(c for c in DIT_CASES if c["name"] == "ti2v_pertoken_t700")
    x, ctx = case["inputs"]["x"][0][None], case["inputs"]["context"][0][None]
    out = pipe.experts["model"](x, torch.tensor([[0, 700, 700]]), ctx)
    assert rel_err(out[0], case["output"][0]) < TOL


# ------------------------------------------------------------------ VAE 2.2
def test_vae22_statistics_are_the_published_ones(vae_ref):
    torch.testing.assert_close(torch.tensor(LATENT_MEAN), vae_ref["mean"], rtol=0, atol=0)
    torch.testing.assert_close(1.0 / torch.tensor(LATENT_STD), vae_ref["inv_std"], rtol=0, atol=0)


@torch.no_grad()
def test_vae22_encode_and_decode_match_official(pipe, vae_ref):
    vae = pipe.vae
    assert isinstance(vae, WanVAE22) and (vae.dim, vae.dec_dim) == (4, 4)
    assert rel_err(vae.encode(vae_ref["video"][None])[0], vae_ref["z"]) < TOL
    assert rel_err(vae.encode(vae_ref["video"][None, :, :1])[0], vae_ref["z_first_frame"]) < TOL
    assert rel_err(vae.decode(vae_ref["z"][None])[0], vae_ref["decoded"]) < TOL
    expected = vae_ref["decoded_rand_raw"].clamp(-1, 1)
    assert rel_err(vae.decode(vae_ref["z_rand"][None])[0], expected) < TOL
    saved = vae.decode_chunk_bytes
    vae.decode_chunk_bytes = 1   # one latent frame per chunk, as the official decode: the same video
    try:
        assert rel_err(vae.decode(vae_ref["z_rand"][None])[0], expected) < TOL
        # the bf16 decode path: convolutions in bf16, norms and residual stream fp32 (random tiny weights)
        assert rel_err(vae.decode(vae_ref["z_rand"][None], dtype=torch.bfloat16)[0], expected) < 5e-2
    finally:
        vae.decode_chunk_bytes = saved


# ------------------------------------------------------------------ whole loops through the public API
@pytest.mark.parametrize("name", ["t2v_unipc_shift5", "i2v_unipc_shift5"])
def test_loop_matches_official(pipe, name):
    run = load_ref("e_ti2v_loop.pt")["runs"][name]
    image = None if run["mode"] == "t2v" else Image.fromarray(run["image"].numpy())
    result = pipe.generate(run["prompt"], run["n_prompt"], image=image, size=tuple(run["size_wh"]),
                           frame_num=run["frame_num"], steps=run["sampling_steps"], shift=run["shift"],
                           guide_scale=run["guide_scale"], solver=run["solver"], seed=run["seed"], decode=False)
    assert result.latents.shape == run["final_latents"].shape
    assert rel_err(result.latents, run["final_latents"]) < TOL
    assert rel_err(pipe.decode_video(result.latents), run["video"]) < TOL
    plan = pipe.plan(image=image, size=tuple(run["size_wh"]), frame_num=run["frame_num"], seed=run["seed"])
    assert torch.equal(plan.noise, run["noise"])
    if image is not None:
        assert rel_err(result.latents[:, :1], run["z_image"]) < TOL   # the image latent stays frame 0


def test_image_is_fitted_like_the_official_code():
    run = load_ref("e_ti2v_loop.pt")["runs"]["i2v_unipc_shift5"]
    fitted = fit_image(Image.fromarray(run["image"].numpy()), run["max_area"])
    assert fitted.shape[2:] == run["image_tensor"].shape[2:] == (run["out_wh"][1], run["out_wh"][0])
    assert torch.equal(fitted[0], run["image_tensor"][:, 0])
    assert best_output_size(1920, 1080, 32, 32, 1280 * 704) == (1248, 704)   # 16:9 in the 720p area
    assert best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)
    assert best_output_size(704, 1280, 32, 32, 1280 * 704) == (704, 1280)


# ------------------------------------------------------------------ defaults, checks, memory
def test_defaults_are_the_official_ones(pipe):
    spec = MODEL_SPECS["ti2v-5B"]
    assert (spec.steps, spec.shift, spec.guide_scale, spec.fps, spec.frame_num) == (50, 5.0, (5.0, 5.0), 24, 121)
    assert spec.size_names() == ["1280*704", "704*1280"]
    plan = pipe.plan(size=(1280, 704), frame_num=121, cfg="sequential")
    assert plan.grid.shape == (31, 44, 80) and plan.grid.tokens == 31 * 22 * 40
    assert plan.steps.steps == 50 and plan.steps.timesteps[0] == 999
    with pytest.raises(ValueError, match="4k\\+1"):
        pipe.plan(size=(96, 64), frame_num=8)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.plan(size=(80, 48), frame_num=9)


@pytest.mark.parametrize("missing", ["Wan2.2_VAE.pth", "config.json", "models_t5_umt5-xxl-enc-bf16.pth"])
def test_missing_piece_is_a_clear_error(tmp_path, missing):
    folder = tmp_path / "Wan2.2-TI2V-5B"
    shutil.copytree(TI2V_DIR, folder)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        wan_engine.check_checkpoint(folder)


def test_memory_plan_fits_a_24_gb_card():
    """The release's sizes: the 5B DiT in bf16 (10.0 GB) resident with the 2.2 VAE (2.8 GB) and a 720p 121-frame
    forward; umT5-XXL (11.4 GB) encodes on the CPU, as the official --t5_cpu, since even a visit to the card
    would not fit beside them. A 32 GB card holds everything."""
    gb = 10**9
    sizes = dict(expert_bytes=10 * gb, n_experts=1, t5_bytes=int(11.4 * gb), vae_bytes=int(2.8 * gb),
                 activation_bytes=int(2.9 * gb) + (4 << 30))
    card_24 = plan_memory(free_bytes=int(23.5 * 2**30), **sizes)
    assert card_24 == MemoryPlan(experts_resident=True, text_encoder_resident=False, text_encoder_on_cpu=True)
    assert plan_memory(free_bytes=31 * 2**30, **sizes) == MemoryPlan(True, True)
    assert plan_memory(80 * gb, 10 * gb, 1, 11 * gb, gb, 7 * gb).text_encoder_resident


def test_text_encoder_on_the_cpu_encodes_there_and_hands_the_device_its_context(pipe):
    """The context of a CPU-encoded prompt is the one the resident encoder gives (here both on the CPU)."""
    resident = pipe.encode_text(["a heron"])
    memory = pipe.memory
    pipe.memory = MemoryPlan(True, False, text_encoder_on_cpu=True)
    try:
        on_cpu = pipe.encode_text(["a heron"])
    finally:
        pipe.memory = memory
    assert torch.equal(on_cpu, resident) and pipe.text_encoder.token_embedding.weight.device.type == "cpu"
