"""`predict` refuses images over --max-pixels before decoding them, naming each, and scores the rest."""
from __future__ import annotations

from oncotransfer.data.demo import demo_path


def test_predict_names_images_over_the_pixel_limit(tiny_run, tmp_path):
    from oncotransfer.infer.predict import run_predict
    images = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:2]  # 384 x 384 each
    big = tmp_path / "big.png"
    from PIL import Image
    Image.new("RGB", (400, 400)).save(big)
    df, errors = run_predict(tiny_run, [*map(str, images), str(big)], tmp_path / "p.csv", engine="torch",
                             max_pixels=384 * 384)
    assert list(df["path"]) == [str(p) for p in images]
    assert list(errors) == [str(big)] and "400 x 400" in errors[str(big)] and "before decoding" in errors[str(big)]
