#!/usr/bin/env bash
# Regenerates the committed conformance fixtures in tests/fixtures/oracle from the project alone:
# the tiny official-layout checkpoint trees, oracle_fixture.json and the compacted refs/.
# The official Wan2.2 code (PyPI wan22) is a test-only oracle. It lives in its own venv and is
# never imported by the project or its tests.
#
#   tests/oracle/regenerate.sh
#
# Environment:
#   ORACLE_VENV     the oracle venv (default <repo>/.venv-oracle); created when it lacks wan22 2.2.11
#   ORACLE_THREADS  torch CPU threads for make_refs.py (default 2, as the committed refs were made)
#   ORACLE_KEEP     if set, a directory that receives the full raw output (the fixture and the
#                   raw refs before compact_refs.py); it is replaced
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv=${ORACLE_VENV:-$root/.venv-oracle}
threads=${ORACLE_THREADS:-2}
dest=$root/tests/fixtures/oracle
py=$venv/bin/python

if ! "$py" -c 'import importlib.metadata as m; assert m.version("wan22") == "2.2.11"' 2>/dev/null; then
    echo "creating the oracle venv at $venv"
    python3 -m venv "$venv"
    # --no-deps: wan22's declared dependencies pull flash_attn (a CUDA source build) and more
    "$venv/bin/pip" install --no-deps wan22==2.2.11
    "$venv/bin/pip" install torch==2.13.0
    "$venv/bin/pip" install -r tests/oracle/requirements-oracle.txt
fi

# the work directory sits under the ignored build/ so that the final moves stay on one file system
mkdir -p "$root/build"
work=$(mktemp -d "$root/build/oracle-regen.XXXXXX")
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$py" tests/oracle/make_fixture.py --out "$work/fixture"
"$py" tests/oracle/make_refs.py --fixture "$work/fixture" --out "$work/raw_refs" --threads "$threads"

mkdir "$work/new"
"$py" tests/oracle/compact_refs.py --raw "$work/raw_refs" --out "$work/new/refs"
"$py" tests/oracle/make_lora_refs.py --fixture "$work/fixture/t2v-A14B-tiny" --out "$work/new/refs" --threads "$threads"
# cp -r turns make_fixture's hard links into plain files, as git stores them
for item in t2v-A14B-tiny i2v-A14B-tiny ti2v-5B-tiny oracle_fixture.json; do
    cp -r "$work/fixture/$item" "$work/new/$item"
done

if [ -n "${ORACLE_KEEP:-}" ]; then
    rm -rf "$ORACLE_KEEP"
    mkdir -p "$ORACLE_KEEP"
    cp -r "$work/fixture" "$work/raw_refs" "$ORACLE_KEEP/"
fi

# replace an item only when its content changed, so an unchanged fixture is left untouched
for item in t2v-A14B-tiny i2v-A14B-tiny ti2v-5B-tiny oracle_fixture.json refs; do
    if diff -r "$work/new/$item" "$dest/$item" >/dev/null 2>&1; then
        echo "unchanged: tests/fixtures/oracle/$item"
    else
        echo "updated:   tests/fixtures/oracle/$item"
        if [ -e "$dest/$item" ]; then
            mv "$dest/$item" "$work/old-$item"
        fi
        mv "$work/new/$item" "$dest/$item"
    fi
done
du -sh "$dest"/refs "$dest"/t2v-A14B-tiny "$dest"/i2v-A14B-tiny "$dest"/ti2v-5B-tiny
