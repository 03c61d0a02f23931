"""Calibration of the step caches for any checkpoint: one full generation, recording what they need.

- MagCache: per model call, the magnitude ratio of the block-stack residual (output minus input) to
  the previous residual of the same branch: the mean over tokens of |r_t| / |r_prev| (per-token L2
  norms over channels), and its standard deviation, as the MagCache calibration defines them. The
  previous residual is the branch's last one whatever the expert, so the A14B curve shows the dip at
  the expert switch like the published ones. Stored in the published layout: interleaved cond/uncond
  from step 1 (2 * (steps - 1) values).
- TeaCache: the fit data of its rescaling polynomial. x = the relative L1 change of the timestep signal
  (e and e0, see patches/teacache.py), y = the relative L1 change of the block-stack output of the same
  branch and expert (what a skipped step replaces; the head runs on every call), and a degree-4 fit
  (highest power first) when there are more than 4 distinct x.

The result is merged into `<checkpoint>/wanflow_calibration.json` (one entry per solver, steps, shift
and whether the run had an image, which tells TI2V-5B's text-only and text+image modes apart; written
atomically). MagCache prefers the entry of the run's exact settings, else the newest
one resampled to the run's steps, over the published ratios.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wan_engine import BlockCall, RunHook, plan_steps

from .step_cache import (
    BRANCHES,
    CALIBRATION_FORMAT,
    StepCacheHandle,
    calibration_key,
    calibration_path,
    load_calibrations,
)
from .teacache import teacache_rel_l1

log = logging.getLogger(__name__)

FIT_DEGREE = 4


class _Recorder(RunHook):
    """A run hook that runs every block stack and records residual ratios and output changes."""

    def __init__(self):
        self.last_residual: dict[str, Tensor] = {}          # branch -> [1, L, C]
        self.last_output: dict[str, tuple[str, Tensor]] = {}  # branch -> (expert, [1, L, C])
        self.ratio: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}  # (step, branch) -> (mean, std), 0-dim
        self.output_change: dict[tuple[int, str], Tensor] = {}  # (step, branch) -> 0-dim

    def block_stack(self, call: BlockCall, tokens: Tensor, run_blocks: Callable[[Tensor], Tensor]) -> Tensor:
        out = run_blocks(tokens)  # [B, L, C]
        residual = out - tokens  # [B, L, C]
        for i, branch in enumerate(call.branches):
            res, o = residual[i:i + 1].float(), out[i:i + 1].float()  # [1, L, C]
            prev = self.last_residual.get(branch)
            if prev is not None:
                per_token = res.norm(dim=-1) / prev.norm(dim=-1)  # [1, L]
                self.ratio[call.step, branch] = (per_token.mean(), per_token.std())
            self.last_residual[branch] = res
            expert, prev_out = self.last_output.get(branch, (None, None))
            if expert == call.expert:  # TeaCache compares calls of one expert only
                self.output_change[call.step, branch] = (o - prev_out).abs().mean() / prev_out.abs().mean()
            self.last_output[branch] = (call.expert, o)
        return out


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` recorded, and the file it was merged into."""

    path: Path
    entry: dict

    @property
    def magcache_ratios(self) -> list[float]:
        return self.entry["magcache"]["ratios"]


def _fit(x: list[float | None], y: dict[str, list[float | None]]) -> dict:
    pairs = [(x[i], y[b][i]) for b in BRANCHES for i in range(len(x)) if x[i] is not None and y[b][i] is not None]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    coefficients = None
    if len(set(xs)) > FIT_DEGREE:  # fitted on a scaled domain (well conditioned), stored in the plain basis
        coefficients = np.polynomial.Polynomial.fit(xs, ys, FIT_DEGREE).convert().coef[::-1].tolist()
    return {"x": xs, "y": ys, "coefficients": coefficients}


def calibrate(pipe, prompt: str, steps: int | None = None, shift: float | None = None, *, solver: str = "unipc",
              size: tuple[int, int] = (832, 480), frame_num: int = 81, seed: int = 0, negative_prompt: str = "",
              image=None, guide_scale: float | tuple[float, float] | None = None,
              path: str | Path | None = None) -> Calibration:
    """Run one generation (no step cache) recording MagCache ratios and TeaCache fit data, and merge
    them into `path` (default `<checkpoint>/wanflow_calibration.json`). None: the model's defaults."""
    if any(isinstance(h, StepCacheHandle) for h in pipe.hooks):
        raise ValueError("a step cache is applied to this pipeline: remove it before calibrating "
                         "(calibration must run every model call)")
    plan = plan_steps(pipe.spec, steps, shift, solver)
    if plan.steps < 2:
        raise ValueError(f"calibration needs at least 2 steps (ratios compare consecutive steps), got {plan.steps}")
    recorder = _Recorder()
    pipe.hooks.register(recorder)
    try:
        pipe.generate(prompt, negative_prompt=negative_prompt, image=image, size=size, frame_num=frame_num,
                      steps=plan.steps, shift=plan.shift, guide_scale=guide_scale, solver=solver, seed=seed,
                      decode=False)
    finally:
        pipe.hooks.remove(recorder)

    # Read back once sampling is over (nothing was synced during it).
    keys = [(i, b) for i in range(1, plan.steps) for b in BRANCHES]
    stats = torch.stack([torch.stack(recorder.ratio[k]) for k in keys]).tolist()  # [2 * (steps - 1), 2]
    change_keys = list(recorder.output_change)
    values = torch.stack([recorder.output_change[k] for k in change_keys]).tolist() if change_keys else []
    changes = dict(zip(change_keys, values, strict=True))
    y = {b: [changes.get((i, b)) for i in range(plan.steps)] for b in BRANCHES}
    entry = {
        "model": pipe.spec.name, "solver": plan.solver, "steps": plan.steps, "shift": plan.shift,
        "size": list(size), "frame_num": frame_num, "image": image is not None, "seed": seed, "prompt": prompt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "magcache": {"ratios": [round(m, 5) for m, _ in stats], "ratio_std": [round(s, 5) for _, s in stats]},
        "teacache": {signal: _fit(teacache_rel_l1(pipe.experts, plan, signal), y) for signal in ("e", "e0")},
    }
    path = Path(path) if path is not None else calibration_path(pipe.checkpoint_dir)
    _merge(path, entry)
    log.info("calibrated %s (%d steps, shift %g, %s) into %s", pipe.spec.name, plan.steps, plan.shift, solver, path)
    return Calibration(path, entry)


def _merge(path: Path, entry: dict) -> None:
    """Replace the entry with the same settings (or add it) and write the file atomically."""
    same = calibration_key(entry)
    entries = [e for e in load_calibrations(path) if calibration_key(e) != same]
    text = json.dumps({"format": CALIBRATION_FORMAT, "entries": [*entries, entry]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
