#!/usr/bin/env python3
"""Cost of GPTQ at real layer shapes (issue 7): peak RSS and seconds per
expert matrix of `moec compress` with a GPTQ recipe, which calibrates and
quantises layer by layer (sequential GPTQ), against `moec calibrate
--input-moments`, which holds every layer's moments at once (what a
calibrate-then-quantise pipeline needs). The model is the OLMoE-1B-7B-shaped
4-layer synthetic checkpoint of bench/run.sh (random weights: this measures
cost, not quality); calibration tokens are random ids.

Prints one JSON object per line.
Also, with --max-memory SIZE (repeatable), the same compress under that
budget (issue 19: layers one at a time, experts loaded on demand, moments a
chunk of experts at a time), with the package compared byte for byte.
--only-budgets skips the two unbounded runs (the budget runs then compare
among themselves).

Usage: bench/gptq_memory.py BUILD_DIR MODEL_DIR [TOKENS] [--max-memory SIZE]... [--only-budgets]
"""
import json
import os
import subprocess
import sys
import tempfile


def timed(*args):
    """Runs a command under /usr/bin/time; returns (peak RSS bytes, seconds)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%M %e", *args], check=True, capture_output=True, text=True)
    rss_kb, seconds = result.stderr.strip().splitlines()[-1].split()
    return int(rss_kb) * 1024, float(seconds)


def main():
    args = sys.argv[1:]
    budgets = [args[i + 1] for i, a in enumerate(args) if a == "--max-memory"]
    only_budgets = "--only-budgets" in args
    positional = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--max-memory")]
    build, model = positional[0], positional[1]
    tokens = int(positional[2]) if len(positional) > 2 else 2048
    moec = os.path.join(build, "tools", "moec")
    config = json.load(open(os.path.join(model, "config.json")))
    hidden, width = config["hidden_size"], config["intermediate_size"]
    experts, layers = config["num_experts"], config["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as work:
        ids = os.path.join(work, "ids.u32")
        # Deterministic pseudo-random ids below the vocabulary.
        state, data = 12345, bytearray()
        for _ in range(tokens + 1):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            data += ((state >> 33) % config["vocab_size"]).to_bytes(4, "little")
        open(ids, "wb").write(data)
        moments_per_layer = experts * (hidden * hidden + width * width) * 8
        base = {"model": os.path.basename(model.rstrip("/")), "tokens": tokens, "layers": layers,
                "moments_bytes_per_layer": moments_per_layer}

        if not only_budgets:
            rss, seconds = timed(moec, "calibrate", model, "--data", ids, "--tokens", str(tokens), "--input-moments",
                                 "-o", os.path.join(work, "stats.safetensors"))
            print(json.dumps(dict(base, run="moec calibrate --input-moments (every layer's moments)",
                                  peak_rss_bytes=rss, seconds=seconds)), flush=True)
            os.remove(os.path.join(work, "stats.safetensors"))

        recipe = os.path.join(work, "gptq.json")
        json.dump({"calibration": {"data": ids, "tokens": tokens},
                   "passes": [{"pass": "moe-quantize", "options": {"method": "gptq", "bits": 4, "group": 128}}]},
                  open(recipe, "w"))
        reference = None
        for budget in ([] if only_budgets else [None]) + budgets:
            summary = os.path.join(work, "summary.json")
            package = os.path.join(work, "q.moepkg")
            extra = ["--max-memory", budget] if budget else []
            rss, seconds = timed(moec, "compress", model, "--recipe", recipe, "-o", package, "--summary", summary,
                                 *extra)
            sequential = json.load(open(summary))["passes"][0]["sequential"]
            matrices = 3 * experts * layers
            quantize = sum(layer["quantize_seconds"] for layer in sequential["layers"])
            calibrate = sum(layer["calibrate_seconds"] for layer in sequential["layers"])
            body = open(package, "rb").read()
            reference = body if reference is None else reference
            label = ("moec compress --max-memory %s, sequential GPTQ q4_g128 (a chunk of experts' moments)" % budget
                     if budget else "moec compress, sequential GPTQ q4_g128 (one layer's moments)")
            record = dict(base, run=label, peak_rss_bytes=rss, seconds=seconds, calibrate_seconds=calibrate,
                          quantize_seconds=quantize, expert_matrices=matrices,
                          seconds_per_expert_matrix=quantize / matrices, same_package=body == reference)
            if "memory_plan" in sequential:
                record["memory_plan"] = sequential["memory_plan"]
            print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
