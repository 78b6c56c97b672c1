#!/usr/bin/env python3
"""Prints docs/realmodel/int2.md's "Held-out texts" table from docs/realmodel/int2_results.jsonl:
per text, the exact cache's summed NLL and, for each row, ratio = exp((nll_row - nll_exact) /
tokens scored) over the contexts both have, plus the excess NLL (nats) of every context.

    python3 tests/realmodel/int2_table.py [--texts GPL-3,...] [--cols LABEL=DESIGN_ROW/HELDOUT_ROW,...]

A column names one row for the design texts (GPL-3, GFDL-1.3: the texts key_rounding mse's
rule was chosen on) and one for the held-out texts, because the same setting was measured
under different row names: min-max = x-S8 on the design texts (session 2's kvtier-int2) and
S8-minmax on the held-out ones (the lead's run, /work/team/heldout_int2.sh)."""
import argparse
import json
import math
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "docs", "realmodel", "int2_results.jsonl")
SIM = os.path.join(HERE, "..", "..", "docs", "realmodel", "int2_sim.jsonl")
DESIGN = ("GPL-3", "GFDL-1.3")
HELDOUT = ("GPL-2", "LGPL-2.1", "MPL-1.1", "MPL-2.0", "GPL-1", "Apache-2.0")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jsonl", default=DEFAULT)
    ap.add_argument("--texts", default=",".join(DESIGN + HELDOUT))
    # label=row on the design texts/row on the held-out texts
    ap.add_argument("--cols", default="min-max=x-S8/S8-minmax,mse=S8-mse/S8-mse")
    ap.add_argument("--sim", nargs="?", const=SIM,
                    help="also read int2_sim.py's results (default docs/realmodel/int2_sim.jsonl) "
                         "as rows sim-MODEK-MODEV (rotv 1, 2/2 bits, normfit 0 only)")
    a = ap.parse_args()
    res = defaultdict(dict)  # (row, text) -> {context: rec}; the last line for a key wins
    for line in open(a.jsonl):
        r = json.loads(line)
        res[(r["row"], r["text"])][r["context"]] = r
    if a.sim:
        for line in open(a.sim):
            r = json.loads(line)
            if (r.get("rotv"), r.get("bk"), r.get("bv"), r.get("normfit")) != (1, 2, 2, 0):
                continue
            res[(f"sim-{r['modek']}-{r['modev']}", r["text"])][r["context"]] = r
    cols = []
    for c in a.cols.split(","):
        label, rows = c.split("=")
        d, h = rows.split("/")
        cols.append((label, d, h))
    print("| text | role | exact NLL sum (scored) | " +
          " | ".join(f"{l} ratio | {l} excess nats per context" for l, _, _ in cols) + " |")
    print("|---" * (3 + 2 * len(cols)) + "|")
    summary = defaultdict(list)
    for t in a.texts.split(","):
        ex = res[("exact", t)]
        if not ex:
            continue
        role = "design" if t in DESIGN else "held-out"
        cells = []
        for label, d, h in cols:
            got = res[(d if t in DESIGN else h, t)]
            ctx = sorted(set(got) & set(ex))
            if not ctx:
                cells += ["-", "-"]
                continue
            dn = sum(got[c]["nll"] - ex[c]["nll"] for c in ctx)
            n = sum(ex[c]["scored"] for c in ctx)
            ratio = math.exp(dn / n)
            summary[(label, role)].append(ratio)
            cells += [f"{ratio:.4f}" + ("" if len(ctx) == len(ex) else f" ({len(ctx)} ctx)"),
                      ", ".join(f"{got[c]['nll'] - ex[c]['nll']:.1f}" for c in ctx)]
        if all(c == "-" for c in cells):
            continue
        print(f"| {t} | {role} | {sum(r['nll'] for r in ex.values()):.2f} "
              f"({sum(r['scored'] for r in ex.values())}) | " + " | ".join(cells) + " |")
    print()
    for (label, role), v in sorted(summary.items()):
        print(f"{label} {role}: mean ratio {sum(v) / len(v):.4f}, worst {max(v):.4f}, "
              f"texts <= 1.025: {sum(x <= 1.025 for x in v)} of {len(v)}")


if __name__ == "__main__":
    main()
