"""Checks a moec report (JSON) against the module it describes.

The module is read independently of moec's lowering: the `moe.expert` and
`moe.router` lines of the printed IR, layer by layer. Every expert the
report lists must agree with what the module holds:
  kept   -> an expert op with that origin, the reported width and id;
  pruned -> no expert op with that origin;
  merged -> no expert op with that origin, and the expert it was merged
            into is held;
and every expert op of the module appears in the report as kept.
Usage: check_report.py report.json module.mlir [expected decisions...]
where each expected decision is "layer:origin=decision" (e.g. 0:2=pruned).
"""
import json
import re
import sys

report = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()

layers = {}
current = None
for line in text.splitlines():
    m = re.search(r"moe\.layer (\d+)", line)
    if m:
        current = int(m.group(1))
        layers[current] = {}
        continue
    m = re.search(r"moe\.expert (\d+) width (\d+) .*?(\{.*\})?$", line)
    if m and current is not None:
        ident, width = int(m.group(1)), int(m.group(2))
        attrs = m.group(3) or ""
        o = re.search(r"origin = (\d+)", attrs)
        origin = int(o.group(1)) if o else ident
        part = re.search(r"part_offset = (\d+)", attrs)
        entry = layers[current].setdefault(origin, {"id": ident, "width": 0})
        entry["width"] += width
        assert part is None or entry["id"] == ident

errors = []
for layer in report["layers"]:
    if layer["mlp"] != "moe":
        continue
    index = layer["index"]
    held = layers.get(index, {})
    listed = set()
    for e in layer["experts"]:
        origin = e["origin"]
        listed.add(origin)
        where = f"layer {index} expert {origin}"
        if e["decision"] == "kept":
            if origin not in held:
                errors.append(f"{where}: reported kept, not in the module")
            elif held[origin]["width"] != e["width_after"] or held[origin]["id"] != e["id"]:
                errors.append(f"{where}: reported width {e['width_after']} id {e['id']}, module has {held[origin]}")
        elif e["decision"] in ("pruned", "merged"):
            if origin in held:
                errors.append(f"{where}: reported {e['decision']}, still in the module")
            if e["decision"] == "merged" and "into" in e and e["into"] not in held:
                errors.append(f"{where}: merged into {e['into']}, which the module does not hold")
            if not e.get("method"):
                errors.append(f"{where}: {e['decision']} without the method that decided it")
        else:
            errors.append(f"{where}: unexpected decision {e['decision']}")
    for origin in held:
        if origin not in listed:
            errors.append(f"layer {index} expert {origin}: in the module, not in the report")
    if layer["experts_after"] != len(held):
        errors.append(f"layer {index}: experts_after {layer['experts_after']}, module holds {len(held)}")

decisions = {(l["index"], e["origin"]): e["decision"] for l in report["layers"] if l["mlp"] == "moe" for e in l["experts"]}
for expected in sys.argv[3:]:
    where, decision = expected.split("=")
    layer, origin = map(int, where.split(":"))
    if decisions.get((layer, origin)) != decision:
        errors.append(f"layer {layer} expert {origin}: expected {decision}, report says {decisions.get((layer, origin))}")

counts = {}
for d in decisions.values():
    counts[d] = counts.get(d, 0) + 1
if errors:
    print("\n".join(errors))
    sys.exit(1)
print("report matches the module:", " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
