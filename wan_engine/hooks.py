"""Hooks with a run lifecycle: how a patch takes part in the pipeline's runs.

A hook registered on a pipeline (`pipe.hooks.register(hook)`) is told when a run starts, with its
`RunPlan` (`begin_run`), wraps the block stack of every DiT call of the run (`block_stack`), and is
told when the run ends, normally or not (`end_run`). Hooks registered later wrap those registered
earlier. The idea is diffusers' ModelHook / HookRegistry, bound to our one seam instead of to
attribute names.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from .plan import RunPlan

RunBlocks = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BlockCall:
    """Which DiT call a block-stack hook is wrapping."""

    step: int
    timestep: int
    expert: str
    branches: tuple[str, ...]  # the rows of the batch, in order: ("cond",), ("uncond",) or ("cond", "uncond")


class RunHook:
    """A patch's part in a run. Subclasses override what they need; the defaults do nothing."""

    def begin_run(self, plan: RunPlan) -> None:
        """Before the run's first DiT call."""

    def block_stack(self, call: BlockCall, tokens: Tensor, run_blocks: RunBlocks) -> Tensor:
        """tokens [B, L, C] (B rows = call.branches) -> the block stack's output [B, L, C]."""
        return run_blocks(tokens)

    def end_run(self) -> None:
        """After the run's last DiT call, or when it stopped early (cancelled, failed)."""


class HookRegistry:
    """The hooks of one pipeline, in registration order."""

    def __init__(self):
        self._hooks: list[RunHook] = []

    def __iter__(self) -> Iterator[RunHook]:
        return iter(tuple(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def register(self, hook: RunHook) -> None:
        if any(h is hook for h in self._hooks):
            raise ValueError(f"{hook!r} is already registered")
        self._hooks.append(hook)

    def remove(self, hook: RunHook) -> None:
        """Unregister `hook` (a no-op when it is not registered: removing twice is harmless)."""
        self._hooks = [h for h in self._hooks if h is not hook]

    def begin_run(self, plan: RunPlan) -> None:
        for hook in self._hooks:
            hook.begin_run(plan)

    def end_run(self) -> None:
        for hook in reversed(self._hooks):
            hook.end_run()

    def bind(self, call: BlockCall) -> Callable[[Tensor, RunBlocks], Tensor] | None:
        """The DiT's `block_stack_hook` for one call: every hook around the block stack, None without hooks."""
        if not self._hooks:
            return None
        hooks = tuple(self._hooks)

        def block_stack(tokens: Tensor, run_blocks: RunBlocks) -> Tensor:
            inner = run_blocks
            for hook in hooks:
                inner = _wrap(hook, call, inner)
            return inner(tokens)

        return block_stack


def _wrap(hook: RunHook, call: BlockCall, inner: RunBlocks) -> RunBlocks:
    return lambda tokens: hook.block_stack(call, tokens, inner)
