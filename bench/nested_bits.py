#!/usr/bin/env python3
"""Nested bit widths: one package, two memory budgets, on the bundled fixtures.

For each fixture: the routed experts quantised once, RTN 4-bit groups of 32
stored nested (`moe-quantize nested-bits=2`: the top two bits of each code a
2-bit matrix with fitted scales); `moec eval --max-memory` then loads a share
of the experts at 2 bits (those whose 2-bit values differ least from their
4-bit ones per byte saved). Against: plain 4-bit and 2-bit packages, and the
closest existing method at the same resident bytes, moe-allocate-bits
(MC-MoE's allocation over 2/4-bit experts from calibration) at the same
average width. `nested_cost_ppl`: the same budgets from a package quantised
with `nested-cost` (each expert's cost recorded from 32 K calibration tokens). Held-out perplexity over the whole split. Prints one JSON
object per line.
Usage: bench/nested_bits.py [BUILD_DIR]
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

from benchlib import CALIBRATION, HELDOUT, fixture_dir, run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    parser.add_argument("--low-shares", default="0.5,0.75")  # average expert width 3.0 and 2.5 bits
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    with tempfile.TemporaryDirectory() as work:

        def package(fixture, name, recipe):
            path = os.path.join(work, f"{fixture}-{name}.json")
            json.dump(recipe, open(path, "w"))
            out = os.path.join(work, f"{fixture}-{name}.moepkg")
            run(moec, "compress", fixture_dir(fixture), "--recipe", path, "-o", out)
            return out

        def perplexity(path, *extra):
            completed = subprocess.run([moec, "eval", path, "--data", HELDOUT, "--json", *extra], check=True,
                                       capture_output=True, text=True)
            stdout, stderr = completed.stdout, completed.stderr
            note = re.search(r"nested experts: (\d+) of (\d+) at their low bits; layer weights ([0-9.]+) MiB "
                             r"\(([0-9.]+) MiB at high bits\)", stderr)
            return json.loads(stdout)["perplexity"], note

        quantize = {"pass": "moe-quantize", "options": {"bits": 4, "group": 32}}
        for fixture in args.fixtures.split(","):
            nested = package(fixture, "nested", {"passes": [
                {"pass": "moe-quantize", "options": {"bits": 4, "group": 32, "nested-bits": 2}}]})
            plain4 = package(fixture, "q4", {"passes": [quantize]})
            plain2 = package(fixture, "q2", {"passes": [{"pass": "moe-quantize", "options": {"bits": 2, "group": 32}}]})
            costed = package(fixture, "nested-cost", {
                "calibration": {"data": CALIBRATION, "tokens": 32768},
                "passes": [{"pass": "moe-quantize", "options": {"bits": 4, "group": 32, "nested-bits": 2,
                                                                "nested-cost": True}}]})
            high, _ = perplexity(nested)
            q4, _ = perplexity(plain4)
            q2, _ = perplexity(plain2)
            low_ppl, all_low = perplexity(nested, "--max-memory", "1")
            experts = int(all_low.group(2))
            low_bytes, high_bytes = float(all_low.group(3)), float(all_low.group(4))
            row = {"fixture": fixture, "experts": experts, "nested_file_bytes": os.path.getsize(nested),
                   "q4_file_bytes": os.path.getsize(plain4), "q4_ppl": q4, "q2_ppl": q2,
                   "nested_high_ppl": high, "nested_low_ppl": low_ppl,
                   "layer_mib_high": high_bytes, "layer_mib_low": low_bytes, "budgets": []}
            for share in [float(s) for s in args.low_shares.split(",")]:
                # The budget that sends this share of the experts low (MiB, a little slack for rounding).
                budget = high_bytes - share * (high_bytes - low_bytes) + 0.001
                ppl, note = perplexity(nested, "--max-memory", f"{budget * 1048576:.0f}")
                cost_ppl, cost_note = perplexity(costed, "--max-memory", f"{budget * 1048576:.0f}")
                assert cost_note.group(1) == note.group(1), "the same number of experts low"
                bits = 4 - 2 * share
                allocated = package(fixture, f"alloc{bits}", {
                    "calibration": {"data": CALIBRATION, "tokens": 32768, "block_samples": 1024},
                    "passes": [{"pass": "moe-allocate-bits", "options": {"budget": bits, "candidates": "2,4",
                                                                          "group": 32}},
                               {"pass": "moe-quantize", "options": {"group": 32}}]})
                alloc_ppl, _ = perplexity(allocated)
                row["budgets"].append({"low_share": share, "average_bits": bits, "max_memory_mib": budget,
                                       "experts_low": int(note.group(1)), "layer_mib": float(note.group(3)),
                                       "nested_ppl": ppl, "nested_cost_ppl": cost_ppl,
                                       "allocate_bits_ppl": alloc_ppl})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
