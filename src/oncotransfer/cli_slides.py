"""``oncotransfer slides``: whole-slide images cut into tissue tiles (the command; the work is data.slides)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oncotransfer.cli_output import Stream

slides_app = typer.Typer(no_args_is_help=True, help="Whole-slide images: tissue tiles at a physical resolution.")
console = Stream()
err = Stream(stderr=True)
MPP_SOURCE_HELP = ("level-0 µm/px of the scan (e.g. 0.25 for 40x); overrides the file's own, which is needed when "
                   "it records none or an implausible one (72 dpi)")
TISSUE_HELP = ("tissue mask: auto | brightfield (stain on white glass) | fluorescence (bright on dark); auto picks "
               "fluorescence when the thumbnail is mostly dark")


@slides_app.command("tile")
def slides_tile(slides: Path = typer.Argument(..., help="one slide (SVS, NDPI, MRXS, pyramidal TIFF...) or a folder"),
                out_dir: Path = typer.Argument(..., help="folder for tiles/, thumbnails/, manifest.csv"),
                tile_size: int = typer.Option(224, help="tile side in pixels"),
                mpp: Optional[float] = typer.Option(None, help="tile resolution in µm/px (default 0.5)"),
                magnification: Optional[float] = typer.Option(None, help="tile magnification instead of --mpp"),
                mpp_source: Optional[float] = typer.Option(None, help=MPP_SOURCE_HELP),
                labels: Optional[Path] = typer.Option(None, help="CSV slide,label[,patient]; tiles inherit them"),
                min_tissue: float = typer.Option(0.5, help="least tissue fraction of a kept tile"),
                tissue: str = typer.Option("auto", help=TISSUE_HELP),
                overwrite: bool = typer.Option(False, help="replace an existing OUT/manifest.csv")) -> None:
    """Find tissue (Otsu on a low-resolution level), cut non-overlapping tiles, write manifest.csv for train;
    exit 1 when a slide failed (the others are still tiled)."""
    from oncotransfer.data.slides import tile_slides
    result = tile_slides(slides, out_dir, tile_size, mpp, magnification, mpp_source, labels, min_tissue, overwrite,
                         log=lambda s: err.print(s, highlight=False, soft_wrap=True), tissue=tissue)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)
