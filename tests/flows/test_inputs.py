"""Paths a request names: confined to the configured roots, and images and checkpoints checked before a GPU slot."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pydantic import ValidationError

from flows.batch import ManifestError, load_manifest
from flows.generate import generate_video
from flows.request import GenerationRequest, problems
from tasks.gpus import GpuProfile
from tasks.settings import get_settings

NO_GPU = GpuProfile(source="none", reason="test")
ORACLE = Path(__file__).parents[1] / "fixtures" / "oracle"


def _error(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.for_hardware(NO_GPU, **fields)
    return "\n".join(problems(caught.value))


def _roots(monkeypatch, **settings: str) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the working directory (wan_env makes tmp_path the working directory)."""
    folder = tmp_path.parent / f"{tmp_path.name}-outside"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder)


def test_an_image_outside_the_input_roots_is_refused_alike_whether_it_exists_or_not(wan_env, outside):
    Image.new("RGB", (64, 64)).save(outside / "real.png")
    real = _error(task="tiny-i2v", image=str(outside / "real.png"))
    missing = _error(task="tiny-i2v", image=str(outside / "missing.png"))
    for message in (real, missing):
        assert "image: " in message and "outside the folders WAN_INPUT_ROOTS allows" in message
        assert "not a file" not in message and "does not exist" not in message
    assert real.replace("real.png", "X") == missing.replace("missing.png", "X")
    assert "WAN_INPUT_ROOTS" in _error(task="tiny-i2v", image="/etc/shadow")


def test_dot_dot_and_symlinks_are_resolved_before_the_check(wan_env, tmp_path, outside):
    Image.new("RGB", (64, 64)).save(outside / "frame.png")
    climbing = f"../{outside.name}/frame.png"  # relative to the working directory, tmp_path
    assert "outside the folders WAN_INPUT_ROOTS allows" in _error(task="tiny-i2v", image=climbing)
    (tmp_path / "link.png").symlink_to(outside / "frame.png")
    assert "outside the folders WAN_INPUT_ROOTS allows" in _error(task="tiny-i2v", image="link.png")


def test_input_roots_admit_their_folders_and_the_request_keeps_the_resolved_path(wan_env, monkeypatch, outside):
    Image.new("RGB", (64, 64)).save(outside / "frame.png")
    _roots(monkeypatch, WAN_INPUT_ROOTS=f"/nonexistent-root:{outside}")
    request = GenerationRequest.for_hardware(NO_GPU, task="tiny-i2v", image=str(outside / "." / "frame.png"))
    assert request.image == str((outside / "frame.png").resolve())
    assert GenerationRequest.for_hardware(NO_GPU, **request.model_dump()) == request  # Prefect validates again


