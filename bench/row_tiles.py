#!/usr/bin/env python3
"""The engine from row tiles made at load against the stored rows, in one run.

Alternates `engine_throughput FILE --row-tiles yes|no` (same binary, same
weights) and prints one JSON object per model and thread count with the
medians and the ratios tiles / rows, for prefill and decode. Outside
`make check`; the files are the GGUF models bench/vs_llamacpp.sh caches.

  python3 bench/row_tiles.py BUILD_DIR MODEL.gguf|.moepkg... [--rounds N]
      [--prompt P] [--decode D] [--threads 1,2]
"""
import argparse
import json
import os
import statistics
import subprocess


def run(build, path, tiles, threads, prompt, decode):
    out = subprocess.run([os.path.join(build, "bench", "engine_throughput"), path, "--prompt", str(prompt),
                          "--decode", str(decode), "--threads", str(threads), "--decode-start", "empty",
                          "--bandwidth", "no", "--row-tiles", "yes" if tiles else "no"],
                         check=True, capture_output=True, text=True).stdout
    record = json.loads(out)
    return record["prefill_tokens_per_second"], record["decode_tokens_per_second"], record["peak_rss_bytes"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    for path in args.models:
        for threads in [int(t) for t in args.threads.split(",")]:
            samples = {True: [], False: []}
            for _ in range(args.rounds):
                for tiles in (True, False):
                    samples[tiles].append(run(args.build, path, tiles, threads, args.prompt, args.decode))
            row = {"bench": "row_tiles", "model": os.path.basename(path), "threads": threads,
                   "rounds": args.rounds, "prompt": args.prompt, "decode": args.decode}
            for tiles, name in ((True, "tiles"), (False, "rows")):
                row[f"{name}_prefill_tokens_per_s"] = statistics.median(s[0] for s in samples[tiles])
                row[f"{name}_decode_tokens_per_s"] = statistics.median(s[1] for s in samples[tiles])
                row[f"{name}_peak_rss_bytes"] = max(s[2] for s in samples[tiles])
            for phase in ("prefill", "decode"):
                row[f"tiles_vs_rows_{phase}"] = (row[f"tiles_{phase}_tokens_per_s"] /
                                                 row[f"rows_{phase}_tokens_per_s"])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
