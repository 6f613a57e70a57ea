#!/usr/bin/env python3
"""Writes the tiny weights and statistics the minimal pass tests read.

weights.safetensors: a router r [4, 8] and four experts (g<e>, u<e> [4, 8],
d<e> [8, 4]) in bf16; expert e's weights are scaled by (e + 1), and neuron
n of every expert by (n + 1), so magnitudes order experts and neurons.
stats.safetensors: layer 0 statistics in moec calibrate's names: expert 2
routed the least, expert 3 the most; experts 0 and 1 alike in the router.

Run from this folder: python3 make_inputs.py
"""
import json
import struct


def bf16(value):
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return struct.pack("<H", (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


def write(path, tensors):
    header, data = {}, b""
    for name, (dtype, shape, payload) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + data)


def matrix(rows, cols, value):
    return ("BF16", [rows, cols], b"".join(bf16(value(r, c)) for r in range(rows) for c in range(cols)))


def f64(values, shape):
    return ("F64", shape, b"".join(struct.pack("<d", v) for v in values))


def i64(values, shape):
    return ("I64", shape, b"".join(struct.pack("<q", v) for v in values))


weights = {"r": matrix(4, 8, lambda r, c: 0.01 * ((r * 8 + c) % 5 - 2))}
for e in range(4):
    weights[f"g{e}"] = matrix(4, 8, lambda n, c, e=e: 0.02 * (e + 1) * (n + 1) * (1 if (n + c) % 2 else -1))
    weights[f"u{e}"] = matrix(4, 8, lambda n, c, e=e: 0.03 * (e + 1) * (n + 1) * (1 if c % 3 else -1))
    weights[f"d{e}"] = matrix(8, 4, lambda h, n, e=e: 0.01 * (e + 1) * (n + 1) * (1 if (h + n) % 2 else -1))
write("weights.safetensors", weights)

routed = [300, 280, 20, 400]
stats = {
    "layers.0.tokens": i64([500], []),
    "layers.0.routed_tokens": i64(routed, [4]),
    "layers.0.gate_weight_sum": f64([150.0, 140.0, 5.0, 220.0], [4]),
    "layers.0.router_score_sum": f64([120.0, 118.0, 12.0, 250.0], [4]),
    "layers.0.easy_ep_score": f64([10.0, 9.0, 0.5, 20.0], [4]),
    "layers.0.max_abs_output": f64([1.0, 1.1, 0.9, 1.2], [4]),
    "layers.0.top_logit_sum": f64([30.0, 29.0, 1.0, 50.0], [4]),
    # Router-logit Gram: experts 0 and 1 nearly parallel, 2 and 3 apart.
    "layers.0.router_logit_gram": f64([4.0, 3.9, 0.1, 0.2,
                                       3.9, 4.0, 0.1, 0.1,
                                       0.1, 0.1, 4.0, -1.0,
                                       0.2, 0.1, -1.0, 4.0], [4, 4]),
}
for e in range(4):
    # Neuron n's weighted activation grows with n: neuron 0 matters least.
    square = [float((n + 1) ** 2) for n in range(4)]
    for name in ["neuron_square_sum", "neuron_square_max", "neuron_weighted_square_sum", "neuron_weighted_square_max"]:
        stats[f"layers.0.experts.{e}.{name}"] = f64(square, [4])
write("stats.safetensors", stats)
