"""Step caching shared by TeaCache and MagCache: sampling plans, skip schedules and the block-stack hook.

Both methods decide, per denoising step and per cond/uncond branch, whether the DiT's block stack runs
or is replaced by the residual (block-stack output minus input) cached at that branch's last computed
step of the same expert; the head runs on every call. On Wan both decisions depend only on the sampling
settings and on figures known before sampling (TeaCache: the timestep embedding; MagCache: calibrated
magnitude ratios), so the whole schedule is computed before the first step. The hook then only looks
it up: no data-dependent branching inside compiled code and no host sync in the step loop.

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

from wan_engine import MODEL_SPECS, BlockCall, ModelSpec
from wan_engine.pipeline import HIGH_NOISE, LOW_NOISE
from wan_engine.samplers import make_schedule

log = logging.getLogger(__name__)

BRANCHES = ("cond", "uncond")
SINGLE_EXPERT = "model"  # the engine's name for the DiT of a single-expert model (TI2V-5B)
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


@dataclass(frozen=True)
class SamplingPlan:
    """The steps of one generation as the engine runs them: the timestep and the expert of each step."""

    model: str
    task: str
    moe: bool
    steps: int
    shift: float
    solver: str
    timesteps: tuple[int, ...]
    experts: tuple[str, ...]

    @property
    def split(self) -> int:
        """Index of the first low-noise step (`steps` when there is none)."""
        return next((i for i, e in enumerate(self.experts) if e == LOW_NOISE), self.steps)

    @property
    def phase_starts(self) -> frozenset[int]:
        """Steps where an expert takes over (step 0 included)."""
        return frozenset(i for i in range(self.steps) if i == 0 or self.experts[i] != self.experts[i - 1])


def plan_sampling(model: ModelSpec | str, steps: int | None = None, shift: float | None = None,
                  solver: str = "unipc") -> SamplingPlan:
    """The plan of a generation with these settings (None: the model's defaults), before sampling."""
    spec = MODEL_SPECS[model] if isinstance(model, str) else model
    steps = steps or spec.steps
    shift = spec.shift if shift is None else shift
    timesteps = tuple(make_schedule(solver, steps, shift).timesteps.tolist())
    if spec.is_moe:
        experts = tuple(HIGH_NOISE if t >= spec.boundary * 1000 else LOW_NOISE for t in timesteps)
    else:
        experts = (SINGLE_EXPERT,) * steps
    return SamplingPlan(spec.name, spec.task, spec.is_moe, steps, float(shift), solver, timesteps, experts)


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


def find_calibration(checkpoint_dir: str | Path, plan: SamplingPlan) -> tuple[Path, dict] | None:
    """(file, entry) calibrated with the plan's exact settings, else the newest entry; None without a file."""
    path = calibration_path(checkpoint_dir)
    entries = load_calibrations(path)
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


def decide(plan: SamplingPlan, rules: Mapping[str, RowRule], retained: Mapping[str, Sequence[bool]],
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
    plan: SamplingPlan
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


class ScheduleMismatch(RuntimeError):
    """The generation being run is not the one the step cache was prepared for."""


@dataclass(frozen=True)
class CallRecord:
    """One model call as the step cache handled it."""

    step: int
    expert: str
    branches: tuple[str, ...]
    computed: bool


BuildSchedules = Callable[[SamplingPlan], dict[bool, SkipSchedule]]  # plan -> {batched: schedule}


class StepCacheHandle:
    """A step cache installed as the pipeline's block-stack hook (chained to the hook found there).

    `prepare(steps, shift, solver)` fixes the schedules before sampling (apply prepares the model's
    defaults); each generation must then run with those settings, or the hook raises ScheduleMismatch
    at its first call that disagrees. State is per generation: a call at step 0 not yet seen in this
    run (or a step going backwards) starts a new run with no cached residual."""

    def __init__(self, pipe, build: BuildSchedules):
        inner = pipe.block_stack_hook
        if isinstance(inner, StepCacheHandle):
            raise ValueError(f"a {inner.schedule.method} step cache is already applied to this pipeline; "
                             f"remove it before applying another")
        self._pipe = pipe
        self._build = build
        self._inner = inner
        self._schedules: dict[bool, SkipSchedule] = {}
        self._active: SkipSchedule | None = None
        self._residuals: dict[tuple[str, str], Tensor] = {}   # (expert, branch) -> [1, L, C]
        self._seen: set[tuple[int, str]] = set()
        self._last_step = -1
        self._removed = False
        self.calls: list[CallRecord] = []   # the model calls of the current (or last) run
        pipe.block_stack_hook = self

    # ------------------------------------------------------------------ before sampling
    def prepare(self, steps: int | None = None, shift: float | None = None, solver: str = "unipc") -> SkipSchedule:
        """Compute the schedules of a generation with these settings (None: the model's defaults)."""
        plan = plan_sampling(self._pipe.spec, steps, shift, solver)
        self._schedules = self._build(plan)
        self._active = None
        log.info("step cache prepared for %d steps (shift %g, %s): %s", plan.steps, plan.shift, solver, self.detail)
        return self._schedules[False]

    @property
    def schedule(self) -> SkipSchedule:
        """The schedule of the current or last run; before any run, the one for separate cond/uncond calls."""
        return self._active or self._schedules[False]

    def schedule_for(self, batched: bool) -> SkipSchedule:
        return self._schedules[batched]

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
        return self.schedule.method

    @property
    def detail(self) -> str:
        """One line for logs and the tier summary: settings and model calls computed."""
        counts = self.schedule.counts()
        settings = ", ".join(f"{k} {v}" for k, v in self.schedule.settings.items())
        return f"{self.name} ({settings}): {counts['computed']}/{counts['total']} model calls computed"

    # ------------------------------------------------------------------ the hook
    def __call__(self, call: BlockCall, tokens: Tensor, run_blocks: Callable[[Tensor], Tensor]) -> Tensor:
        """tokens [B, L, C] (B rows = call.branches) -> block-stack output [B, L, C]."""
        if self._starts_run(call):
            self._begin_run(batched=len(call.branches) > 1)
        schedule = self._active
        self._check(call, schedule.plan)
        self._seen.update((call.step, b) for b in call.branches)
        self._last_step = call.step
        rows = [(call.expert, b) for b in call.branches]
        keeps = [schedule.keeps(b, call.step) for b in call.branches]
        # Rows of one batch that disagree are all computed: the blocks only run for the whole batch.
        computed = any(schedule.compute[b][call.step] for b in call.branches)
        residual = None
        if computed:
            out = run_blocks(tokens) if self._inner is None else self._inner(call, tokens, run_blocks)  # [B, L, C]
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

    def _starts_run(self, call: BlockCall) -> bool:
        return (self._active is None or call.step < self._last_step
                or any((call.step, b) in self._seen for b in call.branches))

    def _begin_run(self, batched: bool) -> None:
        self._active = self._schedules[batched]
        self._residuals.clear()
        self._seen.clear()
        self._last_step = -1
        self.calls = []

    def _check(self, call: BlockCall, plan: SamplingPlan) -> None:
        if (call.step < plan.steps and call.timestep == plan.timesteps[call.step]
                and call.expert == plan.experts[call.step]):
            return
        raise ScheduleMismatch(
            f"the step cache was prepared for {plan.steps} steps (shift {plan.shift:g}, {plan.solver}) but step "
            f"{call.step} of this run has timestep {call.timestep} on the {call.expert} expert; call "
            f"handle.prepare(steps=..., shift=..., solver=...) with the run's settings before generating")

    # ------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Restore the hook that was installed before this one (idempotent)."""
        if self._removed:
            return
        if self._pipe.block_stack_hook is not self:
            raise RuntimeError("another block-stack hook was installed on top of this step cache; remove it first")
        self._pipe.block_stack_hook = self._inner
        self._residuals.clear()
        self._removed = True


def install_step_cache(pipe, build, steps: int | None, shift: float | None, solver: str) -> StepCacheHandle:
    """Install a step cache whose skip schedules `build(plan)` makes, prepared for a generation with these
    settings; when preparing fails (bad settings, unreadable figures) nothing stays installed."""
    handle = StepCacheHandle(pipe, build)
    try:
        handle.prepare(steps, shift, solver)
    except Exception:
        handle.remove()
        raise
    return handle
