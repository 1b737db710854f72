"""Fault suite (issue 12 item 3): kill -9 of real `oncotransfer train` processes, then --resume; full and
read-only disks; damaged and shared caches. Every run is tiny (20 images, 32 px, random-weight Lite0).
More kill points and disk sizes: benchmarks/faults.py."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (ForkServer, cache_problems, kill_and_resume, run_dirs, same_results,  # noqa: E402
                     write_config)
from oncotransfer.rundir import read_metrics, run_finished
from synthetic import colour_images

SEED = 12  # the kill times are random but repeatable
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server and /proc: Linux only")


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, server):
    """The images and one uninterrupted reference run per mode (with its own cache), timed."""
    root = tmp_path_factory.mktemp("faults")
    data = colour_images(root / "img", per_class=10, size=40, stripes=True)
    refs = {}
    for mode in ("frozen", "finetune", "kfold"):
        cfg = write_config(root / f"{mode}.yaml", data, root / f"ref_{mode}", root / f"refcache_{mode}", mode)
        t0 = time.monotonic()
        assert server.run(["train", cfg], root / f"ref_{mode}.log") == 0, (root / f"ref_{mode}.log").read_text()
        refs[mode] = (run_dirs(root / f"ref_{mode}")[0], time.monotonic() - t0)
    return root, data, refs


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


# Seeded kill points: a random moment of each mode's run, and for the frozen run also the moment its plots are
# being drawn (metrics computed, report not yet written): where a grid used to count a run as finished.
CASES = [("frozen", "random"), ("frozen", "report"), ("finetune", "random"), ("kfold", "random")]


@pytest.mark.parametrize("mode,when", CASES)
def test_kill9_then_resume_gives_identical_results(world, server, mode, when, tmp_path):
    root, data, refs = world
    ref, seconds = refs[mode]
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", data, tmp_path / "out", cache, mode)
    rng = random.Random(f"{SEED}-{mode}")
    if when == "random":
        got = kill_and_resume(server, cfg, tmp_path / "out", tmp_path / "run.log", delay=rng.uniform(0.1, 0.9) * seconds)
    else:  # the second-last plot: the last plot and both reports are still to come, then metrics.json
        got = kill_and_resume(server, cfg, tmp_path / "out", tmp_path / "run.log", trigger="*/plots/roc.png")
    assert got["killed_rc"] in (-9, 0)  # 0: it finished before the kill landed (then resume re-evaluates)
    assert not got["unreported"], "a train run without its report counted as finished"
    for d in got["finished_after_kill"]:  # anything counted finished right after the kill is complete
        assert same_results(d, ref)
    if when == "report":
        assert got["killed_rc"] == -9 and not got["finished_after_kill"]
    assert got["resume_rc"] == 0, got["log"][-3000:]
    _no_traceback(got["log"])
    assert run_finished(got["run_dir"], report=True)
    assert same_results(got["run_dir"], ref)
    assert cache_problems(cache) == []


def test_damaged_feature_cache_entry_is_dropped_and_recomputed(world, server, tmp_path):
    """A cut-short .safetensors entry (as a kill left it before writes were atomic): a warning, then the same
    numbers; the rewritten entry loads."""
    root, data, refs = world
    cache = tmp_path / "cache"
    shutil.copytree(root / "refcache_frozen", cache)
    entries = sorted(cache.rglob("*.safetensors"))
    assert entries
    for e in entries:
        e.write_bytes(e.read_bytes()[: e.stat().st_size // 2])
    cfg = write_config(tmp_path / "cfg.yaml", data, tmp_path / "out", cache, "frozen")
    assert server.run(["train", cfg], tmp_path / "run.log") == 0
    log = (tmp_path / "run.log").read_text()
    _no_traceback(log)
    assert "feature cache entry" in log and "damaged" in log
    assert same_results(run_dirs(tmp_path / "out")[0], refs["frozen"][0])
    assert cache_problems(cache) == []


def test_damaged_onnx_export_in_cache_is_exported_again(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from oncotransfer.train.features import onnx_session
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path / "backbone_16.onnx"
    onnx_session(path, net, 16, torch.device("cpu"))
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, "oncotransfer.cache"):
        session = onnx_session(path, net, 16, torch.device("cpu"))
    assert "does not load" in caplog.text
    x = torch.rand(2, 3, 16, 16)
    out = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, net(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("keep", [0, 100])  # empty (np.load raises EOFError) or cut inside the data
def test_damaged_activation_array_is_dropped_and_recomputed(tmp_path, caplog, keep):
    from oncotransfer.train.activations import ActivationCache
    cache = ActivationCache(tmp_path, {"model": "m"})
    shas = [f"s{i}" for i in range(5)]

    def compute(idx):
        return np.stack([np.full((2, 3, 3), float(i), np.float16) for i in idx])
    cache.get({"v": 0}, shas, compute)
    npy = next(tmp_path.rglob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:keep])
    with caplog.at_level(logging.WARNING, "oncotransfer.cache"):
        arr, rows = cache.get({"v": 0}, shas, compute)
    assert "damaged" in caplog.text
    assert [float(arr[r][0, 0, 0]) for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert cache_problems(tmp_path) == []


_STRESS = r"""
import torch
from oncotransfer.train.features import FeatureCache
cache = FeatureCache({root!r}, {{"model": "stress"}})
shas = [f"img{{i}}" for i in range(40)]
for it in range(60):
    want = shas[:{start} + it % 30]
    feats = cache.get({{"view": 0}}, want, lambda idx: torch.stack([torch.full((64,), float(int(want[i][3:])))
                                                                   for i in idx]))
    # every row is exactly the feature of its own image: a half-written or mixed entry would not be
    for s, row in zip(want, feats):
        assert torch.all(row == float(int(s[3:]))), (s, row[:3])
