#!/usr/bin/env python3
"""sass_loops.py - instruction counts of a CUDA kernel's loops from its SASS, without a GPU.

Why: the attention, encode and decode kernels are issue bound, so "instructions per unit of
work in the hot loop" predicts a change's effect before any device time is spent (docs/gpu.md).

    tests/bench/sass_loops.py OBJECT [--kernel SUBSTRING] [--loop N] [--tools DIR]

OBJECT is a CUDA object or fatbinary (e.g. build/kernels/CMakeFiles/kvt_kernels_cuda.dir/
kvt_cuda_attend_i2.cu.o, built with -DCMAKE_CUDA_ARCHITECTURES=90). Without --kernel it lists
the kernels. With --kernel it lists that kernel's loops (a backward branch and its target:
static instruction count and HMMA count), and with --loop N also the opcode histogram of
loop N. Static counts: branches inside a loop (rare paths) are counted as if taken.

cuobjdump and nvdisasm come from PyPI's nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels,
downloaded once into --tools (default build/sass-tools) when not already on PATH.
Python: the pyenv python3 on PATH (standard library only).
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

WHEELS = ("nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm")


def tool_dir(tools):
    """The folder holding cuobjdump and nvdisasm (fetched from PyPI when missing)."""
    on_path = shutil.which("cuobjdump"), shutil.which("nvdisasm")
    if all(on_path):
        return os.path.dirname(on_path[0])
    found = glob.glob(os.path.join(tools, "nvidia", "*", "bin", "nvdisasm"))
    if not found:
        os.makedirs(tools, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tools,
                        *WHEELS], check=True)
        for whl in glob.glob(os.path.join(tools, "*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(tools)
        found = glob.glob(os.path.join(tools, "nvidia", "*", "bin", "nvdisasm"))
        if not found:
            sys.exit("sass_loops: no nvdisasm in the downloaded wheels (%s)" % tools)
    d = os.path.dirname(found[0])
    for exe in ("cuobjdump", "nvdisasm"):
        os.chmod(os.path.join(d, exe), 0o755)
    return d


def kernels(obj, tdir):
    """{mangled name: [(address, instruction text)]} of every kernel in obj."""
    env = dict(os.environ, NVDISASM_PATH=tdir, PATH=tdir + os.pathsep + os.environ["PATH"])
    out = subprocess.run([os.path.join(tdir, "cuobjdump"), "-sass", obj], env=env, check=True,
                         capture_output=True, text=True).stdout
    result, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = result.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return result


def loops(ins):
    """(start, end, body) for every backward branch in address order. Branches placed after
    the last EXIT (ptxas's out-of-line paths for divergent warps, which jump back into the
    body) are not loops and are left out."""
    exits = [a for a, t in ins if opcode(t) == "EXIT"]
    last_exit = max(exits) if exits else ins[-1][0]
    found = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr < last_exit:
            start = int(m.group(1), 16)
            found.append((start, addr, [t for a, t in ins if start <= a <= addr]))
    return sorted(found)


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("object")
    ap.add_argument("--kernel", help="substring of the (mangled) kernel name")
    ap.add_argument("--loop", type=int, help="index of a loop in the --kernel listing")
    ap.add_argument("--tools", default="build/sass-tools")
    a = ap.parse_args()
    ks = kernels(a.object, tool_dir(a.tools))
    if not a.kernel:
        for name, ins in ks.items():
            print("%6d  %s" % (len(ins), name))
        return
    names = [n for n in ks if a.kernel in n]
    if len(names) != 1:
        sys.exit("sass_loops: --kernel %r matches %d kernels: %s" % (a.kernel, len(names), names))
    ls = loops(ks[names[0]])
    print("# %s: %d instructions, %d loops" % (names[0], len(ks[names[0]]), len(ls)))
    for i, (s, e, body) in enumerate(ls):
        hmma = sum(opcode(t).startswith("HMMA") for t in body)
        print("loop %2d  0x%05x-0x%05x  %5d instructions  %3d HMMA" % (i, s, e, len(body), hmma))
    if a.loop is not None:
        body = ls[a.loop][2]
        for op, n in collections.Counter(opcode(t) for t in body).most_common():
            print("%6d  %s" % (n, op))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # piped into head
        sys.exit(0)
