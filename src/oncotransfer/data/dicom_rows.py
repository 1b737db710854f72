"""DICOM objects as manifest rows: frame expansion, hashed patients, ``data inspect``'s summary, ``predict``'s
frame paths, and duplicate groups that keep an object's frames together (decoding is data/dicom.py's)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from oncotransfer.data.dicom import FRAME_TAG, frames_for, is_dicom_path, read_info, split_frame
from oncotransfer.data.images import ImageReadError


@dataclass
class DicomRows:
    """Manifest rows after DICOM objects were expanded to their frames (non-DICOM rows kept as they were)."""
    paths: list[str]
    labels: list[str]
    patients: list[str] | None
    sha256: list[str]
    skipped: dict[str, str]


def expand_rows(paths: list[str], labels: list[str], patients: list[str] | None, frames: str,
                sha256_file) -> DicomRows:
    """One row per selected frame of each DICOM object; unusable objects go to ``skipped`` with one line.

    Patients given by a manifest column or a regex are kept; otherwise every row takes its object's hashed
    PatientID, and the data set has patient ids only if every row has one. A multi-frame object's rows get
    ``sha256(file sha256 + '#frame=K')``: distinct images for the feature caches, kept together by patient."""
    out = DicomRows([], [], [], [], {})
    dicom_patients: list[str | None] = []
    for i, path in enumerate(paths):
        given = None if patients is None else patients[i]
        if not is_dicom_path(path):
            rows, pid, digest = [path], None, sha256_file(path)
        else:
            try:
                info = read_info(path)
            except ImageReadError as e:
                out.skipped[path] = str(e)
                continue
            chosen = frames_for(info.frames, frames)
            if isinstance(chosen, str):
                out.skipped[path] = f"{path}: {chosen}"
                continue
            digest = sha256_file(path)
            rows = [path] if info.frames == 1 else [f"{path}{FRAME_TAG}{k}" for k in chosen]
            pid = info.patient
        for r in rows:
            out.paths.append(r)
            out.labels.append(labels[i])
            out.patients.append(given)
            dicom_patients.append(pid)
            out.sha256.append(digest if r == path else hashlib.sha256(f"{digest}{r[len(path):]}".encode()).hexdigest())
    if patients is None:
        out.patients = dicom_patients if dicom_patients and all(dicom_patients) else None
    return out


def summarise(paths: list[str]) -> dict:
    """``data inspect``'s DICOM facts over the distinct objects among ``paths`` (hashed ids only)."""
    from collections import Counter
    objects = sorted({split_frame(p)[0] for p in paths if is_dicom_path(p)})
    keys = ("modality", "manufacturer", "frames", "bits_stored", "photometric", "transfer_syntax")
    out: dict = {k: Counter() for k in keys}
    series: dict[tuple, int] = {}
    for p in objects:
        try:
            info = read_info(p)
        except ImageReadError:
            continue  # already listed as unreadable
        for k in keys:
            out[k][getattr(info, k)] += 1
        key = (info.patient or "-", info.study or "-", info.series or "-", info.modality)
        series[key] = series.get(key, 0) + 1
    out["objects"] = len(objects)
    out["patients"] = len({k[0] for k in series if k[0] != "-"})
    out["studies"] = len({k[1] for k in series if k[1] != "-"})
    out["series"] = series
    return out


def frame_paths(files: list, frames: str, errors: dict[str, str]) -> list[str]:
    """``predict``: each multi-frame DICOM file -> its ``file#frame=K`` entries under the run's policy (so a cine
    loop gets one row per frame with ``all``); unusable objects go to ``errors``; other files are kept."""
    out: list = []
    for f in files:
        if not is_dicom_path(f) or split_frame(f)[1] is not None:
            out.append(f)
            continue
        try:
            info = read_info(f)
        except ImageReadError as e:
            errors[str(f)] = str(e)
            continue
        chosen = frames_for(info.frames, frames)
        if isinstance(chosen, str):
            errors[str(f)] = f"{f}: {chosen}"
        else:
            out += [f] if info.frames == 1 else [f"{f}{FRAME_TAG}{k}" for k in chosen]
    return out


def join_frames(paths: list[str], groups: np.ndarray) -> np.ndarray:
    """Duplicate groups with the frames of each multi-frame object in one group, so that even without patient
    ids the frames of one cine loop never sit on both sides of a split (``split.group_duplicates``)."""
    parent: dict[int, int] = {}

    def find(g: int) -> int:
        while parent.get(g, g) != g:
            g = parent[g]
        return g
    first: dict[str, int] = {}
    for p, g in zip(paths, groups.tolist()):
        obj, frame = split_frame(p)
        if frame is None:
            continue
        if obj in first:
            a, b = find(g), find(first[obj])
            if a != b:
                parent[a] = b
        first.setdefault(obj, g)
    roots = [find(g) for g in groups.tolist()]
    return np.unique(roots, return_inverse=True)[1]
