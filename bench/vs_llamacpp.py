#!/usr/bin/env python3
"""moec beside llama.cpp on the same GGUF bytes (see bench/vs_llamacpp.sh).

  python3 bench/vs_llamacpp.py BUILD_DIR LLAMA_BIN_DIR OUT.jsonl
"""
import json
import os
import re
import statistics
import subprocess
import sys

from gguf_families import byte_level_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYNTHETIC = {
    "olmoe": "olmoe-1b-7b-4layers.json",
    "qwen3": "qwen3-30b-a3b-2layers.json",
}
# moec's group format with the same bytes as each ggml type, for the GEMV
# comparison (Q4_K and Q2_K have no twin: the nearest moec format).
KERNEL_TWINS = {"q4_0": "q4_g32_sym", "q8_0": "q8_g32_sym", "q4_K": "q4_g128_asym", "q2_K": "q2_g128_asym"}


def run(command, **kwargs):
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs).stdout


def model_dir(name, build, work):
    if name in SYNTHETIC:
        directory = os.path.join(work, name)
        if not os.path.exists(os.path.join(directory, "config.json")):
            run([os.path.join(build, "tools", "moec-synth"), "--config", os.path.join(HERE, "configs", SYNTHETIC[name]),
                 "--shards", "4", "-o", directory])
        tokenizer = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(tokenizer):
            vocab_size = json.load(open(os.path.join(directory, "config.json")))["vocab_size"]
            with open(tokenizer, "w") as out:
                json.dump(byte_level_tokenizer(vocab_size), out)
        return directory
    return os.path.join(ROOT, "tests", "data", "fixtures", name)


def gguf_file(name, directory, gguf_type, build, bin_dir, work):
    """moec's GGUF export of the checkpoint, every matrix then quantized to
    `gguf_type` by llama-quantize --pure (embedding and output included), so
    both engines read the very same bytes; moec's keys travel through."""
    path = os.path.join(work, f"{name}-{gguf_type}.gguf")
    if os.path.exists(path):
        return path
    moec = os.path.join(build, "tools", "moec")
    module, full = os.path.join(work, f"{name}.mlir"), os.path.join(work, f"{name}-bf16.gguf")
    if not os.path.exists(full):
        run([moec, "-q", "import", directory, "-o", module])
        run([moec, "-q", "export", module, "--format", "gguf", "-o", full])
        for leftover in (module, module.replace(".mlir", ".moestore")):
            if os.path.exists(leftover):
                os.remove(leftover)
    run([os.path.join(bin_dir, "llama-quantize"), "--pure", full, path, gguf_type.upper(), str(os.cpu_count())])
    return path


def llama_bench(bin_dir, path, threads, prompt, decode):
    text = run([os.path.join(bin_dir, "llama-bench"), "-m", path, "-p", str(prompt), "-n", str(decode),
                "-t", str(threads), "-r", "2", "-o", "jsonl"])
    rates = {}
    for line in text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            rates["prefill" if record["n_prompt"] else "decode"] = record["avg_ts"]
    return rates


def moec_bench(build, path, threads, prompt, decode):
    text = run([os.path.join(build, "bench", "engine_throughput"), path, "--prompt", str(prompt), "--decode",
                str(decode), "--threads", str(threads), "--decode-start", "empty", "--bandwidth", "no",
                "--warmup", "full", "--repeat", "2"])  # as llama-bench: a whole-size warm-up, -r 2 averaged
    record = json.loads(text)
    return {"prefill": record["prefill_tokens_per_second"], "decode": record["decode_tokens_per_second"]}


