"""What the command line prints, and how, by where it goes (imported by ``cli.py`` alone; no training code).

On a terminal: rich tables, colour (unless ``NO_COLOR`` is set) and progress bars on stderr. Anywhere else
(a pipe, a file, CI logs): plain text that is never cut or wrapped, no ANSI codes, tables as space-aligned
columns, and progress as a few plain lines. ``--json`` output is one JSON document on stdout; messages go to
stderr then.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from rich.console import Console

WIDE = 10_000  # off a terminal rich would cut everything to 80 columns

# C0 controls but tab and newline, DEL, C1 controls (0x9b is a one-byte CSI), and the bidi overrides that reorder what
# a terminal shows: a file name, label or class name holding them could retitle, clear or spoof the terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str) -> str:
    """``text`` with every terminal control character written out (ESC -> ``\\x1b``), so that user-controlled
    names print as what they are and never act on the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def escape_library_output() -> None:
    """Route what libraries print on their own (``warnings``, ``logging`` records) through ``safe_text`` too: a
    pydicom or Pillow warning quotes the file name or a header value, which an attacker controls."""
    format_warning = warnings.formatwarning

    def formatwarning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
        return safe_text(format_warning(message, category, filename, lineno, line))

    warnings.formatwarning = formatwarning  # type: ignore[assignment]
    make_record = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make_record(*args, **kwargs)
        rec.msg, rec.args = safe_text(rec.getMessage()), ()
        return rec

    logging.setLogRecordFactory(record)


def no_color() -> bool:
    """https://no-color.org: NO_COLOR set to anything but the empty string turns colour off."""
    return bool(os.environ.get("NO_COLOR"))


