"""Conversion throughput and peak memory on a synthetic Llama-3-8B-shaped checkpoint.

    python tools/bench/bench_convert.py [--size-gb 3.0] [--work-dir DIR] [--json FILE]

Writes an HF directory with Llama-3-8B tensor shapes (bf16, random) and as many layers as make
`--size-gb` of safetensors, then measures in this one run, each in a fresh process:
  copy HF files (cp + fsync)         the baseline for HF -> Megatron
  HF -> Megatron (streaming)         throughput, ratio to the copy, peak RSS
  copy Megatron files (cp + fsync)   the baseline for Megatron -> HF
  Megatron -> HF (streaming)         throughput, ratio to the copy, peak RSS
  bare process (imports only)        RSS floor of a Python process with torch loaded
Disks vary between runs: compare ratios from the same run. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
mode, src, dst, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import torch
torch.set_num_threads(1)
from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
start = time.perf_counter()
nbytes = 0
if mode == "import":
    nbytes = convert_hf_to_megatron(src, dst, **extra)["bytes"]
elif mode == "export":
    nbytes = convert_megatron_to_hf(src, dst, **extra)["bytes"]
elif mode == "copy":
    import os, shutil
    os.makedirs(dst)
    for root, _, files in os.walk(src):
        for name in files:
            path = os.path.join(root, name)
            target = os.path.join(dst, os.path.relpath(path, src))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
            nbytes += os.path.getsize(path)
seconds = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"bytes": nbytes, "seconds": seconds, "peak_rss_kib": int(hwm)}))
"""


def _child(mode: str, src, dst, **extra) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(src), str(dst), json.dumps(extra)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="safetensors size (>= 3 GB)")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a tempdir)")
    parser.add_argument("--json", default="runs/bench/bench_convert.json", help="result file")
    parser.add_argument("--max-chunk-mb", type=float, default=128, help="converter chunk size")
    parser.add_argument("--repeats", type=int, default=1, help="measure each step this often")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
    args = parser.parse_args()

    from megatron_opdlm.conversion.synthetic import LLAMA3_8B, write_synthetic_llama

    shape = dict(LLAMA3_8B)
    if args.smoke:
        shape.update(hidden_size=256, intermediate_size=512, vocab_size=4096,
                     num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * kv * h + 3 * f * h)  # bf16 bytes
    fixed = 2 * 2 * v * h
    layers = max(1, math.ceil((args.size_gb * 1e9 - fixed) / per_layer))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, ckpt, back = work / "hf", work / "ckpt", work / "hf_back"
    for path in (hf_dir, ckpt, back, work / "copy"):
        _drop(path)
    t0 = time.perf_counter()
    size = write_synthetic_llama(hf_dir, layers, shape)
    kind = "tiny" if args.smoke else "Llama-3-8B"
    print(f"synthetic {kind}-shaped checkpoint: {layers} layers, {size / 2**20:.0f} MiB "
          f"(written in {time.perf_counter() - t0:.0f} s) in {work}")  # fmt: skip

    rows = []
    for _ in range(args.repeats):
        for name, mode, src, dst, extra in (
            ("copy HF files", "copy", hf_dir, work / "copy", {}),
            ("HF -> Megatron", "import", hf_dir, ckpt, {"max_chunk_mb": args.max_chunk_mb}),
            ("copy Megatron files", "copy", ckpt, work / "copy", {}),
            ("Megatron -> HF", "export", ckpt, back, {}),
        ):
            _drop(dst)
            result = _child(mode, src, dst, **extra)
            result["name"] = name
            rows.append(result)
            if mode == "copy":
                _drop(dst)
        _drop(back)
    bare = _child("copy", work / "empty-src", work / "empty-dst")  # imports only, copies nothing
    _drop(work / "empty-dst")

    def mib_s(row):
        return row["bytes"] / 2**20 / row["seconds"]

    def best(name):
        return max((r for r in rows if r["name"] == name), key=mib_s)

    summary = {}
    for name, baseline in (("HF -> Megatron", "copy HF files"),
                           ("Megatron -> HF", "copy Megatron files")):  # fmt: skip
        conv, copy = best(name), best(baseline)
        summary[name] = {
            "MiB": conv["bytes"] / 2**20, "MiB_per_s": mib_s(conv),
            "copy_MiB_per_s": mib_s(copy), "ratio_to_copy": mib_s(conv) / mib_s(copy),
            "peak_rss_MiB": conv["peak_rss_kib"] / 1024,
            "peak_rss_above_bare_MiB": (conv["peak_rss_kib"] - bare["peak_rss_kib"]) / 1024,
        }  # fmt: skip
    print(f"\n{'step':<22}{'MiB':>9}{'s':>8}{'MiB/s':>9}{'x copy':>8}{'peak RSS MiB':>14}")
    for row in rows:
        megatron_side = row["name"] in ("copy Megatron files", "Megatron -> HF")
        copy = best("copy Megatron files" if megatron_side else "copy HF files")
        ratio = mib_s(row) / mib_s(copy)
        print(f"{row['name']:<22}{row['bytes'] / 2**20:>9.0f}{row['seconds']:>8.1f}"
              f"{mib_s(row):>9.0f}{ratio:>8.2f}{row['peak_rss_kib'] / 1024:>14.0f}")  # fmt: skip
    print(f"{'bare process':<22}{'':>9}{'':>8}{'':>9}{'':>8}{bare['peak_rss_kib'] / 1024:>14.0f}")
    result = {
        "machine": f"{os.cpu_count()} CPUs", "layers": layers, "shape": shape, "hf_bytes": size,
        "max_chunk_mb": args.max_chunk_mb, "bare_peak_rss_MiB": bare["peak_rss_kib"] / 1024,
        "runs": rows, "summary": summary,
    }  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    if args.work_dir is None:
        _drop(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
