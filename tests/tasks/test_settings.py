"""wanflow settings: WAN_ environment variables and .env files."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.settings import Settings


def test_defaults_without_configuration(wan_env, monkeypatch):
    monkeypatch.delenv("WAN_OUTPUTS_DIR")
    settings = Settings()
    assert settings.outputs_dir == Path("outputs")
    assert (settings.default_tier, settings.default_strategy, settings.gpu_tag_base) == ("quality", "auto", "gpu")
    assert settings.default_task is None and settings.gpu_inventory is None
    assert settings.input_roots == [Path(".")] and settings.checkpoint_roots == [Path(".")]  # the working directory


def test_environment_and_dotenv(wan_env, monkeypatch):
    Path(".env").write_text("WAN_NODE_NAME=node-a\nWAN_DEFAULT_STRATEGY=concurrent\n")
    monkeypatch.setenv("WAN_GPU_TAG_PREFIX", "h100")
    monkeypatch.setenv("WAN_GPU_INVENTORY", '[{"total_gb": 80}, {"name": "B200", "compute_capability": [12, 0]}]')
    settings = Settings()
    assert settings.gpu_tag_base == "h100-node-a"  # GPU 3 of this host: tag h100-node-a-3
    assert settings.default_strategy == "concurrent"
    assert [g.name for g in settings.gpu_inventory] == ["Simulated GPU", "B200"]


def test_bad_values_fail_fast(wan_env, monkeypatch):
    monkeypatch.setenv("WAN_DEFAULT_STRATEGY", "fastest")
    with pytest.raises(ValidationError, match="default_strategy"):
        Settings()


def test_input_roots_are_a_path_list_or_json_and_checkpoints_add_their_root(wan_env, monkeypatch):
    monkeypatch.setenv("WAN_INPUT_ROOTS", "/srv/inputs:/data/shared:")
    monkeypatch.setenv("WAN_CHECKPOINT_ROOT", "/models")
    settings = Settings()
    assert settings.input_roots == [Path("/srv/inputs"), Path("/data/shared")]
    assert settings.checkpoint_roots == [Path("/models"), Path("/srv/inputs"), Path("/data/shared")]
    monkeypatch.setenv("WAN_INPUT_ROOTS", '["/srv/in:puts"]')
    assert Settings().input_roots == [Path("/srv/in:puts")]
    monkeypatch.setenv("WAN_INPUT_ROOTS", " ")
    with pytest.raises(ValidationError, match="input_roots"):
        Settings()
