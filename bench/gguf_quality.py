#!/usr/bin/env python3
"""moec's GGUF exports against llama.cpp, measured by llama.cpp.

For each bundled fixture: the bf16 export's llama-perplexity next to moec's
own perplexity of the module with the same windows (`moec eval
--llama-perplexity`: parity of the export); then, at equal formats, llama-quantize's
Q4_0 / Q4_1 / Q8_0 / Q4_K_M / Q3_K_M / Q2_K of the bf16 export (with and without an
imatrix from the calibration text) against moec's RTN and GPTQ in the moec
the same ggml formats (`moe-quantize format=q4_0`: RTN with a weighted scale
search, sequential GPTQ with the format's own grid through `moec compress`),
output.weight in Q8_0 as llama-quantize keeps it, exported byte for byte. Bits per weight count every tensor
of the file. The fixtures' hidden size (160) is not a multiple of 256, so
llama-quantize's K-quant mixes fall back to 32-value types for most tensors.

  python3 bench/gguf_quality.py BUILD_DIR [LLAMA_BIN_DIR]
(LLAMA_BIN_DIR defaults to what bench/build_llamacpp.sh prints.) One JSON
object per line. Needs the gguf Python package (bits per weight).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from gguf import GGUFReader

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
CTX = 256


def run(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)


def bits_per_weight(path):
    reader = GGUFReader(path)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    return 8.0 * sum(int(t.n_bytes) for t in reader.tensors) / weights


def llama_ppl(llama, model, text):
    # llama-perplexity now and then ends without its estimate on this shared
    # machine; a run is repeated up to three times.
    for attempt in range(3):
        out = subprocess.run([os.path.join(llama, "llama-perplexity"), "-m", model, "-f", text, "-c", str(CTX), "-t",
                              str(os.cpu_count())], capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if found:
            return float(found.group(1))
    sys.exit(f"llama-perplexity printed no estimate for {model} (exit {out.returncode}):\n"
             f"{(out.stdout + out.stderr)[-2000:]}")


def text_file(jsonl, path):
    with open(jsonl) as f, open(path, "w") as out:
        out.write("\n\n".join(json.loads(line)["text"] for line in f if line.strip()))


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    llama = sys.argv[2] if len(sys.argv) > 2 else run(os.path.join(HERE, "build_llamacpp.sh")).stdout.strip()
    moec = os.path.join(build, "tools", "moec")
    with tempfile.TemporaryDirectory() as work:
        heldout, calibration = os.path.join(work, "heldout.txt"), os.path.join(work, "calibration.txt")
        text_file(os.path.join(DATA, "brown", "heldout.jsonl"), heldout)
        text_file(os.path.join(DATA, "brown", "calibration.jsonl"), calibration)
        for fixture in ["tiny-mixtral", "tiny-deepseek"]:
            base = os.path.join(work, fixture)
            module = base + ".mlir"
            run(moec, "import", os.path.join(DATA, "fixtures", fixture), "-o", module)
            bf16 = base + "-bf16.gguf"
            run(moec, "export", module, "--format", "gguf", "-o", bf16)
            ours = json.loads(run(moec, "eval", module, "--data", heldout, "--llama-perplexity", "--seq-len", CTX,
                                  "--json").stdout)["perplexity"]
            theirs = llama_ppl(llama, bf16, heldout)
            print(json.dumps({"fixture": fixture, "model": "bf16 export", "bpw": round(bits_per_weight(bf16), 3),
                              "llama_perplexity": theirs, "moec_perplexity_same_windows": ours,
                              "relative_difference": abs(theirs - ours) / ours}), flush=True)
            imatrix = base + ".imatrix.gguf"
            run(os.path.join(llama, "llama-imatrix"), "-m", bf16, "-f", calibration, "-o", imatrix, "-c", CTX)
            for qtype in ["Q8_0", "Q4_1", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"]:
                for use_imatrix in [False, True]:
                    out = f"{base}-{qtype}{'-imatrix' if use_imatrix else ''}.gguf"
                    args = ["--imatrix", imatrix] if use_imatrix else []
                    run(os.path.join(llama, "llama-quantize"), *args, bf16, out, qtype)
                    print(json.dumps({"fixture": fixture, "model": f"llama-quantize {qtype}",
                                      "imatrix": use_imatrix, "bpw": round(bits_per_weight(out), 3),
                                      "llama_perplexity": llama_ppl(llama, out, heldout)}), flush=True)
            # moec in the same ggml formats, output.weight in Q8_0 as llama-quantize keeps it.
            for qtype in ["q8_0", "q4_1", "q4_0"]:
                quantized = base + "-rtn.mlir"
                run(moec, "opt", module, "--pipeline", "moe-quantize{format=q8_0 targets=lm_head},"
                    f"moe-quantize{{format={qtype} targets=all,embedding}}", "-o", quantized)
                out = base + "-rtn.gguf"
                run(moec, "export", quantized, "--format", "gguf", "-o", out)
                print(json.dumps({"fixture": fixture, "model": f"moec RTN {qtype.upper()}",
                                  "bpw": round(bits_per_weight(out), 3),
                                  "llama_perplexity": llama_ppl(llama, out, heldout)}), flush=True)
                recipe = base + "-gptq.json"
                with open(recipe, "w") as f:
                    json.dump({"calibration": {"data": os.path.join(DATA, "brown", "calibration.jsonl"),
                                               "tokens": 8192},
                               "passes": [{"pass": "moe-quantize", "options": {"format": "q8_0", "targets": "lm_head"}},
                                          {"pass": "moe-quantize",
                                           "options": {"method": "gptq", "format": qtype, "act-order": True,
                                                       "targets": "all,embedding"}}]}, f)
                package = base + "-gptq.moepkg"
                run(moec, "compress", os.path.join(DATA, "fixtures", fixture), "--recipe", recipe, "-o", package)
                out = base + "-gptq.gguf"
                run(moec, "export", package, "--format", "gguf", "-o", out)
                print(json.dumps({"fixture": fixture, "model": f"moec sequential GPTQ {qtype.upper()}",
                                  "bpw": round(bits_per_weight(out), 3),
                                  "llama_perplexity": llama_ppl(llama, out, heldout)}), flush=True)
            # Bit allocation (MC-MoE, experts between Q4_0 and Q8_0) executed by sequential GPTQ.
            for budget in [5, 6]:
                recipe = base + "-alloc.json"
                with open(recipe, "w") as f:
                    json.dump({"calibration": {"data": os.path.join(DATA, "brown", "calibration.jsonl"),
                                               "tokens": 8192, "block_samples": 1024},
                               "passes": [{"pass": "moe-quantize", "options": {"format": "q8_0", "targets": "lm_head"}},
                                          {"pass": "moe-allocate-bits",
                                           "options": {"budget": budget, "tolerance": 0.5, "candidates": "q4_0,q8_0", "pin-bits": 0,
                                                       "granularity": "layer"}},
                                          {"pass": "moe-quantize",
                                           "options": {"method": "gptq", "format": "q4_0", "act-order": True,
                                                       "targets": "all,embedding"}}]}, f)
                package = base + "-alloc.moepkg"
                run(moec, "compress", os.path.join(DATA, "fixtures", fixture), "--recipe", recipe, "-o", package)
                out = base + "-alloc.gguf"
                run(moec, "export", package, "--format", "gguf", "-o", out)
                print(json.dumps({"fixture": fixture,
                                  "model": f"moec allocate-bits {budget} (Q4_0/Q8_0 experts) + sequential GPTQ",
                                  "bpw": round(bits_per_weight(out), 3),
                                  "llama_perplexity": llama_ppl(llama, out, heldout)}), flush=True)


if __name__ == "__main__":
    main()
