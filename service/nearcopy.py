"""Near-copies of the training set: an embedding index, then a shift-tolerant pixel check.

A synthetic image is a *near-copy* when some training image is, pixel for pixel, nearly the same
picture, even after a shift of a few pixels, added noise, a brightness/contrast change or JPEG
re-encoding. Finding one takes two stages:

1. **Candidates by embedding.** The bundle classifier's embedding ([B, E], ``classifier.onnx``) of
   the image smoothed (a Gaussian of 1 pixel: at 64² pixel noise of σ = 0.1 otherwise moved 85% of
   noisy copies away from their source) and standardised to a fixed mean and spread (without it a
   third of brightness/contrast-changed copies were lost at this stage), L2-normalised, is searched for the ``neighbours`` nearest training embeddings with scikit-learn's
   exact ``NearestNeighbors``. At E = 64–1024 tree indexes visit nearly every point (the curse of
   dimension), so scikit-learn runs its chunked BLAS search; the cost per query grows linearly with
   the training set and the pixel check never looks at more than ``neighbours`` images
   (BENCHMARKS.md, "Memorisation audit").
2. **Pixel check.** Each candidate is compared on ``compare_size``² thumbnails (area means, smoothed
   by the same 1-pixel Gaussian) by the
   maximum normalised cross-correlation over integer shifts up to ``max_shift`` thumbnail pixels, both
   overlapping windows z-scored (zero-normalised cross-correlation, ZNCC; Lewis, "Fast normalized
   cross-correlation", Vision Interface 1995). Z-scoring cancels any brightness/contrast change
   (an affine map of intensities), the shift search cancels translations, and the thumbnail's area
   mean averages away noise and JPEG blocking. The score is in [-1, 1]; 1 is the same picture.

The threshold on that score is calibrated on real data by ``training/evaluate/memorisation.py`` (the
real-to-real nearest-neighbour scores of held-out patients against the training patients) and stored
in the index file with everything else the check needs, so the service (no torch, no training data)
runs the same check the audit measured.

The index file (``.npz``, no pickles) holds ``embeddings`` float32 [N, E], ``thumbnails`` uint8
[N, S, S] (smoothed) (pixels of [-1, 1] mapped to 0..255), ``names`` [N] and ``metadata`` (JSON: threshold,
compare_size, max_shift, neighbours, image_size, classifier_sha256, source). It is a side file rather
than a bundle file: it describes a data set, not the networks, may be rebuilt without re-exporting the
bundle, and grows with the training set (about 4 KiB per image at 64²); ``classifier_sha256`` ties it
to the classifier whose embedding it holds, and loading it beside another bundle is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FORMAT = "cxrsynth-near-copy-index/1"
DEFAULT_COMPARE_SIZE = 64
DEFAULT_NEIGHBOURS = 10
DEFAULT_MAX_SHIFT_PX = 4  # pixels at the images' own resolution
SMOOTHING_SIGMA_PX = 1.0  # Gaussian smoothing before both stages, in pixels of what is compared
# A generator that still copies after this many fresh seeds for one image memorises its training set;
# the filter gives up rather than loop.
MAX_REPLACEMENTS = 16


class NearCopyIndexError(ValueError):
    """An index file that cannot be used, or images that do not fit it; the message says what to fix."""


def thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    """Area-mean thumbnails: images [B, H, W] (or [B, 1, H, W]) in [-1, 1] → float32 [B, size, size].

    H and W must be equal multiples of ``size`` (the project's images are powers of two); an image
    smaller than ``size`` is refused, since upsampling would invent detail.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise NearCopyIndexError(f"images must be [B, H, W] or [B, 1, H, W] squares; got shape {list(images.shape)}")
    side = images.shape[1]
    if side < size or side % size:
        raise NearCopyIndexError(f"images of {side}² cannot be averaged down to {size}² thumbnails; "
                                 f"use images whose side is a multiple of {size}")
    factor = side // size
    return images.reshape(len(images), size, factor, size, factor).mean(axis=(2, 4))


def smoothed(images: np.ndarray) -> np.ndarray:
    """images [B, H, W] under a Gaussian of :data:`SMOOTHING_SIGMA_PX` (scipy.ndimage, edges repeated)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(images, np.float32), (0, SMOOTHING_SIGMA_PX, SMOOTHING_SIGMA_PX), mode="nearest")


def shift_in_thumbnail_pixels(max_shift_px: int, image_size: int, compare_size: int) -> int:
    """A shift of ``max_shift_px`` image pixels, in thumbnail pixels, rounded up."""
    return math.ceil(max_shift_px * compare_size / image_size)


def zncc_over_shifts(query: np.ndarray, candidates: np.ndarray, max_shift: int) -> np.ndarray:
    """Max zero-normalised cross-correlation over shifts: query [S, S], candidates [K, S, S] → [K] in [-1, 1].

    Every integer shift (dy, dx) with |dy|, |dx| ≤ ``max_shift`` is tried; the overlapping windows of
    the two images are z-scored separately, so the score is blind to brightness and contrast. A
    constant window (zero variance) scores 0.
    """
    size = query.shape[-1]
    best = np.full(len(candidates), -1.0, np.float64)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            q = query[max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)]
            c = candidates[:, max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)]
            q = (q - q.mean()).ravel()
            c = (c - c.mean(axis=(1, 2), keepdims=True)).reshape(len(c), -1)
            norms = np.linalg.norm(q) * np.linalg.norm(c, axis=1)
            score = np.divide(c @ q, norms, out=np.zeros(len(c)), where=norms > 1e-12)
            np.maximum(best, score, out=best)
    return best


def standardised(images: np.ndarray) -> np.ndarray:
    """Each image [..., H, W] shifted and scaled to mean 0 and standard deviation 0.5, clipped to [-1, 1]."""
    images = np.asarray(images, np.float32)
    mean = images.mean(axis=(-2, -1), keepdims=True)
    spread = np.maximum(images.std(axis=(-2, -1), keepdims=True), 1e-6)
    return np.clip((images - mean) / spread * 0.5, -1.0, 1.0)


def embed_images(bundle: Any, images: np.ndarray) -> np.ndarray:
    """The bundle classifier's embedding [B, E] of images [B, H, W] in [-1, 1], area-averaged to the
    bundle's resolution, smoothed (:func:`smoothed`) and standardised (:func:`standardised`)."""
    batch = standardised(smoothed(thumbnails(images, int(bundle.manifest.resolution))))[:, None]
    return bundle.classify(batch)[1]


def normalised(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (Euclidean distance then orders as cosine similarity)."""
    embeddings = np.asarray(embeddings, np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _from_uint8(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class Matches:
    """The closest training image of each query, after the pixel check.

    similarity [Q] ZNCC in [-1, 1] of the best candidate; neighbour [Q] its row in the index;
    embedding_distance [Q] Euclidean distance of unit embeddings (0–2) to that candidate;
    nearest_embedding_distance [Q] the distance to the nearest embedding overall; near_copy [Q] bool.
    """

    similarity: np.ndarray
    neighbour: np.ndarray
    embedding_distance: np.ndarray
    nearest_embedding_distance: np.ndarray
    near_copy: np.ndarray


class NearCopyIndex:
    """The training set's embeddings and thumbnails, with the threshold that makes a near-copy."""

    def __init__(self, embeddings: np.ndarray, thumbs: np.ndarray, names: np.ndarray, metadata: dict[str, Any]):
        self.embeddings = normalised(embeddings)
        self.thumbs = thumbs  # uint8 [N, S, S]
        self.names = np.asarray(names, dtype=str)
        self.metadata = metadata
        self.sha256: str | None = None  # of the file it was loaded from
        count = len(self.embeddings)
        if count == 0 or len(self.thumbs) != count or len(self.names) != count:
            raise NearCopyIndexError(f"an index needs as many embeddings, thumbnails and names, at least one; got "
                                     f"{len(self.embeddings)}, {len(self.thumbs)}, {len(self.names)}")
        self.neighbours = min(int(metadata["neighbours"]), count)
        from sklearn.neighbors import NearestNeighbors

        self._search = NearestNeighbors(n_neighbors=self.neighbours).fit(self.embeddings)

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def compare_size(self) -> int:
        return int(self.metadata["compare_size"])

    @property
    def max_shift(self) -> int:
        return int(self.metadata["max_shift"])

    def __len__(self) -> int:
        return len(self.embeddings)

    @classmethod
    def build(cls, embeddings: np.ndarray, images: np.ndarray, names: Any, *, threshold: float,
              classifier_sha256: str, source: str = "", neighbours: int = DEFAULT_NEIGHBOURS,
              compare_size: int = DEFAULT_COMPARE_SIZE, max_shift_px: int = DEFAULT_MAX_SHIFT_PX) -> NearCopyIndex:
        """An index of training images [N, H, W] in [-1, 1] with their embeddings [N, E].

        ``compare_size`` is capped at H; ``max_shift_px`` is in pixels of these images.
        """
        images = np.asarray(images, np.float32)
        image_size = int(images.shape[-1])
        compare_size = min(compare_size, image_size)
        metadata = {
            "format": INDEX_FORMAT,
            "threshold": float(threshold),
            "compare_size": compare_size,
            "max_shift": shift_in_thumbnail_pixels(max_shift_px, image_size, compare_size),
            "neighbours": int(neighbours),
            "image_size": image_size,
            "classifier_sha256": classifier_sha256,
            "source": source,
        }
        return cls(embeddings, _to_uint8(smoothed(thumbnails(images, compare_size))), np.asarray(list(names)), metadata)

    def with_threshold(self, threshold: float) -> NearCopyIndex:
        return NearCopyIndex(self.embeddings, self.thumbs, self.names, {**self.metadata, "threshold": float(threshold)})

    def match(self, embeddings: np.ndarray, images: np.ndarray) -> Matches:
        """Queries: embeddings [Q, E] and images [Q, H, W] in [-1, 1] (H = the index's image size or a
        multiple of compare_size) → :class:`Matches`."""
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise NearCopyIndexError(f"embeddings have {embeddings.shape[1]} dimensions, the index "
                                     f"{self.embeddings.shape[1]}: it was built with another classifier")
        distances, rows = self._search.kneighbors(normalised(embeddings))
        query_thumbs = smoothed(thumbnails(images, self.compare_size))
        similarity = np.empty(len(rows))
        best = np.empty(len(rows), np.int64)
        best_distance = np.empty(len(rows))
        for q, candidates in enumerate(rows):
            scores = zncc_over_shifts(query_thumbs[q], _from_uint8(self.thumbs[candidates]), self.max_shift)
            pick = int(np.argmax(scores))
            similarity[q], best[q], best_distance[q] = scores[pick], candidates[pick], distances[q, pick]
        return Matches(similarity, best, best_distance, distances[:, 0], similarity >= self.threshold)

    # -- the file ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, embeddings=self.embeddings, thumbnails=self.thumbs, names=self.names,
                         metadata=np.array(json.dumps(self.metadata, sort_keys=True)))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, classifier_sha256: str | None = None) -> NearCopyIndex:
        """Read an index file; with ``classifier_sha256``, refuse one built on another classifier."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                metadata = json.loads(str(data["metadata"]))
                index = cls(data["embeddings"], data["thumbnails"], data["names"], metadata)
        except (OSError, KeyError, ValueError) as error:
            if isinstance(error, NearCopyIndexError):
                raise NearCopyIndexError(f"{path}: {error}") from None
            raise NearCopyIndexError(f"{path} is not a near-copy index ({error}); write one with "
                                     "`python -m training.evaluate.memorisation index`") from None
        if metadata.get("format") != INDEX_FORMAT:
            raise NearCopyIndexError(f"{path}: format {metadata.get('format')!r}, expected {INDEX_FORMAT!r}")
        if classifier_sha256 is not None and metadata["classifier_sha256"] != classifier_sha256:
            raise NearCopyIndexError(
                f"{path} was built on classifier.onnx sha256 {metadata['classifier_sha256'][:12]}…, the bundle's is "
                f"{classifier_sha256[:12]}…; rebuild the index with this bundle")
        index.sha256 = _sha256(path)
        return index


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def near_copy_limit_message(seed: int) -> str:
    return (f"the image of seed {seed} and its next {MAX_REPLACEMENTS} replacements were all near-copies of the "
            "training set: the generator memorises it; audit it (python -m training.evaluate.memorisation) "
            "rather than filter it")


class NearCopyFilter:
    """The service's check: embeds generated images with the bundle's classifier and matches them.

    Images are embedded one at a time: ONNX Runtime's results depend in the last bits on the batch
    shape (docs/ARCHITECTURE.md, "One compute shape per engine"), and an image's verdict, hence the
    archive's bytes, must not depend on which other images shared its batch.
    """

    def __init__(self, bundle: Any, index: NearCopyIndex):
        self.bundle = bundle
        self.index = index

    @classmethod
    def open(cls, bundle: Any, path: str | Path) -> NearCopyFilter:
        return cls(bundle, NearCopyIndex.load(path, bundle.manifest.files["classifier.onnx"].sha256))

    def near_copies(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """bool [B]: which generated images [H, W] in [-1, 1] are near-copies of a training image."""
        batch = np.stack([np.asarray(image, np.float32) for image in images])
        embeddings = np.concatenate([embed_images(self.bundle, image[None]) for image in batch])
        return self.index.match(embeddings, batch).near_copy
