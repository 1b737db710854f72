"""Experiment tracking: log a finished run directory (config, per-epoch history, metrics, report) to MLflow.

``log_run(run_dir)`` reads only the files a run leaves behind, so a run can be tracked right after training
(``--track mlflow``) or later. A multistage parent directory becomes a parent MLflow run with one nested run
per stage (and ``direct``). Default store: ``sqlite:///<runs folder>/mlflow.db`` next to the run directories.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from oncotransfer.yaml_io import read_run_yaml

from oncotransfer.errors import ConfigError, MissingExtraError, OncoError
from oncotransfer.rundir import read_metrics

ARTEFACTS = ("config.yaml", "metrics.json", "report.md", "report.html", "history.csv", "predictions.csv",
             "comparison.md", "comparison.html", "stages.txt")
_MAX_VALUE = 6000  # MLflow's limit on a param value (characters)
_MAX_KEY = 250
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


class TrackingError(OncoError):
    """The tracking store cannot be reached or refused what was logged."""


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise MissingExtraError("--track mlflow needs MLflow, which is not installed; "
                                "pip install 'oncotransfer[mlflow]'") from None
    return mlflow


TRACKERS: dict[str, Callable[[], Any]] = {"mlflow": _mlflow}


def check_tracker(tracker: str, tracking_uri: str | None = None) -> None:
    """Fail fast (before any training): unknown tracker, missing package, or an unreachable server."""
    if tracker not in TRACKERS:
        raise ConfigError(f"--track {tracker!r}: unknown tracker; valid: {', '.join(sorted(TRACKERS))}")
    TRACKERS[tracker]()
    if tracking_uri:
        _ping(tracking_uri)
        with _mlflow_errors(tracking_uri):
            _client(tracking_uri).search_experiments(max_results=1)


def default_uri(run_dir: str | Path) -> str:
    """``sqlite:///`` store in the folder that holds the run directory (``runs/mlflow.db``)."""
    return store_in(Path(run_dir).resolve().parent)


def store_in(folder: str | Path) -> str:
    """The ``sqlite:///`` URI of ``folder/mlflow.db``."""
    return "sqlite:///" + (Path(folder).resolve() / "mlflow.db").as_posix()


def log_run(run_dir: str | Path, tracker: str = "mlflow", tracking_uri: str | None = None,
            experiment: str | None = None, tags: dict[str, Any] | None = None, log_checkpoint: bool = False,
            run_name: str | None = None) -> str:
    """Log a finished run directory (or a multistage parent with one nested run per stage); return the run id.

    Logging the same directory again into the same experiment returns the earlier run's id and logs nothing,
    so a run tracked right after training and again later is one MLflow run, not two."""
    check_tracker(tracker)
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise TrackingError(f"{run}: not a run directory (no config.yaml); give the folder `oncotransfer train` wrote")
    uri = tracking_uri or default_uri(run)
    cfg = read_run_yaml(run / "config.yaml")[0]
    with _mlflow_errors(uri):
        client = _client(uri)
        exp_id = _experiment(client, experiment or str(cfg.get("name") or run.name), uri)
        earlier = _logged_before(client, exp_id, run)
        if earlier:
            return earlier
        base_tags = {"oncotransfer.run_dir": str(run.resolve()), **{k: str(v) for k, v in (tags or {}).items()}}
        parent_id = _log_one(client, exp_id, run, run_name or run.name, base_tags, log_checkpoint)
        if (run / "stages.txt").is_file():
            children = [run / n for n in (run / "stages.txt").read_text().split()] + [run / "direct"]
            for child in (c for c in children if (c / "config.yaml").is_file()):
                _log_one(client, exp_id, child, child.name, {**base_tags, "oncotransfer.run_dir": str(child.resolve()),
                                                             "mlflow.parentRunId": parent_id}, log_checkpoint)
    return parent_id


def _logged_before(client, exp_id: str, run: Path) -> str | None:
    """The id of a FINISHED top-level run of ``exp_id`` already logged from ``run``, if any."""
    path = str(run.resolve())
    quote = "'" if "'" not in path else '"'
    if quote in path:  # both quote characters: MLflow's filter grammar cannot say it; log again
        return None
    found = client.search_runs([exp_id], f"tags.`oncotransfer.run_dir` = {quote}{path}{quote} "
                                         "and attributes.status = 'FINISHED'", max_results=10)
    top = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return top[0].info.run_id if top else None


def _log_one(client, exp_id: str, run: Path, name: str, tags: dict[str, str], log_checkpoint: bool) -> str:
    from mlflow.entities import Metric, Param
    mr = client.create_run(exp_id, run_name=name, tags=tags)
    rid = mr.info.run_id
    try:
        cfg = read_run_yaml(run / "config.yaml")[0]
        params = [Param(k, v) for k, v in flatten_params(cfg).items()]
        metrics = [Metric(k, v, 0, step) for k, v, step in history_metrics(run / "history.csv")]
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file() and (run / "stages.txt").is_file():  # parent: the final stage's metrics
            last = (run / "stages.txt").read_text().split()
            metrics_file = run / last[-1] / "metrics.json" if last else metrics_file
        if metrics_file.is_file():
            content = read_metrics(metrics_file.parent).content()
            metrics += [Metric(k, v, 0, 0) for k, v in final_metrics(content).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        for f in ARTEFACTS:
            if (run / f).is_file():
                client.log_artifact(rid, str(run / f))
        if (run / "plots").is_dir():
            client.log_artifacts(rid, str(run / "plots"), "plots")
        if log_checkpoint and (run / "checkpoint").is_dir():
            client.log_artifacts(rid, str(run / "checkpoint"), "checkpoint")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def flatten_params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys (``train.lr``); lists and empty mappings JSON-encoded; values cut to MLflow's 6000 chars."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key + "."))
            continue
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        if len(text) > _MAX_VALUE:
            text = text[:_MAX_VALUE - 14] + "...(truncated)"
        out[_name(key)] = text
    return out


def history_metrics(path: Path) -> list[tuple[str, float, int]]:
    """(name, value, epoch) per history.csv cell; names get a ``fold{k}/`` prefix when there are several folds."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    several = len({r.get("fold") for r in rows}) > 1
    out = []
    for r in rows:
        prefix = f"fold{r['fold']}/" if several else ""
        step = int(float(r.get("epoch") or 0))
        out += [(_name(prefix + col), v, step) for col, cell in r.items()
                if col not in ("fold", "epoch", None) and (v := _number(cell)) is not None]
    return out


def final_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of metrics.json under dotted names (``pooled.accuracy``, ``pooled.accuracy_ci95.0``);
    confusion matrices, strings, booleans and nulls are left out (metrics.json itself is an artefact)."""
    out: dict[str, float] = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics)
    for k, v in items:
        key = f"{prefix}{k}"
        if k == "confusion_matrix":
            continue
        elif isinstance(v, (dict, list)):
            out.update(final_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[_name(key)] = float(v)
    return out


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _name(key: str) -> str:
    return _BAD_CHARS.sub("_", key)[:_MAX_KEY]


def _client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///") and ":memory:" not in uri:  # artefacts beside the db, not in ./mlruns
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _ping(uri: str) -> None:
    """A tracking server that does not answer fails in seconds (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"--tracking-uri {uri}: no tracking server answers ({getattr(e, 'reason', e)}); "
                            "start one with `mlflow server` or fix the URI") from None


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow's and alembic's INFO chatter off; their errors become one line."""
    from mlflow.exceptions import MlflowException
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    except (MlflowException, OSError) as e:
        first = (str(getattr(e, "message", e)).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(f"tracking to {uri} failed: {first[:300]}") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
