"""LoRA files and the LoRA patch: every layout reads to the same deltas, merged weights follow the official
rule W + (alpha / rank) * up @ down, apply then remove is bit-identical (merged and unmerged, float32 and bf16,
through the 2-bit correction and its exceptions), unmerged equals merged, an unmerged swap keeps its hooks, a
merged swap does not recompile, parsed files are cached, and every bad file gets one clear error before any
weight changes."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from patches.lora import _BITS, LoraConfig, apply_loras
from tests.lora_files import LAYOUTS, in_layout, official_lora, write_lora
from tests.patches import tiny_pipeline
from wan_engine.lora import LoraChoice, LoraError, read_lora


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{e}.{k}": v.detach().clone() for e, dit in pipe.experts.items() for k, v in dit.state_dict().items()}


def assert_same(before: dict, after: dict) -> None:
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} tensors changed, first {changed[:3]}"


def official_merge(weights: dict, sd: dict, strength: float = 1.0) -> dict:
    """W + strength * ((alpha / rank) * up @ down + diff), b + strength * diff_b: the rule as published."""
    out = dict(weights)
    modules = {k.rsplit(".lora_down", 1)[0] for k in sd if ".lora_down" in k}
    for m in modules:
        down, up = sd[f"{m}.lora_down.weight"].double(), sd[f"{m}.lora_up.weight"].double()
        scale = float(sd[f"{m}.alpha"]) / down.shape[0] if f"{m}.alpha" in sd else 1.0
        out[f"{m}.weight"] = out[f"{m}.weight"].double() + strength * scale * (up @ down)
    for k, v in sd.items():
        if k.endswith(".diff_b"):
            m = k.removesuffix(".diff_b")
            out[f"{m}.bias"] = out[f"{m}.bias"].double() + strength * v.double()
        elif k.endswith(".diff"):
            m = k.removesuffix(".diff")
            key = m if m in out else f"{m}.weight"
            out[key] = out[key].double() + strength * v.double()
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_merges_as_the_official_rule(pipe, tmp_path, layout):
    sd = official_lora(seed=1, extras=layout != "diffusers")
    path = write_lora(tmp_path / f"{layout}.safetensors", in_layout(sd, layout))
    lora = read_lora(path)
    assert lora.layout == {"official": "official", "comfy": "kohya", "diffusers": "diffusers"}[layout]
    before = snapshot(pipe)
    high = {k: v for k, v in pipe.experts["high_noise"].state_dict().items()}
    expected = official_merge(high, sd, strength=0.7)
    with apply_loras(pipe, LoraConfig((LoraChoice(str(path), 0.7, "high"),))) as handle:
        merged = pipe.experts["high_noise"].state_dict()
        worst = max((merged[k].double() - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-6
        assert_same({k: v for k, v in before.items() if k.startswith("low_noise")},
                    {k: v for k, v in snapshot(pipe).items() if k.startswith("low_noise")})
        assert handle.summary()[0]["sha256"] == lora.sha256
    assert_same(before, snapshot(pipe))


def test_stacked_loras_add_up_and_remove_exactly_in_bf16(tmp_path):
    pipe = copy.deepcopy(tiny_pipeline())
    for dit in pipe.experts.values():
        dit.to(torch.bfloat16)
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(seed=2), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(seed=3, rank=8, alpha=None), "comfy"))
    before = snapshot(pipe)
    sd_a, sd_b = official_lora(seed=2), official_lora(seed=3, rank=8, alpha=None)
    low = {k: v.float() for k, v in pipe.experts["low_noise"].state_dict().items()}
    expected = official_merge(official_merge(low, sd_a, 1.0), sd_b, 0.5)
    with apply_loras(pipe, LoraConfig((LoraChoice(str(a)), LoraChoice(str(b), 0.5, "low")))):
        merged = pipe.experts["low_noise"].state_dict()
        for k, v in expected.items():   # one bf16 rounding of the float32 sum
            assert torch.equal(merged[k], v.float().to(torch.bfloat16)) or \
                (merged[k].float() - v).abs().max() <= v.abs().max() * 2 ** -8
    assert_same(before, snapshot(pipe))


def test_unmerged_equals_merged_and_removes_exactly(pipe, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", in_layout(official_lora(seed=4, extras=True), "official"))
    choice = (LoraChoice(str(path), 1.3),)
    dit = pipe.experts["high_noise"]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([900]), torch.randn(1, 12, 4096, generator=g)
    base = dit(x, t, ctx)
    before = snapshot(pipe)
    with apply_loras(pipe, LoraConfig(choice, merge=True)):
        merged = dit(x, t, ctx)
    with apply_loras(pipe, LoraConfig(choice, merge=False)):
        unmerged = dit(x, t, ctx)
    assert (merged - base).abs().max() > 1e-3
    assert (unmerged - merged).abs().max() < 1e-4 * merged.abs().max()
    assert torch.equal(dit(x, t, ctx), base)
    assert_same(before, snapshot(pipe))


def test_merged_swap_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters
    pipe = copy.deepcopy(tiny_pipeline())
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(seed=5), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(seed=6), "official"))
    torch._dynamo.reset()
    block = pipe.experts["high_noise"].blocks[0]
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x, mod, ctx = torch.randn(1, 16, 64, generator=g), torch.randn(1, 1, 6, 64, generator=g), torch.randn(1, 512, 64)
    rope = pipe.experts["high_noise"].rope((1, 4, 4), torch.device("cpu"))
    outs = [compiled(x, mod, ctx, rope)]
    graphs = counters["stats"]["unique_graphs"]
    for path in (a, b):
        with apply_loras(pipe, LoraConfig((LoraChoice(str(path)),))):
            outs.append(compiled(x, mod, ctx, rope))
            assert torch.allclose(outs[-1], block(x, mod, ctx, rope), atol=1e-6)   # the new weights are used
    outs.append(compiled(x, mod, ctx, rope))
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(outs[1], outs[0]) and not torch.equal(outs[2], outs[1])
    assert torch.equal(outs[3], outs[0])


def _bad_files(tmp_path) -> dict[str, tuple]:
    good = official_lora(seed=7)
    wide = official_lora(seed=7, dim=128, ffn_dim=256)
    unmatched = dict(good, **{"blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 64),
                              "blocks.9.self_attn.q.lora_up.weight": torch.zeros(64, 4)})
    locon = dict(good, **{"blocks.0.ffn.0.lora_mid.weight": torch.zeros(4, 4)})
    half = {k: v for k, v in good.items() if k != "blocks.1.ffn.2.lora_up.weight"}
    return {
        "no module": (unmatched, "match no module", "blocks.9.self_attn.q.lora_down.weight"),
        "shape (another model size)": (wide, "does not fit", "blocks.0.cross_attn.k (file: alpha (), down (4, 128)"),
        "unsupported kind": (locon, "kind we do not support", "blocks.0.ffn.0.lora_mid.weight"),
        "incomplete pair": (half, "without its up", "blocks.1.ffn.2.lora_down.weight"),
    }


@pytest.mark.parametrize("case", ["no module", "shape (another model size)", "unsupported kind", "incomplete pair"])
def test_bad_files_raise_one_clear_error_before_any_change(pipe, tmp_path, case):
    sd, message, key = _bad_files(tmp_path)[case]
    good = write_lora(tmp_path / "good.safetensors", in_layout(official_lora(seed=8), "official"))
    bad = write_lora(tmp_path / "bad.safetensors", in_layout(sd, "official"))
    before = snapshot(pipe)
    with pytest.raises(LoraError) as err:
        apply_loras(pipe, LoraConfig((LoraChoice(str(good)), LoraChoice(str(bad)))))
    assert message in str(err.value) and key in str(err.value) and "bad.safetensors" in str(err.value)
    assert_same(before, snapshot(pipe))


def test_unreadable_and_out_of_range_choices(pipe, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="unreadable LoRA file"):
        read_lora(junk)
    with pytest.raises(LoraError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(LoraError, match="holds no tensors"):
        read_lora(empty)
    with pytest.raises(LoraError, match="strength must be between 0 and 2"):
        LoraChoice("x.safetensors", 2.5)
    with pytest.raises(LoraError, match="expert must be one of"):
        LoraChoice("x.safetensors", 1.0, "middle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_correction_restores_every_bit_with_exceptions_and_dense_fallback(dtype):
    from patches.lora import _Correction
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(257, 33, generator=g) * 0.02).to(dtype)         # odd sizes: the 2-bit codes are padded
    w.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0]).to(dtype)
    delta = torch.randn(257, 33, generator=g) * 1e-3
    delta.view(-1)[:40] *= 1e4                                       # far larger than the weights: exceptions
    merged = (w.float() + delta).to(dtype)
    corr = _Correction(w, merged, delta)
    assert corr.full is None and 0 < corr.index.numel() < w.numel() // 8
    assert not torch.equal((merged.float() - delta).to(dtype), w)    # subtracting alone is not exact
    restored = merged.clone()
    corr.restore_(restored, delta)
    ints = _BITS[w.element_size()]
    assert torch.equal(restored.view(ints), w.view(ints))
    assert corr.nbytes < w.numel() * w.element_size() // 2
    huge = torch.randn(257, 33, generator=g) * 1e3                   # most weights lost: a full copy instead
    merged = (w.float() + huge).to(dtype)
    dense = _Correction(w, merged, huge)
    dense.restore_(merged, huge)
    assert dense.full is not None and torch.equal(merged.view(ints), w.view(ints))


def test_merged_apply_remove_is_bit_identical_with_a_strong_lora_in_bf16(tmp_path):
    pipe = copy.deepcopy(tiny_pipeline())
    for dit in pipe.experts.values():
        dit.to(torch.bfloat16)
    sd = official_lora(seed=9, extras=True)
    strong = {k: v * 30 if k.endswith("lora_up.weight") else v for k, v in sd.items()}
    path = write_lora(tmp_path / "strong.safetensors", in_layout(strong, "official"))
    before = snapshot(pipe)
    for _ in range(3):
        with apply_loras(pipe, LoraConfig((LoraChoice(str(path), 2.0),))):
            assert not torch.equal(pipe.experts["low_noise"].blocks[0].ffn[0].weight,
                                   before["low_noise.blocks.0.ffn.0.weight"])
        assert_same(before, snapshot(pipe))


def test_unmerged_swap_keeps_the_hooks_and_equals_a_fresh_apply(pipe, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(seed=10, extras=True), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(seed=11, extras=True), "comfy"))
    other = write_lora(tmp_path / "o.safetensors", in_layout(official_lora(seed=12, layers=1), "official"))
    dit = pipe.experts["high_noise"]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([900]), torch.randn(1, 12, 4096, generator=g)
    before = snapshot(pipe)
    cfg_b = LoraConfig((LoraChoice(str(b), 0.6),), merge=False)
    with apply_loras(pipe, cfg_b):
        fresh = dit(x, t, ctx)
    handle = apply_loras(pipe, LoraConfig((LoraChoice(str(a), 1.0),), merge=False))
    hooks = {n: list(m._forward_hooks.values()) for n, m in dit.named_modules() if m._forward_hooks}
    assert handle.swap(pipe, cfg_b)
    assert {n: list(m._forward_hooks.values()) for n, m in dit.named_modules() if m._forward_hooks} == hooks
    assert torch.equal(dit(x, t, ctx), fresh) and handle.summary()[0]["name"] == "b.safetensors"
    assert not handle.swap(pipe, LoraConfig((LoraChoice(str(other)),), merge=False))   # other modules
    assert not handle.swap(pipe, LoraConfig((LoraChoice(str(a)),), merge=True))         # other mode
    handle.remove()
    assert_same(before, snapshot(pipe))
    assert not any(m._forward_hooks for m in dit.modules())


def test_parsed_files_are_cached_by_path_size_and_mtime_within_a_byte_budget(tmp_path):
    from wan_engine.lora import LoraFileCache
    paths = [write_lora(tmp_path / f"{i}.safetensors", in_layout(official_lora(seed=i), "official"))
             for i in range(3)]
    cache = LoraFileCache(max_bytes=2 * read_lora(paths[0]).nbytes)
    first = cache.read(paths[0])
    assert cache.read(paths[0]) is first and cache.reads == 1
    cache.read(paths[1])
    cache.read(paths[0])                                  # 0 is now the most recent: 1 goes when 2 comes
    cache.read(paths[2])
    assert cache.read(paths[0]) is first and cache.reads == 3
    cache.read(paths[1])
    assert cache.reads == 4
    write_lora(paths[0], in_layout(official_lora(seed=5, rank=8), "official"))   # a new file at the same path
    assert cache.read(paths[0]).rank == 8 and cache.reads == 5
    with pytest.raises(LoraError, match="does not exist"):
        cache.read(tmp_path / "missing.safetensors")
