"""Multi-frame files as manifest rows: DICOM cine loops and multi-frame objects, the slices of a NIfTI volume.
Frame expansion with each file's group (hashed PatientID, volume) as patient, ``predict``'s frame paths, and
duplicate groups that keep a file's frames together. Any reader with ``framed = True`` takes part."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from oncotransfer.data.readers import FRAME_TAG, ImageReadError, Reader, probe, reader_for, split_frame
from oncotransfer.data.readers.dicom import frames_for


def framed_reader(path: str) -> Reader | None:
    """The file's reader when it is one that may hold several frames (and ``path`` names no frame yet)."""
    if split_frame(path)[1] is not None:
        return None
    try:
        r = reader_for(path)
    except ImageReadError:
        return None  # not a regular file: decoding names it
    return r if r.framed else None


@dataclass
class FrameRows:
    """Manifest rows after multi-frame files were expanded to their frames (other rows kept as they were)."""
    paths: list[str]
    labels: list[str]
    patients: list[str] | None
    sha256: list[str]
    skipped: dict[str, str]
    without_group: list[str] | None = None
    """Framed files whose header names no patient (the first 50), when no manifest column or regex gave one."""


def expand_rows(paths: list[str], labels: list[str], patients: list[str] | None, frames: str,
                sha256_file) -> FrameRows:
    """One row per selected frame of each framed file; unusable files go to ``skipped`` with one line.

    Patients given by a manifest column or a regex are kept; otherwise every row takes its file's group (a
    DICOM object's hashed PatientID, a volume's name), and the data set has patient ids only if every row has
    one. A multi-frame file's rows get ``sha256(file sha256 + '#frame=K')``: distinct images for the feature
    caches, kept together by patient."""
    out = FrameRows([], [], [], [], {})
    missing: list[str] = []
    dicom_patients: list[str | None] = []
    for i, path in enumerate(paths):
        given = None if patients is None else patients[i]
        reader = framed_reader(path)
        if reader is None:
            rows, pid, digest = [path], None, sha256_file(path)
        else:
            try:
                info = probe(path)
            except ImageReadError as e:
                out.skipped[path] = str(e)
                continue
            chosen = frames_for(info.frames, frames)
            if isinstance(chosen, str):
                out.skipped[path] = f"{path}: {chosen}"
                continue
            digest = sha256_file(path)
            rows = [path] if info.frames == 1 else [f"{path}{FRAME_TAG}{k}" for k in chosen]
            pid = info.group
            if pid is None and len(missing) < 50:
                missing.append(path)
        for r in rows:
            out.paths.append(r)
            out.labels.append(labels[i])
            out.patients.append(given)
            dicom_patients.append(pid)
            out.sha256.append(digest if r == path else hashlib.sha256(f"{digest}{r[len(path):]}".encode()).hexdigest())
    if patients is None:
        out.patients = dicom_patients if dicom_patients and all(dicom_patients) else None
        out.without_group = missing
    return out


def frame_paths(files: list, frames: str, errors: dict[str, str]) -> list[str]:
    """``predict``: each multi-frame file -> its ``file#frame=K`` entries under the run's policy (so a cine
    loop gets one row per frame with ``all``); unusable files go to ``errors``; other files are kept."""
    out: list = []
    for f in files:
        if framed_reader(str(f)) is None:
            out.append(f)
            continue
        try:
            info = probe(str(f))
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
