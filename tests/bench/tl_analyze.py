#!/usr/bin/env python3
"""tl_analyze.py - where the INT2 attention kernel's unit-loop end times spread from.

Reads the raw per-block stamps that the timeline build (-DKVT_ATT_TIMELINE) of kvtier-bench
appends to KVT_TL_DUMP=FILE (kvt_cuda_attend.cu, tl_where), one section per benchmark case:

    block smid warpids(hex, a byte per warp) group kv_head first count
        entry prologue loop0 loop1 loop2 loop3 merge     (ns from the first block's entry)
    end N LABEL

and prints, per case: blocks per multiprocessor; loop ends of the blocks on multiprocessors
with 2 and 3 blocks; each full multiprocessor's last loop end (what the grid waits for); warps'
loop times by launch wave (block index / multiprocessors) and by the block's rank on its
multiprocessor (0: lowest block index there); correlations of a block's loop end with its
entry time and its block index. docs/gpu.md "Session 9: balancing the unit loops" has what
these showed on the H200.

    tests/bench/tl_analyze.py DUMP [DUMP...]

Python: standard library only.
"""
import collections
import statistics
import sys


def load(path):
    """[(label, [block dict])] in file order"""
    cases, cur = [], []
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "end":
                cases.append((" ".join(w[2:]), cur))
                cur = []
                continue
            t = [int(x) / 1e3 for x in w[7:14]]
            wid = int(w[2], 16)
            cur.append({"i": int(w[0]), "sm": int(w[1]),
                        "wid": [(wid >> (8 * k)) & 0xFF for k in range(4)],
                        "group": int(w[3]), "count": int(w[6]), "entry": t[0], "pro": t[1],
                        "loop": t[2:6], "merge": t[6]})
    return cases


def corr(x, y):
    mx, my = statistics.mean(x), statistics.mean(y)
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy) if sx and sy else 0.0


def q(v):
    v = sorted(v)
    return "%.2f / %.2f / %.2f" % (v[0], v[len(v) // 2], v[-1]) if v else "-"


def report(label, bl):
    per = collections.defaultdict(list)
    for b in bl:
        per[b["sm"]].append(b)
    hist = collections.Counter(len(v) for v in per.values())
    most = max(hist)
    print("== %s: %d blocks; multiprocessors by blocks %s" % (label, len(bl), dict(sorted(hist.items()))))
    for k in sorted(hist):
        print("   blocks on multiprocessors with %d: loop end (latest warp) %s us" %
              (k, q([max(b["loop"]) for b in bl if len(per[b["sm"]]) == k])))
    print("   full multiprocessors' last loop end %s us" %
          q([max(max(b["loop"]) for b in v) for v in per.values() if len(v) == most]))
    nsm = len(per)
    for wv in range((len(bl) + nsm - 1) // nsm):
        seg = [b for b in bl if b["i"] // nsm == wv]
        print("   wave %d (blocks %d-%d): warp loop %s us, chunks %s" %
              (wv, wv * nsm, wv * nsm + len(seg) - 1,
               q([l - b["pro"] for b in seg for l in b["loop"]]),
               dict(sorted(collections.Counter(b["count"] for b in seg).items()))))
    rank = collections.defaultdict(list)
    for v in per.values():
        if len(v) == most:
            for r, b in enumerate(sorted(v, key=lambda b: b["i"])):
                rank[r] += [l - b["pro"] for l in b["loop"]]
    for r in sorted(rank):
        print("   rank %d on its multiprocessor: warp loop %s us (mean %.2f)" %
              (r, q(rank[r]), statistics.mean(rank[r])))
    ends = [max(b["loop"]) for b in bl]
    print("   corr(loop end, entry) %.3f, corr(loop end, block index) %.3f" %
          (corr(ends, [b["entry"] for b in bl]), corr(ends, [b["i"] for b in bl])))


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    for path in sys.argv[1:]:
        for label, bl in load(path):
            report(label, bl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
