#!/usr/bin/env python3
"""Expert offloading (--expert-cache) against layer streaming, on real routing.

For each fixture: `moec analyze` predicts hit rates (SCH and LRU, one cache
over all layers of ratio x the summed top-k experts); then
`engine_throughput --text` decodes held-out text token by token (teacher
forcing) with an expert cache of that many experts, LRU and frequency
policies, LRU with HOBBIT's 4-bit fallback for missing experts that get less
than 30% or 50% of a token's routing weight (decoded text's perplexity beside
it), and with plain layer streaming under the same total budget
(`--max-memory`: the cache plus every layer's non-expert weights), and with
everything resident. Prints one JSON object per line.
Usage: bench/expert_offload.py [BUILD_DIR] [--decode N]
"""
import argparse
import json
import os
import tempfile

from benchlib import HELDOUT, fixture_dir, run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--fixtures", default="tiny-mixtral,tiny-deepseek")
    parser.add_argument("--decode", type=int, default=900)  # + the 64-token prompt within the fixtures' 1024 positions
    args = parser.parse_args()
    moec = os.path.join(args.build, "tools", "moec")
    throughput = os.path.join(args.build, "bench", "engine_throughput")
    heldout = HELDOUT
    with tempfile.TemporaryDirectory() as work:
        for fixture in args.fixtures.split(","):
            model = fixture_dir(fixture)
            config = json.load(open(os.path.join(model, "config.json")))
            width = config.get("moe_intermediate_size") or config["intermediate_size"]
            expert_bytes = 3 * config["hidden_size"] * width * 2  # bf16
            analysis = os.path.join(work, "a.json")
            run(moec, "analyze", model, "--data", heldout, "--json", analysis)
            a = json.load(open(analysis))["routing_analysis"]["model"]

            def decode(*extra):
                out = json.loads(run(throughput, model, "--text", heldout, "--prompt", "64", "--decode",
                                     str(args.decode), "--bandwidth", "no", *extra))
                return {k: out.get(k) for k in ("decode_tokens_per_second", "decode_bytes_loaded_per_token",
                                                "decode_expert_hit_rate", "expert_resident_bytes_peak",
                                                "resident_layer_bytes_peak", "decode_layer_loads",
                                                "decode_text_perplexity", "decode_expert_fallbacks",
                                                "expert_fallback_bytes")}

            resident = decode()
            for ratio in ("1", "2"):
                experts = a["cache_experts"][ratio]
                cache = experts * expert_bytes
                row = {"fixture": fixture, "ratio": float(ratio), "cache_experts": experts, "cache_bytes": cache,
                       "predicted_lru": a["lru"][ratio], "predicted_sch_m16": a["sch"]["16"][ratio],
                       "resident": resident}
                for policy in ("lru", "frequency"):
                    row[policy] = decode("--expert-cache", str(cache), "--expert-policy", policy)
                # HOBBIT's low-precision replacement of missing experts no
                # token leans on (4-bit copies of every expert kept apart).
                for below in ("0.3", "0.5"):
                    row["lru_fallback_q4_below_" + below] = decode(
                        "--expert-cache", str(cache), "--expert-fallback", "q4_g32_asym",
                        "--expert-fallback-below", below)
                # Layer streaming under the same total: the cache plus the
                # non-expert weights the offloading run keeps resident.
                total = cache + row["lru"]["resident_layer_bytes_peak"]
                row["layer_streaming"] = decode("--max-memory", str(total))
                row["layer_streaming"]["max_memory_bytes"] = total
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
