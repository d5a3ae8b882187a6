"""Draw docs/real-formats.png: what the readers make of real files.

    python scripts/reader_figure.py [--film ../shared/data/dicom-samples/RG1_J2KR.dcm] [--out docs/real-formats.png]

Top row: the CR film (MONOCHROME1, 15 bits stored, JPEG 2000 lossless) shown naively as stored values,
then as read (display_pixels) with the lung-field and spine regions the tests measure and their means,
then the grey levels kept. Bottom row: each reader's tensor for the real-format copies in tests/data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pydicom
from matplotlib.patches import Rectangle

from training.data import CheXpert, DicomDataset, NIHChestXray14
from training.data.dicom import display_pixels

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
REGIONS = {"lung": (0.18, 0.35, 0.25, 0.45), "lung ": (0.62, 0.80, 0.25, 0.45), "spine": (0.45, 0.53, 0.25, 0.60)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--film", type=Path, default=REPO.parent / "shared" / "data" / "dicom-samples" / "RG1_J2KR.dcm")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "real-formats.png")
    args = parser.parse_args()
    film = args.film if args.film.exists() else DATA / "dicom" / "cr_film_j2k.dcm"
    dataset = pydicom.dcmread(film)
    stored, shown = dataset.pixel_array, display_pixels(dataset)

    figure, axes = plt.subplots(2, 4, figsize=(16, 8.6))
    axes[0, 0].imshow(stored, cmap="gray", vmin=0, vmax=2**dataset.BitsStored - 1)
    axes[0, 0].set_title(f"{film.name}\nstored values drawn as if MONOCHROME2\n"
                         f"{dataset.Columns}×{dataset.Rows}, {dataset.BitsStored} bits, {dataset.PhotometricInterpretation}",
                         fontsize=10)
    axes[0, 1].imshow(shown, cmap="gray", vmin=0, vmax=1)
    height, width = shown.shape
    for name, (x0, x1, y0, y1) in REGIONS.items():
        region = shown[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)]
        colour = "tab:cyan" if name.startswith("lung") else "tab:orange"
        axes[0, 1].add_patch(Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height,
                                       fill=False, edgecolor=colour, linewidth=1.5))
        axes[0, 1].text(x0 * width, (y1 + 0.05 + 0.05 * (name == "spine")) * height, f"{name.strip()} {region.mean():.2f}",
                        color="black", fontsize=10, bbox={"facecolor": colour, "alpha": 0.85, "pad": 1.5})
    axes[0, 1].set_title("as read: window 15000/30000,\nMONOCHROME1 inverted\n(region means: 0 black … 1 white)",
                         fontsize=10)
    levels = np.unique(stored).size
    axes[0, 2].hist(np.rint(shown * 65535).ravel(), bins=512, color="0.3")
    axes[0, 2].set_title(f"display levels (16-bit): {np.unique(np.rint(shown * 65535)).size}\n"
                         f"stored levels: {levels} — none merged", fontsize=10)
    axes[0, 2].set_xlabel("uint16 display value")
    axes[0, 3].axis("off")
    axes[0, 3].text(0, 0.5, "DICOM grayscale pipeline (PS3.3 C.11):\n  stored → Modality LUT (rescale)\n"
                    "  → VOI LUT or window (else 0.5–99.5 %ile)\n  → MONOCHROME1 inverted → padding black\n"
                    "  → uint16 → centre crop → LANCZOS", fontsize=10, family="monospace", va="center")

    nih = NIHChestXray14(DATA / "real_nih", split="all", size=128)
    names = list(nih.image_names)
    tiles = [
        ("NIH RGBA PNG (real, 128² copy)", nih[names.index("00000773_001.png")][0]),
        ("NIH palette PNG", nih[names.index("00000165_001_palette.png")][0]),
        ("CheXpert greyscale JPEG 320×394", CheXpert(DATA / "real_chexpert" / "CheXpert-v1.0-small", split="valid", size=128)[0][0]),
        ("DICOM DX 8-bit MONOCHROME2 (NIH)", DicomDataset(DATA / "dicom", split="all", size=128)[2][0]),
    ]
    for axis, (title, tensor) in zip(axes[1], tiles):
        axis.imshow(tensor[0].numpy(), cmap="gray", vmin=-1, vmax=1)
        axis.set_title(f"{title}\n→ tensor {tuple(tensor.shape)}", fontsize=10)
    for axis in [*axes[0, :2], *axes[1]]:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