print("ok", cache.hits, cache.misses)
"""


def test_two_processes_sharing_a_feature_cache_never_read_half_an_entry(server, tmp_path):
    """Two processes grow and read one cache file at once, 60 rounds each: every read is a whole entry."""
    pids = [server.start_code(_STRESS.format(root=str(tmp_path / "cache"), start=k), tmp_path / f"p{k}.log")
            for k in (5, 10)]
    rcs = [server.wait(p, 240) for p in pids]
    logs = [(tmp_path / f"p{k}.log").read_text() for k in (5, 10)]
    assert rcs == [0, 0], logs
    assert all(log.startswith("ok") for log in logs) and "damaged" not in "".join(logs)
    assert cache_problems(tmp_path / "cache") == []


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> None:
    """Leave about ``leave`` bytes free on ``mnt``."""
    (mnt / "filler").unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_disk_is_one_clear_line_and_keeps_earlier_runs_and_cache(world, server, small_disk):
    root, data, refs = world
    cfg = write_config(small_disk / "cfg.yaml", data, small_disk / "out", small_disk / "cache", "frozen")
    assert server.run(["train", cfg], small_disk.parent / "first.log") == 0
    first = run_dirs(small_disk / "out")[0]
    before = _digests(first)
    for leave in (600_000, 3_000_000):  # runs out in the fit state / in the checkpoint
        _fill(small_disk, leave)
        log = small_disk.parent / f"full{leave}.log"
        rc = server.run(["train", cfg, "--set", "train.seed=5"], log)
        text = log.read_text()
        assert rc == 1, text
        _no_traceback(text)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk is full" in errors[0] and str(small_disk) in errors[0], text
        assert [d for d in run_dirs(small_disk / "out") if run_finished(d)] == [first]
        assert _digests(first) == before
        assert cache_problems(small_disk / "cache") == []
        for d in run_dirs(small_disk / "out"):
            if d != first:
                shutil.rmtree(d)
    (small_disk / "filler").unlink()
    assert same_results(first, refs["frozen"][0])


def test_read_only_disk_and_cache_path_that_is_a_file_are_one_line(world, server, small_disk):
    root, data, refs = world
    cfg = write_config(small_disk.parent / "cfg.yaml", data, small_disk / "out", small_disk.parent / "cache",
                       "frozen")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    log = small_disk.parent / "ro.log"
    assert server.run(["train", cfg], log) == 1
    text = log.read_text()
    _no_traceback(text)
    assert "read-only" in text and str(small_disk / "out") in text
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    blocker = small_disk.parent / "cache_file"
    blocker.write_text("not a folder")
    log = small_disk.parent / "file.log"
    # refused by the pre-run check (a config error, exit 2) before any run folder or cache is touched
    assert server.run(["train", cfg, "--set", f"train.cache_dir={blocker}"], log) == 2
    text = log.read_text()
    _no_traceback(text)
    assert "is a file, not a folder" in text and str(blocker) in text
    assert not any(run_finished(d) for d in run_dirs(small_disk / "out"))


def test_metrics_record_that_the_report_was_written(world):
    """Layout 2: metrics.json comes last and says whether its report exists (what run_finished reads)."""
    _, _, refs = world
    run = refs["kfold"][0]
    m = read_metrics(run)
    assert m.layout == 2 and m.report is True
    assert json.loads((run / "run.json").read_text())["layout"] == 2
    assert (run / "report.html").stat().st_mtime_ns <= (run / "metrics.json").stat().st_mtime_ns
