"""wan_engine: our PyTorch inference engine for Wan2.2 (no Prefect in here).

    pipe = wan_engine.load_pipeline("tiny", device="cpu", dtype=torch.float32)
    result = pipe.generate("a cat on a snowy mountain", size=(64, 64), frame_num=5, seed=0)
    result.frames  # uint8 [F, H, W, 3]
"""
from .configs import MODEL_SPECS, TINY_PRESETS, ModelSpec
from .loading import CheckpointError, check_checkpoint, load_pipeline
from .pipeline import BlockCall, GenerationCancelled, GenerationResult, StepInfo, WanPipeline

__all__ = [
    "MODEL_SPECS", "TINY_PRESETS", "ModelSpec", "CheckpointError", "check_checkpoint", "load_pipeline", "BlockCall",
    "GenerationCancelled", "GenerationResult", "StepInfo", "WanPipeline",
]