def is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Stream:
    """stdout or stderr, looked up at each print (so redirections and test captures are honoured)."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr
        self.width: int | None = None  # a fixed width for rich output on a terminal (tests)

    @property
    def file(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    @property
    def tty(self) -> bool:
        return is_tty(self.file)

    def rich(self) -> Console:
        """A rich console for this stream: colour and terminal width on a terminal, plain and unwrapped off it."""
        tty = self.tty
        return Console(file=self.file, force_terminal=tty, no_color=no_color(), highlight=False,
                       color_system="auto" if tty and not no_color() else None,
                       width=self.width if tty else WIDE, soft_wrap=not tty)

    def print(self, *objects: Any, markup: bool = False, **kw: Any) -> None:
        """Text as it is (no rich markup unless ``markup=True``), or any rich renderable."""
        kw.pop("highlight", None)
        # Everything printed passes here; the tool's own text holds no control character, a user's name may.
        objects = tuple(safe_text(o) if isinstance(o, str) else o for o in objects)
        if not markup and all(isinstance(o, str) for o in objects):
            sep, end = kw.get("sep", " "), kw.get("end", "\n")
            self.file.write(sep.join(objects) + end)
            self.file.flush()
            return
        self.rich().print(*objects, markup=markup, highlight=False, **kw)


def table(stream: Stream, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A rich table on a terminal; otherwise a header and space-aligned rows, nothing cut."""
    cells = [[safe_text(str(c)) for c in row] for row in rows]
    if stream.tty:
        from rich.table import Table
        from rich.text import Text
        t = Table(title=title and Text(safe_text(title)))
        for c in columns:
            t.add_column(Text(safe_text(c)))
        for row in cells:
            t.add_row(*map(Text, row))  # Text, not str: a file name like "[red]x.png" is not rich markup
        stream.rich().print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        stream.print(title)
    for row in [list(columns), *cells]:
        stream.print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def jsonable(x: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, NumPy scalars and arrays, paths and sets become JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in (sorted(x, key=str) if isinstance(x, set) else x)]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # NumPy scalar or array
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (valid JSON: no NaN)."""
    sys.stdout.write(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


class LineProgress:
    """Off a terminal: a plain stderr line per task at each quarter and at its end (each unit for 4 or fewer)."""

    def __init__(self, err: Stream):
        self.err = err
        self.marks: dict[str, int] = {}  # task -> last mark printed

    def log(self, line: str) -> None:
        self.err.print(line)

    def progress(self, task: str, done: int, total: int) -> None:
        if total <= 0:
            return
        if done <= 0:  # a task (re)starts
            self.marks[task] = 0
            return
        mark = min(done, total) if total <= 4 else (4 * min(done, total)) // total
        if mark > self.marks.get(task, 0):
            self.marks[task] = mark
            self.err.print(f"{task}: {min(done, total)}/{total}" + (" done" if done >= total else ""))


class BarProgress:
    """On a terminal: one rich progress bar per task on stderr; log lines print above the bars."""

    def __init__(self, bars: Any):
        self.bars = bars
        self.tasks: dict[str, Any] = {}

    def log(self, line: str) -> None:
        self.bars.console.print(safe_text(line), markup=False, highlight=False)

    def progress(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bars.add_task(task, total=total)
        self.bars.update(self.tasks[task], completed=done, total=total)


@contextmanager
def reporter(err: Stream) -> Iterator[LineProgress | BarProgress]:
    """``log(line)`` and ``progress(task, done, total)`` for one command: bars on a terminal, lines otherwise."""
    if not err.tty:
        yield LineProgress(err)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err.rich(), transient=False) as bars:
        yield BarProgress(bars)


def inspect_summary(rep: Any) -> dict[str, Any]:
    """``data inspect`` as JSON-ready values."""
    m = rep.manifest
    return {"root": str(m.root), "images": len(m), "classes": list(m.classes), "per_class": rep.per_class,
            "imbalance": rep.imbalance, "patients": None if rep.per_patient is None else len(rep.per_patient),
            "per_patient": rep.per_patient,
            "sizes": [{"width": w, "height": h, "images": n} for (w, h), n in rep.sizes.most_common()],
            "modes": dict(rep.modes), "unreadable": rep.unreadable, "exact_duplicates": rep.exact_duplicates,
            "near_duplicates": rep.near_duplicates, "cross_class_duplicates": rep.cross_class, "blank": rep.blank,
            "dicom": _dicom_summary(rep.dicom) if rep.dicom else None}


def _dicom_summary(d: dict) -> dict[str, Any]:
    return {"objects": d["objects"], "patients": d["patients"], "studies": d["studies"],
            "burned_in_annotation": d.get("burned_in", 0), "us_region": d.get("us_region", 0),
            **{k: dict(d[k]) for k in ("modality", "manufacturer", "frames", "bits_stored", "photometric",
                                       "transfer_syntax")},
            "series": [{"patient": p, "study": st, "series": se, "modality": mod, "objects": n}
                       for (p, st, se, mod), n in sorted(d["series"].items())]}


def _print_dicom(out: Stream, d: dict) -> None:
    out.print(f"DICOM: {d['objects']} object(s), {d['patients']} patient(s), {d['studies']} study(ies), "
              f"{len(d['series'])} series (ids are salted hashes, never the raw values)")
    for key, label in (("modality", "modality"), ("manufacturer", "manufacturer"), ("frames", "frames per object"),
                       ("bits_stored", "bits stored"), ("photometric", "photometric interpretation"),
                       ("transfer_syntax", "transfer syntax")):
        out.print(f"  {label}: " + ", ".join(f"{k} ({n})" for k, n in d[key].most_common()))
    out.print(f"  declare burned-in annotation: {d.get('burned_in', 0)}; ultrasound image region usable: "
              f"{d.get('us_region', 0)} (data.us_region: auto crops them to it)")
    rows = sorted(d["series"].items())
    table(out, ["patient", "study", "series", "modality", "objects"],
          [[p, st, se, mod, n] for (p, st, se, mod), n in rows[:30]])
    if len(rows) > 30:
        out.print(f"... {len(rows) - 30} more series")


def print_inspect(out: Stream, rep: Any, err: Stream | None = None) -> None:
    """``data inspect`` for people: counts per class and patient, sizes, modes on ``out``; every ``warning:``
    line (unreadable files, blank images, empty classes...) on ``err`` (standard error), so that the summary can
    be piped."""
    err = err or out
    m = rep.manifest
    out.print(f"{m.root}: {len(m)} images, {len(m.classes)} classes"
              + (f", {len(rep.per_patient)} patients" if rep.per_patient else ", no patient ids"))
    table(out, ["class", "images"], [[c, n] for c, n in rep.per_class.items()])
    out.print(f"class imbalance (largest / smallest): {rep.imbalance:.2f}"
              + (f" (class(es) {rep.empty_classes} have no readable image)" if rep.empty_classes else ""))
    for note in m.notes:
        err.print(f"warning: {note}")
    if rep.per_patient:
        table(out, ["patient", *m.classes], [[p, *[row[c] for c in m.classes]] for p, row in rep.per_patient.items()])
    out.print("image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in rep.sizes.most_common(5)))
    out.print("modes: " + ", ".join(f"{k} ({n})" for k, n in rep.modes.items()))
    if rep.dicom:
        _print_dicom(out, rep.dicom)
    for name, why in rep.unreadable.items():
        err.print(f"warning: unreadable, skipped: {name}: {why}")
    for name, why in rep.blank.items():
        err.print(f"warning: blank image: {name}: {why}", highlight=False, soft_wrap=True)
    out.print(f"byte-identical groups: {len(rep.exact_duplicates)}; near-identical (pHash <= 4): "
              f"{len(rep.near_duplicates)}")
    for g in rep.near_duplicates[:10]:
        out.print("  duplicates: " + ", ".join(g))
    for g in rep.cross_class:
        out.print(f"duplicates filed under different classes: {', '.join(g)}")


def cell(v: Any) -> str:
    """A table cell: floats to 3 decimals, missing values empty."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.3f}"
    return "" if v is None else str(v)


