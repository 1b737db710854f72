"""``oncotransfer slides``: whole-slide images cut into tissue tiles (the command; the work is data.slides)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oncotransfer.cli_output import Stream

slides_app = typer.Typer(no_args_is_help=True, help="Whole-slide images: tissue tiles at a physical resolution.")
console = Stream()
err = Stream(stderr=True)
MPP_SOURCE_HELP = "level-0 µm/px for slides whose files record none (e.g. 0.25 for a 40x scan)"


@slides_app.command("tile")
def slides_tile(slides: Path = typer.Argument(..., help="one slide (SVS, NDPI, MRXS, pyramidal TIFF...) or a folder"),
                out_dir: Path = typer.Argument(..., help="folder for tiles/, thumbnails/, manifest.csv"),
                tile_size: int = typer.Option(224, help="tile side in pixels"),
                mpp: Optional[float] = typer.Option(None, help="tile resolution in µm/px (default 0.5)"),
                magnification: Optional[float] = typer.Option(None, help="tile magnification instead of --mpp"),
                mpp_source: Optional[float] = typer.Option(None, help=MPP_SOURCE_HELP),
                labels: Optional[Path] = typer.Option(None, help="CSV slide,label[,patient]; tiles inherit them"),
                min_tissue: float = typer.Option(0.5, help="least tissue fraction of a kept tile"),
                overwrite: bool = typer.Option(False, help="replace an existing OUT/manifest.csv")) -> None:
    """Find tissue (Otsu on a low-resolution level), cut non-overlapping tiles, write manifest.csv for train."""
    from oncotransfer.data.slides import tile_slides
    result = tile_slides(slides, out_dir, tile_size, mpp, magnification, mpp_source, labels, min_tissue, overwrite,
                         log=lambda s: err.print(s, highlight=False, soft_wrap=True))
    console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)
