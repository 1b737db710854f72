"""``oncotransfer data inspect``: decode every image once and say what a user must know before training."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oncotransfer.data.images import phash64
from oncotransfer.data.manifest import Manifest, duplicate_groups, load_manifest
from oncotransfer.data.readers import ImageReadError, decode_failure, ingest_max_pixels, open_rgb, probe
from oncotransfer.data.readers.dicom import summarise
from oncotransfer.data.readers.quality import blank_reason
from oncotransfer.errors import MissingExtraError


@dataclass
class InspectReport:
    manifest: Manifest
    per_class: dict[str, int]
    per_patient: dict[str, dict[str, int]] | None
    sizes: Counter
    modes: Counter
    unreadable: dict[str, str]
    exact_duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)
    cross_class: list[list[str]] = field(default_factory=list)
    blank: dict[str, str] = field(default_factory=dict)
    """Images that decode to a constant or near-blank picture: {relative path: reason} (``readers.quality``)."""
    dicom: dict | None = None
    """DICOM data: counts of modality, manufacturer, frames, bit depth, photometric interpretation and transfer
    syntax over the objects, and the (hashed) patient / study / series ids (data/dicom.py ``summarise``)."""

    @property
    def imbalance(self) -> float:
        """Largest / smallest class; infinite when a class has no readable image (not 1.00 from skipping it)."""
        counts = list(self.per_class.values())
        if not counts or not max(counts):
            return float("nan")
        return max(counts) / min(counts) if min(counts) else float("inf")

    @property
    def empty_classes(self) -> list[str]:
        return [c for c, n in self.per_class.items() if n == 0]


def inspect_dataset(path: str | Path, patient_regex: str | None = None, dicom_frames: str = "middle",
                    max_pixels: int | None = -1) -> InspectReport:
    """Every file is read once: the header first (refused above ``max_pixels``, -1: the ingestion limit, before
    any decoding), then decoded for its pHash; a file that fails is named with its reason, never a traceback."""
    m = load_manifest(str(path), patient_regex, min_classes=1, dicom_frames=dicom_frames)
    limit = ingest_max_pixels() if max_pixels == -1 else max_pixels
    sizes, modes, unreadable, ok, hashes, dicom, blank = Counter(), Counter(), {}, [], [], [], {}
    unreadable.update({_rel(m, p): why.split(": ", 1)[-1] for p, why in m.skipped.items()})
    for i, p in enumerate(m.paths):
        try:
            head = probe(p, limit)
            img = open_rgb(p, draft_size=256)
            hashes.append(phash64(img))
            if why := blank_reason(img):
                blank[m.relpath(i)] = why
            if head.reader == "pillow":
                sizes[(head.width, head.height)] += 1
                modes[head.mode] += 1
            else:  # decoded size; DICOM's mode is its photometric interpretation (in ``dicom`` below)
                sizes[img.size] += 1
                modes[head.reader.upper()] += 1
                dicom += [p] if head.reader == "dicom" else []
            ok.append(i)
        except ImageReadError as e:
            unreadable[m.relpath(i)] = str(e).split(": ", 1)[-1]
        except MissingExtraError:
            raise
        except Exception as e:  # noqa: BLE001 - hostile bytes can break a decoder plugin in any way
            unreadable[m.relpath(i)] = decode_failure(p, e).split(": ", 1)[-1]
    sub = m.subset(ok)
    names = [sub.relpath(i) for i in range(len(sub))]
    exact = duplicate_groups(sub.sha256)
    near = duplicate_groups(sub.sha256, np.array(hashes, dtype=np.uint64))
    rep = InspectReport(m, {c: int((sub.labels == k).sum()) for k, c in enumerate(m.classes)}, None, sizes, modes,
                        unreadable, blank=blank)
    if dicom:
        rep.dicom = summarise(dicom)  # the objects that decoded
    if sub.patients is not None:
        rep.per_patient = {str(p): {c: int(((sub.patients == p) & (sub.labels == k)).sum())
                                    for k, c in enumerate(m.classes)} for p in sorted(set(sub.patients))}
    for ids, out in ((exact, rep.exact_duplicates), (near, rep.near_duplicates)):
        for g in np.unique(ids):
            members = np.nonzero(ids == g)[0]
            if len(members) > 1:
                out.append([names[i] for i in members])
                if out is rep.near_duplicates and len(set(sub.labels[members])) > 1:
                    rep.cross_class.append([f"{names[i]} ({m.classes[sub.labels[i]]})" for i in members])
    return rep


def _rel(m: Manifest, path: str) -> str:
    try:
        return str(Path(path).relative_to(m.root))
    except ValueError:
        return path