def trust_lines(df: Any) -> list[str]:
    """What a predictions table says about trusting it: images out of distribution, images to refer."""
    lines = []
    if "in_distribution" in df.columns and len(df):
        flags = df["in_distribution"].dropna()
        out = int((flags.astype(str) == "False").sum())
        if len(flags) and out:
            lines.append(f"{out} of {len(df)} image(s) out of distribution (do not look like the training images): "
                         "their answers should not be trusted; see the in_distribution column")
    for path, why in (getattr(df, "attrs", {}).get("blank") or {}).items():
        lines.append(f"warning: blank input, scored anyway: {path}: {why}")
    if "refer" in df.columns and len(df):
        n = int(df["refer"].astype(bool).sum())
        lines.append(f"refer to a person: {n} of {len(df)} image(s) (refer, refer_reason columns)")
    return lines


def print_predictions(out: Stream, err: Stream, df: Any, path: Any, explain: bool) -> None:
    """``predict``'s table (50 rows at most) and where it went on ``out``; trust warnings on ``err``."""
    probs = [c for c in df.columns if c.startswith("prob_")]
    extra = [c for c in ("ood_score", "in_distribution", "refer") if c in df.columns]
    table(out, ["path", "pred", *probs, *extra],
          [[r["path"], r["pred"], *[f"{r[c]:.3f}" for c in probs], *[cell(r[c]) for c in extra]]
           for _, r in df.head(50).iterrows()])
    if len(df) > 50:
        out.print(f"... {len(df) - 50} more rows")
    out.print(f"{len(df)} image(s) -> {path}" + (f", overlays in {path.parent / (path.stem + '_explain')}"
                                                  if explain else ""))
    for line in trust_lines(df):
        err.print(line, highlight=False, soft_wrap=True)


def external_lines(metrics: dict[str, Any], data: str) -> list[str]:
    """``evaluate --data``'s terminal warnings after the overlap check's: out-of-distribution share, dataset
    shift, skipped files."""
    lines = []
    ood = metrics.get("ood")
    if ood and ood.get("flagged") is not None:
        share = ood["flagged_share"]
        inside, outside = ood.get("in_distribution") or {}, ood.get("out_of_distribution") or {}
        acc = "".join(f"; accuracy {label} {part['accuracy']:.3f} ({part['n']})"
                      for label, part in (("in distribution", inside), ("out of distribution", outside))
                      if part.get("n"))
        lines.append(f"{'warning: ' if share > 0.1 else ''}out of distribution: {ood['flagged']} of {ood['scored']} "
                     f"image(s) ({share:.1%}; about 5% expected of data like the training images){acc}")
    if (metrics.get("shift") or {}).get("line"):
        lines.append(("warning: " if metrics["shift"].get("shifted") else "") + metrics["shift"]["line"])
    skipped = list((metrics.get("skipped") or {}).values())
    if skipped:
        lines.append(f"warning: {len(skipped)} file(s) of {data} skipped as unreadable, not scored"
                     + (f" (first 10 of {len(skipped)} below)" if len(skipped) > 10 else ":"))
        lines += [f"  {why}" for why in skipped[:10]]
    return lines
