#!/usr/bin/env python3
"""Delta patch libraries compared by measurement: patch size, generation time, memory to apply.

    python bench/delta_compare.py                       # a system binary and a small change to it
    python bench/delta_compare.py --old v1.bin --new v2.bin

Without ``--old/--new`` the base image is a ~200 KB system binary and the new image is that binary
with a small code change: ``--insert`` bytes inserted at 30 % of the image and ``--relocs``
4-byte displacements after the insertion point shifted by the same amount (what a compiler does to
calls and jumps that cross a code insertion). Each candidate creates a patch (timed, best of
``--repeat``), applies it in a fresh interpreter (peak RSS added by the apply, over a baseline
process that has read the same inputs) and checks the result's SHA-256. The whole new image
compressed with LZMA is the reference a delta must beat.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bsdiff4
import detools

_APPLY = r"""
import re, sys
from pathlib import Path

def hwm():
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

kind, old, patch, out = sys.argv[1:5]
import bsdiff4, detools, hashlib, io
old_b, patch_b = Path(old).read_bytes(), Path(patch).read_bytes()
base = hwm()
if kind == "baseline":
    new = old_b
elif kind == "bsdiff4":
    new = bsdiff4.patch(old_b, patch_b)
else:
    with open(old, "rb") as f, open(patch, "rb") as p, open(out, "wb") as o:
        detools.apply_patch(f, p, o)
    new = Path(out).read_bytes()
print(hwm() - base, hashlib.sha256(new).hexdigest())
"""


@dataclass
class Result:
    name: str
    size: int
    create_s: float
    apply_kb: int
    ok: bool


def default_images(insert: int, relocs: int, seed: int) -> tuple[bytes, bytes, str]:
    """A real ~200 KB binary and a small code change to it."""
    for candidate in ("find", "make", "zip", "dbus-daemon", "python3"):
        path = shutil.which(candidate)
        if path and 150_000 <= Path(path).stat().st_size <= 400_000:
            old = Path(path).read_bytes()
            break
    else:
        old = random.Random(seed).randbytes(200_000)
        path = "random bytes"
    rng = random.Random(seed)
    at = len(old) * 3 // 10
    new = bytearray(old[:at] + rng.randbytes(insert) + old[at:])
    for _ in range(relocs):
        i = rng.randrange(at + insert, len(new) - 4)
        word = (int.from_bytes(new[i : i + 4], "little") + insert) & 0xFFFFFFFF
        new[i : i + 4] = word.to_bytes(4, "little")
    return old, bytes(new), f"{path} ({len(old)} bytes), +{insert} bytes at 30 %, {relocs} displacements"


def timed(make: Callable[[], bytes], repeat: int) -> tuple[bytes, float]:
    best, patch = float("inf"), b""
    for _ in range(repeat):
        t = time.perf_counter()
        patch = make()
        best = min(best, time.perf_counter() - t)
    return patch, best


def detools_patch(old: bytes, new: bytes, **kw: object) -> bytes:
    out = io.BytesIO()
    detools.create_patch(io.BytesIO(old), io.BytesIO(new), out, **kw)  # type: ignore[arg-type]
    return out.getvalue()


def apply_in_child(kind: str, old_path: Path, patch: bytes, tmp: Path) -> tuple[int, str]:
    patch_path, out_path = tmp / f"{kind}.patch", tmp / f"{kind}.out"
    patch_path.write_bytes(patch)
    proc = subprocess.run(
        [sys.executable, "-c", _APPLY, kind, str(old_path), str(patch_path), str(out_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    kb, digest = proc.stdout.split()
    return int(kb), digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path)
    ap.add_argument("--new", type=Path)
    ap.add_argument("--insert", type=int, default=48)
    ap.add_argument("--relocs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.old and args.new:
        old, new = args.old.read_bytes(), args.new.read_bytes()
        what = f"{args.old} -> {args.new}"
    else:
        old, new, what = default_images(args.insert, args.relocs, args.seed)
    want = hashlib.sha256(new).hexdigest()
    full = len(lzma.compress(new, preset=9 | lzma.PRESET_EXTREME))
    print(f"images: {what}; new image {len(new)} bytes, {full} bytes compressed (LZMA -9e)")

    candidates: list[tuple[str, str, Callable[[], bytes]]] = [
        ("bsdiff4 (bzip2)", "bsdiff4", lambda: bsdiff4.diff(old, new)),
        ("detools bsdiff+lzma", "detools", lambda: detools_patch(old, new, compression="lzma")),
        ("detools bsdiff+heatshrink", "detools", lambda: detools_patch(old, new, compression="heatshrink")),
        ("detools bsdiff+crle", "detools", lambda: detools_patch(old, new, compression="crle")),
        (
            "detools hdiffpatch+lzma",
            "detools",
            lambda: detools_patch(
                old, new, compression="lzma", patch_type="hdiffpatch", algorithm="hdiffpatch", use_mmap=False
            ),
        ),
    ]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old_path = tmp / "old.bin"
        old_path.write_bytes(old)
        baseline_kb, _ = apply_in_child("baseline", old_path, b"", tmp)
        for name, kind, make in candidates:
            try:
                patch, seconds = timed(make, args.repeat)
                kb, digest = apply_in_child(kind, old_path, patch, tmp)
            except Exception as exc:  # a candidate this build of the library lacks is reported, not fatal
                print(f"{name:28s} unavailable: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            results.append(Result(name, len(patch), seconds, kb - baseline_kb, digest == want))

    print(f"{'candidate':28s} {'patch B':>9s} {'vs full':>8s} {'create s':>9s} {'apply +KB':>10s} ok")
    for r in results:
        print(
            f"{r.name:28s} {r.size:9d} {full / r.size:7.1f}x {r.create_s:9.3f} {r.apply_kb:10d} "
            f"{'yes' if r.ok else 'NO'}"
        )
    for r in results:
        key = "_".join(r.name.replace("(", "").replace(")", "").replace("+", " ").split())
        print(f"FIGURE delta_{key} bytes={r.size} create_s={r.create_s:.3f} apply_kb={r.apply_kb}")


if __name__ == "__main__":
    main()
