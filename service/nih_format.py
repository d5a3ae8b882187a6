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
