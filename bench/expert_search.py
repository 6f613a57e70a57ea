#!/usr/bin/env python3
"""EEP's search (`moec search`) on the bundled fixtures, at two budgets.

For each fixture and ratio: search on the calibration split (fitness: the
engine's mean loss on --tokens per genre), replay the recipe with
`moec compress`, and evaluate the package on the whole held-out split, as the
expert-quality table in BENCHMARKS.md does. With --merge-evaluations N the
search runs EEP's merge stage after pruning, and the pruning stage's own
keep-set (the recipe's moe-drop-experts alone) is evaluated too.
Prints one JSON object per line.
Usage: bench/expert_search.py [BUILD_DIR] [--tokens N] [--evaluations N] [--merge-evaluations N]
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
    parser.add_argument("--merge-evaluations", type=int, default=0)
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
                          str(args.tokens), "--evaluations", str(args.evaluations), "--merge-evaluations",
                          str(args.merge_evaluations), "--seed", str(args.seed), "-o", recipe)
                seconds = time.time() - start
                line = [l for l in out.splitlines() if l.startswith("searched")][0]
                # "best loss B (...); most-routed experts kept F (...); original O (...)"
                best, frequency, original = [float(x) for x in re.findall(r"([0-9]+\.[0-9]{6})", line)][:3]
                package = os.path.join(work, f"{fixture}-{ratio}.moepkg")
                run(moec, "compress", model, "--recipe", recipe, "-o", package)
                heldout_ppl = json.loads(run(moec, "eval", package, "--data", heldout, "--json"))["perplexity"]
                passes = json.load(open(recipe))["passes"]
                result = {"fixture": fixture, "ratio": float(ratio), "search_seconds": round(seconds, 1),
                          "evaluations": args.evaluations, "merge_evaluations": args.merge_evaluations,
                          "tokens_per_genre": args.tokens, "search_ppl": math.exp(best),
                          "frequency_search_ppl": math.exp(frequency), "original_search_ppl": math.exp(original),
                          "heldout_ppl": heldout_ppl, "dropped": passes[-1]["options"]["experts"],
                          "mixed_experts": 0}
                if args.merge_evaluations > 0:
                    merge = [l for l in out.splitlines() if l.startswith("merge stage")][0]
                    result["pruning_search_ppl"] = math.exp(float(re.findall(r"([0-9]+\.[0-9]{6})", merge)[0]))
                    pruned = os.path.join(work, f"{fixture}-{ratio}-pruned.json")
                    json.dump({"passes": passes[-1:]}, open(pruned, "w"))
                    pruned_package = os.path.join(work, f"{fixture}-{ratio}-pruned.moepkg")
                    run(moec, "compress", model, "--recipe", pruned, "-o", pruned_package)
                    result["pruning_heldout_ppl"] = json.loads(
                        run(moec, "eval", pruned_package, "--data", heldout, "--json"))["perplexity"]
                    if passes[0]["pass"] == "moe-mix-experts":
                        result["mixed_experts"] = passes[0]["options"]["mix"].count("=")
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
