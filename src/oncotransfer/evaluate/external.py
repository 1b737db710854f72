"""``evaluate RUN --data OTHER`` checks OTHER against the images the run was trained and validated on: how many
overlap (byte-identical or near-identical by pHash), and the score of the clean remainder beside the full set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from oncotransfer.data.keypoints import describe_files
from oncotransfer.data.overlap import find_overlap, training_reference
from oncotransfer.errors import OncoError
from oncotransfer.runtables import check_split


def overlap_checked(run_dir: str | Path, df: pd.DataFrame, folds: list[int], size: int, us_region: bool = False
                    ) -> tuple[pd.DataFrame, dict | None]:
    """(predictions without the hash columns, the overlap summary for metrics and report; None when the run
    has no split.csv to compare with). With a ``file`` column (the images' paths) flipped, rotated, cropped
    and padded copies are looked for too (``data.keypoints``). The clean remainder is scored with the run's own
    metric settings. A missing or damaged split.csv is an error (``runtables.check_split``): a skipped check
    would let training images be scored as external ones without a word."""
    run_dir = Path(run_dir)
    shas, phash = df.pop("sha256").tolist(), df.pop("phash")
    files = df.pop("file").tolist() if "file" in df else None
    check_split(run_dir)
    ref = training_reference(run_dir, folds, size, us_region)
    ph = None if phash.isna().any() else phash.to_numpy(dtype=np.uint64)
    query = describe_files(files, mirrored=True, us_region=us_region) if files is not None else None
    ov = find_overlap(shas, ph, ref, query)
    clean = None
    if ov.mask.any() and not ov.mask.all():
        clean = _clean_scores(run_dir, df[~ov.mask])
    return df, ov.summary(df["path"].tolist(), clean)


def _clean_scores(run_dir: Path, clean: pd.DataFrame) -> dict | None:
    from oncotransfer.evaluate.report import evaluate_run
    try:
        m = evaluate_run(run_dir, predictions=clean.reset_index(drop=True), out_name="report_external_clean",
                         plots=False)
    except OncoError:
        return None
    p = m["pooled"]
    return {"n": int(p.get("n", len(clean))), "accuracy": float(p["accuracy"]),
            "accuracy_ci95": p.get("accuracy_ci95"), "balanced_accuracy": float(p["balanced_accuracy"]),
            "roc_auc": p.get("roc_auc"), "metrics_file": "metrics_report_external_clean.json"}
