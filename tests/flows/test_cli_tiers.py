"""`wanflow patches`, `bench` and `calibrate`: the performance tiers from the command line."""
from __future__ import annotations

import json
import shutil

from PIL import Image

from flows.cli import main
from patches import bench
from patches.step_cache import CALIBRATION_FILE, CALIBRATION_FORMAT
from tests.conftest import ORACLE_DIR


def test_patches_lists_every_tier_and_why_compile_is_off_on_a_cpu(capsys):
    assert main(["patches", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("performance tiers on cpu:")
    assert all(f"\n{tier}:\n" in out for tier in ("quality", "balanced", "speed"))
    compile_lines = [line for line in out.splitlines() if line.strip().startswith("compile")]
    assert len(compile_lines) == 2 and all(" off " in line and "no CUDA GPU" in line for line in compile_lines)
    assert "TeaCache, threshold 0.25" in out


def test_bench_hands_its_options_to_the_bench(monkeypatch):
    """The bench itself is tested in test_bench.py; here: the subcommand parses its options and runs it."""
    seen = []
    monkeypatch.setattr(bench, "run_from_args", lambda args: seen.append(args) or 0)
    assert main(["bench", "--model", "tiny", "--tiers", "quality,speed", "--threshold", "0.3", "--no-warm"]) == 0
    (args,) = seen
    assert (args.model, args.tiers, args.threshold, args.no_warm, args.repeats) == ("tiny", "quality,speed", 0.3,
                                                                                    True, 3)


def test_calibrate_saves_next_to_the_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "Wan2.2-T2V-A14B-tiny"
    shutil.copytree(ORACLE_DIR / "t2v-A14B-tiny", checkpoint)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--steps", "3", "--size", "64*64", "--frames", "5",
                 "--device", "cpu"]) == 0
    saved = checkpoint / CALIBRATION_FILE
    assert f"saved: {saved}" in capsys.readouterr().out.splitlines()
    data = json.loads(saved.read_text())
    assert data["format"] == CALIBRATION_FORMAT
    entry = data["entries"][-1]
    assert (entry["model"], entry["steps"], entry["size"], entry["frame_num"]) == ("t2v-A14B", 3, [64, 64], 5)
    assert len(entry["magcache"]["ratios"]) == 2 * (3 - 1)  # interleaved cond/uncond from step 1


def test_calibrate_keeps_ti2v_text_and_text_image_modes_apart(tmp_path, capsys):
    checkpoint = tmp_path / "Wan2.2-TI2V-5B"
    shutil.copytree(ORACLE_DIR / "ti2v-5B-tiny", checkpoint)
    Image.new("RGB", (80, 60), (200, 40, 10)).save(tmp_path / "first.png")
    run = ["calibrate", "--checkpoint", str(checkpoint), "--steps", "3", "--size", "64*64", "--frames", "5",
           "--device", "cpu"]
    assert main(run) == 0 and main([*run, "--image", str(tmp_path / "first.png")]) == 0
    out = capsys.readouterr().out
    assert "ti2v-5B (3 steps, shift 5, unipc, text only)" in out and "unipc, text+image)" in out
    entries = json.loads((checkpoint / CALIBRATION_FILE).read_text())["entries"]
    assert [(e["model"], e["image"], e["frame_num"]) for e in entries] == [("ti2v-5B", False, 5), ("ti2v-5B", True, 5)]
    assert all(len(e["magcache"]["ratios"]) == 2 * (3 - 1) for e in entries)
