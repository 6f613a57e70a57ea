#!/usr/bin/env python3
"""Checks that no folder of moec uses one above it (docs/DESIGN.md, "Floors").

Two kinds of arrows are read: `#include "..."` lines of every source and
header under a floor, resolved to the floor whose include root holds the
header, and the libraries each CMake target links (`target_link_libraries`
and the MLIR helpers' LINK_LIBS), resolved to the floor that defines them.
An arrow from a floor to a higher one is an error. Prints the arrows between
floors (`--graph`) or only the violations; exits 1 when there are any.

Usage: scripts/check-layering.py [--graph] [REPO]
"""
import os
import re
import sys

FLOORS = ["support", "frontend", "kernels", "runtime", "calibration", "compiler", "passes", "tools"]
RANK = {name: i for i, name in enumerate(FLOORS)}
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".td")


def include_roots(repo):
    """(root directory, floor) pairs that quoted includes resolve against."""
    roots = []
    for floor in FLOORS:
        include = os.path.join(repo, floor, "include")
        if os.path.isdir(include):
            roots.append((include, floor))
    roots.append((os.path.join(repo, "kernels"), "kernels"))  # "common/QuantFormat.h", "cpu/...", "cuda/..."
    return roots


def floor_of_include(header, including_dir, roots):
    local = os.path.join(including_dir, header)
    if os.path.exists(local):
        return None  # beside the including file: the same floor
    for root, floor in roots:
        if os.path.exists(os.path.join(root, header)):
            return floor
    return None  # generated (.inc) or a system header


def source_files(repo, floor):
    for directory, _, files in os.walk(os.path.join(repo, floor)):
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                yield os.path.join(directory, name)


def cmake_targets(repo):
    """target name -> floor, and (floor, target, linked libraries) per CMakeLists."""
    defined, links = {}, []
    define = re.compile(r"(?:add_library|add_executable|add_llvm_executable|add_mlir_library|"
                        r"add_mlir_dialect_library)\(\s*([A-Za-z0-9_\-]+)")
    for floor in FLOORS:
        for directory, _, files in os.walk(os.path.join(repo, floor)):
            if "CMakeLists.txt" not in files:
                continue
            text = open(os.path.join(directory, "CMakeLists.txt")).read()
            text = re.sub(r"#[^\n]*", "", text)
            for match in define.finditer(text):
                defined[match.group(1)] = floor
            for match in re.finditer(r"target_link_libraries\(\s*([A-Za-z0-9_\-]+)([^)]*)\)", text):
                links.append((floor, match.group(1), match.group(2).split()))
            for match in re.finditer(r"add_mlir(?:_dialect)?_library\(\s*([A-Za-z0-9_\-]+)(.*?)\n\)", text, re.S):
                body = match.group(2)
                if "LINK_LIBS" in body:
                    libraries = body.split("LINK_LIBS", 1)[1].split()
                    links.append((floor, match.group(1), libraries))
    return defined, links


def main():
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    repo = os.path.abspath(arguments[0] if arguments else os.path.join(os.path.dirname(__file__), ".."))
    roots = include_roots(repo)
    arrows, violations = {}, []
    for floor in FLOORS:
        for path in source_files(repo, floor):
            for number, line in enumerate(open(path, errors="replace"), 1):
                match = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
                if not match:
                    continue
                target = floor_of_include(match.group(1), os.path.dirname(path), roots)
                if target is None or target == floor:
                    continue
                arrows[(floor, target)] = arrows.get((floor, target), 0) + 1
                if RANK[target] > RANK[floor]:
                    violations.append(f"{os.path.relpath(path, repo)}:{number}: includes {match.group(1)} "
                                      f"from {target}/, a floor above {floor}/")
    defined, links = cmake_targets(repo)
    for floor, target, libraries in links:
        for library in libraries:
            other = defined.get(library)
            if other is None or other == floor:
                continue
            arrows[(floor, other)] = arrows.get((floor, other), 0) + 1
            if RANK[other] > RANK[floor]:
                violations.append(f"{floor}/CMakeLists.txt: {target} links {library} from {other}/, "
                                  f"a floor above {floor}/")
    if "--graph" in sys.argv:
        for (source, target), count in sorted(arrows.items(), key=lambda a: (RANK[a[0][0]], RANK[a[0][1]])):
            print(f"{source} -> {target} ({count})")
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} arrows run up a floor; floors bottom up: {', '.join(FLOORS)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
