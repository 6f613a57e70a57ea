#!/usr/bin/env python3
"""Expert-parallel sequential GPTQ over MPI ranks (issue 19, item 4): the same
`moec compress` (GPTQ q4_g128 of the routed experts) of a synthetic model with
many experts run as 1, 2 and 4 processes on this machine (`mpirun -n N
--oversubscribe`, shared memory, one thread per rank), with the time, rank
0's peak RSS, and whether the package is byte-identical to the single-process
one.
Random weights and random calibration ids: this measures cost, not quality.

Prints one JSON object per line.
Usage: bench/gptq_scaling.py BUILD_DIR [CONFIG] [TOKENS] [RANKS...]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import HERE


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    config = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "configs", "mixtral-16experts-4layers.json")
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    ranks = [int(n) for n in sys.argv[4:]] or [1, 2, 4]
    moec = os.path.abspath(os.path.join(build, "tools", "moec"))
    synth = os.path.abspath(os.path.join(build, "tools", "moec-synth"))
    mpirun = shutil.which("mpirun")
    if not mpirun:
        sys.exit("gptq_scaling.py: mpirun not found (Debian: openmpi-bin)")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "model")
        subprocess.run([synth, "--config", config, "-o", model], check=True, capture_output=True)
        spec = json.load(open(os.path.join(model, "config.json")))
        vocab = spec["vocab_size"]
        ids = os.path.join(work, "ids.u32")
        state, data = 12345, bytearray()
        for _ in range(tokens + 1):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            data += ((state >> 33) % vocab).to_bytes(4, "little")
        open(ids, "wb").write(data)
        recipe = os.path.join(work, "gptq.json")
        json.dump({"calibration": {"data": ids, "tokens": tokens},
                   "passes": [{"pass": "moe-quantize", "options": {"method": "gptq", "bits": 4, "group": 128}}]},
                  open(recipe, "w"))
        reference = None
        for n in ranks:
            package = os.path.join(work, "q%d.moepkg" % n)
            command = [moec, "compress", model, "--recipe", recipe, "-o", package, "-q", "--threads", "1"]
            if n > 1:
                command = [mpirun, "-n", str(n), "--oversubscribe", "--mca", "btl", "self,vader"] + command
            start = time.time()
            out = subprocess.run(command, check=True, capture_output=True, text=True,
                                 env=env)
            seconds = time.time() - start
            summary = json.loads(out.stdout)
            sequential = [p for p in summary["passes"] if "sequential" in p][0]["sequential"]
            body = open(package, "rb").read()
            reference = reference if reference is not None else body
            experts = sum(spec.get(k, 0) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
            print(json.dumps({"config": os.path.basename(config), "tokens": tokens, "ranks": n, "threads_per_rank": 1,
                              "seconds": seconds, "quantize_seconds": sequential["quantize_seconds"],
                              "rank0_peak_rss_bytes": sequential["peak_rss_bytes"],
                              "expert_matrices": 3 * experts * spec["num_hidden_layers"],
                              "identical_to_one_process": body == reference}), flush=True)


if __name__ == "__main__":
    main()
