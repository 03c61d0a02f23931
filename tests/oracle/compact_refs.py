"""Turn the raw oracle references (make_refs.py output) into the smaller files committed
under tests/fixtures/oracle/refs.

    python tests/oracle/compact_refs.py --raw RAW_REFS_DIR --out tests/fixtures/oracle/refs

Needs only torch (runs in the project venv or the oracle venv). The committed files keep the
raw file names and key structure; they differ from the raw files in two ways only:

- The TI2V parts sit in files of their own, so the A14B files keep their content: the
  ``ti2v_*`` cases of a_dit_forward.pt (the last ones, so the other cases keep their indices)
  go to a_ti2v_dit_forward.pt, ``c_vae.pt["vae2_2"]`` to c_vae22.pt; e_ti2v_loop.pt keeps its
  name.
- Tensors that are bit-identical within one file are stored once (torch.save writes a
  tensor object once however often it is referenced). Examples: the loop runs share
  their context, context_null and noise, ``official_generate`` equals the replica, and
  ``final_latents`` is the last step's ``latents_after``. After loading, such entries are
  the same tensor object, so treat loaded references as read-only.

index.json lists every committed file with its size, sha256 and content (shapes and
dtypes), plus what was left out. It holds no paths or timings, so regenerating gives
byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os

import torch

log = logging.getLogger("compact_refs")

COMMITTED = ("a_dit_forward.pt", "b_t5.pt", "c_vae.pt", "d_schedulers.pt", "e_t2v_loop.pt",
             "e_i2v_loop.pt", "e_ti2v_loop.pt")
# committed file -> (raw file it is cut from, what of it)
SPLIT_OUT = {
    "a_ti2v_dit_forward.pt": ("a_dit_forward.pt", "cases whose name starts with 'ti2v' (ti2v_pertoken_t700, "
                              "ti2v_pertoken_t999, ti2v_scalar_t500)"),
    "c_vae22.pt": ("c_vae.pt", "vae2_2 (the Wan2.2 VAE of the ti2v-5B-tiny tree), at the top level"),
}
MOVED = {raw: f"{what}: in {name}" for name, (raw, what) in SPLIT_OUT.items()}


def describe(obj):
    """Shapes and dtypes of a nested reference object (what index.json shows)."""
    if torch.is_tensor(obj):
        return f"tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) > 12 and all(torch.is_tensor(o) for o in obj):
            return [describe(obj[0]), f"... {len(obj)} tensors"]
        return [describe(o) for o in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(type(obj).__name__)


def drop_ti2v(name: str, obj: dict) -> dict:
    """The raw object of one A14B file without its TI2V parts."""
    if name == "a_dit_forward.pt":
        return dict(obj, cases=[c for c in obj["cases"] if not c["name"].startswith("ti2v")])
    if name == "c_vae.pt":
        return {k: v for k, v in obj.items() if k != "vae2_2"}
    return obj


def ti2v_part(name: str, raw: dict) -> dict:
    """The TI2V part of a raw file, as the committed file `name` holds it."""
    if name == "a_ti2v_dit_forward.pt":
        return dict(cases=[c for c in raw["cases"] if c["name"].startswith("ti2v")], note=raw["note"])
    return dict(raw["vae2_2"], note=raw["note"])


def share_identical(obj, canon: dict | None = None):
    """Replace bit-identical tensors by one standalone tensor (views would drag their whole
    storage into the file; one object referenced twice is saved once)."""
    canon = {} if canon is None else canon
    if torch.is_tensor(obj):
        t = obj.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        key = (t.dtype, tuple(t.shape), hashlib.sha256(raw).hexdigest())
        if key not in canon:
            canon[key] = t.clone()
        return canon[key]
    if isinstance(obj, dict):
        return {k: share_identical(v, canon) for k, v in obj.items()}
    if isinstance(obj, list):
        return [share_identical(o, canon) for o in obj]
    if isinstance(obj, tuple):
        return tuple(share_identical(o, canon) for o in obj)
    return obj


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compact_dir(raw: str, out: str) -> dict:
    """Write the committed files of ``raw`` into ``out``; returns the index written."""
    os.makedirs(out, exist_ok=True)
    raw_index = json.load(open(os.path.join(raw, "index.json")))
    files = {}
    for name in COMMITTED + tuple(SPLIT_OUT):
        source = SPLIT_OUT[name][0] if name in SPLIT_OUT else name
        obj = torch.load(os.path.join(raw, source), weights_only=False)
        obj = share_identical(ti2v_part(name, obj) if name in SPLIT_OUT else drop_ti2v(name, obj))
        path = os.path.join(out, name)
        torch.save(obj, path)
        raw_bytes = os.path.getsize(os.path.join(raw, source))
        files[name] = dict(bytes=os.path.getsize(path), raw_bytes=raw_bytes, sha256=sha256_file(path),
                           content=describe(obj))
        log.info("%s: %.2f MiB (raw %.2f MiB)", name, files[name]["bytes"] / 2**20, raw_bytes / 2**20)
    index = dict(
        note="Committed oracle references: the raw make_refs.py output with the TI2V parts of "
             "a_dit_forward.pt and c_vae.pt in files of their own, bit-identical tensors within a file "
             "stored once (compact_refs.py). Otherwise the same file names and keys as the raw files; "
             "see tests/oracle/README.md.",
        made_by="tests/oracle/regenerate.sh (make_fixture.py, make_refs.py, compact_refs.py)",
        seed=raw_index["seed"], versions=raw_index["versions"], moved=MOVED,
        total_bytes=sum(f["bytes"] for f in files.values()), files=files)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return index


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="make_refs.py output directory")
    ap.add_argument("--out", required=True, help="directory for the committed references")
    args = ap.parse_args()
    index = compact_dir(args.raw, args.out)
    log.info("total %.2f MiB -> %s", index["total_bytes"] / 2**20, args.out)


if __name__ == "__main__":
    main()
