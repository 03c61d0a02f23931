"""Step caching shared by TeaCache and MagCache: skip schedules and the run hook that follows them.

Both methods decide, per denoising step and per cond/uncond branch, whether the DiT's block stack runs
or is replaced by the residual (block-stack output minus input) cached at that branch's last computed
step of the same expert; the head runs on every call. On Wan both decisions depend only on the sampling
settings and on figures known before sampling (TeaCache: the timestep embedding; MagCache: calibrated
magnitude ratios), so the whole schedule is computed from the run's plan when the run begins (the
engine's `begin_run(plan)`: its steps, experts, CFG mode and whether its conditioning has an image, which
picks TI2V-5B's text-only or text+image figures). The hook then only looks it up: no
data-dependent branching inside compiled code and no host sync in the step loop.

Separate state per branch and per A14B expert: a new expert's phase always starts with a computed
step (its blocks have produced no residual yet), and the residuals of an expert are dropped when its
phase ends. When one batch holds both rows (batched classifier-free guidance) the block stack can only
run for the whole batch, so the schedule for that case is decided jointly: a step is skipped only when
both rows would skip, and a row computed for the other's sake restarts its accumulators like any
computed step (it got a fresh residual).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from wan_engine import MODEL_SPECS, BlockCall, ModelSpec, RunHook, RunPlan, StepPlan, plan_steps

log = logging.getLogger(__name__)

BRANCHES = ("cond", "uncond")
CALIBRATION_FILE = "wanflow_calibration.json"  # written next to the checkpoint by patches/calibrate.py
CALIBRATION_FORMAT = "wanflow-calibration/1"


@cache
def load_figures(name: str) -> dict:
    """A published-figures file of patches/data (e.g. "magcache_ratios")."""
    return json.loads(files("patches").joinpath("data", f"{name}.json").read_text())


def published_model(spec: ModelSpec) -> str:
    """The released model whose published figures apply to `spec` ("t2v-A14B", "i2v-A14B", "ti2v-5B");
    the tiny presets borrow the figures of the release they mimic."""
    if spec.task == "ti2v":
        return "ti2v-5B"
    if spec.is_moe and spec.task in ("t2v", "i2v"):
        return f"{spec.task}-A14B"
    raise ValueError(f"no published step-cache figures for {spec.name!r} (task {spec.task!r})")


def calibration_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CALIBRATION_FILE


def load_calibrations(path: str | Path) -> list[dict]:
    """The entries of a calibration file, oldest first ([] when there is no file)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path} is not a wanflow calibration file (format {data.get('format')!r}, "
                         f"expected {CALIBRATION_FORMAT!r})")
    return data["entries"]


def calibrated_with_image(entry: dict) -> bool:
    """Whether a calibration entry's run had an image (TI2V's text+image mode, I2V); entries written before
    this was recorded come from the one mode their task has."""
    return entry.get("image", MODEL_SPECS[entry["model"]].task == "i2v")


def calibration_key(entry: dict) -> tuple:
    """The settings one entry stands for: a new calibration with the same key replaces it."""
    return entry["solver"], entry["steps"], entry["shift"], calibrated_with_image(entry)


def find_calibration(checkpoint_dir: str | Path | None, plan: StepPlan,
                     image: bool | None = None) -> tuple[Path, dict] | None:
    """(file, entry) calibrated with the plan's exact settings, else the newest entry, among the entries of
    runs with (`image` True) or without an image (None: either); None without a file (or without a
    checkpoint: random weights) or without an entry of that mode."""
    if checkpoint_dir is None:
        return None
    path = calibration_path(checkpoint_dir)
    entries = [e for e in load_calibrations(path) if image is None or calibrated_with_image(e) == image]
    if not entries:
        return None
    exact = [e for e in entries if (e["solver"], e["steps"], e["shift"]) == (plan.solver, plan.steps, plan.shift)]
    return path, (exact or entries)[-1]


class RowRule(Protocol):
    """One branch's skip rule: accumulators that grow over skipped steps and restart at computed ones."""

    def reset(self) -> None: ...

    def advance(self, step: int) -> bool:
        """Account for `step` as a candidate skip; True if the cached residual may stand in for it."""
        ...


