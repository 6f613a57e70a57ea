#!/usr/bin/env python3
"""GPTQ's group scales when groups are smaller than the lazy-update block
(issue 18, item 5): moe-quantize's group-scales=running (every update so
far), block (the weights as of the block's start: AutoGPTQ) and static (the
original weights: GPTQModel's static_groups), on the routed experts of both
fixtures at 2, 3 and 4 bits with groups of 32 and 64 (block 128), or the
groups and choices given (--groups 128 --scales block,static: with groups of
the block size, block and running are the same).

Held-out perplexity (4096 targets per genre) and KL divergence against the
original over the same windows. Prints one JSON object per line.
Usage: bench/gptq_group_scales.py BUILD_DIR [--groups 32,64] [--scales running,block,static]
"""
import argparse
import json
import os
import tempfile

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--groups", default="32,64")
    parser.add_argument("--scales", default="running,block,static")
    args = parser.parse_args()
    build = args.build
    moec = os.path.join(build, "tools", "moec")
    heldout = HELDOUT
    calibration = CALIBRATION
    with tempfile.TemporaryDirectory() as work:
        for fixture in ("tiny-mixtral", "tiny-deepseek"):
            model = fixture_dir(fixture)
            stats = os.path.join(work, fixture + ".stats.safetensors")
            run(moec, "calibrate", model, "--data", calibration, "--input-moments", "-o", stats, "--quiet")
            module = os.path.join(work, fixture + ".mlir")
            run(moec, "import", model, "-o", module, "--quiet")
            for bits in (2, 3, 4):
                for group in [int(g) for g in args.groups.split(",")]:
                    for scales in args.scales.split(","):
                        out = os.path.join(work, "q.mlir")
                        run(moec, "opt", module, "--quiet", "--pipeline",
                            "moe-quantize{method=gptq stats=%s bits=%d group=%d block=128 targets=experts "
                            "group-scales=%s}" % (stats, bits, group, scales), "-o", out)
                        result = json.loads(run(moec, "eval", out, "--data", heldout, "--max-tokens", "4096",
                                                "--compare", model, "--json", "--quiet"))
                        print(json.dumps({"bench": "gptq_group_scales", "fixture": fixture, "bits": bits,
                                          "group": group, "group_scales": scales,
                                          "perplexity": result["perplexity"],
                                          "kl_mean": result["compare"]["kl_mean"]}), flush=True)


if __name__ == "__main__":
    main()
