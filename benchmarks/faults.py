"""Faults beyond the test suite: more kill -9 points, 14 full-disk sizes, read-only and blocked paths, damaged
caches, and shared caches; prints cases, tracebacks, hangs, silent wrong results and data lost per group.

    HF_HUB_OFFLINE=1 python benchmarks/faults.py [--kills 5] [--seed 0]

Every case runs the real `oncotransfer train` CLI in its own process (forked from a warm server, see
tests/faults/harness.py) on 20 synthetic images at 32 px with a random-weight Lite0, against an uninterrupted
reference run per mode. Counted as
- traceback: "Traceback" anywhere in the output;
- hang: a process that outlived its time limit;
- silent wrong: a run that reports success (exit 0 or counted finished) with results that differ from the
  reference, a train run counted finished without its report, or a failure that is not one "error:" line;
- data lost: an earlier finished run changed or no longer finished, or a cache entry that fails to load.
Full-disk and read-only cases need root (a tmpfs is mounted); they are skipped otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "faults")]

from harness import ForkServer, cache_problems, kill_and_resume, run_dirs, same_results, write_config  # noqa: E402
from synthetic import colour_images  # noqa: E402

from oncotransfer.rundir import run_finished  # noqa: E402

TRIGGERS = ["*/split.csv", "*/state/fold0.safetensors", "*/checkpoint/model.safetensors", "*/plots/history.png",
            "*/plots/roc.png", "*/report.md", "*/report.html"]
LEAVE = [0, 20_000, 100_000, 300_000, 600_000, 1_000_000, 2_000_000, 3_000_000, 6_000_000, 10_000_000,
         13_000_000, 14_000_000, 15_000_000, 20_000_000]


class Tally:
    def __init__(self):
        self.rows: dict[str, list[int]] = {}

    def add(self, group: str, traceback=False, hang=False, wrong=False, lost=False, note: str = "") -> None:
        row = self.rows.setdefault(group, [0, 0, 0, 0, 0])
        for i, v in enumerate((True, traceback, hang, wrong, lost)):
            row[i] += int(bool(v))
        if traceback or hang or wrong or lost:
            print(f"  !! {group}: {note}", flush=True)

    def print(self) -> None:
        head = f"{'group':<34} {'cases':>5} {'tracebacks':>10} {'hangs':>5} {'silent wrong':>12} {'data lost':>9}"
        print("\n" + head + "\n" + "-" * len(head))
        total = [0] * 5
        for g, r in self.rows.items():
            print(f"{g:<34} {r[0]:>5} {r[1]:>10} {r[2]:>5} {r[3]:>12} {r[4]:>9}")
            total = [a + b for a, b in zip(total, r)]
        print(f"{'all':<34} {total[0]:>5} {total[1]:>10} {total[2]:>5} {total[3]:>12} {total[4]:>9}")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(text: str) -> bool:
    return len([line for line in text.splitlines() if line.startswith("error:")]) == 1


def no_cut_short_report(out: Path) -> bool:
    """Never a metrics.json beside a missing or cut-short report (train runs write reports)."""
    for d in run_dirs(out):
        if (d / "metrics.json").exists():
            html = d / "report.html"
            if not (run_finished(d, report=True) and html.is_file() and html.read_text().rstrip().endswith("</html>")):
                return False
    return True


def kills(server, tally, tmp, data, refs, n, seed):
    for mode, (ref, seconds) in refs.items():
        rng = random.Random(f"{seed}-{mode}")
        plans = [("random", rng.uniform(0.02, 0.98) * seconds) for _ in range(n)] + [("at", t) for t in TRIGGERS]
        for k, (kind, arg) in enumerate(plans):
            case = tmp / f"kill_{mode}_{k}"
            case.mkdir()
            cfg = write_config(case / "cfg.yaml", data, case / "out", case / "cache", mode)
            got = kill_and_resume(server, cfg, case / "out", case / "run.log", **(
                {"delay": arg} if kind == "random" else {"trigger": arg}), timeout=600)
            wrong = (got["unreported"] or any(not same_results(d, ref) for d in got["finished_after_kill"])
                     or got["resume_rc"] != 0 or not same_results(got["run_dir"], ref))
            lost = bool(cache_problems(case / "cache"))
            tally.add(f"kill -9 + resume: {mode}", "Traceback" in got["log"], "hang" in (got["killed_rc"], got["resume_rc"]),
                      wrong, lost, f"{kind} {arg}: rc {got['killed_rc']}/{got['resume_rc']}")
            shutil.rmtree(case)


def mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def fill(mnt: Path, leave: int) -> None:
    (mnt / "filler").unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass


def disks(server, tally, tmp, data, refs):
    mnt = tmp / "disk"
    if not mount(mnt, "40m"):
        print("full-disk cases skipped: mounting a tmpfs needs root")
        return
    try:
        cfg = write_config(mnt / "cfg.yaml", data, mnt / "out", mnt / "cache", "frozen")
        server.run(["train", cfg], tmp / "first.log")
        first = run_dirs(mnt / "out")[0]
        before = digests(first)
        outcomes = []
        for leave in LEAVE:
            fill(mnt, leave)
            log = tmp / f"full{leave}.log"
            rc = server.run(["train", cfg, "--set", "train.seed=5"], log, timeout=600)
            text = log.read_text()
            outcomes.append(f"{leave // 1000} kB: {'ok' if rc == 0 else (text.strip().splitlines() or ['?'])[-1][:90]}")
            others = [d for d in run_dirs(mnt / "out") if d != first]
            ok_run = rc == 0 and all(run_finished(d, report=True) for d in others)
            wrong = not (ok_run or (rc == 1 and one_error_line(text) and not any(run_finished(d) for d in others)))
            wrong |= not no_cut_short_report(mnt / "out")
            lost = digests(first) != before or not run_finished(first) or bool(cache_problems(mnt / "cache"))
            tally.add("full disk (14 sizes)", "Traceback" in text, rc == "hang", wrong, lost,
                      f"leave {leave}: rc {rc}: {text.strip().splitlines()[-1:]}")
            for d in others:
                shutil.rmtree(d)
        (mnt / "filler").unlink()
        print("full disk, free space left -> outcome:\n  " + "\n  ".join(outcomes), flush=True)
        # The cache alone on a full disk (the output has room).
        cmnt = tmp / "cachedisk"
        if mount(cmnt, "1m"):
            fill(cmnt, 0)
            cfg2 = write_config(tmp / "cfg2.yaml", data, tmp / "out2", cmnt / "cache", "frozen")
            rc = server.run(["train", cfg2], tmp / "cfull.log")
            text = (tmp / "cfull.log").read_text()
            tally.add("cache disk full", "Traceback" in text, rc == "hang", not (rc == 1 and one_error_line(text)),
                      False, text[-300:])
            subprocess.run(["umount", "-l", str(cmnt)], capture_output=True)
        # Read-only output, read-only cache, and paths that are files.
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        cases = {"output on a read-only disk": ["train", tmp / "ro_out.yaml"],
                 "cache on a read-only disk": ["train", tmp / "ro_cache.yaml"]}
        write_config(tmp / "ro_out.yaml", data, mnt / "out_new", tmp / "cache_rw", "frozen")
        write_config(tmp / "ro_cache.yaml", data, tmp / "out_rw", mnt / "cache_new", "frozen")
        blocker = tmp / "a_file"
        blocker.write_text("x")
        write_config(tmp / "blocked.yaml", data, tmp / "out_b", tmp / "cache_b", "frozen")
        cases["cache path is a file"] = ["train", tmp / "blocked.yaml", "--set", f"train.cache_dir={blocker}"]
        cases["output path is a file"] = ["train", tmp / "blocked.yaml", "--set", f"output_dir={blocker}"]
        for name, argv in cases.items():
            log = tmp / "case.log"
            rc = server.run(argv, log)
            text = log.read_text()
            tally.add("read-only / blocked paths", "Traceback" in text, rc == "hang",
                      not (rc != 0 and one_error_line(text)), digests(first) != before, f"{name}: {text[-300:]}")
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def damaged_caches(server, tally, tmp, data, refs):
    for mode, pattern, engine in (("frozen", "*.safetensors", "torch"), ("finetune", "*.npy", "torch"),
                                  ("frozen", "*.onnx", "onnx")):
        for cut in (0, 8, 0.5):
            case = tmp / f"dmg_{mode}_{pattern[2:]}_{cut}"
            case.mkdir()
            cfg = write_config(case / "cfg.yaml", data, case / "out", case / "cache", mode)
            if engine == "onnx":
                text = cfg.read_text().replace("feature_engine: torch", "feature_engine: onnx")
                cfg.write_text(text)
            server.run(["train", cfg], case / "a.log")
            first = run_dirs(case / "out")[0]
            for f in (case / "cache").rglob(pattern):
                f.write_bytes(f.read_bytes()[: int(cut * f.stat().st_size) if isinstance(cut, float) else cut])
            if engine == "onnx":  # features cached in full would never open the export: make them needed
                for f in (case / "cache").rglob("*.safetensors"):
                    f.unlink()
            rc = server.run(["train", cfg], case / "b.log")
            text = (case / "b.log").read_text()
            second = [d for d in run_dirs(case / "out") if d != first]
            wrong = rc != 0 or not second or not same_results(second[0], first) or "damaged" not in text and \
                "does not load" not in text
            tally.add("damaged cache entries", "Traceback" in text, rc == "hang", wrong,
                      bool(cache_problems(case / "cache")), f"{mode} {pattern} cut {cut}: rc {rc} {text[-300:]}")
            shutil.rmtree(case)


def shared_cache(server, tally, tmp, data, refs):
    for n in (2, 3):
        case = tmp / f"shared{n}"
        case.mkdir()
        cfgs = [write_config(case / f"c{k}.yaml", data, case / f"out{k}", case / "cache", "frozen")
                for k in range(n)]
        pids = [server.start(["train", c], case / f"r{k}.log") for k, c in enumerate(cfgs)]
        rcs = [server.wait(p, 600) for p in pids]
        logs = "".join((case / f"r{k}.log").read_text() for k in range(n))
        wrong = rcs != [0] * n or not all(same_results(run_dirs(case / f"out{k}")[0], refs["frozen"][0])
                                          for k in range(n))
        tally.add("trainings sharing a cache at once", "Traceback" in logs, "hang" in rcs, wrong,
                  bool(cache_problems(case / "cache")), f"{n} at once: {rcs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5, help="random kill times per mode (plus one per trigger file)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults-") as td:
        tmp = Path(td)
        data = colour_images(tmp / "img", per_class=10, size=40, stripes=True)
        server = ForkServer()
        refs = {}
        for mode in ("frozen", "finetune", "kfold"):
            cfg = write_config(tmp / f"{mode}.yaml", data, tmp / f"ref_{mode}", tmp / f"refcache_{mode}", mode)
            t = time.monotonic()
            assert server.run(["train", cfg], tmp / f"ref_{mode}.log") == 0
            refs[mode] = (run_dirs(tmp / f"ref_{mode}")[0], time.monotonic() - t)
            print(f"reference {mode}: {refs[mode][1]:.1f} s", flush=True)
        tally = Tally()
        for step in (kills, disks, damaged_caches, shared_cache):
            if step is kills:
                step(server, tally, tmp, data, refs, args.kills, args.seed)
            else:
                step(server, tally, tmp, data, refs)
            print(f"{step.__name__} done ({time.monotonic() - t0:.0f} s)", flush=True)
        server.close()
    tally.print()
    print(f"\n{time.monotonic() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
