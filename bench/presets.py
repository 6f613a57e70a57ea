"""Size and quality of every `moec compress --preset` on the bundled fixtures.

For each preset and fixture: `moec compress --preset P --calib-data
calibration.jsonl --eval-data heldout.jsonl` (the package against the
original on the same windows), then one JSON line with the package size,
perplexity before and after, KL divergence and top-1 agreement. Also the
statistics cache (`--stats-cache`): a second preset that calibrates the same
way reads the statistics instead of computing them.

Usage: python3 bench/presets.py build [--eval-tokens N] > bench/results/presets.jsonl
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
parser = argparse.ArgumentParser()
parser.add_argument("build")
parser.add_argument("--eval-tokens", type=int, default=4096)
parser.add_argument("--presets", default="q8,q4,q4-gptq,q3-mixed,prune25-q4,merge-q4")
args = parser.parse_args()
moec = os.path.join(args.build, "tools", "moec")
data = os.path.join(root, "tests", "data", "brown")

with tempfile.TemporaryDirectory() as work:
    for fixture in ("tiny-mixtral", "tiny-deepseek"):
        model = os.path.join(root, "tests", "data", "fixtures", fixture)
        cache = os.path.join(work, "cache-" + fixture)
        for preset in args.presets.split(","):
            out = os.path.join(work, f"{fixture}-{preset}.moepkg")
            start = time.time()
            run = subprocess.run([moec, "compress", model, "--preset", preset, "-o", out, "-q",
                                  "--calib-data", os.path.join(data, "calibration.jsonl"),
                                  "--eval-data", os.path.join(data, "heldout.jsonl"),
                                  "--eval-tokens", str(args.eval_tokens), "--stats-cache", cache],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                print(json.dumps({"fixture": fixture, "preset": preset, "error": run.stderr.strip()}))
                continue
            s = json.loads(run.stdout)
            calibrations = [p["calibration"] for p in s["passes"] if "calibration" in p]
            print(json.dumps({
                "fixture": fixture, "preset": preset,
                "bytes_before": s["bytes_before"], "bytes_after": s["bytes_after"],
                "ratio": s["bytes_before"] / s["bytes_after"],
                "perplexity_before": s["perplexity_before"], "perplexity_after": s["perplexity_after"],
                "increase_percent": s["perplexity_increase_percent"],
                "kl_mean": s["compare"]["kl_mean"], "kl_p99": s["compare"]["kl_p99"],
                "top1_agreement": s["compare"]["top1_agreement"],
                "calibration": "cached" if any("cached" in c for c in calibrations)
                               else "computed" if calibrations else "none",
                "calibration_seconds": sum(c["seconds"] for c in calibrations),
                "seconds": time.time() - start}), flush=True)
