"""``oncotransfer train`` under torchrun (2 CPU processes, gloo on loopback) matches one process.

Same global batch size and seed, so both see the same batches: each rank trains on half of every batch with its
loss weighted by its share, and DDP's gradient mean equals the single-process gradient. Agreement is checked to
1e-5 (float32 sums in a different order), far below anything that moves a metric.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist
import yaml

from synthetic import THREE, colour_images
from oncotransfer.config import validate
from oncotransfer.experiments.run import run_experiment

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch build has no gloo backend")]
TOL = 1e-5


def make_images(root: Path, per_class: int = 9, size: int = 40) -> Path:
    return colour_images(root, THREE, per_class, size, noise=25, seed=1, stripes=True, name="{c}_{i}.png")


def raw_config(data: Path, tmp: Path, name: str, feature_engine: str = "torch", **train) -> dict:
    # batch 7 over 2 ranks: slices of 4 and 3, so the weighting of uneven shares is exercised.
    return {"name": name, "data": {"path": str(data), "image_size": 64},
            "split": {"kind": "train-val-test", "test_size": 0.2, "val_size": 0.2, "group_by_patient": False,
                      "group_duplicates": False, "allow_image_level_split": True},
            "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze": "frozen",
                      "head": {"kind": "paper_dense", "hidden": [16]}},
            "augment": {"mode": "offline", "copies": 1, "rotation": 15, "hflip": True},
            "train": {"epochs": 4, "batch_size": 7, "lr": 0.01, "seed": 5, "fast_cpu": False,
                      "feature_engine": feature_engine, "cache_dir": str(tmp / f"cache_{name}"), "num_workers": 0,
                      **train},
            "evaluate": {"bootstrap": 0}, "output_dir": str(tmp / f"runs_{name}")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m oncotransfer.cli ARGS`` on loopback only."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "oncotransfer.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # rank 1 must not have made a run directory of its own
    return runs[0]


def assert_same_run(a: Path, b: Path) -> None:
    ha, hb = (pd.read_csv(p / "history.csv") for p in (a, b))
    assert len(ha) == len(hb)
    for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
        np.testing.assert_allclose(ha[col], hb[col], atol=TOL, err_msg=col)
    pa, pb = (pd.read_csv(p / "predictions.csv") for p in (a, b))
    assert list(pa["path"]) == list(pb["path"]) and list(pa["pred"]) == list(pb["pred"])
    probs = [c for c in pa.columns if c.startswith("prob_")]
    np.testing.assert_allclose(pa[probs].to_numpy(), pb[probs].to_numpy(), atol=TOL)
    ma, mb = (json.loads((p / "metrics.json").read_text())["pooled"] for p in (a, b))
    assert ma["accuracy"] == mb["accuracy"]


@pytest.mark.parametrize("cached, engine", [(True, "torch"), (True, "onnx"), (False, "torch")],
                         ids=["feature-cache", "feature-cache-onnxruntime", "images-through-model"])
def test_two_processes_match_one(tmp_path: Path, cached: bool, engine: str) -> None:
    data = make_images(tmp_path / "img")
    kw = {"feature_cache": cached, "feature_engine": engine}
    one = run_experiment(validate(raw_config(data, tmp_path, "one", **kw)), report=True).run_dir
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw_config(data, tmp_path, "two", **kw)))
    proc = torchrun(["train", str(tmp_path / "two.yaml")], tmp_path)
    two = only_run(tmp_path / "runs_two")
    assert proc.stdout.count("accuracy:") == 1  # only rank 0 prints
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert_same_run(one, two)
    assert (two / "report.html").is_file() and (two / "checkpoint" / "model.safetensors").is_file()
    if cached:  # rank 0 alone wrote the cache, holding every image (each rank extracted half of them)
        from safetensors import safe_open
        files = list((tmp_path / "cache_two").rglob("*.safetensors"))
        assert len(files) == 2  # the originals and one offline copy
        for f in files:
            with safe_open(str(f), "pt") as fh:
                assert len(json.loads(fh.metadata()["shas"])) == 27


def test_resume_a_two_process_run(tmp_path: Path) -> None:
    """Two processes train 2 epochs and stop; two processes resume to 4. The result equals one uninterrupted
    single-process run of 4 epochs (rank 0 reads the saved state and sends it to rank 1)."""
    data = make_images(tmp_path / "img")
    one = run_experiment(validate(raw_config(data, tmp_path, "one")), report=True).run_dir
    raw = raw_config(data, tmp_path, "two", save_every_epoch=True)
    raw["train"]["epochs"] = 2
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    torchrun(["train", str(tmp_path / "two.yaml")], tmp_path)
    two = only_run(tmp_path / "runs_two")
    assert len(pd.read_csv(two / "history.csv")) == 2
    saved = yaml.safe_load((two / "config.yaml").read_text())
    saved["train"]["epochs"] = 4  # what an interrupted 4-epoch run leaves behind after its second epoch
    (two / "config.yaml").write_text(yaml.safe_dump(saved))
    shutil.rmtree(two / "checkpoint")
    torchrun(["train", "unused.yaml", "--resume", str(two)], tmp_path)
    assert_same_run(one, two)


def test_world_size_without_rendezvous_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """WORLD_SIZE > 1 set by hand (not by torchrun) fails at once with one line naming what is missing."""
    from oncotransfer import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    data = make_images(tmp_path / "img")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw_config(data, tmp_path, "bad")))
    monkeypatch.setattr(sys, "argv", ["oncotransfer", "train", str(tmp_path / "c.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: WORLD_SIZE > 1 but RANK, MASTER_ADDR, MASTER_PORT not set" in err and "torchrun" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs_bad").exists()  # nothing trained, nothing written
