#!/usr/bin/env python3
"""Every family's GGUF export loads and runs in llama.cpp.

The tiny transformers-saved checkpoints of tests/data/hf (random weights,
vocabulary of 128) get a byte-level BPE tokenizer of their 128 ids (the
first 128 bytes, no merges); each is imported, exported with `moec export
--format gguf`, and scored by llama-perplexity and by `moec eval
--llama-perplexity` on the same ASCII text and windows. Where llama.cpp's
graph computes what the checkpoint does, the two agree; where it does not
(said by the exporter's remarks), they differ. One JSON object per line.

  python3 bench/gguf_families.py BUILD_DIR [LLAMA_BIN_DIR]
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")


def byte_level_tokenizer(vocab_size=128):
    """Byte-level BPE without merges: the first min(vocab_size, 256) bytes,
    then filler tokens up to vocab_size (never produced by tokenizing)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    vocab = {mapping[b]: b for b in range(min(vocab_size, 256))}
    vocab.update({f"tok{i}": i for i in range(256, vocab_size)})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": byte_level,
            "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "vocab": vocab, "merges": []}}


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    llama = sys.argv[2] if len(sys.argv) > 2 else subprocess.run(
        [os.path.join(HERE, "build_llamacpp.sh")], check=True, capture_output=True, text=True).stdout.strip()
    moec = os.path.join(build, "tools", "moec")
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(DATA, "brown", "heldout.jsonl")) as f:
            text = "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
        ascii_text = os.path.join(work, "ascii.txt")
        with open(ascii_text, "w") as out:
            out.write("".join(c for c in text if ord(c) < 128)[:60000])
        for name in sorted(os.listdir(os.path.join(DATA, "hf"))):
            source = os.path.join(DATA, "hf", name)
            if not os.path.isdir(source):
                continue
            model = os.path.join(work, name)
            shutil.copytree(source, model)
            with open(os.path.join(model, "tokenizer.json"), "w") as out:
                json.dump(byte_level_tokenizer(), out)
            context = min(128, json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"])
            module = model + ".mlir"
            subprocess.run([moec, "import", model, "-o", module], check=True, capture_output=True)
            exported = subprocess.run([moec, "export", module, "--format", "gguf", "-o", model + ".gguf"],
                                      capture_output=True, text=True)
            row = {"model": name, "remarks": [line[8:] for line in exported.stderr.splitlines()
                                              if line.startswith("remark: ") and "padded" not in line]}
            if exported.returncode != 0:
                row["refused"] = exported.stderr.strip().splitlines()[-1]
                print(json.dumps(row), flush=True)
                continue
            theirs = subprocess.run([os.path.join(llama, "llama-perplexity"), "-m", model + ".gguf", "-f", ascii_text,
                                     "-c", str(context), "-t", str(os.cpu_count())], capture_output=True, text=True)
            found = re.search(r"Final estimate: PPL = ([0-9.]+)", theirs.stdout + theirs.stderr)
            row["llama_perplexity"] = float(found.group(1)) if found else None
            ours = subprocess.run([moec, "eval", module, "--data", ascii_text, "--llama-perplexity", "--seq-len",
                                   str(context), "--json"], check=True, capture_output=True, text=True)
            row["moec_perplexity"] = json.loads(ours.stdout)["perplexity"]
            if found:
                row["relative_difference"] = abs(row["llama_perplexity"] - row["moec_perplexity"]) / row["moec_perplexity"]
            print(json.dumps(row), flush=True)
        # SentencePiece-style tokenizers (Mixtral's, PhiMoE's): a random
        # Mixtral of their vocabulary, exported as llama.cpp's "llama" vocab.
        config = json.load(open(os.path.join(DATA, "hf", "mixtral", "config.json")))
        config.update({"vocab_size": 1256, "max_position_embeddings": 512})
        json.dump(config, open(os.path.join(work, "spm-config.json"), "w"))
        base = os.path.join(work, "spm-model")
        subprocess.run([moec + "-synth", "--family", "mixtral", "--config", os.path.join(work, "spm-config.json"),
                        "-o", base], check=True, capture_output=True)
        for style in ["sp-metaspace", "sp-legacy"]:
            model = os.path.join(work, style)
            shutil.copytree(base, model)
            shutil.copy(os.path.join(DATA, "tokenizers", style, "tokenizer.json"), model)
            with open(os.path.join(model, "tokenizer_config.json"), "w") as out:
                json.dump({"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}, out)
            subprocess.run([moec, "import", model, "-o", model + ".mlir"], check=True, capture_output=True)
            subprocess.run([moec, "export", model + ".mlir", "--format", "gguf", "-o", model + ".gguf"], check=True,
                           capture_output=True)
            theirs = subprocess.run([os.path.join(llama, "llama-perplexity"), "-m", model + ".gguf", "-f", ascii_text,
                                     "-c", "128", "-t", str(os.cpu_count())], capture_output=True, text=True)
            found = re.search(r"Final estimate: PPL = ([0-9.]+)", theirs.stdout + theirs.stderr)
            chunks = re.search(r"over ([0-9]+) chunks", theirs.stdout + theirs.stderr)
            ours = json.loads(subprocess.run([moec, "eval", model + ".mlir", "--data", ascii_text, "--llama-perplexity",
                                              "--seq-len", "128", "--json"], check=True, capture_output=True,
                                             text=True).stdout)
            print(json.dumps({"model": f"mixtral, {style} tokenizer", "llama_perplexity": float(found.group(1)),
                              "llama_windows": int(chunks.group(1)), "moec_perplexity": ours["perplexity"],
                              "moec_windows": ours["targets"] // 63,
                              "relative_difference": abs(float(found.group(1)) - ours["perplexity"]) /
                              ours["perplexity"], "remarks": []}), flush=True)


if __name__ == "__main__":
    main()
