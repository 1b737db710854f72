"""Hostile or mistaken data sets are caught at load time, one line naming the row, file or class (issue 12)."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncotransfer.config import DataConfig
from oncotransfer.data import images as images_mod
from oncotransfer.data.images import decode_many
from oncotransfer.data.inspect import inspect_dataset
from oncotransfer.data.manifest import load_manifest
from oncotransfer.errors import DataError
from oncotransfer.train.data import load_data


def png(path: Path, value: int = 128, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size, size, 3), value, np.uint8)
    a[: size // 2, :, 0] = 255 - value  # not flat, so pHashes differ between values
    Image.fromarray(a).save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with an empty IDAT: 65 bytes."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def two_classes(root: Path, n: int = 3) -> Path:
    for c, base in (("a", 30), ("b", 150)):
        for i in range(n):
            png(root / c / f"{c}{i}.png", base + 20 * i)
    return root


def csv(root: Path, text: str) -> Path:
    two_classes(root)
    (root / "manifest.csv").write_text(text)
    return root / "manifest.csv"


def test_empty_label_cell_names_the_line(tmp_path):
    m = csv(tmp_path, "path,label\na/a0.png,a\na/a1.png,\nb/b0.png,b\n")
    with pytest.raises(DataError, match=r"empty label cell on line\(s\) 3 \(header = line 1\)"):
        load_manifest(m)


def test_patient_column_with_empty_cells_is_an_error_not_a_silent_drop(tmp_path):
    m = csv(tmp_path, "path,label,patient\na/a0.png,a,P1\na/a1.png,a,\nb/b0.png,b,P2\nb/b1.png,b, \n")
    with pytest.raises(DataError, match=r"empty patient cell on line\(s\) 3, 5 .* of 4 rows"):
        load_manifest(m)
    # a column left wholly empty means no patient ids at all (the split then asks for them), not an error
    m = csv(tmp_path / "all", "path,label,patient\na/a0.png,a,\nb/b0.png,b,\n")
    assert load_manifest(m).patients is None


def test_repeated_manifest_row_names_both_lines(tmp_path):
    m = csv(tmp_path, "path,label\na/a0.png,a\nb/b0.png,b\na/a0.png,a\n")
    with pytest.raises(DataError, match=r"repeat a path, e.g. 'a/a0.png' on lines 2, 4"):
        load_manifest(m)


def test_same_image_under_two_labels_names_both_paths(tmp_path):
    two_classes(tmp_path)
    (tmp_path / "b" / "copy.png").write_bytes((tmp_path / "a" / "a1.png").read_bytes())
    with pytest.raises(DataError, match=r"byte-identical under two labels") as e:
        load_data(DataConfig(path=str(tmp_path)), 32, 1)
    assert "a1.png (a)" in str(e.value) and "copy.png (b)" in str(e.value)


def test_class_whose_files_are_all_unreadable(tmp_path):
    two_classes(tmp_path)
    for i in range(2):
        (tmp_path / "c" ).mkdir(exist_ok=True)
        (tmp_path / "c" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(DataError, match=r"class\(es\) \['c'\] have no readable image"):
        load_data(DataConfig(path=str(tmp_path)), 32, 1)
    rep = inspect_dataset(tmp_path)
    assert rep.per_class["c"] == 0 and rep.empty_classes == ["c"]
    assert rep.imbalance == float("inf")  # not 1.00 from leaving the empty class out


def test_empty_class_folder_and_symlink_loop_are_reported(tmp_path):
    two_classes(tmp_path)
    (tmp_path / "tumour").mkdir()
    os.symlink("loop.png", tmp_path / "a" / "loop.png")
    m = load_manifest(tmp_path)
    assert any("'tumour'" in n and "holds no images" in n for n in m.notes)
    assert any(p.endswith("loop.png") and "symlink loop" in why for p, why in m.skipped.items())
    data = load_data(DataConfig(path=str(tmp_path)), 32, 1, phash=False)
    text = " | ".join(data.warnings)
    assert "tumour" in text and "loop.png" in text
    rep = inspect_dataset(tmp_path)
    assert any("loop.png" in k for k in rep.unreadable)


def test_non_regular_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        load_manifest("/dev/null")
    with pytest.raises(DataError, match="is an image, not a data set"):
        load_manifest(png(tmp_path / "x.png"))
    two_classes(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\na/a0.png,a\n/dev/null,b\n")
    with pytest.raises(DataError, match="not readable image files, e.g. '/dev/null'"):
        load_manifest(tmp_path / "manifest.csv")


def test_bomb_headers_are_refused_before_decoding(tmp_path, monkeypatch):
    two_classes(tmp_path)
    (tmp_path / "a" / "huge.png").write_bytes(png_header(30000, 30000))   # above Pillow's own hard limit
    (tmp_path / "a" / "big.png").write_bytes(png_header(9000, 9000))      # 81 M px: below it, above ours
    rep = inspect_dataset(tmp_path)
    assert "too large" in rep.unreadable["a/huge.png"]
    assert "9000 x 9000" in rep.unreadable["a/big.png"]

    decoded = []
    real = images_mod.decode_tensor  # decode_many's decoder (grey sources stay one band)
    monkeypatch.setattr(images_mod, "decode_tensor", lambda p, s, **kw: decoded.append(p) or real(p, s, **kw))
    paths = [str(tmp_path / "a" / "big.png"), str(tmp_path / "a" / "a0.png")]
    _, ok, failed, _ = decode_many(paths, 32, workers=1)
    assert ok == [1] and "header declares 9000 x 9000" in failed[0]
    _, ok, failed, _ = decode_many(paths[1:], 32, workers=1, max_pixels=100)   # 16 x 16 = 256 px
    assert ok == [] and "256 pixels" in failed[0]
    assert decoded == [paths[1]]   # the refused files never reached the decoder


def test_pixel_limit_from_the_environment(tmp_path, monkeypatch):
    from oncotransfer.data.readers import ingest_max_pixels
    from oncotransfer.errors import ConfigError
    monkeypatch.setenv("ONCOTRANSFER_MAX_PIXELS", "200")
    assert ingest_max_pixels() == 200
    _, ok, failed, _ = decode_many([str(png(tmp_path / "x.png"))], 32)
    assert not ok and "above the limit of 200" in failed[0]
    monkeypatch.setenv("ONCOTRANSFER_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="ONCOTRANSFER_MAX_PIXELS"):
        ingest_max_pixels()


def test_unreadable_permissions_are_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    two_classes(tmp_path)
    secret = png(tmp_path / "a" / "secret.png", 99)
    secret.chmod(0)
    try:
        data = load_data(DataConfig(path=str(tmp_path)), 32, 1, phash=False)
    finally:
        secret.chmod(0o644)
    assert any("secret.png" in w for w in data.warnings)


def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    """Opening a FIFO blocks until a writer comes: it must be named, never hashed or decoded."""
    two_classes(tmp_path)
    os.mkfifo(tmp_path / "b" / "pipe.png")
    m = load_manifest(tmp_path)
    assert str(tmp_path / "b" / "pipe.png") not in m.paths
    assert "not a regular file" in m.skipped[str(tmp_path / "b" / "pipe.png")]
    (tmp_path / "manifest.csv").write_text("path,label\na/a0.png,a\nb/pipe.png,b\n")
    with pytest.raises(DataError, match="not readable image files, e.g. .*pipe.png"):
        load_manifest(tmp_path / "manifest.csv")
