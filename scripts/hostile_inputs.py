#!/usr/bin/env python3
"""A round of generated bad inputs through the moec tools (issue 13's check).

For every file kind the tools read (config.json, tokenizer.json, packages,
modules, weight stores, recipes, data files) it writes mutated copies of a
good file (truncations, bit flips, edited JSON fields) and runs the tool
that reads it. Every run must end in time with exit code 0 (the input was
still acceptable) or 1..127 with a message on stderr; a signal, a hang
(timeout), an exit code above 127 or a silent failure is reported. Prints
one JSON line per file kind and exits 1 when anything was not clean.

Usage: scripts/hostile_inputs.py BUILD_DIR [--rounds N] [--seed S]
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURE = os.path.join(ROOT, "tests/data/fixtures/tiny-mixtral")
HELDOUT = os.path.join(ROOT, "tests/data/brown/heldout.jsonl")


def run(cmd, timeout=60):
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", b""
    if p.returncode < 0:
        return f"signal {-p.returncode}", p.stderr
    if p.returncode > 127:
        return f"exit {p.returncode}", p.stderr
    if p.returncode != 0 and not p.stderr.strip():
        return "silent failure", p.stderr
    return ("ok" if p.returncode == 0 else "rejected"), p.stderr


def flip(data, rng, count):
    data = bytearray(data)
    for _ in range(count):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def json_mutations(value, rng):
    """A copy of `value` with one field replaced by a hostile value."""
    hostile = [-1, 0, 2**31 - 1, 2**63 - 1, -(2**40), 1e308, -1e308, 0.0, "", "x" * 3, None, [], {}, True, 1.5]
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v[:8]):
                walk(x, path + [i])

    walk(value, [])
    path = rng.choice(paths[1:]) if len(paths) > 1 else []
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if path:
        if rng.random() < 0.15 and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = rng.choice(hostile)
    return copy


def main():
    build = os.path.abspath(sys.argv[1])
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 40
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 1
    rng = random.Random(seed)
    moec = os.path.join(build, "tools", "moec")
    work = tempfile.mkdtemp(prefix="moec-hostile-")
    bad = []
    try:
        module = os.path.join(work, "m.mlir")
        subprocess.run([moec, "import", FIXTURE, "-o", module], check=True, capture_output=True)
        quantized = os.path.join(work, "q.mlir")
        subprocess.run([moec, "opt", module, "--pipeline", "moe-quantize{bits=4 group=64}", "-o", quantized],
                       check=True, capture_output=True)
        package = os.path.join(work, "q.moepkg")
        subprocess.run([moec, "emit", quantized, "-o", package], check=True, capture_output=True)
        good = {
            "config": open(os.path.join(FIXTURE, "config.json"), "rb").read(),
            "tokenizer": open(os.path.join(FIXTURE, "tokenizer.json"), "rb").read(),
            "package": open(package, "rb").read(),
            "module": open(quantized, "rb").read(),
            "store": open(os.path.join(work, "m.moestore"), "rb").read(),
        }

        def checkpoint_with(name, data):
            directory = os.path.join(work, "ckpt")
            shutil.rmtree(directory, ignore_errors=True)
            shutil.copytree(FIXTURE, directory)
            open(os.path.join(directory, name), "wb").write(data)
            return directory

        def record(kind, outcome, stderr, detail):
            counts.setdefault(kind, {}).setdefault(outcome, 0)
            counts[kind][outcome] += 1
            if outcome not in ("ok", "rejected"):
                bad.append({"kind": kind, "outcome": outcome, "detail": detail,
                            "stderr": stderr.decode(errors="replace")[-400:]})

        counts = {}
        eval_args = ["--data", HELDOUT, "--max-tokens", "32", "--seq-len", "32"]
        for r in range(rounds):
            # config.json: edited fields and flipped bytes.
            config = json.loads(good["config"])
            data = json.dumps(json_mutations(config, rng)).encode() if r % 3 else flip(good["config"], rng, 3)
            outcome, err = run([moec, "eval", checkpoint_with("config.json", data)] + eval_args)
            record("config.json", outcome, err, data[:200].decode(errors="replace"))
            # tokenizer.json: edited added tokens / model fields, truncation.
            tokenizer = json.loads(good["tokenizer"])
            if r % 2:
                part = rng.choice(["added_tokens", "model", "post_processor", "pre_tokenizer", "decoder"])
                if tokenizer.get(part) is not None:
                    tokenizer[part] = json_mutations(tokenizer[part], rng)
                data = json.dumps(tokenizer).encode()
            else:
                data = good["tokenizer"][: rng.randrange(len(good["tokenizer"]))]
            outcome, err = run([moec, "generate", checkpoint_with("tokenizer.json", data), "--prompt", "The jury", "-n", "2"])
            record("tokenizer.json", outcome, err, f"round {r}")
            # packages: truncations, flipped bytes (checksums catch them) and
            # appended garbage; manifests edited behind valid checksums are the
            # package-manifest fuzzer's (fuzz/package_manifest_fuzzer.cpp).
            path = os.path.join(work, "bad.moepkg")
            kind = r % 3
            if kind == 0:
                data = good["package"][: rng.randrange(len(good["package"]))]
            elif kind == 1:
                data = flip(good["package"], rng, 1 + rng.randrange(4))
            else:
                data = good["package"] + bytes(rng.randrange(1, 5000))
            open(path, "wb").write(data)
            outcome, err = run([moec, "eval", path] + eval_args)
            record("package", outcome, err, f"round {r} kind {kind}")
            # modules: flipped bytes and edited numbers in the text.
            text = good["module"].decode()
            if r % 2:
                lines = text.split("\n")
                i = rng.randrange(len(lines))
                lines[i] = "".join(str(rng.choice([0, -1, 99999, 3])) if ch.isdigit() and rng.random() < 0.3 else ch
                                   for ch in lines[i])
                data = "\n".join(lines).encode()
            else:
                data = flip(good["module"], rng, 2)
            path = os.path.join(work, "bad.mlir")
            shutil.copy(os.path.join(work, "m.moestore"), os.path.join(work, "bad.moestore"))
            open(path, "wb").write(data.replace(b"m.moestore", b"bad.moestore"))
            outcome, err = run([moec, "eval", path] + eval_args)
            record("module", outcome, err, f"round {r}")
            # weight stores: flipped bytes and truncations under a module that uses them.
            store = good["store"]
            data = flip(store, rng, 1) if r % 2 else store[: rng.randrange(len(store))]
            open(os.path.join(work, "bad.moestore"), "wb").write(data)
            open(path, "wb").write(good["module"].replace(b"m.moestore", b"bad.moestore"))
            outcome, err = run([moec, "eval", path] + eval_args)
            record("store", outcome, err, f"round {r}")
            # recipes: hostile option values.
            recipe = {"passes": [{"pass": rng.choice(["moe-quantize", "moe-set-topk", "moe-prune-atoms", "moe-drop-experts"]),
                                  "options": {rng.choice(["bits", "group", "top-k", "ratio", "method", "experts", "targets",
                                                          "layers", "scale-type"]):
                                              rng.choice([-1, 0, 2, 99, 1e308, "nan", "}", "a,b", "0:1,2;9:0", [], None,
                                                          "experts bits=2", True])}}]}
            path = os.path.join(work, "recipe.json")
            json.dump(recipe, open(path, "w"))
            outcome, err = run([moec, "compress", FIXTURE, "--recipe", path, "-o", os.path.join(work, "r.moepkg")])
            record("recipe", outcome, err, json.dumps(recipe))
        for kind, outcomes in counts.items():
            print(json.dumps({"kind": kind, "runs": sum(outcomes.values()), **outcomes}))
        for item in bad:
            print(json.dumps(item))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
