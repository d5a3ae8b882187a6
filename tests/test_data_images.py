"""Image decoding, bad data and the resize cache, shared by every reader."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from training.data import ImageFolder, ImageSkipped, ResizeCache, decode_image, make_loader, to_tensor
from training.data import cache as cache_module


def gradient(size: int = 64) -> np.ndarray:
    """8-bit test pattern: horizontal ramp 0..255 plus a vertical component, no flat regions."""
    x = np.linspace(0, 255, size)
    return np.clip(x[None, :] * 0.8 + x[:, None] * 0.2, 0, 255).round().astype(np.uint8)


def test_8bit_grey_keeps_values_and_maps_to_minus_one_one(tmp_path: Path) -> None:
    pixels = gradient()
    pixels[0, 0], pixels[-1, -1] = 0, 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    stored = decode_image(tmp_path / "a.png", 64)
    assert stored.dtype == np.uint8 and np.array_equal(stored, pixels)
    tensor = to_tensor(stored)
    assert tensor.shape == (1, 64, 64) and tensor.dtype == torch.float32
    assert tensor[0, 0, 0] == -1.0 and tensor[0, -1, -1] == 1.0
    assert torch.allclose(tensor[0], torch.from_numpy(pixels / 127.5 - 1.0).float(), atol=1e-6)


def test_16bit_png_scaled_by_its_own_bit_depth(tmp_path: Path) -> None:
    eight = gradient()
    sixteen = eight.astype(np.uint16) * 257  # 255 -> 65535: the same intensities at 16 bits
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    stored = decode_image(tmp_path / "deep.png", 64)
    assert stored.dtype == np.uint16 and stored.max() == sixteen.max()
    assert torch.allclose(to_tensor(stored), to_tensor(eight), atol=1e-6)
    # Resized 16-bit data stays 16-bit and matches the 8-bit path to 8-bit precision.
    Image.fromarray(eight).save(tmp_path / "a.png")
    small_16 = to_tensor(decode_image(tmp_path / "deep.png", 32))
    small_8 = to_tensor(decode_image(tmp_path / "a.png", 32))
    assert (small_16 - small_8).abs().max() < 2.5 / 255


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_alpha_and_palette_become_luminance(tmp_path: Path, mode: str) -> None:
    grey = Image.fromarray(gradient())
    converted = grey.convert(mode)
    if mode in ("RGBA", "LA"):
        converted.putalpha(Image.fromarray(np.full((64, 64), 40, np.uint8)))  # alpha is not signal
    converted.save(tmp_path / "c.png")
    stored = decode_image(tmp_path / "c.png", 64)
    assert stored.dtype == np.uint8
    assert np.abs(stored.astype(int) - gradient().astype(int)).max() <= 1


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    Image.fromarray(gradient()).save(tmp_path / "j.jpg", quality=95)
    stored = decode_image(tmp_path / "j.jpg", 64)
    assert np.abs(stored.astype(int) - gradient().astype(int)).mean() < 2.0


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture(tmp_path: Path) -> None:
    big = np.asarray(Image.fromarray(gradient(64)).resize((600, 520), Image.Resampling.BICUBIC))
    Image.fromarray(big).convert("RGB").save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    from_jpeg = decode_image(tmp_path / "big.jpg", 64).astype(int)
    from_png = decode_image(tmp_path / "big.png", 64).astype(int)
    assert from_jpeg.shape == (64, 64) and np.abs(from_jpeg - from_png).mean() < 2.0


def test_non_square_is_centre_cropped_then_resized(tmp_path: Path) -> None:
    # 300 wide, 200 high: the outer 50 px columns are white and must be cropped away.
    pixels = np.zeros((200, 300), np.uint8)
    pixels[:, :50] = pixels[:, 250:] = 255
    pixels[:, 50:250] = np.linspace(0, 200, 200)[None, :]
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    stored = decode_image(tmp_path / "wide.png", 100)
    assert stored.shape == (100, 100)
    assert stored[:, :3].mean() < 10 and 190 < stored[:, -3:].mean() <= 205  # ramp ends, not the white bands


def test_bad_files_raise_skip_with_reason(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tiny.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    Image.fromarray(gradient(256)).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.png").write_text("not an image")
    expected = {
        "tiny.png": "too_small",
        "corrupt.png": "unreadable",
        "truncated.png": "unreadable",
        "text.png": "unreadable",
        "absent.png": "missing",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageSkipped) as raised:
            decode_image(tmp_path / name, 32)
            pytest.fail(f"{name} decoded")
        assert raised.value.reason == reason, name


def write_mixed_folder(root: Path) -> None:
    """Good images of every flavour plus one corrupt and one tiny file, in nested folders."""
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(gradient(80)).save(root / "grey8.png")
    Image.fromarray(gradient(80).astype(np.uint16) * 257).save(root / "a" / "grey16.png")
    Image.fromarray(gradient(80)).convert("RGB").save(root / "a" / "rgb.jpg")
    Image.fromarray(gradient(80)).convert("RGBA").save(root / "a" / "b" / "rgba.png")
    Image.fromarray(gradient(80)).save(root / "a" / "b" / "x.tif")
    Image.fromarray(gradient(80)).save(root / "a" / "b" / "x.bmp")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "tiny.png")
    (root / "corrupt.png").write_bytes(b"garbage" * 50)
    (root / "notes.txt").write_text("ignored: not an image extension")


def test_folder_skips_bad_images_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_mixed_folder(tmp_path)
    dataset = ImageFolder(tmp_path, size=32)
    assert len(dataset) == 8
    good = {"grey8.png", "a/grey16.png", "a/rgb.jpg", "a/b/rgba.png", "a/b/x.tif", "a/b/x.bmp"}
    with caplog.at_level(logging.WARNING, logger="training.data"):
        items = [dataset[i] for i in range(len(dataset))]
    for image, labels, mask in items:
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
        assert labels.shape == mask.shape == (14,) and mask.sum() == 0
    assert dataset.skipped == {"missing": 0, "unreadable": 1, "too_small": 1}
    assert sum("corrupt.png" in r.getMessage() for r in caplog.records) == 1
    assert sum("tiny.png" in r.getMessage() for r in caplog.records) == 1
    # A bad index is replaced by a good item, deterministically.
    bad = [i for i, p in enumerate(dataset.paths) if str(p) not in good]
    assert len(bad) == 2
    for i in bad:
        assert torch.equal(dataset[i][0], dataset[i][0])
    # Known-bad files are not read again: the counts stay put.
    [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped_total == 2


def test_skip_counts_cross_worker_processes(tmp_path: Path) -> None:
    write_mixed_folder(tmp_path)
    dataset = ImageFolder(tmp_path, size=32)
    loader = make_loader(dataset, batch_size=4, workers=2, shuffle=True, seed=3, drop_last=False)
    shapes = [batch[0].shape for batch in loader]
    assert shapes == [(4, 1, 32, 32), (4, 1, 32, 32)]
    assert dataset.skipped == {"missing": 0, "unreadable": 1, "too_small": 1}


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)


def test_resize_cache_reuses_and_invalidates(tmp_path: Path) -> None:
    images, cache_dir = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    Image.fromarray(gradient(128)).save(images / "x.png")
    plain = ImageFolder(images, size=48)
    cached = ImageFolder(images, size=48, cache_dir=cache_dir)
    first = cached[0][0]
    entries = list(cache_dir.rglob("*.npy"))
    assert len(entries) == 1 and torch.equal(first, plain[0][0])
    # The second read comes from the cache entry: prove it by altering the entry in place.
    altered = np.load(entries[0])
    altered[0, 0] = 0 if altered[0, 0] else 255
    np.save(entries[0], altered)
    assert not torch.equal(cached[0][0], first)
    # A changed source (new size/mtime) gets a new entry and fresh pixels.
    Image.fromarray(255 - gradient(128)).save(images / "x.png")
    os.utime(images / "x.png", ns=(1, 1))
    assert torch.allclose(cached[0][0], -first, atol=2 / 255)
    # A damaged entry is rebuilt rather than trusted.
    entry = ResizeCache(cache_dir).entry(images / "x.png", 48)
    entry.write_bytes(b"damaged")
    assert torch.allclose(cached[0][0], -first, atol=2 / 255)
    assert np.load(entry).shape == (48, 48)


def test_folder_linking_back_into_itself_lists_its_one_image_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Image.fromarray(gradient()).save(tmp_path / "only.png")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "up").symlink_to("..")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = ImageFolder(tmp_path, size=32)
    assert list(dataset.paths) == ["only.png"]
    assert dataset.links_skipped == {"repeated_folders": 1, "duplicate_files": 0, "broken_links": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "listed 1 file(s), skipped 1 folder link(s) leading back" in warnings[0]


def test_every_real_file_is_listed_once_whatever_links_lead_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real, other = tmp_path / "real", tmp_path / "zother"
    real.mkdir()
    other.mkdir()
    Image.fromarray(gradient()).save(real / "x.png")
    Image.fromarray(255 - gradient()).save(real / "y.png")
    Image.fromarray(gradient(48)).save(other / "w.png")
    (tmp_path / "alias").symlink_to("real")  # a second way into real/
    (real / "to_other").symlink_to("../zother")  # real/ and zother/ link to each other: a loop
    (other / "to_real").symlink_to("../real")
    (tmp_path / "z.png").symlink_to("real/x.png")  # a second name for one file
    os.link(real / "y.png", tmp_path / "hard.png")  # and a hard link
    (tmp_path / "gone.png").symlink_to("nowhere.png")  # links to nothing
    (tmp_path / "self.png").symlink_to("self.png")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = ImageFolder(tmp_path, size=32)
    # The first path met is kept: names sorted, a folder's own files and subfolders before anything deeper.
    assert list(dataset.paths) == ["hard.png", "z.png", "zother/w.png"]
    assert dataset.links_skipped == {"repeated_folders": 3, "duplicate_files": 2, "broken_links": 2}
    assert dataset.skipped == {"missing": 2, "unreadable": 0, "too_small": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for part in ("listed 3 file(s)", "3 folder link(s)", "2 further name(s)", "2 link(s) to nothing"):
        assert part in warnings[0], warnings[0]
    images = [dataset[i][0] for i in range(len(dataset))]
    assert len({tuple(image.flatten().tolist()) for image in images}) == 3  # three different pictures


def test_a_tree_without_links_is_listed_without_a_warning(tmp_path: Path, caplog) -> None:
    write_mixed_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = ImageFolder(tmp_path, size=32)
    assert len(dataset) == 8 and not caplog.records
    assert dataset.links_skipped == {"repeated_folders": 0, "duplicate_files": 0, "broken_links": 0}


# What a viewer shows for each EXIF/TIFF Orientation value, from the stored rows and columns (the
# tag names where the stored first row and column belong: 6 = "right, top", turn 90° clockwise).
DISPLAYED = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),
}


def save_oriented(path: Path, pixels: np.ndarray, orientation: int, **options) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(pixels).save(path, exif=exif, **options)


def top_half_white(size: int = 64) -> np.ndarray:
    pixels = np.zeros((size, size), np.uint8)
    pixels[: size // 2] = 255
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_tag_is_applied_as_a_viewer_does(tmp_path: Path, orientation: int) -> None:
    stored = gradient()  # no symmetry: each of the eight orientations gives a different picture
    save_oriented(tmp_path / "o.png", stored, orientation)
    assert np.array_equal(decode_image(tmp_path / "o.png", 64), DISPLAYED[orientation](stored))


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_jpeg_and_tiff_orientation_turn_the_top_half_to_the_right(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"o{suffix}"
    if suffix == ".tif":
        Image.fromarray(top_half_white()).save(path, tiffinfo={274: 6})  # TIFF's own Orientation tag
    else:
        save_oriented(path, top_half_white(), 6, quality=95)
    shown = decode_image(path, 64).astype(float)
    assert shown[:, :30].mean() < 10 and shown[:, 34:].mean() > 245


def test_folder_items_are_upright_and_old_cache_entries_are_not_served(tmp_path: Path, monkeypatch) -> None:
    images, cache_dir = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    save_oriented(images / "o.jpg", top_half_white(), 6, quality=95)
    # An entry as the decoder before orientation tags wrote it: its key, the stored layout's pixels.
    absolute = os.path.abspath(images / "o.jpg")
    status = os.stat(absolute)
    old_key = f"{absolute}\0{status.st_size}\0{status.st_mtime_ns}\0{64}\0{1}"
    digest = hashlib.blake2b(old_key.encode(), digest_size=16).hexdigest()
    old_entry = cache_dir / "64" / digest[:2] / f"{digest}.npy"
    ResizeCache(cache_dir).store(old_entry, top_half_white())

    image = ImageFolder(images, size=64, cache_dir=cache_dir)[0][0][0]
    assert image[:, :30].mean() < -0.9 and image[:, 34:].mean() > 0.9  # displayed: right half white
    new_entry = ResizeCache(cache_dir).entry(images / "o.jpg", 64)
    assert new_entry != old_entry and new_entry.is_file()
    assert sorted(cache_dir.rglob("*.npy")) == sorted([old_entry, new_entry])
    # The key follows the decoding rule's version and Pillow's, whatever either becomes.
    monkeypatch.setattr(cache_module, "DECODE_VERSION", cache_module.DECODE_VERSION + 1)
    assert ResizeCache(cache_dir).entry(images / "o.jpg", 64) != new_entry
    monkeypatch.undo()
    monkeypatch.setattr(PIL, "__version__", "0.0.0")
    assert ResizeCache(cache_dir).entry(images / "o.jpg", 64) != new_entry
