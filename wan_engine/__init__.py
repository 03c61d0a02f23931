"""wan_engine: our PyTorch inference engine for Wan2.2 (no Prefect in here).

    pipe = wan_engine.load_pipeline("tiny", device="cpu", dtype=torch.float32)
    result = pipe.generate("a cat on a snowy mountain", size=(64, 64), frame_num=5, seed=0)
    result.frames  # uint8 [F, H, W, 3]

    plan = pipe.plan(size=(64, 64), frame_num=5, seed=0)   # the same run, one stage at a time
    text = pipe.encode_prompt(plan, "a cat on a snowy mountain")
    latents = pipe.sample(plan, text.context, pipe.encode_conditioning(plan)).latents

One job over several processes (one per device): each calls `run_rank` in a group formed by `init_job_group`
(see wan_engine.parallel).
"""
from .configs import MODEL_SPECS, TINY_PRESETS, ModelSpec
from .hooks import BlockCall, RunHook
from .loading import CheckpointError, check_checkpoint, load_pipeline, resident_bytes
from .parallel import ParallelPlan, RankFailed, choose_parallel_plan, init_job_group, run_rank
from .pipeline import Denoiser, GenerationCancelled, GenerationResult, StepInfo, WanPipeline
from .plan import RunPlan, StepPlan, latent_grid, plan_steps

__all__ = [
    "MODEL_SPECS", "TINY_PRESETS", "ModelSpec", "CheckpointError", "check_checkpoint", "load_pipeline",
    "resident_bytes", "BlockCall",
    "RunHook", "Denoiser", "GenerationCancelled", "GenerationResult", "StepInfo", "WanPipeline", "RunPlan",
    "StepPlan", "latent_grid", "plan_steps", "ParallelPlan", "RankFailed", "choose_parallel_plan", "init_job_group",
    "run_rank",
]
