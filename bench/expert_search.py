#!/usr/bin/env python3
"""EEP's pruning search (`moec search`) on the bundled fixtures, at two budgets.

For each fixture and ratio: search on the calibration split (fitness: the
engine's mean loss on --tokens per genre), replay the recipe with
`moec compress`, and evaluate the package on the whole held-out split, as the
expert-quality table in BENCHMARKS.md does. Prints one JSON object per line.
Usage: bench/expert_search.py [BUILD_DIR] [--tokens N] [--evaluations N]
"""
import argparse
import json
import math
import os
import re
import tempfile
import time

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11450)
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    calibration = CALIBRATION
    heldout = HELDOUT
    with tempfile.TemporaryDirectory() as work:
        for fixture in args.fixtures.split(","):
            model = fixture_dir(fixture)
            for ratio in args.ratios.split(","):
                recipe = os.path.join(work, f"{fixture}-{ratio}.json")
                start = time.time()
                out = run(moec, "search", model, "--data", calibration, "--ratio", ratio, "--max-tokens",
                          str(args.tokens), "--evaluations", str(args.evaluations), "--seed", str(args.seed),
                          "-o", recipe)
                seconds = time.time() - start
                line = [l for l in out.splitlines() if l.startswith("searched")][0]
                # "best loss B (...); most-routed experts kept F (...); original O (...)"
                best, frequency, original = [float(x) for x in re.findall(r"([0-9]+\.[0-9]{6})", line)][:3]
                package = os.path.join(work, f"{fixture}-{ratio}.moepkg")
                run(moec, "compress", model, "--recipe", recipe, "-o", package)
                heldout_ppl = json.loads(run(moec, "eval", package, "--data", heldout, "--json"))["perplexity"]
                print(json.dumps({"fixture": fixture, "ratio": float(ratio), "search_seconds": round(seconds, 1),
                                  "evaluations": args.evaluations, "tokens_per_genre": args.tokens,
                                  "search_ppl": math.exp(best), "frequency_search_ppl": math.exp(frequency),
                                  "original_search_ppl": math.exp(original), "heldout_ppl": heldout_ppl,
                                  "dropped": json.load(open(recipe))["passes"][0]["options"]["experts"]}), flush=True)


if __name__ == "__main__":
    main()
