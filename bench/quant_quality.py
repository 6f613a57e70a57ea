#!/usr/bin/env python3
"""Quantization quality on the bundled fixtures (issue 7): held-out perplexity
of RTN vs GPTQ at 4, 3 and 2 bits (groups of 128 and 64) on the routed
experts, MC-MoE mixed precision at 2.5 and 3.0 average bits against the
uniform widths around them (RTN and GPTQ executing the allocation), and the
combination with 25% NAEE expert pruning (recalibrated after pruning, by
moec compress). Mixed precision per expert and per micro-expert (64-neuron
importance tiers), and GPTQ both one-shot (moec calibrate, then moec opt)
and sequential (moec compress: layer by layer, each layer calibrated on the
quantised layers before it). Also the cost of GPTQ: seconds per expert
matrix and the pass's peak RSS.

Prints one JSON object per line. Usage: bench/quant_quality.py BUILD_DIR
"""
import json
import os
import resource
import sys
import tempfile
import time

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    moec = os.path.join(build, "tools", "moec")
    heldout = HELDOUT
    calibration = CALIBRATION

    def evaluate(model):
        return json.loads(run(moec, "eval", model, "--data", heldout, "--json"))["perplexity"]

    with tempfile.TemporaryDirectory() as work:
        for fixture in ("tiny-mixtral", "tiny-deepseek"):
            model = fixture_dir(fixture)
            stats = os.path.join(work, fixture + ".stats.safetensors")
            start = time.time()
            run(moec, "calibrate", model, "--data", calibration, "--input-moments", "--block-samples", "2048",
                "-o", stats)
            calibration_seconds = time.time() - start
            module = os.path.join(work, fixture + ".mlir")
            run(moec, "import", model, "-o", module)
            experts = open(module).read().count("moe.expert ")
            print(json.dumps({"fixture": fixture, "config": "original", "perplexity": evaluate(model),
                              "calibration_seconds": calibration_seconds}), flush=True)

            def quantize(label, pipeline):
                out = os.path.join(work, "%s-%s.mlir" % (fixture, label))
                before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                start = time.time()
                run(moec, "opt", module, "--pipeline", pipeline, "-o", out)
                seconds = time.time() - start
                record = {"fixture": fixture, "config": label, "perplexity": evaluate(out), "pass_seconds": seconds}
                if "gptq" in pipeline:
                    record["seconds_per_expert_matrix"] = seconds / (3 * experts)
                    record["peak_rss_kb_of_children"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
                print(json.dumps(record), flush=True)

            for group in (128, 64):
                for bits in (4, 3, 2):
                    for method in ("rtn", "gptq"):
                        quantize("%s-q%d-g%d" % (method, bits, group),
                                 "moe-quantize{method=%s stats=%s bits=%d group=%d targets=experts}"
                                 % (method, stats, bits, group))
            for budget in (2.5, 3.0):
                for method in ("rtn", "gptq"):
                    quantize("mixed-%s-%s-g64" % (budget, method),
                             "moe-allocate-bits{stats=%s budget=%s candidates=2,3,4 group=64},"
                             "moe-quantize{method=%s stats=%s group=64 targets=experts}" % (stats, budget, method, stats))
                # Micro-experts (64-neuron importance tiers); RTN needs no
                # moments, GPTQ runs through compress below.
                quantize("mixed-micro-%s-rtn-g64" % budget,
                         "moe-allocate-bits{stats=%s budget=%s candidates=2,3,4 group=64 granularity=micro-expert},"
                         "moe-quantize{group=64 targets=experts}" % (stats, budget))

            def compress(label, passes):
                recipe = os.path.join(work, label + ".json")
                with open(recipe, "w") as f:
                    json.dump({"calibration": {"data": calibration, "block_samples": 2048}, "passes": passes}, f)
                package = os.path.join(work, "%s-%s.moepkg" % (fixture, label))
                summary = json.loads(run(moec, "compress", model, "--recipe", recipe, "-o", package))
                print(json.dumps({"fixture": fixture, "config": label, "perplexity": evaluate(package),
                                  "seconds": summary["seconds"]}), flush=True)

            def gptq(bits=None):
                options = {"method": "gptq", "group": 64, "targets": "experts"}
                if bits:
                    options["bits"] = bits
                return {"pass": "moe-quantize", "options": options}

            # Sequential GPTQ (moec compress: each layer calibrated on the
            # quantised layers before it), uniform and mixed.
            for bits in (4, 3, 2):
                compress("sequential-gptq-q%d-g64" % bits, [gptq(bits)])
            for budget in (2.5, 3.0):
                for granularity in ("expert", "micro-expert"):
                    compress("sequential-mixed-%s-%s-gptq-g64" % (granularity, budget),
                             [{"pass": "moe-allocate-bits", "options": {"budget": budget, "candidates": "2,3,4",
                                                                        "group": 64, "granularity": granularity}},
                              gptq()])
            for bits in (3, 4):
                compress("prune25-gptq-q%d-g64" % bits,
                         [{"pass": "moe-prune-experts", "options": {"method": "reconstruction", "ratio": 0.25}},
                          gptq(bits)])


if __name__ == "__main__":
    sys.exit(main())