def decide(plan: StepPlan, rules: Mapping[str, RowRule], retained: Mapping[str, Sequence[bool]],
           batched: bool) -> dict[str, tuple[bool, ...]]:
    """Per branch and step, True where the block stack runs. Retained steps and phase starts always run;
    with `batched` a step is skipped only when every row would skip it."""
    starts = plan.phase_starts
    compute: dict[str, list[bool]] = {b: [] for b in rules}
    for i in range(plan.steps):
        skip = {b: i not in starts and not retained[b][i] and rule.advance(i) for b, rule in rules.items()}
        if batched and not all(skip.values()):
            skip = dict.fromkeys(skip, False)
        for b, rule in rules.items():
            if not skip[b]:
                rule.reset()
            compute[b].append(not skip[b])
    return {b: tuple(flags) for b, flags in compute.items()}


@dataclass(frozen=True)
class SkipSchedule:
    """Which model calls of one generation run the block stack, fixed before sampling."""

    method: str                            # "teacache" | "magcache"
    plan: StepPlan
    compute: Mapping[str, tuple[bool, ...]]  # branch -> per step: True = run the blocks, False = reuse
    batched: bool                          # decided jointly for the cond and uncond rows of one batch
    settings: Mapping[str, object]         # the method's parameters and the figures used

    def __post_init__(self):
        for branch, flags in self.compute.items():
            if len(flags) != self.plan.steps or not all(flags[i] for i in self.plan.phase_starts):
                raise ValueError(f"invalid {self.method} schedule for {branch}: needs {self.plan.steps} steps, "
                                 f"computed at each phase start {sorted(self.plan.phase_starts)}")

    def rows(self) -> dict[tuple[str, str], dict[int, bool]]:
        """(expert, branch) -> {step: computed} over the steps of that expert."""
        return {(e, b): {i: self.compute[b][i] for i in range(self.plan.steps) if self.plan.experts[i] == e}
                for e in dict.fromkeys(self.plan.experts) for b in self.compute}

    def computed_steps(self) -> dict[str, list[int]]:
        return {b: [i for i, c in enumerate(flags) if c] for b, flags in self.compute.items()}

    def skipped_steps(self) -> dict[str, list[int]]:
        return {b: [i for i, c in enumerate(flags) if not c] for b, flags in self.compute.items()}

    def keeps(self, branch: str, step: int) -> bool:
        """Whether the branch's cached residual is still needed after `step` (its next step skips)."""
        nxt = step + 1
        return (nxt < self.plan.steps and self.plan.experts[nxt] == self.plan.experts[step]
                and not self.compute[branch][nxt])

    def counts(self) -> dict[str, int]:
        """Model calls (one per branch and step) computed and skipped."""
        computed = sum(sum(flags) for flags in self.compute.values())
        total = len(self.compute) * self.plan.steps
        return {"computed": computed, "skipped": total - computed, "total": total}

    def summary(self) -> dict:
        """The schedule for a run's metadata (JSON-ready)."""
        per_expert = {e: {b: sum(flags.values()) for (e2, b), flags in self.rows().items() if e2 == e}
                      for e in dict.fromkeys(self.plan.experts)}
        return {"method": self.method, "settings": dict(self.settings), "model": self.plan.model,
                "steps": self.plan.steps, "shift": self.plan.shift, "solver": self.plan.solver,
                "batched": self.batched, "computed_steps": self.computed_steps(),
                "skipped_steps": self.skipped_steps(), "computed_per_expert": per_expert, **self.counts()}


@dataclass(frozen=True)
class CallRecord:
    """One model call as the step cache handled it."""

    step: int
    expert: str
    branches: tuple[str, ...]
    computed: bool


# (the run's steps, its branches, whether they share one batch, whether it has an image) -> the skip schedule
BuildSchedule = Callable[[StepPlan, tuple[str, ...], bool, bool], SkipSchedule]


