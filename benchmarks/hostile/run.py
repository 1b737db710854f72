"""Run every hostile family (benchmarks/hostile/<family>.py, each with ``build(t) -> list[Case]``) through the
real command line and print one row per case and the table of verdicts per family.

Usage: PYTHONPATH=src python benchmarks/hostile/run.py [--only FAMILY[,FAMILY]] [--match TEXT] [--quiet]
Exit 1 when any case is not ok.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import VERDICTS, run_case  # noqa: E402

FAMILIES = [p.stem for p in sorted(Path(__file__).resolve().parent.glob("*.py"))
            if p.stem not in ("core", "run", "__init__") and not p.stem.startswith("_")]


def _family(name: str):
    """The family module by its file: a family may put benchmarks/ on sys.path, where benchmarks/overlap.py
    (a measurement, not a family) would shadow the ``overlap`` family if imported by name."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hostile_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated families (default: all): " + ", ".join(FAMILIES))
    ap.add_argument("--match", default="", help="run only the cases whose name holds this text")
    ap.add_argument("--quiet", action="store_true", help="print only the cases that are not ok, and the table")
    args = ap.parse_args()
    families = [f for f in (args.only.split(",") if args.only else FAMILIES) if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {FAMILIES}")
    table: dict[str, Counter] = {}
    peaks: dict[str, int] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            t = Path(tmp) / fam
            t.mkdir()
            cases = _family(fam).build(t)
            if args.match:
                cases = [c for c in cases if args.match in c.name or c.name.startswith("train ")]
            counts = table.setdefault(fam, Counter())
            for c in cases:
                verdict, detail, r = run_case(c, t)
                counts[verdict] += 1
                peaks[fam] = max(peaks.get(fam, 0), r.peak)
                if not args.quiet or verdict != "ok":
                    print(f"{verdict:9s} | {fam:10s} | {c.name[:56]:56s} | {r.peak / 2**20:6.0f} MB | {detail}",
                          flush=True)
    print(f"\n| family | cases | {' | '.join(VERDICTS)} | peak MB |")
    print("|---|" + "---|" * (len(VERDICTS) + 2))
    total = Counter()
    for fam, counts in table.items():
        total += counts
        print(f"| {fam} | {sum(counts.values())} | " + " | ".join(str(counts[v]) for v in VERDICTS)
              + f" | {peaks.get(fam, 0) / 2**20:.0f} |")
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[v]) for v in VERDICTS)
          + f" | {max(peaks.values(), default=0) / 2**20:.0f} |")
    print(f"\n{time.time() - t0:.0f} s")
    return 0 if sum(total.values()) == total["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
