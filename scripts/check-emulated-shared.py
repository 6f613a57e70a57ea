#!/usr/bin/env python3
"""Checks that every __shared__ variable of the emulated CUDA kernels lies in
the section the CPU emulation poisons at each block's start.

kernels/cuda/emulation/CudaEmulation.h makes __shared__ a function-local
static in the section `moec_emulated_shared`, which the emulation fills with
0xFF bytes before every block, as a GPU leaves shared memory undefined. GCC
ignores the section attribute on a static of a function template (it goes to
.bss unpoisoned, silently), so a template kernel or helper with shared memory
would escape the check. Every writable function-local static of the emulated
kernels (namespace moe::cuda_emulated) is shared memory, since CUDA device
code has no other kind; this lists those outside the section (any section
but read-only data and code).

Usage: check-emulated-shared.py ARCHIVE_OR_OBJECT...
"""

import re
import subprocess
import sys

SECTION = "moec_emulated_shared"
VISIBILITY = re.compile(r"^\.(hidden|protected|internal) ")
READ_ONLY = (".rodata", ".data.rel.ro", ".text")
SYMBOL = re.compile(r"^[0-9a-f]+ (?P<flags>.{7}) (?P<section>\S+)\t[0-9a-f]+ (?P<name>.*)$")


def main(paths):
    if not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        table = subprocess.run(["objdump", "-t", "-C", *paths], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"check-emulated-shared: cannot read the symbols of {' '.join(paths)}: {error}", file=sys.stderr)
        return 2
    inside, outside = [], []
    for line in table.splitlines():
        # objdump -t: VALUE, seven flag columns, SECTION, a tab, SIZE and NAME.
        match = SYMBOL.match(line)
        if not match or "O" not in match["flags"]:
            continue
        section, name = match["section"], match["name"]
        # A visibility other than the default comes before the name.
        name = VISIBILITY.sub("", name)
        if not name.startswith("moe::cuda_emulated::") or ")::" not in name:
            continue  # not a function-local static of the emulated kernels
        if section == SECTION:
            inside.append((section, name))
        elif not section.startswith(READ_ONLY):
            outside.append((section, name))
    for section, name in outside:
        print(f"check-emulated-shared: {name} lies in {section}, not {SECTION}: its shared memory is never "
              "poisoned (declare it in a kernel or a plain function, not a template)", file=sys.stderr)
    if not inside:
        print(f"check-emulated-shared: no shared memory found in {SECTION} of {' '.join(paths)}: "
              "the check reads nothing", file=sys.stderr)
        return 1
    print(f"check-emulated-shared: {len(inside)} shared variables in {SECTION}, {len(outside)} outside")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
