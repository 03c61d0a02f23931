"""`wanflow`: the command line of the generate flow.

    wanflow demo                      the tiny preset end to end; prints where the video is
    wanflow generate --prompt ...     any request (every GenerationRequest field is an option)
    wanflow gpus [--json]             the GPUs this host has, as the flow sees them

Runs use the Prefect server in PREFECT_API_URL, or start Prefect's embedded one.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from typing import Any

# Before Prefect is imported (values the user set win): its embedded server takes longer than the
# default 20 s to start on a small machine (2 cores: 12-40 s), and its telemetry job fails offline
# and races the first run for the SQLite database, printing a long traceback.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pydantic import ValidationError  # noqa: E402

from flows.request import GenerationRequest  # noqa: E402
from flows.settings import get_settings  # noqa: E402

DEMO_PROMPT = "a paper boat drifting down a rain-soaked street, soft morning light"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanflow", description="Wan2.2 video generation orchestrated by Prefect")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate a short video with the tiny preset (CPU is fine)")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--verbose", action="store_true", help="show Prefect's run logs")
    generate = commands.add_parser("generate", help="generate one video")
    _add_request_options(generate)
    generate.add_argument("--verbose", action="store_true", help="show Prefect's run logs")
    gpus = commands.add_parser("gpus", help="print the detected GPU profile")
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    if args.command == "gpus":
        return _print_gpus(args.json)
    if args.command == "demo":
        fields = {"task": "tiny", "prompt": args.prompt, "duration_s": 2.0}
    else:
        fields = {k: v for k, v in vars(args).items() if k in GenerationRequest.model_fields and v is not None}
    try:
        request = GenerationRequest(**fields)
    except ValidationError as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return 2
    return _run(request, args.verbose)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    for name, field in GenerationRequest.model_fields.items():
        kind, choices = _option_type(field.annotation)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices,
                            help=field.description)


def _option_type(annotation: Any) -> tuple[Any, list | None]:
    """The argparse type and choices of a request field (Optional unwrapped, lists comma-separated)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return lambda text: [int(v) for v in text.split(",")], None
    return annotation, None


def _run(request: GenerationRequest, verbose: bool) -> int:
    from prefect.states import State
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.generate import generate_video
    from tasks.denoise import listen_to_steps

    if not verbose:
        _quiet_prefect_console()
    print(f"{request.task}: {request.frame_count} frames at {request.size}, {request.steps} steps", file=sys.stderr)
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("denoise", total=request.steps)
        with listen_to_steps(lambda info: progress.update(bar, completed=info.step + 1, total=info.total)):
            try:
                result = generate_video(request)
            except Exception as exc:  # the run failed: its message is the answer
                print(f"generation failed: {exc}", file=sys.stderr)
                return 1
    if isinstance(result, State):
        print(f"run ended {result.type.value.lower()}: {result.message}", file=sys.stderr)
        return 1
    print(f"video: {result.video}")
    print(f"metadata: {result.metadata}")
    return 0


def _quiet_prefect_console() -> None:
    """Keep Prefect's console lines (not its API logs) to warnings, so the progress bar stays readable."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)


def _print_gpus(as_json: bool) -> int:
    from tasks.gpus import read_gpu_profile

    profile = read_gpu_profile(get_settings().gpu_inventory)
    if as_json:
        print(profile.model_dump_json(indent=2))
        return 0
    print(profile.summary())
    for gpu in profile.gpus:
        flags = [f for f, on in (("high-VRAM", gpu.high_vram), ("Blackwell", gpu.blackwell)) if on]
        print(f"  gpu {gpu.index} ({gpu.device}): {gpu.name}, {gpu.total_bytes / 1e9:.1f} GB total, "
              f"{gpu.free_bytes / 1e9:.1f} GB free, SM {gpu.compute_capability[0]}.{gpu.compute_capability[1]}, "
              f"{gpu.nvlink_links} NVLink links{', ' + ', '.join(flags) if flags else ''}")
    for link in profile.links:
        path = "NVLink" if link.nvlink else "PCIe P2P" if link.p2p else "no P2P (through host memory)"
        print(f"  gpu {link.a} <-> gpu {link.b}: {path}")
    if profile.driver_version:
        print(f"  driver {profile.driver_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
