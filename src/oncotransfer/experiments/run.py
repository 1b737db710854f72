"""``run_experiment(config) -> RunResult``: data, split, one model per fold (``train.fold``), run directory, report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd

from oncotransfer.config import ExperimentConfig, load_saved_config, save_config, to_dict
from oncotransfer.data.augment import Augmenter, describe
from oncotransfer.data.overlap import data_warning_lines, save_training_keypoints, split_frame
from oncotransfer.data.splits import make_split, splitter
from oncotransfer.errors import CheckpointError, OncoError, RunInterrupted
from oncotransfer.evaluate.report import evaluate_run
from oncotransfer.experiments.preflight import check_before_run, remove_unstarted
from oncotransfer.io import atomic_to_csv
from oncotransfer.models.backbones import get_backbone
from oncotransfer.models.checkpoint import checkpoint_meta, write_checkpoint
from oncotransfer.models.heads import head_factory
from oncotransfer.progress import Progress, prefixed
from oncotransfer.rundir import mark_unfinished, write_run_info
from oncotransfer.train import distributed as D
from oncotransfer.train.data import LoadedData, load_data
from oncotransfer.train.device import pick_device, precision_label
from oncotransfer.models.ood import detector_fitter
from oncotransfer.train.fold import collect_outputs, fold_ood, train_fold
from oncotransfer.train.fold_outputs import NO_VAL_NOTE, calibrate_folds, fold_file, save_fold_tensors, state_snapshot
from oncotransfer.train.ood import pool_thresholds, save_run_ood, with_ood_columns
from oncotransfer.train.loop import FitState


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    classes: list[str]

    @property
    def accuracy(self) -> float:
        return float(self.metrics["pooled"]["accuracy"])


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    base = Path(cfg.output_dir) / f"{stamp}_{cfg.name}"
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir, k = Path(f"{base}-{k}"), k + 1
    run_dir.mkdir(parents=True)
    return run_dir


def run_experiment(cfg: ExperimentConfig | None = None, run_dir: str | Path | None = None, *, resume: bool = False,
                   data: LoadedData | None = None, on_epoch_end: Callable[[int, FitState], None] | None = None,
                   log: Callable[[str], None] | None = None, report: bool = True,
                   progress: Progress | None = None) -> RunResult:
    """Train and evaluate one config; ``resume=True`` continues the run in ``run_dir`` from its saved state.
    ``log`` takes message lines, ``progress`` the extraction and epoch counts per fold ("fold 1/5 epochs").

    Under torchrun every rank calls this; rank 0 alone writes the run directory (see ``train.distributed``)."""
    main = D.is_main()
    say = (log if main else None) or (lambda s: None)
    if resume:
        run_dir = Path(run_dir)
        if main and not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = D.broadcast(load_saved_config(run_dir / "config.yaml") if main else None)
        if main:  # results are rewritten: until the new metrics.json is in place the run is not finished
            mark_unfinished(run_dir)
    t0 = time.perf_counter()
    # Everything that can fail on bad input runs before a run directory exists, so none is left half-made.
    spec = get_backbone(cfg.model.backbone)
    splitter(cfg.split.kind)  # unknown plug-in names fail here, before any work
    head_factory(cfg.model.head.kind)
    if cfg.evaluate.ood != "none":
        detector_fitter(cfg.evaluate.ood)
    size = cfg.data.image_size or spec.input_size
    data = data or load_data(cfg.data, size, cfg.train.num_workers, phash=cfg.split.group_duplicates)
    m = data.manifest
    split = make_split(m, cfg.split, data.dup_groups)
    check_before_run(cfg, m.classes, resume)
    device = D.local_device(pick_device(cfg.train.device))  # a device this machine lacks: before any folder
    if cfg.train.cache_dir and main:  # so is a cache folder that cannot exist (under /proc, a symlink loop)
        Path(cfg.train.cache_dir).mkdir(parents=True, exist_ok=True)
    if not resume:
        if main:
            run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        run_dir = Path(D.broadcast(str(run_dir) if main else None))
    if main:
        split_df = split_frame(split, m, data.phashes)
        atomic_to_csv(split_df, run_dir / "split.csv", index=False)
        # keypoints of every image, so `evaluate --data` finds flipped, rotated and cropped copies of them later
        save_training_keypoints(run_dir, split_df, m.paths, cfg.data.us_region == "auto")
        # Split warnings (image-level split, classes held by few patients) belong on the terminal too, not only
        # in run.json and the report's Warnings section.
        for line in data_warning_lines(list(data.warnings) + list(split.warnings), m.skipped, run_dir / "run.json"):
            say(line)
    say(f"{len(m)} images, {len(m.classes)} classes, split {cfg.split.kind}: {len(split.folds)} fold(s), "
        f"{'grouped by ' + split.grouped_by if split.grouped_by else 'IMAGE-LEVEL'}")
    aug = Augmenter(cfg.augment)
    histories, outputs, best_epochs, modes, fold0, fold0_state, oods = [], [], {}, set(), None, None, {}
    warnings = list(data.warnings) + list(split.warnings)
    try:
        for fold in split.folds:
            result = train_fold(cfg, data, fold, run_dir, device, aug, on_epoch_end, say,
                                prefixed(progress if main else None, f"fold {fold.index + 1}/{len(split.folds)} "))
            model = result.model
            modes.add(result.mode)
            best_epochs[str(fold.index)] = result.best_epoch
            histories.append(pd.DataFrame(result.history).assign(fold=fold.index))
            outputs.append(collect_outputs(result, data, cfg, device))  # calibrated after the last fold
            oods[fold.index] = fold_ood(result, data, cfg, reference=fold.index == 0)
            if fold.index == 0:
                fold0, fold0_state = model, state_snapshot(model)
                warnings += list(model.weights.warnings if model.weights else [])
            elif main:  # every fold's model is kept: only the tensors that differ from fold 0's
                save_fold_tensors(run_dir, fold.index, model, fold0_state)
    except RunInterrupted:
        raise
    except KeyboardInterrupt as e:
        raise RunInterrupted(run_dir) from e  # so the CLI can name the directory that --resume continues
    except OncoError:
        if main and not resume:
            remove_unstarted(run_dir)  # e.g. weights that cannot be had: no folder holding only config.yaml
        raise
    if not main:
        return RunResult(run_dir, {}, m.classes)
    try:  # Ctrl-C while the results are written: the run is resumable too (its folds are saved)
        history = pd.concat(histories)[["fold", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]]
        atomic_to_csv(history, run_dir / "history.csv", index=False)
        # Temperature scaling once every fold is done: one T on the pooled validation logits unless every
        # fold's validation subset is large enough for its own (train.temperature.choose_temperatures).
        preds, cal = calibrate_folds(outputs, cfg.evaluate.calibration, cfg.model.head.sigmoid)
        own_thresholds = pool_thresholds(oods, cfg.evaluate.ood_pass_rate,
                                         all(o.detector.same_scale for o in oods.values() if o is not None))
        preds = [with_ood_columns(p, oods[o.fold]) for p, o in zip(preds, outputs)]
        temps = cal.temperatures
        for line in [cal.summary()] + [f"warning: {w}" for w in cal.warnings]:
            if line:
                say(line)
        warnings += cal.warnings
        atomic_to_csv(pd.concat(preds), run_dir / "predictions.csv", index=False)
        if cfg.evaluate.calibrate and all(t is None for t in temps.values()):
            warnings.append(NO_VAL_NOTE)
        meta = checkpoint_meta(fold0, m.classes, cfg.model.head.model_dump(), to_dict(cfg),
                               {"fold": 0, "n_folds": len(split.folds), "temperature": temps.get("0"),
                                "folds": [{"fold": f.index, "file": fold_file(f.index), "temperature": temps[str(f.index)]}
                                          for f in split.folds]})
        write_checkpoint(run_dir, fold0, meta)
        warnings += save_run_ood(run_dir, oods, cfg, fold0.head, temps, split.folds[0], data.dup_groups,
                                 own_thresholds)
        protocol = {"split": cfg.split.kind, "folds": len(split.folds), "grouped_by": split.grouped_by,
                    "image_level": split.image_level, "selection_on_test": split.selection_on_test,
                    "augment": describe(cfg.augment), "zoom_mode": cfg.augment.zoom_mode if cfg.augment.zoom else None,
                    "feature_cache": "; ".join(sorted(modes))}
        write_run_info(run_dir, {
            "name": cfg.name, "classes": m.classes, "n_images": len(m), "protocol": protocol,
            "best_epochs": best_epochs, "seconds": time.perf_counter() - t0, "device": str(device),
            "precision": precision_label(device, cfg.train.fast_cpu), "weights": cfg.model.weights,
            "backbone": cfg.model.backbone, "warnings": warnings, "skipped": m.skipped,
            "checkpoint": f"fold 0 of {len(split.folds)}" + (" (folds 1.. in checkpoint/folds/)" if len(split.folds) > 1
                                                               else ""),
            "temperatures": temps, "calibration": {**cal.record, "enabled": cfg.evaluate.calibrate},
            "processes": D.world_size()})
        metrics = {}
        if report:
            metrics = evaluate_run(run_dir)
        return RunResult(run_dir, metrics, m.classes)
    except RunInterrupted:
        raise
    except KeyboardInterrupt as e:
        raise RunInterrupted(run_dir) from e
