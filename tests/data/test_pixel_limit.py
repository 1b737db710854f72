"""Images are refused by their declared pixel count before decoding (data.readers open_rgb / probe max_pixels)."""
from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFile

from oncotransfer.data.demo import demo_path
from oncotransfer.data.images import decode_for_model
from oncotransfer.data.readers import MAX_PIXELS, ImageReadError, ImageTooLargeError, open_rgb, probe

JPG = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]  # 384 x 384


@pytest.fixture
def loads(monkeypatch):
    seen = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: seen.append(self.size) or real(self))
    return seen


def test_over_the_limit_is_refused_without_decoding(loads):
    with pytest.raises(ImageTooLargeError, match=r"384 x 384 = 147,456 pixels, above the limit of 100,000"):
        open_rgb(JPG, max_pixels=100_000)
    with pytest.raises(ImageTooLargeError):
        probe(JPG.read_bytes(), max_pixels=100_000)
    assert loads == []
    assert open_rgb(JPG, max_pixels=384 * 384).size == (384, 384) and loads  # at the limit: decoded


def test_default_keeps_pillows_limit_and_the_same_pixels():
    a = decode_for_model(JPG, 128)[1]
    b = decode_for_model(JPG, 128, max_pixels=MAX_PIXELS)[1]
    assert (a == b).all()
    assert issubclass(ImageTooLargeError, ImageReadError)  # callers catching ImageReadError still catch it


def test_probe_estimates_decoded_bytes_from_the_header(loads):
    head = probe(JPG, draft_size=128)  # JPEG drafted to 1/2 scale at most (>= 128 px)
    assert (head.width, head.height) == (384, 384) and head.peak_bytes == 192 * 192 * (3 + 3)
    buf = io.BytesIO()
    Image.new("RGBA", (300, 200)).save(buf, "PNG")
    head = probe(buf.getvalue())
    assert (head.reader, head.width, head.height, head.peak_bytes) == ("pillow", 300, 200, 300 * 200 * (4 + 8 + 3))
    with pytest.raises(ImageReadError, match="not an image"):
        probe(b"not an image at all")
    assert loads == []
