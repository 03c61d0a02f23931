"""`wanflow`: the command line of the generate flow.

    wanflow demo                      the tiny preset end to end; prints where the video is
    wanflow generate --prompt ...     any request (every GenerationRequest field is an option; --lora
                                      NAME_OR_PATH[:STRENGTH[:EXPERT]] repeated, --distilled)
    wanflow gpus [--json]             the GPUs this host has, as the flow sees them
    wanflow patches                   what each performance tier applies on this machine, and why not
    wanflow bench --model t2v-A14B    seconds per step, MFU and peak memory per tier (random weights)
    wanflow calibrate --checkpoint D  record the step caches' figures for a checkpoint, saved next to it
    wanflow setup                     prepare the Prefect server: GPU limits, work pool, deployments, automation
    wanflow worker                    run this host's Prefect worker for the deployments
    wanflow batch MANIFEST            generate every entry of a manifest (YAML or JSONL); done ones are skipped

Runs use the Prefect server in PREFECT_API_URL, or start Prefect's embedded one.
"""
from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from typing import Any

from pydantic import ValidationError

from flows.request import GenerationRequest, LoraRequest, problems
from tasks.settings import get_settings
from wan_engine.sizes import Size

DEMO_PROMPT = "a paper boat drifting down a rain-soaked street, soft morning light"
CALIBRATION_PROMPT = "a woman walking along a beach at sunset, waves rolling in, the camera slowly tracking her"
LORA_FORM = "NAME_OR_PATH[:STRENGTH[:EXPERT]]"


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
    _add_engine_commands(commands)
    _add_service_commands(commands)
    args = parser.parse_args(argv)

    if args.command in ENGINE_COMMANDS:
        return ENGINE_COMMANDS[args.command](args)
    if args.command in SERVICE_COMMANDS:
        return SERVICE_COMMANDS[args.command](args)
    if args.command == "gpus":
        return _print_gpus(args.json)
    if args.command == "demo":
        fields = {"task": "tiny", "prompt": args.prompt, "duration_s": 2.0}
    else:
        fields = {k: v for k, v in vars(args).items() if k in GenerationRequest.model_fields and v is not None}
        try:
            fields["loras"] = [parse_lora(spec) for spec in args.lora or []]
        except ValueError as exc:
            print(f"invalid --lora {exc}", file=sys.stderr)
            return 2
    try:
        request = GenerationRequest(**fields)
    except ValidationError as exc:
        for problem in problems(exc):
            print(f"invalid request: {problem}", file=sys.stderr)
        return 2
    return _run(request, args.verbose)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    for name, field in GenerationRequest.model_fields.items():
        if name in ("loras", "distilled"):  # a repeated option of its own form, a flag
            continue
        kind, choices = _option_type(field.annotation)
        # a video of a built-in prompt is never what a user meant: `generate` asks for one
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices,
                            help=field.description, required=name == "prompt")
    parser.add_argument("--lora", action="append", metavar=LORA_FORM,
                        help="a LoRA by name in WAN_LORA_DIR or by path inside WAN_INPUT_ROOTS, STRENGTH 0-2 (default "
                             "1), EXPERT both, high or low (default both; STRENGTH may be left empty: style::high); "
                             "repeat it to stack LoRAs in order")
    parser.add_argument("--distilled", action="store_true", default=None,
                        help=GenerationRequest.model_fields["distilled"].description)


