"""Built-in demo data sets (see ATTRIBUTION.md for sources and licences)."""
from __future__ import annotations

from pathlib import Path

from oncotransfer.errors import DataError

_HERE = Path(__file__).parent
DEMO_SETS = {
    "busi": "323 breast-ultrasound images, benign/malignant, no patient ids, near-duplicates (BUSI, CC BY 4.0)",
    "osteosarcoma": "60 H&E osteosarcoma tiles, 3 classes, 4 patients (TCIA, CC BY 3.0)",
    "bus250": "250 breast-ultrasound images, benign/malignant, no patient ids (Mendeley Data, CC BY 4.0)",
}


def demo_path(name: str) -> Path:
    """Folder of a built-in set (holds manifest.csv)."""
    if name not in DEMO_SETS:
        raise DataError(f"unknown demo set {name!r}; built-in sets: {sorted(DEMO_SETS)}")
    return _HERE / name