def kernels(build, bin_dir, emit):
    """ggml's GEMV (one thread: test-backend-ops uses half the cores) beside quant_kernels."""
    pattern = "type_a=(" + "|".join(KERNEL_TWINS) + "),type_b=f32,m=4096,n=1,k=14336,"
    text = run([os.path.join(bin_dir, "test-backend-ops"), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p", pattern])
    ggml = {}
    for match in re.finditer(r"type_a=(\w+),type_b=f32,m=4096,n=1,k=14336,.*?([\d.]+) us/run", text):
        ggml[match.group(1)] = float(match.group(2)) * 1e-6
    ours = {}
    text = run([os.path.join(build, "bench", "quant_kernels"), "--rows", "4096", "--cols", "14336", "--repeat", "20",
                "--formats", ",".join(KERNEL_TWINS.values())])
    read = {}
    for line in text.splitlines():
        record = json.loads(line)
        if record["kernel"] == "memory":
            read[record["threads"]] = record["read_gb_per_s"]
        elif record["kernel"] == "gemv":
            key = (record["format"], record["threads"])
            if key not in ours or record["seconds"] < ours[key]["seconds"]:
                ours[key] = record  # the best instruction set
    for ggml_type, format_name in KERNEL_TWINS.items():
        for threads in sorted(read):
            record = ours[(format_name, threads)]
            row = {"bench": "gemv", "ggml_type": ggml_type, "moec_format": format_name, "threads": threads,
                   "moec_isa": record["isa"], "moec_seconds": record["seconds"],
                   "moec_gb_per_s": record["gb_per_s"], "read_gb_per_s": read[threads],
                   "moec_fraction_of_read_bandwidth": record["gb_per_s"] / read[threads]}
            if threads == 1 and ggml_type in ggml:
                # Same shape, so the time ratio is the rate ratio.
                row["ggml_seconds"] = ggml[ggml_type]
                row["moec_rate_vs_ggml"] = ggml[ggml_type] / record["seconds"]
            emit(row)


def main():
    build, bin_dir, out = sys.argv[1:4]
    rounds = int(os.environ.get("ROUNDS", "3"))
    models = os.environ.get("MODELS", "tiny-mixtral tiny-deepseek olmoe qwen3").split()
    types = os.environ.get("TYPES", "q4_0 q8_0").split()
    work = os.environ.get("WORK", os.path.expanduser("~/.cache/moec-vs-llamacpp"))
    os.makedirs(work, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = []
    with open(out, "w") as sink:
        def emit(row):
            if os.environ.get("RUN"):
                row["run"] = os.environ["RUN"]  # a label for this run's lines
            results.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps(row), flush=True)

        if os.environ.get("KERNELS", "yes") != "no":
            kernels(build, bin_dir, emit)
        for name in models:
            directory = model_dir(name, build, work)
            prompt, decode = 512, 128
            for gguf_type in types:
                path = gguf_file(name, directory, gguf_type, build, bin_dir, work)
                for threads in (1, 2):
                    samples = {"llama.cpp": [], "moec": []}
                    for _ in range(rounds):  # alternated
                        samples["llama.cpp"].append(llama_bench(bin_dir, path, threads, prompt, decode))
                        samples["moec"].append(moec_bench(build, path, threads, prompt, decode))
                    row = {"bench": "engine", "model": name, "type": gguf_type, "threads": threads,
                           "prompt": prompt, "decode": decode, "rounds": rounds}
                    for tool, runs in samples.items():
                        for phase in ("prefill", "decode"):
                            row[f"{tool}_{phase}_tokens_per_s"] = statistics.median(r[phase] for r in runs)
                    for phase in ("prefill", "decode"):
                        row[f"moec_vs_llamacpp_{phase}"] = (row[f"moec_{phase}_tokens_per_s"] /
                                                            row[f"llama.cpp_{phase}_tokens_per_s"])
                    emit(row)
    print("\nsummary (moec / llama.cpp, medians of alternated rounds):")
    for row in results:
        if row["bench"] == "engine":
            print(f"  {row['model']:13} {row['type']:5} {row['threads']} thread(s): "
                  f"decode {row['moec_vs_llamacpp_decode']:.2f}x, prefill {row['moec_vs_llamacpp_prefill']:.2f}x")
        elif "moec_rate_vs_ggml" in row:
            print(f"  GEMV {row['moec_format']} vs {row['ggml_type']} (1 thread): {row['moec_rate_vs_ggml']:.2f}x")


if __name__ == "__main__":
    main()