def test_an_image_is_opened_and_checked_before_any_gpu_work(wan_env, tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all\n")
    assert "image: 'notes.png' is not a PNG, JPEG, WEBP or BMP image" in _error(task="tiny-i2v", image="notes.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "anim.gif")
    assert "is not a PNG, JPEG, WEBP or BMP image (the formats allowed)" in _error(task="tiny-i2v", image="anim.gif")
    Image.new("L", (9000, 2)).save(tmp_path / "wide.png")
    assert "'wide.png' is 9000x2 pixels; its longest side may be at most 8192" in _error(
        task="tiny-i2v", image="wide.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    assert "'cut.png' cannot be read as an image" in _error(task="tiny-i2v", image="cut.png")
    (tmp_path / "folder").mkdir()
    assert "'folder' is not a file" in _error(task="tiny-i2v", image="folder")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        Image.new("RGB", (80, 48)).save(tmp_path / f"ok.{fmt.lower()}", format=fmt)
        assert GenerationRequest.for_hardware(NO_GPU, task="tiny-i2v", image=f"ok.{fmt.lower()}").image


def test_pil_decompression_bomb_limit_is_an_error(wan_env, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)
    Image.new("RGB", (40, 40)).save(tmp_path / "warned.png")  # over the limit: PIL only warns
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")  # over twice the limit: PIL raises
    for name in ("warned.png", "bomb.png"):
        assert f"image: '{name}' is refused as a decompression bomb" in _error(task="tiny-i2v", image=name)


def test_a_checkpoint_folder_goes_through_the_loader_validation(wan_env, tmp_path):
    (tmp_path / "empty").mkdir()
    message = _error(task="t2v-A14B", checkpoint="empty")
    assert "checkpoint: missing DiT config in" in message and "high_noise_model/config.json" in message
    broken = tmp_path / "Wan2.2-T2V-A14B"
    shutil.copytree(ORACLE / "t2v-A14B-tiny", broken)
    (broken / "Wan2.1_VAE.pth").write_bytes((broken / "Wan2.1_VAE.pth").read_bytes()[:1000])
    assert "checkpoint: unreadable VAE" in _error(task="t2v-A14B", checkpoint=str(broken))
    shutil.copy(ORACLE / "t2v-A14B-tiny" / "Wan2.1_VAE.pth", broken / "Wan2.1_VAE.pth")
    request = GenerationRequest.for_hardware(NO_GPU, task="t2v-A14B", checkpoint=str(broken))
    assert request.checkpoint == str(broken.resolve())
    (broken / "high_noise_model" / "config.json").write_text("{}")  # a change after a good check is seen
    assert "checkpoint: " in _error(task="t2v-A14B", checkpoint=str(broken))
    shutil.copy(ORACLE / "t2v-A14B-tiny" / "high_noise_model" / "config.json", broken / "high_noise_model")
    message = _error(task="i2v-A14B", checkpoint=str(broken), image=__file__)
    assert "image: " in message  # the image is checked first; with a good one the task must fit the folder
    Image.new("RGB", (64, 64)).save(tmp_path / "frame.png")
    message = _error(task="i2v-A14B", checkpoint=str(broken), image="frame.png")
    assert "holds a t2v-A14B model (its config.json), not i2v-A14B" in message


def test_checkpoints_lie_in_the_checkpoint_root_or_the_input_roots(wan_env, monkeypatch):
    fixture = ORACLE / "t2v-A14B-tiny"
    message = _error(task="t2v-A14B", checkpoint=str(fixture))
    assert "checkpoint: " in message and "outside the folders WAN_CHECKPOINT_ROOT or WAN_INPUT_ROOTS allows" in message
    _roots(monkeypatch, WAN_CHECKPOINT_ROOT=str(ORACLE))
    assert GenerationRequest.for_hardware(NO_GPU, task="t2v-A14B", checkpoint=str(fixture)).checkpoint == str(
        fixture.resolve())
    assert "outside the folders" in _error(task="t2v-A14B", checkpoint=str(ORACLE / ".." / "fixtures" / ".." / ".."))


def test_a_manifest_lies_inside_the_input_roots(wan_env, tmp_path, outside):
    (outside / "m.yaml").write_text("- {prompt: one, task: tiny}\n")
    for path in (outside / "m.yaml", outside / "missing.yaml", Path("..") / outside.name / "m.yaml"):
        with pytest.raises(ManifestError, match="manifest: .* is outside the folders WAN_INPUT_ROOTS allows"):
            load_manifest(path, profile=NO_GPU)
    (tmp_path / "m.yaml").write_text("- {prompt: one, task: tiny}\n")
    assert [e.request.prompt for e in load_manifest("m.yaml", profile=NO_GPU)] == ["one"]


def test_a_deployment_style_run_is_refused_before_any_task(prefect_server, wan_env, tmp_path):
    """A deployment run hands the flow its request as JSON: Prefect validates it before the body, so a bad
    image fails the run before detect-gpus or allocate-gpus."""
    (tmp_path / "notes.png").write_text("a text file named .png\n")
    for image in ("/etc/hostname", "notes.png"):
        state = generate_video({"task": "tiny-i2v", "prompt": "a lantern", "image": image}, return_state=True)
        assert state.is_failed() and "image: " in state.message
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        assert runs == []
