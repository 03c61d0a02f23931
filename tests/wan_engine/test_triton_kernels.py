"""The Triton kernels (wan_engine.triton_kernels) against the plain PyTorch ops, eager and inside torch.compile.

Each test runs on a CUDA GPU (`-m gpu`, the device machine) or on the CPU through Triton's interpreter, when
Triton is installed and the process starts with TRITON_INTERPRET=1 (Triton decides at import time;
tests/conftest.py sets it where Triton is installed and no GPU is, as in CI). Without Triton the file skips.
On the CPU the tests route CPU tensors to the kernels by replacing `dit.use_triton`, and hand torch.compile a
`JITFunction` whose launches run in the interpreter: `wrap_triton` traces only JITFunctions, and the kernel
source is what gets traced either way.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.conftest import rel_err
from wan_engine import dit as dit_module
from wan_engine.dit import DiTBlock, DiTConfig

pytest.importorskip("triton")
dit_module.load_triton_kernels()  # a model loads them on its first CUDA forward; these tests call them directly
K = dit_module.triton_kernels
KERNELS = ("_add_layer_norm_kernel", "_rms_norm_rope_kernel")

DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA GPU")]),
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="CPU runs need TRITON_INTERPRET=1 at start-up")),
]
# Relative error of a bf16 result against the float32 result rounded to bf16: at most ties differ on a GPU,
# but the interpreter (Triton 3.6) casts float32 to bf16 by truncation, an error of up to one bf16 step.
BF16_TOL = {"cuda": 5e-4, "cpu": 1e-2}


def interpreted(kernel):
    """A JITFunction (what torch.compile can trace) of the same kernel source, launched by the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    jit = JITFunction(kernel.fn)
    jit.run = InterpretedFunction(kernel.fn).run
    return jit


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    if request.param == "cpu":
        for name in KERNELS:
            monkeypatch.setattr(K, name, interpreted(getattr(K, name)))
        # Test-only: let 16-bit CPU blocks take the kernel path (production requires CUDA).
        monkeypatch.setattr(dit_module, "use_triton", lambda x, weight: (
            dit_module.triton_kernels is not None and weight.dtype in (torch.bfloat16, torch.float16)))
    return request.param


class GraphRecorder:
    """A torch.compile backend that keeps each Dynamo graph, then hands it to `backend`."""

    def __init__(self, backend: str):
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs.append(gm)
        return lookup_backend(self.backend)(gm, example_inputs)

    def op_calls(self) -> list[str]:
        """Names of the wan_engine ops called in the recorded graphs, in order."""
        return [str(n.target).split(".")[1] for g in self.graphs for n in g.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("wan_engine.")]


