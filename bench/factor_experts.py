#!/usr/bin/env python3
"""Low-rank expert factoring (moe-factor-experts, D2MoE) on the bundled fixtures.

Each fixture is calibrated once on the whole calibration split with input
moments (the whitened SVD's X^T X). Then, at each budget (the fraction of the
routed experts' parameters removed), moe-factor-experts (whitened, and plain
SVD for comparison) beside the closest existing moec methods that remove the
same share of parameters: neuron pruning (CAMERA-P, `moe-prune-atoms
method=camera`), expert merging (M-SMoE) and expert pruning (EASY-EP).
`with_q4`: the same budget with the routed experts (base and factors for the
factored model) then RTN-quantised to 4-bit groups of 32, beside the plain
model at 2 bits (about the bytes of the 50% budget at 4 bits). Held-out
perplexity over the whole split. Prints one JSON object per line.
Usage: bench/factor_experts.py [BUILD_DIR]
"""
import argparse
import json
import os
import tempfile
import time

from benchlib import CALIBRATION, HELDOUT, fixture_dir, run

# (label, pipeline template); {stats} is the statistics file, {removed} the
# share of parameters removed, {kept} the share kept.
METHODS = [
    ("factor (whitened)", "moe-factor-experts{{stats={stats} ratio={kept}}}"),
    ("factor (plain SVD)", "moe-factor-experts{{stats={stats} ratio={kept} whiten=false}}"),
    ("atoms camera", "moe-prune-atoms{{stats={stats} method=camera ratio={removed}}}"),
    ("merge msmoe", "moe-merge-experts{{stats={stats} method=msmoe ratio={removed}}}"),
    ("prune easy-ep", "moe-prune-experts{{stats={stats} method=easy-ep ratio={removed}}}"),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    parser.add_argument("--removed", default="0.25,0.5")
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    quantize = "moe-quantize{bits=4 group=32}"
    with tempfile.TemporaryDirectory() as work:

        def evaluate(path):
            return json.loads(run(moec, "eval", path, "--data", HELDOUT, "--json"))["perplexity"]

        for fixture in args.fixtures.split(","):
            model = fixture_dir(fixture)
            module = os.path.join(work, fixture + ".mlir")
            stats = os.path.join(work, fixture + ".safetensors")
            run(moec, "import", model, "-o", module)
            run(moec, "calibrate", module, "--data", CALIBRATION, "--input-moments", "-o", stats)
            print(json.dumps({"fixture": fixture, "method": "original", "removed": 0, "perplexity": evaluate(model)}),
                  flush=True)
            for bits in (4, 2):
                out = os.path.join(work, "%s-q%d.mlir" % (fixture, bits))
                run(moec, "opt", module, "--pipeline", "moe-quantize{bits=%d group=32}" % bits, "-o", out)
                print(json.dumps({"fixture": fixture, "method": "rtn %d-bit" % bits, "removed": 0,
                                  "perplexity": evaluate(out)}), flush=True)
            for removed in [float(r) for r in args.removed.split(",")]:
                kept = round(1 - removed, 6)
                for label, template in METHODS:
                    pipeline = template.format(stats=stats, removed=removed, kept=kept)
                    out = os.path.join(work, "%s-%s-%s.mlir" % (fixture, label.split()[0], removed))
                    start = time.time()
                    run(moec, "opt", module, "--pipeline", pipeline, "-o", out)
                    seconds = time.time() - start
                    quantized = out + ".q4.mlir"
                    run(moec, "opt", out, "--pipeline", quantize, "-o", quantized)
                    package = out + ".moepkg"
                    run(moec, "emit", quantized, "-o", package)
                    print(json.dumps({"fixture": fixture, "method": label, "removed": removed,
                                      "perplexity": evaluate(out), "with_q4": evaluate(quantized),
                                      "q4_package_bytes": os.path.getsize(package), "pass_seconds": seconds}),
                          flush=True)


if __name__ == "__main__":
    main()
