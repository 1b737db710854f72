"""Multistage transfer learning: each stage starts from the previous stage's best checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from oncotransfer.config import ExperimentConfig, StageConfig, save_config, to_dict, validate
from oncotransfer.errors import ConfigError, OncoError
from oncotransfer.evaluate.multistage import write_multistage_report
from oncotransfer.experiments.preflight import remove_unstarted
from oncotransfer.experiments.run import RunResult, new_run_dir, run_experiment
from oncotransfer.io import atomic_write_text
from oncotransfer.progress import Progress, prefixed
from oncotransfer.train import distributed as D
from oncotransfer.weight_sources import run_weights


def _over(base: BaseModel, stage: BaseModel | None) -> BaseModel:
    """Fields the stage sets explicitly win; the rest come from the top level."""
    if stage is None:
        return base
    return base.model_copy(update={k: getattr(stage, k) for k in stage.model_fields_set})


def stage_config(cfg: ExperimentConfig, stage: StageConfig, init: str | None) -> ExperimentConfig:
    """The full config of one stage: the top level with the stage's own keys laid over it, validated again."""
    weights = run_weights(stage.init_from) if stage.init_from else init
    model = cfg.model.model_copy(update={k: v for k, v in {"head": stage.head, "freeze": stage.freeze,
                                                            "weights": weights}.items() if v is not None})
    merged = cfg.model_copy(update={
        "name": f"{cfg.name}-{stage.name}", "data": _over(cfg.data, stage.data), "split": _over(cfg.split, stage.split),
        "augment": _over(cfg.augment, stage.augment), "train": _over(cfg.train, stage.train), "model": model,
        "evaluate": _over(cfg.evaluate, stage.evaluate),
        "stages": [], "compare_direct": False})
    return validate(to_dict(merged), f"stage {stage.name!r}")


def run_config(cfg: ExperimentConfig | None, resume: Path | None = None,
               log: Callable[[str], None] | None = None, progress: Progress | None = None) -> RunResult:
    """Entry point of ``oncotransfer train``: one run, or a chain of stages. ``progress``: see ``run_experiment``."""
    if resume is not None:
        if (Path(resume) / "stages.txt").is_file():
            raise ConfigError(f"--resume {resume}: resuming a multistage run is done stage by stage; "
                              f"resume the stage directory inside it")
        return run_experiment(run_dir=resume, resume=True, log=log, progress=progress)
    if not cfg.stages:
        return run_experiment(cfg, log=log, progress=progress)
    return run_stages(cfg, log, progress)


def run_stages(cfg: ExperimentConfig, log: Callable[[str], None] | None = None,
               progress: Progress | None = None) -> RunResult:
    for i, stage in enumerate(cfg.stages):  # before any stage trains: every stage needs its data
        if (stage.data and stage.data.path) is None and cfg.data.path is None:
            raise ConfigError(f"stage {i} ({stage.name!r}) names no data; pass it with "
                              f"--set stages.{i}.data.path=PATH (a folder of class sub-folders, a manifest CSV "
                              "or demo:NAME)")
    main = D.is_main()
    say = (log if main else None) or (lambda s: None)
    if main:
        parent = new_run_dir(cfg)
        save_config(cfg, parent / "config.yaml")
    # Under torchrun, ranks on other machines need this path on a shared file system (stage k+1 loads stage k).
    parent = Path(D.broadcast(str(parent) if main else None))
    results: list[RunResult] = []
    init = None
    for i, stage in enumerate(cfg.stages):
        say(f"stage {i + 1}/{len(cfg.stages)}: {stage.name}")
        sub = stage_config(cfg, stage, init)
        try:
            res = run_experiment(sub, parent / f"stage{i + 1}_{stage.name}", log=log,
                                 progress=prefixed(progress, f"{stage.name}: "))
        except OncoError:
            if main and not results:
                remove_unstarted(parent)  # the first stage could not start: no folder holding only config.yaml
            raise
        results.append(res)
        init = run_weights(res.run_dir)
    if main:
        atomic_write_text(parent / "stages.txt", "\n".join(str(r.run_dir.name) for r in results) + "\n")
    final = results[-1]
    if cfg.compare_direct:
        say("direct: the last stage straight from the first stage's starting weights")
        direct_cfg = stage_config(cfg, cfg.stages[-1], None)
        if cfg.stages[0].init_from:
            direct_cfg = direct_cfg.model_copy(update={"model": direct_cfg.model.model_copy(
                update={"weights": run_weights(cfg.stages[0].init_from)})})
        direct = run_experiment(direct_cfg, parent / "direct", log=log, progress=prefixed(progress, "direct: "))
    if main:
        write_multistage_report(parent, results, direct if cfg.compare_direct else None)
    return RunResult(parent, final.metrics, final.classes)