def parse_lora(spec: str) -> dict[str, Any]:
    """`NAME_OR_PATH[:STRENGTH[:EXPERT]]` as the fields of a request's LoRA (a path holding ':' takes both STRENGTH
    and EXPERT); a ValueError naming the option's value and what is wrong with it."""
    experts = typing.get_args(LoraRequest.model_fields["expert"].annotation)
    form = (f"the form is {LORA_FORM}, STRENGTH 0-2 (default 1), EXPERT {', '.join(experts[:-1])} or {experts[-1]} "
            f"(default {experts[0]})")
    file, *rest = spec.rsplit(":", 2)
    strength, expert = (rest + ["", ""])[:2]
    if not file:
        raise ValueError(f"{spec!r}: NAME_OR_PATH is empty; {form}")
    lora: dict[str, Any] = {"file": file}
    if strength:
        try:
            lora["strength"] = float(strength)
        except ValueError:
            raise ValueError(f"{spec!r}: STRENGTH {strength!r} is not a number; {form}") from None
    if expert:
        if expert not in experts:
            raise ValueError(f"{spec!r}: EXPERT {expert!r} is not {', '.join(experts[:-1])} or {experts[-1]}; {form}")
        lora["expert"] = expert
    return lora


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
    from flows.prefect_settings import offline_defaults
    from tasks.denoise import listen_to_steps

    if not verbose:
        _quiet_prefect_console()
    print(f"{request.task}: {request.frame_count} frames at {request.size}, {request.steps} steps", file=sys.stderr)
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("denoise", total=request.steps)
        with listen_to_steps(lambda info: progress.update(bar, completed=info.step + 1, total=info.total)):
            try:
                with offline_defaults():
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


def _add_engine_commands(commands) -> None:
    """`patches`, `bench` and `calibrate`: the performance tiers on this machine, outside any flow run."""
    from patches.bench import add_arguments as add_bench_arguments

    patches = commands.add_parser("patches", help="what each performance tier applies here, and why anything is off")
    patches.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else the CPU)")
    patches.add_argument("--task", choices=("t2v", "i2v", "ti2v"), help="only this task's step caches")
    bench = commands.add_parser("bench", help="DiT speed per tier with random weights of the real size")
    add_bench_arguments(bench)
    calibrate = commands.add_parser("calibrate", help="record TeaCache/MagCache figures for a checkpoint")
    calibrate.add_argument("--checkpoint", required=True, help="official checkpoint folder, or a preset (tiny)")
    calibrate.add_argument("--prompt", default=CALIBRATION_PROMPT)
    calibrate.add_argument("--negative-prompt", default="")
    calibrate.add_argument("--image", help="first frame: needed for I2V checkpoints; for TI2V it calibrates the "
                           "text+image mode (without it, the text-only mode)")
    calibrate.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    calibrate.add_argument("--shift", type=float, help="noise schedule shift (default: the model's)")
    calibrate.add_argument("--solver", choices=("unipc", "dpm++", "euler"), default="unipc")
    calibrate.add_argument("--guide-scale", type=float, help="default: the model's per-expert scales")
    calibrate.add_argument("--size", type=Size.parse,
                           help="W*H (default: 832*480 where offered, else the model's first size)")
    calibrate.add_argument("--frames", type=int, help="video frames, 4k+1 (default: the model's, 121 for ti2v-5B)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else the CPU)")
    calibrate.add_argument("--output", help="calibration file (default: wanflow_calibration.json in the checkpoint)")


def _print_patches(args: argparse.Namespace) -> int:
    import torch

    from patches.tiers import describe_tiers, format_tiers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"performance tiers on {device}{f' for {args.task}' if args.task else ''}:")
    print(format_tiers(describe_tiers(device, args.task)))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from patches.bench import run_from_args

    return run_from_args(args)


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    import wan_engine
    from patches.calibrate import calibrate
    from tasks.pipelines import engine_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = wan_engine.load_pipeline(args.checkpoint, device=device, dtype=engine_dtype(device))
    size = args.size or Size(*((832, 480) if (832, 480) in pipe.spec.sizes else pipe.spec.sizes[0]))
    frames = args.frames or pipe.spec.frame_num
    mode = " with the image" if args.image else ""
    print(f"calibrating {pipe.spec.name} from {pipe.checkpoint_dir} on {device}: {size}, "
          f"{frames} frames{mode} (one full generation)", file=sys.stderr)
    result = calibrate(pipe, args.prompt, args.steps, args.shift, solver=args.solver, size=size,
                       frame_num=frames, seed=args.seed, negative_prompt=args.negative_prompt,
                       image=args.image, guide_scale=args.guide_scale, path=args.output)
    entry = result.entry
    fitted = [s for s, fit in entry["teacache"].items() if fit["coefficients"]]
    print(f"calibrated {entry['model']} ({entry['steps']} steps, shift {entry['shift']:g}, {entry['solver']}, "
          f"{'text+image' if entry['image'] else 'text only'}): "
          f"{len(result.magcache_ratios)} MagCache ratios, TeaCache fit for {', '.join(fitted) or 'no signal'}")
    print(f"saved: {result.path}")
    return 0


