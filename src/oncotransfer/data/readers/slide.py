"""Whole-slide images: OpenSlide (SVS, NDPI, MRXS, DICOM whole-slide, generic tiled TIFF...), tiffslide as its
fallback. A slide is a pyramid cut into tiles (``data.slides``), never decoded whole: in a class folder, or
sent to ``predict`` or ``serve`` as a picture, it is refused with the hint to tile it."""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path

from oncotransfer.data.readers.base import ImageReadError, Probe, Reader, has_suffix, one_line, read_head
from oncotransfer.data.readers.tiffcheck import TiffStructureError, check_tiff
from oncotransfer.errors import MissingExtraError

# Suffixes only slides use; ``.tif``/``.tiff`` are slides when pyramidal, and ``.dcm`` when VL Whole Slide.
VENDOR_SUFFIXES = {".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}
TIFF_SUFFIXES = {".tif", ".tiff"}
SLIDE_SUFFIXES = VENDOR_SUFFIXES | TIFF_SUFFIXES | {".dcm"}
WSI_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage: the file meta names it within the first few hundred bytes."""
MPP_RANGE = (0.01, 10.0)
"""Plausible level-0 µm/px of a microscope slide: 0.1-0.25 at 40-100x, up to a few µm/px for overviews. Outside
it the resolution tags are a generic TIFF's print resolution (72/96/300 dpi = 353/265/85 µm/px), not a scan's."""
EXTRA = "pip install 'oncotransfer[slides]'"
TILE_HINT = ("a whole-slide image: cut it into tissue tiles with `oncotransfer slides tile` (or score it with "
             "`oncotransfer predict RUN SLIDE --slide`)")


class SlideError(ImageReadError):
    """One slide cannot be opened, read, or has no usable resolution."""


def is_dicom_wsi(path: str | Path, head: bytes | None = None) -> bool:
    head = read_head(path, 1024) if head is None or len(head) < 1024 else head
    return head[128:132] == b"DICM" and WSI_SOP_CLASS in head


def dicom_series_uid(path: str | Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file (its header only), None when unreadable: the levels of one DICOM
    whole-slide image are separate files of one series, and OpenSlide opens the whole pyramid from any of them."""
    try:
        import pydicom
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        uid = ds.get("SeriesInstanceUID")
    except Exception:  # noqa: BLE001 - a damaged header: the file then counts as a slide of its own
        return None
    return str(uid) if uid else None


TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def is_pyramidal_tiff(path: str | Path | bytes) -> bool:
    """A TIFF (a file, or uploaded bytes) with more than one resolution level (a slide), read from its header
    (tifffile, else OpenSlide)."""
    if isinstance(path, bytes) and path[:4] not in TIFF_MAGIC:
        return False
    try:
        import tifffile
    except ImportError:
        tifffile = None
    if tifffile is not None:
        quiet = logging.getLogger("tifffile")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with tifffile.TiffFile(io.BytesIO(path) if isinstance(path, bytes) else str(path)) as tf:
                return bool(tf.series) and (len(tf.series[0].levels) > 1 or tf.is_svs or tf.is_ndpi
                                            or tf.is_scn or tf.is_bif)
        except Exception:  # not a TIFF tifffile can parse: the image reader will say why
            return False
        finally:
            quiet.setLevel(level)
    if isinstance(path, bytes):
        return False
    try:
        import openslide
        return openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-tiff")
    except Exception:
        return False


def open_slide(path: str | Path):
    """An ``openslide.OpenSlide`` (SVS, NDPI, MRXS, DICOM, generic tiled TIFF, ...), else a
    ``tiffslide.TiffSlide`` for TIFF-based files OpenSlide cannot read or when only tiffslide is installed. Both
    share one API. ``SlideError`` (one line) when neither can open it."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such slide")
    try:
        import openslide
    except ImportError:
        openslide = None
    try:
        import tiffslide
    except ImportError:
        tiffslide = None
    if openslide is None and tiffslide is None:
        raise MissingExtraError(f"reading whole-slide images needs openslide-python + openslide-bin (or tiffslide); "
                                f"{EXTRA}")
    try:  # a looping IFD chain or a truncated file: both libraries would tile what they kept, or fail mid-way
        check_tiff(path)
    except TiffStructureError as e:
        raise SlideError(str(e)) from None
    except OSError as e:
        raise SlideError(f"{path}: cannot read the slide ({one_line(e, 120)})") from None
    reason = ""
    tiff = path.suffix.lower() in {".tif", ".tiff", ".svs"}
    if openslide is not None:
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as e:  # unsupported format or corrupt file
            reason = str(e) or type(e).__name__
        else:
            if slide.level_count > 1 or not tiff or tiffslide is None:
                return slide
            # OpenSlide reads a pyramid stored as SubIFDs as one flat level; tiffslide sees its levels.
            try:
                other = tiffslide.TiffSlide(str(path))
            except Exception:  # not for tiffslide either: OpenSlide's flat view stands
                return slide
            if other.level_count > 1:
                slide.close()
                _quiet_zarr_tasks()
                return other
            other.close()
            return slide
    if tiffslide is not None and tiff:
        quiet = logging.getLogger("tifffile")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # tifffile logs its own warning before raising: one line is ours
        try:
            slide = tiffslide.TiffSlide(str(path))
            slide.level_dimensions  # noqa: B018 - force the pages to be parsed now, inside the try
            _quiet_zarr_tasks()
            return slide
        except Exception as e:  # tifffile raises many types on damaged files; one line whatever the cause
            reason = f"{reason}; tiffslide: {str(e)[:100] or type(e).__name__}" if reason else str(e)[:100]
        finally:
            quiet.setLevel(level)
    raise SlideError(f"{path}: not a slide OpenSlide{'/tiffslide' if tiffslide else ''} can read "
                     f"({reason[:160] or 'unsupported format'})")


class _ZarrTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for zarr's chunk reads: tiffslide reads a region's
    tiles as concurrent tasks, the first failure is raised (and reported as one line), and the other tiles'
    failures, the same damage, would otherwise print tracebacks when their tasks are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("never retrieved" in msg and "zarr" in msg)


def _quiet_zarr_tasks() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ZarrTaskFilter) for f in log.filters):
        log.addFilter(_ZarrTaskFilter())


def slide_property(slide, key: str) -> float | None:
    """``openslide.<key>`` or ``tiffslide.<key>`` as a positive finite float, None when absent."""
    for k in (f"openslide.{key}", f"tiffslide.{key}"):
        v = slide.properties.get(k)
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f > 0 and math.isfinite(f):
            return f
    return None


def slide_mpp(slide) -> tuple[float | None, str | None]:
    """(level-0 µm/px, None) when the slide records a plausible resolution, else (None, why it was not used):
    a value outside ``MPP_RANGE`` is a print resolution, and treating it as the scan's would cut tiles hundreds
    of times too coarse."""
    mpp = slide_property(slide, "mpp-x")
    if mpp is None:
        return None, None
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:
        dpi = 25400 / mpp
        return None, (f"its resolution tags say {mpp:.4g} µm/px ({dpi:.0f} pixels per inch), not a microscope's "
                      f"({lo:g}-{hi:g} µm/px): ignored as missing")
    return mpp, None


class SlideReader(Reader):
    name = "slide"
    suffixes = frozenset(VENDOR_SUFFIXES)

    def claims(self, path: Path, head: bytes) -> bool:
        if has_suffix(path, VENDOR_SUFFIXES):
            return True
        suffix = path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            return is_pyramidal_tiff(path)
        return (suffix == ".dcm" or head[128:132] == b"DICM") and is_dicom_wsi(path)

    def claims_bytes(self, data: bytes) -> bool:
        # An uploaded slide would otherwise reach Pillow, which decodes its largest level as one picture.
        return (data[128:132] == b"DICM" and WSI_SOP_CLASS in data[:1024]) or is_pyramidal_tiff(data)

    def probe(self, source, max_pixels=None, draft_size=None) -> Probe:
        if isinstance(source, bytes):
            raise SlideError(f"upload: {TILE_HINT}")
        slide = open_slide(source)
        try:
            w, h = (int(v) for v in slide.dimensions)
            mpp, _ = slide_mpp(slide)
            return Probe(self.name, "slide", w, h, frames=int(slide.level_count), mode="pyramid", mpp=mpp)
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged header can fail in the binding in any way
            raise SlideError(f"{source}: unreadable slide ({one_line(e)})") from None
        finally:
            slide.close()

    def decode(self, source, frame=None, max_pixels=None, draft_size=None, us_region=True):
        raise SlideError(f"{source}: {TILE_HINT}")
