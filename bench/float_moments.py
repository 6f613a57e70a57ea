#!/usr/bin/env python3
"""Do float moments, or float GPTQ arithmetic, change GPTQ's result? (issue
19, item 1.) Sequential GPTQ (`moec compress`) of the routed experts at 2, 3
and 4 bits (groups of 64) on both fixtures, four ways: everything in double
(the default, "f64"); the experts' input moments accumulated in float
(calibration "moments": "f32", half the memory: "f32"); GPTQ's
factorisation and updates in float (moe-quantize precision=f32, about
twice the rate: "gptq_f32"); both ("all_f32", what AutoGPTQ does). For
each: held-out perplexity and KL divergence against the original model
(moec eval --compare).

Prints one JSON object per line. Usage: bench/float_moments.py BUILD_DIR [TOKENS]
"""
import json
import os
import sys
import tempfile

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
    moec = os.path.join(build, "tools", "moec")
    heldout = HELDOUT
    calibration = CALIBRATION
    with tempfile.TemporaryDirectory() as work:
        for fixture in ("tiny-mixtral", "tiny-deepseek"):
            model = fixture_dir(fixture)
            for bits in (4, 3, 2):
                record = {"fixture": fixture, "bits": bits, "group": 64, "calibration_tokens": tokens}
                for name, moments, precision in (("f64", "f64", "f64"), ("f32", "f32", "f64"),
                                                 ("gptq_f32", "f64", "f32"), ("all_f32", "f32", "f32")):
                    recipe = os.path.join(work, "r.json")
                    json.dump({"calibration": {"data": calibration, "tokens": tokens, "moments": moments},
                               "passes": [{"pass": "moe-quantize",
                                           "options": {"method": "gptq", "bits": bits, "group": 64,
                                                       "precision": precision}}]},
                              open(recipe, "w"))
                    package = os.path.join(work, "%s-%d-%s.moepkg" % (fixture, bits, name))
                    run(moec, "compress", model, "--recipe", recipe, "-o", package, "-q")
                    result = json.loads(run(moec, "eval", package, "--data", heldout, "--compare", model, "--json"))
                    record["perplexity_" + name] = result["perplexity"]
                    record["kl_" + name] = result["compare"]["kl_mean"]
                record["perplexity_change_percent"] = 100 * (record["perplexity_f32"] / record["perplexity_f64"] - 1)
                record["gptq_f32_change_percent"] = 100 * (record["perplexity_gptq_f32"] / record["perplexity_f64"] - 1)
                record["all_f32_change_percent"] = 100 * (record["perplexity_all_f32"] / record["perplexity_f64"] - 1)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
