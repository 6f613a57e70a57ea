#!/usr/bin/env python3
"""Packages of the bundled fixtures: size against the theoretical bits, and
held-out perplexity of the package (integer kernels for decode, dequantized
GEMMs for prefill) against the simulated-quantized module (dequantized f32)
and the original model.

For each fixture and pipeline: moec import -> moec opt -> moec eval module
--simulate-quantized -> moec emit -> moec eval package. Prints one JSON
object per line. Usage: bench/package_quality.py BUILD_DIR
"""
import json
import os
import sys
import tempfile

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run


PIPELINES = [
    ("q8_g64_asym", "moe-quantize{bits=8 group=64 targets=all}", 8 + 32 / 64),
    ("q4_g64_asym", "moe-quantize{bits=4 group=64 targets=all}", 4 + 32 / 64),
    ("q4_g128_sym", "moe-quantize{bits=4 group=128 sym=true targets=all}", 4 + 16 / 128),
    ("q3_g64_asym", "moe-quantize{bits=3 group=64 targets=all}", 3 + 32 / 64),
    ("q2_g64_asym", "moe-quantize{bits=2 group=64 targets=all}", 2 + 32 / 64),
    ("NAEE prune 25% + q4_g128_asym experts",
     "moe-prune-experts{stats=STATS method=reconstruction ratio=0.25},moe-quantize{bits=4 group=128 targets=experts}",
     4 + 32 / 128),
]


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    moec = os.path.join(build, "tools", "moec")
    heldout = HELDOUT
    with tempfile.TemporaryDirectory() as work:
        for fixture in ("tiny-mixtral", "tiny-deepseek"):
            model = fixture_dir(fixture)
            stats = os.path.join(work, fixture + ".stats.safetensors")
            run(moec, "calibrate", model, "--data", CALIBRATION,
                "--block-samples", "2048", "-o", stats)
            module = os.path.join(work, fixture + ".mlir")
            run(moec, "import", model, "-o", module)
            original = json.loads(run(moec, "eval", model, "--data", heldout, "--json"))["perplexity"]
            checkpoint_bytes = os.path.getsize(os.path.join(model, "model.safetensors"))
            print(json.dumps({"fixture": fixture, "pipeline": "original", "perplexity": original,
                              "bytes": checkpoint_bytes}), flush=True)
            for label, pipeline, bits in PIPELINES:
                out = os.path.join(work, "%s-%s" % (fixture, label.replace(" ", "_").replace("%", "")))
                run(moec, "opt", module, "--pipeline", pipeline.replace("STATS", stats), "-o", out + ".mlir")
                simulated = json.loads(run(moec, "eval", out + ".mlir", "--data", heldout, "--json",
                                           "--simulate-quantized"))["perplexity"]
                run(moec, "emit", out + ".mlir", "-o", out + ".moepkg")
                packaged = json.loads(run(moec, "eval", out + ".moepkg", "--data", heldout, "--json"))["perplexity"]
                # Theoretical size: quantized tensors at `bits` per weight, the rest as stored.
                with open(out + ".moepkg", "rb") as f:
                    header = f.read(64)
                    length = int.from_bytes(header[24:32], "little")
                    manifest = json.loads(f.read(length))
                theoretical = 0.0
                for tensor in manifest["tensors"].values():
                    if "format" in tensor:
                        rows, cols = tensor["shape"]
                        theoretical += rows * cols * bits / 8
                    else:
                        theoretical += tensor["bytes"]
                print(json.dumps({"fixture": fixture, "pipeline": label, "perplexity": packaged,
                                  "simulated_perplexity": simulated,
                                  "package_vs_simulated_percent": (packaged / simulated - 1) * 100,
                                  "vs_original_percent": (packaged / original - 1) * 100,
                                  "bytes": os.path.getsize(out + ".moepkg"), "theoretical_bytes": int(theoretical),
                                  "checkpoint_bytes": checkpoint_bytes}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
