"""Memory bombs and no-end inputs are refused from what they declare, before anything is allocated (issue 22)."""
from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from oncotransfer.data.manifest import _sha256_or_marker
from oncotransfer.data.readers import ImageReadError, ImageTooLargeError, open_rgb, probe, reader_for, too_large_reason
from oncotransfer.data.readers import dicom_guard
from oncotransfer.data.safe_regex import search_all
from oncotransfer.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "hostile"))
from bombs import deflated_dicom, frames_dicom, png_header, sparse, zero_png  # noqa: E402


@pytest.mark.parametrize("inflated", [2 << 20, 40 << 20, 600 << 20])
def test_deflated_dicom_past_the_budget_is_refused_before_inflating(tmp_path, monkeypatch, inflated):
    monkeypatch.setattr(dicom_guard, "MAX_INFLATED_BYTES", 1 << 20)
    f = deflated_dicom(tmp_path / "bomb.dcm", inflated, rows=512, cols=512)
    for call in (probe, open_rgb):
        with pytest.raises(ImageReadError, match="inflates to more than 1 MiB"):
            call(str(f))
    with pytest.raises(ImageReadError, match="inflates"):  # an upload is the same bytes
        probe(f.read_bytes())


def test_small_deflated_dicom_still_decodes(tmp_path):
    f = deflated_dicom(tmp_path / "small.dcm", 64 * 64, rows=64, cols=64, frames=1)
    assert probe(str(f)).width == 64
    assert open_rgb(str(f)).size == (64, 64)
    assert open_rgb(f.read_bytes()).size == (64, 64)


def test_a_deflated_objects_inflated_bytes_count_toward_its_decode_budget(tmp_path):
    """serve reserves the probe's peak_bytes from --max-decode: four concurrent deflated uploads of 100 MiB
    inflated each must not pass as 64 x 64 images."""
    small = deflated_dicom(tmp_path / "a.dcm", 64 * 64, rows=64, cols=64, frames=1)
    big = deflated_dicom(tmp_path / "b.dcm", 100 << 20, rows=64, cols=64, frames=(100 << 20) // 4096)
    plain = frames_dicom(tmp_path / "c.dcm", 1, pixel_bytes=4096)
    frame_cost = probe(str(plain)).peak_bytes
    assert probe(big.read_bytes()).peak_bytes >= 2 * (100 << 20) > 1000 * frame_cost
    assert probe(str(big)).peak_bytes == probe(big.read_bytes()).peak_bytes
    assert frame_cost < probe(small.read_bytes()).peak_bytes < frame_cost + 3 * (64 * 64 + 4096)


@pytest.mark.parametrize("frames, needle", [(10**9, "above the limit"), (2**31 - 1, "above the limit"),
                                            (50_000, "pixel data holds 1"), (3, "pixel data holds 1"), (2, "pixel data holds 1")])
def test_forged_number_of_frames_is_refused(tmp_path, frames, needle):
    f = frames_dicom(tmp_path / "f.dcm", frames, pixel_bytes=4096)
    with pytest.raises(ImageReadError, match=needle):
        probe(str(f))


def test_frames_that_fit_the_pixel_data_are_read(tmp_path):
    f = frames_dicom(tmp_path / "f.dcm", 3, pixel_bytes=64 * 64 * 3)
    assert probe(str(f)).frames == 3
    assert open_rgb(f"{f}#frame=2").size == (64, 64)


def test_a_dicom_header_of_zeros_stops_at_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(dicom_guard, "MAX_HEADER_READS", 2000)
    f = sparse(tmp_path / "zeros.dcm", 1 << 20, b"\0" * 128 + b"DICM")
    with pytest.raises(ImageReadError, match="DICOM header runs past"):
        probe(str(f))


@pytest.mark.parametrize("name, head", [("tb.png", b""), ("tb.dcm", b"\0" * 128 + b"DICM"), ("tb.jpg", b""),
                                        ("tb.nii", b""), ("tb_magic", b"\0" * 128 + b"DICM")])
def test_sparse_terabyte_files_are_refused_from_their_size(tmp_path, name, head):
    f = sparse(tmp_path / name, 2**40, head)
    with pytest.raises(ImageTooLargeError, match="file too large"):
        reader_for(str(f))
    assert _sha256_or_marker(str(f)).startswith("too-large:")  # never hashed (a terabyte read)


@pytest.mark.parametrize("w, h", [(16000, 16000), (2**31 - 1, 1), (9000, 9000)])
def test_too_large_reason_names_header_bombs(tmp_path, w, h):
    f = tmp_path / "h.png"
    f.write_bytes(png_header(w, h))
    assert "too large" in too_large_reason(f)


def test_too_large_reason_passes_ordinary_images(tmp_path):
    assert too_large_reason(zero_png(tmp_path / "ok.png", 64, 64)) is None


@pytest.mark.parametrize("regex", ["^(a+)+$", "(a|aa)+$", "^(a|a?)+$"])
def test_catastrophic_patient_regex_is_stopped(regex):
    with pytest.raises(DataError, match="catastrophic backtracking"):
        search_all(regex, ["a" * 60 + "b.png"], seconds=1.0)


def test_patient_regex_still_matches():
    assert search_all(r"^(P\d+)_", ["P1_x.png", "P22_y.png", "Q.png"]) == ["P1", "P22", None]
    with pytest.raises(DataError, match="not a valid regular expression"):
        search_all("([", ["a"])


@pytest.mark.parametrize("tile", [16000, 9000, 10**6, 2**31])
def test_slide_tiles_above_the_limit_are_refused_before_the_slide_is_read(tile):
    from oncotransfer.data.slides import plan
    with pytest.raises(ConfigError, match="--tile-size"):
        plan(None, "s.tif", tile)


@pytest.mark.parametrize("name, value", [("mpp", float("inf")), ("mpp_source", float("inf")),
                                         ("magnification", float("nan"))])
def test_slide_resolutions_must_be_finite(name, value):
    from oncotransfer.data.slides import plan
    with pytest.raises(ConfigError, match="finite"):
        plan(None, "s.tif", 224, **{name: value})
