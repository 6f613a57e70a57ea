#!/usr/bin/env python3
"""Every example recipe on both fixtures: moec compress -> package -> GGUF;
moec evaluates the package and the GGUF file within 0.1% of each other.
Two recipes cannot be held exactly, and the export says so: dynamic skipping
is refused; per-expert mixed precision (gptq-mixed) gets one ggml type per
stacked tensor (a remark), within 1%. Recipes are rewritten with a small
calibration set to keep the test short.
Usage: gguf_recipes.py MOEC EXAMPLES_DIR DATA_DIR WORK_DIR"""
import json, os, subprocess, sys

moec, examples, data, work = sys.argv[1:5]
failures = 0
for name in sorted(os.listdir(examples)):
    if not name.endswith(".json"):
        continue  # the YAML form of a JSON recipe (ux.test checks they agree)
    recipe = json.load(open(os.path.join(examples, name)))
    calibration = recipe.get("calibration", {})
    if "data" in calibration:
        calibration["data"] = os.path.join(data, "brown", "calibration.jsonl")
        calibration["tokens"] = 1024
        if "block_samples" in calibration:
            calibration["block_samples"] = 256
    small = os.path.join(work, name)
    json.dump(recipe, open(small, "w"))
    for fixture in ["tiny-mixtral", "tiny-deepseek"]:
        base = os.path.join(work, f"{name[:-5]}-{fixture}")
        subprocess.run([moec, "compress", os.path.join(data, "fixtures", fixture), "--recipe", small,
                        "-o", base + ".moepkg"], check=True, capture_output=True)
        export = subprocess.run([moec, "export", base + ".moepkg", "--format", "gguf", "-o", base + ".gguf"],
                                capture_output=True, text=True)
        if name == "dynamic-skip.json":
            ok = export.returncode == 1 and "skips experts dynamically" in export.stderr
            print(f"{name} {fixture}: export refused: {ok}")
            failures += not ok
            continue
        if export.returncode != 0:
            print(f"{name} {fixture}: export failed: {export.stderr.strip()}")
            failures += 1
            continue
        ppl = []
        for model in [base + ".moepkg", base + ".gguf"]:
            out = subprocess.run([moec, "eval", model, "--data", os.path.join(data, "brown", "heldout.jsonl"),
                                  "--max-tokens", "512", "--json"], check=True, capture_output=True, text=True)
            ppl.append(json.loads(out.stdout)["perplexity"])
        difference = abs(ppl[1] - ppl[0]) / ppl[0]
        mixed = name == "gptq-mixed.json"
        said = "requantized to one" in export.stderr
        print(f"{name} {fixture}: package {ppl[0]:.4f} gguf {ppl[1]:.4f} difference {100 * difference:.4f}%"
              + (f" (mixed precision requantized, said: {said})" if mixed else ""))
        failures += difference > (1e-2 if mixed else 1e-3) or (mixed and not said)
print(f"{failures} failures")
sys.exit(1 if failures else 0)
