"""Multistage transfer learning: each stage starts from the previous stage's best checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from oncotransfer.config import ExperimentConfig, StageConfig, save_config
from oncotransfer.errors import ConfigError
from oncotransfer.train.experiment import RunResult, new_run_dir, run_experiment


def stage_config(cfg: ExperimentConfig, stage: StageConfig, init: str | None) -> ExperimentConfig:
    """The full config of one stage: the top level with the stage's own sections laid over it."""
    model = cfg.model.model_copy(update={k: v for k, v in
                                         {"head": stage.head, "freeze": stage.freeze,
                                          "weights": stage.init_from and f"run:{stage.init_from}" or init}.items()
                                         if v is not None})
    return cfg.model_copy(update={
        "name": f"{cfg.name}-{stage.name}", "data": stage.data or cfg.data, "split": stage.split or cfg.split,
        "augment": stage.augment or cfg.augment, "train": stage.train or cfg.train, "model": model,
        "stages": [], "compare_direct": False})


def run_config(cfg: ExperimentConfig | None, resume: Path | None = None,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Entry point of ``oncotransfer train``: one run, or a chain of stages."""
    if resume is not None:
        if (Path(resume) / "stages.txt").is_file():
            raise ConfigError(f"--resume {resume}: resuming a multistage run is done stage by stage; "
                              f"resume the stage directory inside it")
        return run_experiment(run_dir=resume, resume=True, log=log)
    if not cfg.stages:
        return run_experiment(cfg, log=log)
    return run_stages(cfg, log)


def run_stages(cfg: ExperimentConfig, log: Callable[[str], None] | None = None) -> RunResult:
    say = log or (lambda s: None)
    parent = new_run_dir(cfg)
    save_config(cfg, parent / "config.yaml")
    results: list[RunResult] = []
    init = None
    for i, stage in enumerate(cfg.stages):
        say(f"stage {i + 1}/{len(cfg.stages)}: {stage.name}")
        sub = stage_config(cfg, stage, init)
        res = run_experiment(sub, parent / f"stage{i + 1}_{stage.name}", log=log)
        results.append(res)
        init = f"run:{res.run_dir}"
    (parent / "stages.txt").write_text("\n".join(str(r.run_dir.name) for r in results) + "\n")
    final = results[-1]
    if cfg.compare_direct:
        say("direct: the last stage straight from the first stage's starting weights")
        direct_cfg = stage_config(cfg, cfg.stages[-1], None)
        if cfg.stages[0].init_from:
            direct_cfg = direct_cfg.model_copy(update={"model": direct_cfg.model.model_copy(
                update={"weights": f"run:{cfg.stages[0].init_from}"})})
        direct = run_experiment(direct_cfg, parent / "direct", log=log)
        from oncotransfer.evaluate.multistage import write_multistage_report
        write_multistage_report(parent, results, direct)
    else:
        from oncotransfer.evaluate.multistage import write_multistage_report
        write_multistage_report(parent, results, None)
    return RunResult(parent, final.metrics, final.classes)
