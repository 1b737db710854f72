"""Load a data set once for a run: manifest, decoded images, duplicate groups."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from oncotransfer.config import DataConfig
from oncotransfer.data.checks import check_classes_present, check_label_conflicts
from oncotransfer.data.frames import join_frames
from oncotransfer.data.readers import FRAME_TAG
from oncotransfer.data.readers.quality import blank_reason
from oncotransfer.data.images import decode_many
from oncotransfer.data.manifest import Manifest, drop, duplicate_groups, load_manifest
from oncotransfer.errors import DataError


@dataclass
class LoadedData:
    manifest: Manifest
    images: torch.Tensor
    """uint8 (N, 3, S, S): decoded and resized once for the whole run."""
    dup_groups: np.ndarray
    warnings: list[str]
    phashes: np.ndarray | None = None
    """uint64 perceptual hash per (kept) image when computed; saved in split.csv for overlap checks."""


def blank_warnings(paths: list[str], images: torch.Tensor) -> list[str]:
    """``blank image kept: PATH: constant image (every pixel = 0)`` for each blank model input (kept in the run:
    a user decides whether a blank frame belongs in the data; a silently wrong decode looks like this)."""
    return [f"blank image kept: {p}: {why}" for p, img in zip(paths, images)
            if (why := blank_reason(img.numpy()))]


def load_data(cfg: DataConfig, size: int, workers: int = 2, phash: bool = True) -> LoadedData:
    manifest = load_manifest(cfg.path, cfg.patient_regex, dicom_frames=cfg.dicom_frames)
    check_label_conflicts(manifest.paths, manifest.labels, manifest.classes, manifest.sha256)
    images, ok, failed, hashes = decode_many(manifest.paths, size, workers, phash=phash,
                                             us_region=cfg.us_region == "auto")
    warnings = list(manifest.notes) + [f"skipped unreadable image: {why}" for why in
                                       list(manifest.skipped.values()) + list(failed.values())]
    if failed:
        manifest = drop(manifest, failed)
    warnings += blank_warnings(manifest.paths, images)
    if len(manifest) == 0:
        raise DataError(f"{cfg.path}: none of the images could be read")
    check_classes_present(manifest.labels, manifest.classes, failed, str(cfg.path))
    present = set(manifest.labels.tolist())
    if len(present) < 2:
        raise DataError(f"{cfg.path}: after skipping unreadable files only one class is left")
    groups = duplicate_groups(manifest.sha256, hashes if phash else None)
    n_dup = len(groups) - len(np.unique(groups))
    if n_dup:
        warnings.append(f"{n_dup} image(s) are identical or near-identical to another (pHash distance <= 4)")
    if any(FRAME_TAG in p for p in manifest.paths):  # data.dicom_frames: all -> a cine loop's frames stay together
        groups = join_frames(manifest.paths, groups)
    return LoadedData(manifest, images, groups, warnings, hashes if phash else None)
