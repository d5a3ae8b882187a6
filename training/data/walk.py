"""Listing a user's folder tree: every real file once, whatever links the tree holds.

Folder links are followed (data sets are often assembled from links to several disks), so a link back
to a folder above it (``a/up -> ..``) would make a plain walk go round until the system refuses a path
that deep (one file listed 41 times), and a second link to the same folder or file would list its
images twice. Folders and files are told apart by identity (device and inode), not by path: the first
path met is kept (names sorted, a folder's own files and subfolders before anything deeper), every other
way to the same folder or file is skipped and counted, and a single warning gives the counts.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("training.data")


@dataclass
class TreeListing:
    """What :func:`walk_files` found under its ``root``.

    ``files`` are paths relative to ``root`` (``os.sep``-separated, sorted), one per real file.
    The counts are of what was passed over: folder links that lead to a folder already walked (a loop
    or a second link to it), further names (symbolic or hard links) of a file already listed, and
    links whose target does not exist or cannot be reached.
    """

    files: list[str] = field(default_factory=list)
    repeated_folders: int = 0
    duplicate_files: int = 0
    broken_links: int = 0

    @property
    def skipped(self) -> int:
        return self.repeated_folders + self.duplicate_files + self.broken_links

    def counts(self) -> dict[str, int]:
        """The skip counts by kind, without the file list."""
        return {
            "repeated_folders": self.repeated_folders,
            "duplicate_files": self.duplicate_files,
            "broken_links": self.broken_links,
        }

    def summary(self) -> str:
        parts = [
            (
                self.repeated_folders,
                "folder link(s) leading back to a folder already walked (a loop or a second link)",
            ),
            (self.duplicate_files, "further name(s) of a file already listed"),
            (self.broken_links, "link(s) to nothing"),
        ]
        return "; ".join(f"{count} {what}" for count, what in parts if count)


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def walk_files(root: str | Path, suffixes: tuple[str, ...], *, what: str = "folder") -> TreeListing:
    """Every regular file under ``root`` whose lower-cased name ends with one of ``suffixes``, once each.

    Hidden files and folders (name starting with ".") are left out. Links are followed; anything
    skipped because it repeats a folder or file, or leads nowhere, is counted in the result and
    warned about once as "``what`` ``root``: ...". Unreadable subfolders are passed over, as
    :func:`os.walk` does. Raises ``OSError`` if ``root`` does not exist.
    """
    root = Path(root)
    listing = TreeListing()
    seen_folders = {_identity(os.stat(root))}
    seen_files: set[tuple[int, int]] = set()
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(subdirectories):
            if name.startswith("."):
                continue
            try:
                identity = _identity(os.stat(os.path.join(directory, name)))
            except OSError:  # gone since os.walk listed it
                continue
            if identity in seen_folders:
                listing.repeated_folders += 1
                continue
            seen_folders.add(identity)
            kept.append(name)
        subdirectories[:] = kept  # os.walk descends only into what is left here, in this order
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            path = os.path.join(directory, name)
            try:
                status = os.stat(path)
            except OSError:  # a dangling link, or a link loop (ELOOP)
                listing.broken_links += 1
                continue
            if not stat.S_ISREG(status.st_mode):  # a FIFO or device with an image's name is not an image
                continue
            if _identity(status) in seen_files:
                listing.duplicate_files += 1
                continue
            seen_files.add(_identity(status))
            listing.files.append(os.path.relpath(path, root))
    listing.files.sort()
    if listing.skipped:
        log.warning("%s %s: listed %d file(s), skipped %s", what, root, len(listing.files), listing.summary())
    return listing