@pytest.mark.parametrize("mod_rows", ["sample", "frame", "token"])
@torch.no_grad()
def test_kernels_match_the_plain_ops(device, mod_rows):
    tol = BF16_TOL[device]
    gen = torch.Generator(device=device).manual_seed(0)
    grid = (2, 6, 8) if device == "cuda" else (2, 2, 4)  # fewer tokens for the (slow) interpreter
    B, L, C, N = 2, grid[0] * grid[1] * grid[2], 5120, 40  # the A14B width and heads
    x = torch.randn(B, L, C, device=device, generator=gen) * 3 + 0.5
    rows = {"sample": 1, "frame": grid[0], "token": L}[mod_rows]   # "frame": TI2V's image frame at t = 0
    mod = torch.randn(B, rows, 6, C, device=device, generator=gen)
    shift, scale, gate = mod.unbind(2)[:3]

    def plain_of(v, shift, scale):
        return dit_module.modulate(dit_module.FP32LayerNorm(C, 1e-6, elementwise_affine=False)(v), shift, scale)

    out = K.layer_norm_modulate(x, 1e-6, torch.bfloat16, None, None, shift, scale)
    assert rel_err(out, plain_of(x, shift, scale).bfloat16()) < tol
    norm = dit_module.FP32LayerNorm(C, 1e-6).to(device, torch.bfloat16)
    norm.weight.normal_(generator=gen)
    norm.bias.normal_(generator=gen)
    assert rel_err(K.layer_norm_modulate(x, 1e-6, torch.bfloat16, norm.weight, norm.bias), norm(x).bfloat16()) < tol

    q = (torch.randn(B, L, C, device=device, generator=gen) * 2).bfloat16()
    rms = dit_module.RMSNorm(C, 1e-6).to(device, torch.bfloat16)
    rms.weight.normal_(generator=gen)
    cos, sin = (t.to(device) for t in dit_module.rope_tables(grid, C // N))
    heads = rms(q).unflatten(-1, (N, -1)).transpose(1, 2)  # [B, N, L, D]
    rotated = dit_module.apply_rope(heads, cos, sin).bfloat16()
    out = K.rms_norm_rope(q, rms.weight, 1e-6, N, (cos, sin))
    assert out.shape == (B, N, L, C // N) and rel_err(out, rotated) < tol
    assert rel_err(K.rms_norm_rope(q, rms.weight, 1e-6, N), heads) < tol

    y = torch.randn(B, L, C, device=device, generator=gen).bfloat16()
    summed = dit_module.add_gated(x, y, gate)
    s, h = K.add_layer_norm(x, y, gate, 1e-6, torch.bfloat16, shift=shift, scale=scale)
    assert rel_err(s, summed) < 1e-6 and rel_err(h, plain_of(summed, shift, scale).bfloat16()) < tol
    x2 = x.clone()
    s, h = K.add_layer_norm(x2, y, None, 1e-6, torch.bfloat16, norm.weight, norm.bias, inplace=True)
    assert s is x2 and rel_err(s, x + y.float()) < 1e-6 and rel_err(h, norm(x + y.float()).bfloat16()) < tol
    assert rel_err(K.add_gated(x, y, gate), summed) < 1e-6
    x2 = x.clone()
    assert K.add_gated_(x2, y, gate) is x2 and rel_err(x2, summed) < 1e-6
    x2 = x.clone()
    assert K.add_gated(x2, y, gate, inplace=True) is x2 and rel_err(x2, summed) < 1e-6


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@torch.no_grad()
def test_in_place_ops_declare_their_mutation(device, backend):
    """Compiled, the in-place ops' writes reach the caller's tensor (their `mutates_args` are right)."""
    if backend == "inductor" and device == "cpu":
        pytest.skip("inductor needs a GPU driver to launch user Triton kernels")
    gen = torch.Generator(device=device).manual_seed(1)
    B, L, C = 2, 8, 256
    x = torch.randn(B, L, C, device=device, generator=gen)
    y = torch.randn(B, L, C, device=device, generator=gen).bfloat16()
    shift, scale, gate = torch.randn(B, 1, 3, C, device=device, generator=gen).unbind(2)

    def residual_adds(x, y, gate, shift, scale):
        h = torch.ops.wan_engine.add_layer_norm_(x, y, None, 1e-6, torch.bfloat16, None, None, shift, scale)
        torch.ops.wan_engine.add_gated_(x, y, gate)
        return h

    x_eager, x_compiled = x.clone(), x.clone()
    h_eager = residual_adds(x_eager, y, gate, shift, scale)
    h_compiled = torch.compile(residual_adds, backend=backend, fullgraph=True)(x_compiled, y, gate, shift, scale)
    assert rel_err(x_eager, x + y.float() * (1 + gate)) < 1e-6
    assert torch.equal(x_compiled, x_eager) and torch.equal(h_compiled, h_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_inductor_launches_the_kernels_with_eager_numerics():
    """Inductor hands a Python float (eps) to a user kernel as fp64 where Triton hands it as fp32; the kernels
    cast it, so a compiled call computes exactly what an eager one does (float32 output: every bit shows)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 512, 1024, device="cuda", generator=gen)
    shift, scale = torch.randn(4, 1, 2, 1024, device="cuda", generator=gen).unbind(2)
    q = torch.randn(4, 512, 1024, device="cuda", generator=gen).bfloat16()
    w = torch.randn(1024, device="cuda", generator=gen).bfloat16()

    def ops(x, shift, scale, q, w):
        return (K.layer_norm_modulate(x, 1e-6, torch.float32, shift=shift, scale=scale),
                K.rms_norm_rope(q, w, 1e-6, 8))

    torch._dynamo.reset()
    eager = ops(x, shift, scale, q, w)
    compiled = torch.compile(ops, backend="inductor", fullgraph=True)(x, shift, scale, q, w)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def small_block(device: str, dim: int, num_heads: int, ffn_dim: int, seed: int = 0) -> DiTBlock:
    """A random float32 block whose weights are bf16-representable, so its .bfloat16() copy is the same model."""
    torch.manual_seed(seed)
    cfg = DiTConfig("t2v", 16, 16, dim, ffn_dim, num_heads, 1)
    block = DiTBlock(cfg).eval().requires_grad_(False)
    for p in block.parameters():
        p.copy_(p.bfloat16())
    return block.to(device)


def block_inputs(device: str, dim: int, grid: tuple[int, int, int], text_len: int, head_dim: int, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, L, dim, device=device, generator=gen)  # [B, L, dim] fp32
    mod = torch.randn(1, 1, 6, dim, device=device, generator=gen) * 0.5  # [B, 1, 6, dim]
    context = torch.randn(1, text_len, dim, device=device, generator=gen).bfloat16()  # [B, text_len, dim]
    rope = tuple(t.to(device) for t in dit_module.rope_tables(grid, head_dim))
    return x, mod, context, rope


@torch.no_grad()
def test_compiled_block_keeps_the_kernels(device):
    """aot_eager traces the block whole with our ops as graph nodes (out-of-place forms), and the
    traced block computes what the eager kernels do; the kernel path stays close to the plain one."""
    dim, heads = 128, 4
    block = small_block(device, dim, heads, 256).bfloat16()
    x, mod, context, rope = block_inputs(device, dim, (2, 4, 4), 16, dim // heads)
    x_before = x.clone()
    eager = block(x, mod, context, rope)

    torch._dynamo.reset()
    recorder = GraphRecorder("aot_eager")
    compiled = torch.compile(block, backend=recorder, fullgraph=True)(x, mod, context, rope)
    assert torch.equal(x, x_before)
    assert len(recorder.graphs) == 1
    assert sorted(recorder.op_calls()) == sorted(["layer_norm_modulate", "add_layer_norm", "add_layer_norm",
                                                  "add_gated"] + ["rms_norm_rope"] * 4)
    assert rel_err(compiled, eager) < 1e-5

    block.triton = False   # the block's own option: the plain path, with none of our ops in its graph
    plain = block(x, mod, context, rope)
    assert rel_err(eager, plain) < 1e-2
    torch._dynamo.reset()
    recorder = GraphRecorder("aot_eager")
    torch.compile(block, backend=recorder, fullgraph=True)(x, mod, context, rope)
    assert recorder.op_calls() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_inductor_blocks_keep_the_kernels_on_cuda():
    """Two real-width-ish bf16 blocks compiled as the compile patch does (inductor, fullgraph, static): one
    graph for both, no graph breaks, our ops in it, and results within bf16 rounding of the eager
    kernels and of a float32 plain-path reference."""
    from torch._dynamo.utils import counters

    dim, heads, grid = 1024, 8, (2, 32, 32)  # L = 2048, head width 128
    ref_blocks = [small_block("cuda", dim, heads, 4096, seed=i) for i in range(2)]  # fp32: the plain path
    blocks = [copy.deepcopy(b).bfloat16() for b in ref_blocks]
    x, mod, context, rope = block_inputs("cuda", dim, grid, 512, dim // heads)

    def run(stack, x, context):
        for b in stack:
            x = b(x, mod, context, rope)
        return x

    reference = run(ref_blocks, x, context.float())
    eager = run(blocks, x, context)

    torch._dynamo.reset()
    counters.clear()
    recorder = GraphRecorder("inductor")
    for b in blocks:
        b.compile(backend=recorder, fullgraph=True, dynamic=False)
    compiled = run(blocks, x, context)
    compiled_again = run(blocks, x, context)

    assert len(recorder.graphs) == 1, "the second block must reuse the first one's graph"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert set(recorder.op_calls()) == {"layer_norm_modulate", "add_layer_norm", "add_gated", "rms_norm_rope"}
    assert torch.equal(compiled, compiled_again)
    assert rel_err(compiled, eager) < 1e-2
    assert rel_err(eager, reference) < 2e-2 and rel_err(compiled, reference) < 2e-2
