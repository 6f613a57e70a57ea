#!/usr/bin/env python3
"""Quality of every expert-level compression method on the bundled fixtures.

For each fixture: held-out perplexity (overall and per genre) of the original
model and of every method at 25% and 50% fewer routed-expert parameters,
calibrated on the calibration split (training documents ending in 1; never
the held-out documents), each compressed module evaluated directly by
`moec eval`; dynamic skipping at two quantiles; and calibration on one genre
group vs generic calibration with the same number of tokens, evaluated on
that group (the EASY-EP / PreMoe claim).

Prints one JSON object per line; with --markdown FILE also writes the tables
that BENCHMARKS.md holds. Usage: bench/expert_quality.py BUILD_DIR [--markdown FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import HELDOUT, CALIBRATION, fixture_dir, run

FICTION = {"general-fiction", "mystery", "science-fiction", "adventure", "romance", "humour"}

# (label, pass pipeline template); {stats} and {r} are filled in.
METHODS = [
    ("prune frequency", "moe-prune-experts{{stats={stats} method=frequency ratio={r}}}"),
    ("prune gate-weight", "moe-prune-experts{{stats={stats} method=gate-weight ratio={r}}}"),
    ("prune easy-ep", "moe-prune-experts{{stats={stats} method=easy-ep ratio={r}}}"),
    ("prune tcess", "moe-prune-experts{{stats={stats} method=tcess ratio={r}}}"),
    ("prune reconstruction (NAEE)", "moe-prune-experts{{stats={stats} method=reconstruction ratio={r}}}"),
    ("merge msmoe", "moe-merge-experts{{stats={stats} method=msmoe ratio={r}}}"),
    ("merge msmoe + permutation", "moe-merge-experts{{stats={stats} method=msmoe ratio={r} align=permutation}}"),
    ("merge dern", "moe-merge-experts{{stats={stats} method=dern ratio={r}}}"),
    ("atoms magnitude", "moe-prune-atoms{{method=magnitude ratio={r}}}"),
    ("atoms camera", "moe-prune-atoms{{stats={stats} method=camera ratio={r}}}"),
    ("atoms camera-sum (global)", "moe-prune-atoms{{stats={stats} method=camera-sum ratio={r} scope=global}}"),
    ("atoms heapr (global)", "moe-prune-atoms{{stats={stats} method=heapr ratio={r} scope=global}}"),
    ("atoms heapr (layer)", "moe-prune-atoms{{stats={stats} method=heapr ratio={r} scope=layer}}"),
]


def write_subset(source, target, keep):
    with open(source) as f, open(target, "w") as out:
        for line in f:
            if keep(json.loads(line)["domain"]):
                out.write(line)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--markdown")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    heldout = HELDOUT
    calibration = CALIBRATION
    results = []
    with tempfile.TemporaryDirectory() as work:
        def evaluate(model, data=heldout):
            return json.loads(run(moec, "eval", model, "--data", data, "--json"))

        def emit(record):
            results.append(record)
            print(json.dumps(record), flush=True)

        fiction_cal = os.path.join(work, "fiction-calibration.jsonl")
        fiction_heldout = os.path.join(work, "fiction-heldout.jsonl")
        write_subset(calibration, fiction_cal, lambda d: d in FICTION)
        write_subset(heldout, fiction_heldout, lambda d: d in FICTION)
        for fixture in args.fixtures.split(","):
            model = fixture_dir(fixture)
            stats = os.path.join(work, fixture + ".stats.safetensors")
            start = time.time()
            run(moec, "calibrate", model, "--data", calibration, "--block-samples", "2048", "--gradients",
                "-o", stats)
            calibration_seconds = time.time() - start
            module = os.path.join(work, fixture + ".mlir")
            run(moec, "import", model, "-o", module)
            original = evaluate(model)
            emit({"fixture": fixture, "method": "original", "ratio": 0, "perplexity": original["perplexity"],
                  "experts_per_token": original["experts_per_token"],
                  "domains": {k: v["perplexity"] for k, v in original["domains"].items()},
                  "calibration_seconds": calibration_seconds})
            for ratio in (0.25, 0.5):
                for label, template in METHODS:
                    out = os.path.join(work, "%s-%s-%s.mlir" % (fixture, label.replace(" ", "_"), ratio))
                    start = time.time()
                    try:
                        run(moec, "opt", module, "--pipeline", template.format(stats=stats, r=ratio), "-o", out)
                    except subprocess.CalledProcessError as error:
                        emit({"fixture": fixture, "method": label, "ratio": ratio, "error": error.stderr.strip()})
                        continue
                    seconds = time.time() - start
                    result = evaluate(out)
                    emit({"fixture": fixture, "method": label, "ratio": ratio, "perplexity": result["perplexity"],
                          "experts_per_token": result["experts_per_token"], "pass_seconds": seconds,
                          "domains": {k: v["perplexity"] for k, v in result["domains"].items()}})
            for quantile in (0.5, 0.8):
                out = os.path.join(work, "%s-skip-%s.mlir" % (fixture, quantile))
                run(moec, "opt", module, "--pipeline",
                    "moe-dynamic-skip{stats=%s quantile=%s}" % (stats, quantile), "-o", out)
                result = evaluate(out)
                emit({"fixture": fixture, "method": "dynamic-skip q=%s" % quantile, "ratio": 0,
                      "perplexity": result["perplexity"], "experts_per_token": result["experts_per_token"],
                      "domains": {k: v["perplexity"] for k, v in result["domains"].items()}})
            # Genre-group calibration vs generic calibration with as many tokens.
            fiction_stats = os.path.join(work, fixture + ".fiction.safetensors")
            line = run(moec, "calibrate", model, "--data", fiction_cal, "-o", fiction_stats)
            tokens = int(line.split()[1])
            generic_stats = os.path.join(work, fixture + ".generic.safetensors")
            run(moec, "calibrate", model, "--data", calibration, "--tokens", str(tokens), "-o", generic_stats)
            base = evaluate(model, fiction_heldout)["perplexity"]
            emit({"fixture": fixture, "method": "original", "eval": "fiction", "perplexity": base})
            for method in ("easy-ep", "gate-weight", "frequency"):
                for source, path in (("fiction", fiction_stats), ("generic", generic_stats)):
                    out = os.path.join(work, "%s-%s-%s.mlir" % (fixture, method, source))
                    run(moec, "opt", module, "--pipeline",
                        "moe-prune-experts{stats=%s method=%s ratio=0.25}" % (path, method), "-o", out)
                    emit({"fixture": fixture, "method": method, "ratio": 0.25, "calibration": source,
                          "calibration_tokens": tokens, "eval": "fiction",
                          "perplexity": evaluate(out, fiction_heldout)["perplexity"]})
    if args.markdown:
        write_markdown(results, args.markdown)


def write_markdown(results, path):
    lines = []
    fixtures = sorted({r["fixture"] for r in results}, reverse=True)
    for fixture in fixtures:
        rows = [r for r in results if r["fixture"] == fixture and "eval" not in r]
        original = next(r for r in rows if r["method"] == "original")
        lines.append("**%s** (original: %.2f; calibration %.1f s)\n" %
                     (fixture, original["perplexity"], original["calibration_seconds"]))
        lines.append("| method | 25% fewer expert params | 50% fewer expert params |")
        lines.append("|---|---|---|")
        for label, _ in METHODS:
            cells = []
            for ratio in (0.25, 0.5):
                r = next((r for r in rows if r["method"] == label and r["ratio"] == ratio), None)
                cells.append("error" if r is None or "error" in r else "%.2f" % r["perplexity"])
            lines.append("| %s | %s | %s |" % (label, cells[0], cells[1]))
        for r in rows:
            if r["method"].startswith("dynamic-skip"):
                lines.append("| %s (%.2f experts/token) | %.2f | |" % (r["method"], r["experts_per_token"], r["perplexity"]))
        lines.append("")
        genres = sorted(original["domains"])
        lines.append("| method | ratio | " + " | ".join(genres) + " |")
        lines.append("|---|---|" + "---|" * len(genres))
        for r in rows:
            if "domains" in r:
                lines.append("| %s | %s | " % (r["method"], r["ratio"]) +
                             " | ".join("%.1f" % r["domains"][g] for g in genres) + " |")
        lines.append("")
        group = [r for r in results if r["fixture"] == fixture and r.get("eval") == "fiction"]
        base = next(r for r in group if r["method"] == "original")
        lines.append("Fiction held-out (original %.2f), 25%% of experts pruned:\n" % base["perplexity"])
        lines.append("| method | fiction calibration | generic calibration (same tokens) |")
        lines.append("|---|---|---|")
        for method in ("easy-ep", "gate-weight", "frequency"):
            f = next(r for r in group if r["method"] == method and r["calibration"] == "fiction")
            g = next(r for r in group if r["method"] == method and r["calibration"] == "generic")
            lines.append("| %s | %.2f | %.2f |" % (method, f["perplexity"], g["perplexity"]))
        lines.append("")
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
