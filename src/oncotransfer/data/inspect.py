"""``oncotransfer data inspect``: decode every image once and say what a user must know before training."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oncotransfer.data.images import ImageReadError, open_rgb, phash64
from oncotransfer.data.manifest import Manifest, duplicate_groups, load_manifest
from oncotransfer.data.safety import decode_failure, ingest_max_pixels, probe


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


def inspect_dataset(path: str | Path, patient_regex: str | None = None, max_pixels: int | None = -1
                    ) -> InspectReport:
    """Every file is read once: the header first (refused above ``max_pixels``, -1: the ingestion limit, before
    any decoding), then decoded for its pHash; a file that fails is named with its reason, never a traceback."""
    m = load_manifest(str(path), patient_regex, min_classes=1)
    limit = ingest_max_pixels() if max_pixels == -1 else max_pixels
    sizes, modes, unreadable, ok, hashes = Counter(), Counter(), {}, [], []
    for p, why in m.skipped.items():
        unreadable[str(Path(p).relative_to(m.root)) if Path(p).is_relative_to(m.root) else p] = \
            why.split(": ", 1)[-1]
    for i, p in enumerate(m.paths):
        try:
            w, h, mode = probe(p, limit)
            hashes.append(phash64(open_rgb(p, draft_size=256)))
            sizes[(w, h)] += 1
            modes[mode] += 1
            ok.append(i)
        except ImageReadError as e:
            unreadable[m.relpath(i)] = str(e).split(": ", 1)[-1]
        except Exception as e:  # noqa: BLE001 - hostile bytes can break a decoder plugin in any way
            unreadable[m.relpath(i)] = decode_failure(p, e).split(": ", 1)[-1]
    sub = m.subset(ok)
    names = [sub.relpath(i) for i in range(len(sub))]
    exact = duplicate_groups(sub.sha256)
    near = duplicate_groups(sub.sha256, np.array(hashes, dtype=np.uint64))
    rep = InspectReport(m, {c: int((sub.labels == k).sum()) for k, c in enumerate(m.classes)}, None, sizes, modes,
                        unreadable)
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


def render(rep: InspectReport, console) -> None:
    """Print the report with rich tables."""
    from rich.markup import escape
    from rich.table import Table
    m = rep.manifest
    console.print(f"[bold]{m.root}[/]: {len(m)} images, {len(m.classes)} classes"
                  + (f", {len(rep.per_patient)} patients" if rep.per_patient else ", no patient ids"))
    t = Table("class", "images")
    for c, n in rep.per_class.items():
        t.add_row(c, str(n))
    console.print(t)
    console.print(f"class imbalance (largest / smallest): {rep.imbalance:.2f}"
                  + (f" [red](class(es) {rep.empty_classes} have no readable image)[/]" if rep.empty_classes else ""))
    for note in m.notes:
        console.print(f"[yellow]warning: {escape(note)}[/]", highlight=False)
    if rep.per_patient:
        t = Table("patient", *m.classes)
        for p, row in rep.per_patient.items():
            t.add_row(p, *[str(row[c]) for c in m.classes])
        console.print(t)
    console.print("image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in rep.sizes.most_common(5)))
    console.print("modes: " + ", ".join(f"{k} ({n})" for k, n in rep.modes.items()))
    for name, why in rep.unreadable.items():
        console.print(f"[yellow]warning: unreadable, skipped: {escape(name)}: {escape(why)}[/]")
    console.print(f"byte-identical groups: {len(rep.exact_duplicates)}; near-identical (pHash <= 4): "
                  f"{len(rep.near_duplicates)}")
    for g in rep.near_duplicates[:10]:
        console.print("  duplicates: " + escape(", ".join(g)))
    for g in rep.cross_class:
        console.print(f"[red]duplicates filed under different classes: {escape(', '.join(g))}[/]")
