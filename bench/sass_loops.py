"""SASS instructions per loop of shipped kernel specs: what one trip of a kernel's loop (a KV block of attention, a
K step of a GEMM) costs in instructions, by class, as the GPU would run it. Cross-compiled like the static report
(``python -m jetdet.static_report``): no GPU needed.

    PYTHONPATH=. python bench/sass_loops.py "attention[bf16,D=64,mask=False,M64N64w4s3" --arch 90

prints, per spec whose name contains a pattern (repeatable, ``;``-separated too), each loop of at least
``--min`` instructions, in address order: instructions, and the MUFU (exp2), FSEL (selects), FMUL, FFMA, FADD,
ISETP and tensor-core (HMMA/HGMMA) counts in it. A loop is the range between a backward branch and its target.

Fewer instructions per trip is a proxy, not a timing: what a GPU makes of them is for ``bench/gpu_check.py``.
To compare with an older revision, run the same command with ``PYTHONPATH`` set to a checkout of it (the script
uses only what ``jetdet.static_report`` has had since the loop rule of the static report, 2026-12-05).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

CLASSES = ("MUFU", "FSEL", "FMUL", "FFMA", "FADD", "ISETP")


def loops(sass: str, min_size: int) -> list[dict]:
    from jetdet import static_report as sr

    ins, spans = [], []
    for line in sass.splitlines():
        m = sr._SASS_RE.match(line)
        if not m:
            continue
        addr = int(m["addr"], 16)
        ins.append((addr, m["op"]))
        if m["op"] == "BRA":
            b = sr._BRA_RE.search(line)
            if b and int(b.group(1), 16) < addr:
                spans.append((int(b.group(1), 16), addr))
    out = []
    for lo, hi in sorted(spans):
        ops = collections.Counter(op for a, op in ins if lo <= a <= hi)
        n = sum(ops.values())
        if n >= min_size:
            row = {"instructions": n, **{c.lower(): ops.get(c, 0) for c in CLASSES}}
            row["mma"] = ops.get("HMMA", 0) + ops.get("HGMMA", 0)
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", help="spec name substrings (';' separates several in one argument)")
    p.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    p.add_argument("--min", type=int, default=100, help="smallest loop to print, in instructions (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per spec")
    args = p.parse_args(argv)
    from jetdet import static_report as sr

    pats = [x for arg in args.patterns for x in arg.split(";") if x]
    specs = [s for s in sr.collect_specs(jit=False) if args.arch in s.archs and any(x in s.name for x in pats)]
    if not specs:
        print(f"no spec for sm_{args.arch} matches {pats}", file=sys.stderr)
        return 2
    for spec in specs:
        kernel = sr._compile(sr.as_jit_function(spec.fn), spec, args.arch)
        rows = loops(sr._sass_batch([kernel.asm["cubin"]], args.arch)[0], args.min)
        if args.json:
            print(json.dumps({"spec": spec.name, "arch": args.arch, "loops": rows}))
            continue
        print(f"{spec.name} @ sm_{args.arch}")
        for r in rows:
            rest = "  ".join(f"{k} {v}" for k, v in r.items() if k != "instructions")
            print(f"  loop: {r['instructions']:5d} instructions   {rest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
