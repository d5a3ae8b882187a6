"""The NIH ChestX-ray14 Data_Entry CSV format, for data sets this project writes (phantoms, archives).

Existing ChestX-ray14 loaders read those files unchanged. Columns absent from synthetic data are filled
with documented synthetic values by the writer that uses them.
"""

from __future__ import annotations

# Exactly the header of Data_Entry_2017_v2020.csv.
DATA_ENTRY_COLUMNS: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
# Columns a reader cannot work without.
REQUIRED_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Labels", "Patient ID")

# The field of view of an NIH film (originals: about 3000 px at 0.143 mm), spread over the side of a
# synthetic image: the spacing archives write in OriginalImagePixelSpacing and DICOM in PixelSpacing.
FIELD_OF_VIEW_MM = 430.0


def pixel_spacing_mm(resolution: int) -> float:
    """Millimetres per pixel of a synthetic image ``resolution`` pixels wide (FIELD_OF_VIEW_MM / side)."""
    return FIELD_OF_VIEW_MM / resolution
