#!/usr/bin/env python3
"""Task-adaptive expert sets (PreMoe's retrieval) on the bundled fixtures.

Tasks are four Brown genre groups (press, fiction, learned, general). For each
fixture, scoring method (PreMoe's TCESS and frequency) and budget (25% and 50%
of each MoE layer's experts removed): one package with a pruned set per task
(`moe-prune-experts` with "tasks", each calibrated on the task's calibration
documents) and one generic package pruned the same way on the whole
calibration split (the same number of experts kept). Each genre group's
held-out documents are evaluated with the task's own set (`--task NAME`),
with retrieval (`--task auto`, one set per 256-token window from its first
64 tokens, by PreMoe's first-layer signature and by every layer's) and with
the generic package. Also: how often retrieval picked the window's own task,
and the layer weight bytes a set loads against all experts.

Prints one JSON object per line. Usage: bench/task_sets.py BUILD_DIR
"""
import argparse
import json
import os
import tempfile

from benchlib import DATA, CALIBRATION, fixture_dir, run

TASKS = {
    "press": {"press-reportage", "press-editorial", "press-reviews"},
    "fiction": {"general-fiction", "mystery", "science-fiction", "adventure", "romance", "humour"},
    "learned": {"learned", "government"},
    "general": {"belles-lettres", "popular-lore", "religion", "skills-hobbies"},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    parser.add_argument("--methods", default="tcess,frequency")
    parser.add_argument("--ratios", default="0.25,0.5")
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    with tempfile.TemporaryDirectory() as work:
        for split in ("calibration", "heldout"):
            docs = [json.loads(line) for line in open(os.path.join(DATA, "brown", split + ".jsonl"))]
            for task, genres in TASKS.items():
                with open(os.path.join(work, "%s-%s.jsonl" % (task, split)), "w") as out:
                    out.writelines(json.dumps(d) + "\n" for d in docs if d["domain"] in genres)

        def evaluate(model, data, *extra):
            return json.loads(run(moec, "eval", model, "--data", data, "--json", *extra))

        for fixture in args.fixtures.split(","):
            model = fixture_dir(fixture)
            original = {t: evaluate(model, os.path.join(work, t + "-heldout.jsonl"))["perplexity"] for t in TASKS}
            print(json.dumps({"fixture": fixture, "method": "original", "perplexity": original}), flush=True)
            for method in args.methods.split(","):
                for ratio in (float(r) for r in args.ratios.split(",")):
                    prune = {"pass": "moe-prune-experts", "options": {"method": method, "ratio": ratio}}
                    tasks = dict(prune, tasks=[{"name": t, "data": os.path.join(work, t + "-calibration.jsonl")}
                                               for t in TASKS])
                    generic = {"calibration": {"data": CALIBRATION},
                               "passes": [prune]}
                    paths = {}
                    for label, recipe in (("tasks", {"passes": [tasks]}), ("generic", generic)):
                        path = os.path.join(work, "%s-%s-%s-%s" % (fixture, method, ratio, label))
                        with open(path + ".json", "w") as out:
                            json.dump(recipe, out)
                        run(moec, "compress", model, "--recipe", path + ".json", "-o", path + ".moepkg")
                        paths[label] = path + ".moepkg"
                    record = {"fixture": fixture, "method": method, "ratio": ratio, "own": {}, "auto": {},
                              "auto_all_layers": {}, "generic": {}, "retrieved_own": {},
                              "retrieved_own_all_layers": {}}
                    for task in TASKS:
                        data = os.path.join(work, task + "-heldout.jsonl")
                        own = evaluate(paths["tasks"], data, "--task", task)
                        record["own"][task] = own["perplexity"]
                        record["generic"][task] = evaluate(paths["generic"], data)["perplexity"]
                        for key, scope in (("", "first"), ("_all_layers", "all")):
                            auto = evaluate(paths["tasks"], data, "--task", "auto", "--task-signature", scope)
                            record["auto" + key][task] = auto["perplexity"]
                            windows = auto["task"]["windows"]
                            record["retrieved_own" + key][task] = windows.get(task, 0) / sum(windows.values())
                        record["set_layer_bytes"] = own["layer_weight_bytes"]
                    record["all_layer_bytes"] = evaluate(paths["tasks"], data, "--task", "all",
                                                         "--max-tokens", "256")["layer_weight_bytes"]
                    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
