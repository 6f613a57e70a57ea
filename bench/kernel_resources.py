#!/usr/bin/env python3
"""What each CUDA kernel asks of a multiprocessor, as ptxas reports it.

Without a GPU a kernel's speed cannot be measured, but what bounds its
occupancy can: registers per thread, static shared memory, and whether
ptxas spilled registers to local memory (slow loads in a kernel's loop).
This compiles each source with `nvcc -cubin -Xptxas -v` for each target and
prints one JSON object: every kernel's registers, shared memory, stack and
spill bytes, by target. With --no-spills it exits 1, naming them, if any
kernel spills (the ctest `kernels.NoKernelSpills` runs it so).

  python3 bench/kernel_resources.py --nvcc NVCC [--arch sm_90]... \
      [--include DIR]... [--no-spills] SOURCE.cu...
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def kernels_of(report, source):
    """The entries of one ptxas -v report: a dict per kernel."""
    found, current = [], None
    for line in report.splitlines():
        entry = ENTRY.search(line)
        if entry:
            current = {"source": source, "mangled": entry.group(1), "arch": entry.group(2), "registers": None,
                       "smem_bytes": 0, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0}
            found.append(current)
            continue
        if current is None:
            continue
        frame = FRAME.search(line)
        if frame:
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(
                int, frame.groups())
            continue
        used = USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            current["smem_bytes"] = int(used.group(2) or 0)
            current = None  # the report's last line about this entry
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvcc", required=True)
    parser.add_argument("--arch", action="append", help="sm_XX (default sm_80 and sm_90)")
    parser.add_argument("--include", action="append", default=[])
    parser.add_argument("--no-spills", action="store_true", help="exit 1 if any kernel spills")
    parser.add_argument("sources", nargs="+")
    args = parser.parse_args()
    arches = args.arch or ["sm_80", "sm_90"]
    for arch in arches:
        if not re.fullmatch(r"sm_\d+a?", arch):
            parser.error(f"--arch {arch}: expected sm_ and a number, as sm_90")
    for source in args.sources:
        if not os.path.isfile(source):
            parser.error(f"{source}: no such file")
    kernels = []
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources:
            for arch in arches:
                command = [args.nvcc, "-O3", "-DNDEBUG", "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
                           "-o", os.path.join(scratch, "out.cubin")]
                command += [f"-I{d}" for d in args.include] + [source]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.stderr.write(f"kernel_resources: {' '.join(command)} failed:\n{done.stderr}")
                    return 1
                found = kernels_of(done.stderr + done.stdout, os.path.basename(source))
                if not found:
                    sys.stderr.write(f"kernel_resources: ptxas reported no kernel of {source} for {arch}\n")
                    return 1
                kernels += found
    names = demangle(sorted({k["mangled"] for k in kernels}))
    for k in kernels:
        k["kernel"] = names[k.pop("mangled")]
        if k["registers"] is None:
            sys.stderr.write(f"kernel_resources: no register count for {k['kernel']} ({k['arch']})\n")
            return 1
    spilling = [f"{k['kernel']} ({k['arch']}): {k['spill_store_bytes']} bytes stored, "
                f"{k['spill_load_bytes']} loaded" for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]]
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(json.dumps({"nvcc": version[-1] if version else "", "arches": arches, "kernels": kernels,
                      "spilling": spilling}, indent=1))
    if args.no_spills and spilling:
        sys.stderr.write("kernel_resources: kernels that spill registers:\n  " + "\n  ".join(spilling) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