ENGINE_COMMANDS = {"patches": _print_patches, "bench": _run_bench, "calibrate": _calibrate}


def _add_service_commands(commands) -> None:
    """`setup`, `worker` and `batch`: wanflow as a Prefect service (deployments/, flows/batch.py)."""
    setup = commands.add_parser("setup", help="prepare the Prefect server: GPU limits, work pool, deployments, "
                                "crashed-run automation")
    setup.add_argument("--port", type=int, default=4200,
                       help="port of the local server started when no PREFECT_API_URL is configured")
    worker = commands.add_parser("worker", help="run this host's Prefect worker; SIGTERM or Ctrl-C cancels the runs "
                                 "in flight here and frees their GPUs")
    worker.add_argument("--pool", help="work pool (default: the one prefect.yaml names)")
    worker.add_argument("--name", help="worker name (default: wanflow-<WAN_NODE_NAME or host name>)")
    worker.add_argument("--limit", type=int, help="runs at once on this host (default: no limit, the GPU slots "
                        "queue them)")
    batch = commands.add_parser("batch", help="generate every entry of a manifest (YAML or JSONL)")
    batch.add_argument("manifest", help="YAML or JSONL file, one request per entry")
    batch.add_argument("--defaults", help='request fields for entries that set none, as JSON: \'{"task": "tiny"}\'')
    batch.add_argument("--regenerate", action="store_true", help="generate entries done before again")
    batch.add_argument("--verbose", action="store_true", help="show Prefect's run logs")


def _setup(args: argparse.Namespace) -> int:
    from deployments.server import ServerError
    from deployments.setup import SetupError, setup

    try:
        report = setup(port=args.port)
    except (ServerError, SetupError) as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    print("next: `wanflow worker` on every GPU host (docs/deploy.md)", file=sys.stderr)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from deployments.worker import WorkerError, run_worker

    logging.getLogger("deployments").setLevel(logging.INFO)  # Prefect's console handler prints what it says
    try:
        return run_worker(args.pool, args.name, args.limit)  # on SIGTERM or Ctrl-C: runs here cancelled, 0
    except WorkerError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 1


def _batch(args: argparse.Namespace) -> int:
    import json

    from flows.batch import ManifestError, batch_generate, load_manifest
    from flows.prefect_settings import offline_defaults

    try:
        defaults = json.loads(args.defaults) if args.defaults else None
    except json.JSONDecodeError as exc:
        print(f"invalid --defaults: not JSON ({exc})", file=sys.stderr)
        return 2
    if defaults is not None and not isinstance(defaults, dict):
        print(f"invalid --defaults: an object of request fields, like '{{\"task\": \"tiny\"}}', not "
              f"{type(defaults).__name__}", file=sys.stderr)
        return 2
    try:
        entries = load_manifest(args.manifest, defaults)
    except ManifestError as exc:
        print(f"invalid manifest: {exc}", file=sys.stderr)
        return 2
    print(f"{args.manifest}: {len(entries)} entries", file=sys.stderr)
    if not args.verbose:
        _quiet_prefect_console()
    with offline_defaults():
        state = batch_generate(args.manifest, defaults, skip_existing=not args.regenerate, return_state=True)
    rows = state.result(raise_on_failure=False)
    for row in rows if isinstance(rows, list) else []:
        print(f"line {row['line']:>4}  {row['status']:<9} {row['duration_s']:>7.1f} s  {row['output']}")
    if not state.is_completed():
        print(f"batch ended {state.type.value.lower()}: {state.message}", file=sys.stderr)
        return 1
    return 0


SERVICE_COMMANDS = {"setup": _setup, "worker": _worker, "batch": _batch}


if __name__ == "__main__":
    sys.exit(main())