class StepCacheHandle(RunHook):
    """A step cache registered as a run hook on the pipeline. `begin_run(plan)` takes the schedule of the
    plan's steps, CFG mode and conditioning (built once per distinct plan and kept), and starts with no cached
    residual; `end_run()` drops the residuals. `prepare(steps, shift, solver, image)` shows the schedule a run
    with those settings will get, before any run (the tier's summary)."""

    def __init__(self, pipe, build: BuildSchedule, method: str):
        if any(isinstance(h, StepCacheHandle) for h in pipe.hooks):
            raise ValueError("a step cache is already applied to this pipeline; remove it before applying another")
        self._pipe = pipe
        self._build = build
        self.method = method
        self._schedules: dict[tuple[StepPlan, tuple[str, ...], bool, bool], SkipSchedule] = {}
        self._preview: SkipSchedule | None = None
        self._active: SkipSchedule | None = None
        self._last: SkipSchedule | None = None
        self._residuals: dict[tuple[str, str], Tensor] = {}   # (expert, branch) -> [1, L, C]
        self.calls: list[CallRecord] = []   # the model calls of the current (or last) run
        pipe.hooks.register(self)

    def _schedule(self, steps: StepPlan, branches: tuple[str, ...], batched: bool, image: bool) -> SkipSchedule:
        key = (steps, branches, batched, image)
        if key not in self._schedules:
            self._schedules[key] = self._build(steps, branches, batched, image)
        return self._schedules[key]

    # ------------------------------------------------------------------ before sampling
    def prepare(self, steps: int | None = None, shift: float | None = None, solver: str = "unipc",
                image: bool | None = None) -> SkipSchedule:
        """The schedule of a run with these settings and separate cond/uncond calls (None: the model's
        defaults; `image` None: an image only for I2V), shown by `schedule` until a run begins."""
        image = self._pipe.spec.task == "i2v" if image is None else image
        self._preview = self._schedule(plan_steps(self._pipe.spec, steps, shift, solver), BRANCHES, False, image)
        log.info("step cache for %d steps (shift %g, %s): %s", self._preview.plan.steps, self._preview.plan.shift,
                 solver, self.detail)
        return self._preview

    @property
    def schedule(self) -> SkipSchedule:
        """The schedule of the current or last run; before any run, the one `prepare` showed."""
        return self._active or self._last or self._preview

    @property
    def computed_steps(self) -> dict[str, list[int]]:
        return self.schedule.computed_steps()

    @property
    def counts(self) -> dict[str, int]:
        return self.schedule.counts()

    def metadata(self) -> dict:
        return self.schedule.summary()

    @property
    def name(self) -> str:
        return self.method

    @property
    def detail(self) -> str:
        """One line for logs and the tier summary: settings and model calls computed."""
        counts = self.schedule.counts()
        settings = ", ".join(f"{k} {v}" for k, v in self.schedule.settings.items())
        return f"{self.name} ({settings}): {counts['computed']}/{counts['total']} model calls computed"

    # ------------------------------------------------------------------ the run
    def begin_run(self, plan: RunPlan) -> None:
        self._active = self._schedule(plan.steps, plan.branches, plan.cfg == "batched",
                                      plan.conditioning.image is not None)
        self._residuals.clear()
        self.calls = []

    def end_run(self) -> None:
        self._last, self._active = self._active, None
        self._residuals.clear()

    def block_stack(self, call: BlockCall, tokens: Tensor, run_blocks: Callable[[Tensor], Tensor]) -> Tensor:
        """tokens [B, L, C] (B rows = call.branches) -> block-stack output [B, L, C]."""
        schedule = self._active
        if schedule is None:
            raise RuntimeError(f"{self.method}: a DiT call outside a run; run the pipeline's loop (sample/generate)")
        rows = [(call.expert, b) for b in call.branches]
        keeps = [schedule.keeps(b, call.step) for b in call.branches]
        # Rows of one batch that disagree are all computed: the blocks only run for the whole batch.
        computed = any(schedule.compute[b][call.step] for b in call.branches)
        residual = None
        if computed:
            out = run_blocks(tokens)  # [B, L, C]
            if any(keeps):
                residual = out - tokens  # [B, L, C]
        else:
            cached = [self._residuals[r] for r in rows]
            # Concatenating the rows of a batched skip copies one residual; small next to any block.
            out = tokens + (cached[0] if len(cached) == 1 else torch.cat(cached))  # [B, L, C]
        for i, (row, keep) in enumerate(zip(rows, keeps, strict=True)):
            if not keep:  # not reused by this row's next step: free it now, not at the end of the run
                self._residuals.pop(row, None)
            elif residual is not None:
                self._residuals[row] = residual[i:i + 1]
        self.calls.append(CallRecord(call.step, call.expert, call.branches, computed))
        return out

    # ------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Unregister from the pipeline (idempotent)."""
        self._pipe.hooks.remove(self)
        self._residuals.clear()


def install_step_cache(pipe, build: BuildSchedule, method: str, steps: int | None, shift: float | None,
                       solver: str) -> StepCacheHandle:
    """Register a step cache whose skip schedules `build` makes, showing the schedule of a run with these
    settings; when that fails (bad settings, unreadable figures) nothing stays registered."""
    handle = StepCacheHandle(pipe, build, method)
    try:
        handle.prepare(steps, shift, solver)
    except Exception:
        handle.remove()
        raise
    return handle
