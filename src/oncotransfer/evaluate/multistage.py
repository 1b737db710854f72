"""The parent report of a multistage run: each stage's curves and metrics, and multistage vs direct."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from oncotransfer.evaluate.compare import write_comparison
from oncotransfer.evaluate.render import fmt, fmt_ci, write_report
from oncotransfer.runtables import read_predictions
from oncotransfer.rundir import read_checkpoint_meta, read_run_info


def _stage(parent: Path, index: int, res) -> dict[str, Any]:
    info = res.metrics.get("protocol", {}) or {}
    pooled = res.metrics["pooled"]
    hist = res.run_dir / "plots" / "history.png"
    run = read_run_info(res.run_dir).content()
    meta = res.run_dir / "checkpoint"
    size = read_checkpoint_meta(meta).preprocessing.get("size", "?") if (meta / "meta.json").is_file() else "?"
    return {"index": index, "size": size, "name": res.run_dir.name, "n": run.get("n_images", "?"),
            "classes": ", ".join(res.classes),
            "split": info.get("split"), "image_level": info.get("image_level"),
            "accuracy": fmt_ci(pooled["accuracy"], pooled.get("accuracy_ci95")),
            "weights": run.get("weights"), "report": (res.run_dir / "report.html").relative_to(parent).as_posix(),
            "history": hist.relative_to(parent).as_posix() if hist.is_file() else None}


def write_multistage_report(parent: Path, results: list, direct=None) -> Path:
    """Write ``report.md``/``report.html`` (and ``comparison.*`` when there is a direct run) in ``parent``.

    The final stage's checkpoint is copied to ``parent/checkpoint`` so predict, export and serve take the parent.
    """
    parent = Path(parent)
    stages = [_stage(parent, i, r) for i, r in enumerate(results, 1)]
    final = results[-1]
    comparison = None
    if direct is not None:
        sections = [(label, r.metrics, read_predictions(r.run_dir / "predictions.csv"))
                    for label, r in (("multistage", final), ("direct", direct))]
        html = write_comparison(parent, sections)
        plots = [p for p in (parent / "plots").glob("*.png")]
        comparison = {"multi": fmt(final.accuracy), "direct": fmt(direct.accuracy), "file": html.name,
                      "plots": [{"title": p.stem, "file": p.relative_to(parent).as_posix()} for p in sorted(plots)]}
    # A backbone tuned at one resolution and reused at another is a confound of the comparison (measured here:
    # stage 1 at 128 px, stage 2 at 224 px lost to direct; at 128 px both, it won).
    warnings = [f"stage {i + 2} runs at {b['size']} px but stage {i + 1} trained at {a['size']} px: the carried "
                f"backbone sees another scale; set data.image_size once at the top level for all stages"
                for i, (a, b) in enumerate(zip(stages, stages[1:])) if a["size"] != b["size"]]
    out = write_report(parent, "report", f"Multistage run: {parent.name}",
                       [*(("multistage/stage.md.j2", s) for s in stages),
                        ("multistage/warnings.md.j2", {"warnings": warnings} if warnings else None),
                        ("multistage/comparison.md.j2", comparison)])
    if (final.run_dir / "checkpoint").is_dir():
        shutil.copytree(final.run_dir / "checkpoint", parent / "checkpoint", dirs_exist_ok=True)
    return out
