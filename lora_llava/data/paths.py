"""Image paths of a dataset: inside its image folder, existing, and found without a stat per file.

A dataset names its images relative to an image folder. A path that leaves
that folder, lexically (`../`, an absolute path) or through a symlink (a linked
file or directory that points elsewhere), is refused unless the recipe sets
`data.allow_absolute_paths`: a dataset from elsewhere must not make training
read arbitrary files.

Checking 665K images one `stat` at a time is slow on network file systems, so
each directory is listed once and its entries (name -> is it a symlink) are
cached; a symlinked entry is resolved to see where it points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..recipe.schema import DatasetSpec
from .formats import MISSING_IMAGE, PATH_ESCAPES, SampleError


def _plain(ref: str) -> bool:
    """A relative path with no `.`/`..` segments and no doubled slash, which normpath would leave as it is."""
    return bool(ref) and ref[0] not in "/." and ".." not in ref and "//" not in ref and "/./" not in ref and not ref.endswith("/")


def image_folder(spec: DatasetSpec) -> Path:
    """The folder a dataset's image paths are relative to: `image_folder`, else the data file's folder."""
    if spec.image_folder:
        return Path(spec.image_folder)
    p = Path(spec.path)
    return p if p.is_dir() else p.parent


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ImageResolver:
    """Turns image references of one dataset into checked paths."""

    def __init__(self, folder: str | Path, allow_outside: bool = False):
        self.folder = os.path.abspath(folder)
        self.root = os.path.realpath(folder)
        self.allow_outside = allow_outside
        self._dirs: dict[str, tuple[str, dict[str, bool]] | str | None] = {}

    def resolve(self, ref: str, sample_id: str, must_exist: bool = True) -> Path:
        """The full path of `ref`; raises `SampleError` (path escapes image folder, missing image)."""
        if must_exist:
            return Path(self.check(ref, sample_id))
        full = self._join(ref, sample_id)
        if not self.allow_outside and not _inside(os.path.realpath(full), self.root):
            raise self._escapes(ref, sample_id, "is a symlink out of")
        return Path(full)

    def check(self, ref: str, sample_id: str) -> str:
        """The full path of an image that must exist inside the folder (symlinks followed), as a string."""
        full = self._join(ref, sample_id)
        self._check_file(full, ref, sample_id)
        return full

    def _join(self, ref: str, sample_id: str) -> str:
        if os.sep == "/" and _plain(ref):  # the common case, without normpath's cost: a/b/c.jpg
            return self.folder + os.sep + ref
        full = os.path.normpath(os.path.join(self.folder, ref))
        if not self.allow_outside and not _inside(full, self.folder):
            raise self._escapes(ref, sample_id, "lies outside")
        return full

    def _escapes(self, ref: str, sample_id: str, how: str) -> SampleError:
        return SampleError(sample_id, PATH_ESCAPES, f"image {ref!r} {how} {self.folder} (data.allow_absolute_paths allows it)")

    def _check_file(self, full: str, ref: str, sample_id: str) -> None:
        directory, name = os.path.split(full)
        listing = self._listing(directory)
        if isinstance(listing, str):
            raise SampleError(sample_id, MISSING_IMAGE, f"image {ref!r}: cannot read folder {directory} ({listing})")
        if listing is None or name not in listing[1]:
            raise SampleError(sample_id, MISSING_IMAGE, f"image {ref!r} not found in {self.folder}")
        real_dir, entries = listing
        if entries[name]:
            try:
                target = os.path.realpath(full, strict=True)
            except OSError as e:  # a loop of links, or a link to nothing
                raise SampleError(sample_id, MISSING_IMAGE, f"image {ref!r}: a broken symlink ({e.strerror})") from None
        else:
            target = os.path.join(real_dir, name)
        if not self.allow_outside and not _inside(target, self.root):
            raise self._escapes(ref, sample_id, "is a symlink out of")

    def _listing(self, directory: str) -> tuple[str, dict[str, bool]] | str | None:
        """(real path, {name: is_symlink}) of a directory, read once; None if it does not exist, else why not readable."""
        if directory not in self._dirs:
            try:
                with os.scandir(directory) as it:
                    entries = {e.name: e.is_symlink() for e in it}
                self._dirs[directory] = (os.path.realpath(directory), entries)
            except (FileNotFoundError, NotADirectoryError):
                self._dirs[directory] = None
            except OSError as e:  # no permission, a symlink loop
                self._dirs[directory] = e.strerror or type(e).__name__
        return self._dirs[directory]


# Kept here for callers that resolve one path at a time; datasets use `paths.ImageResolver`.
def resolve_image(path: Any, spec: DatasetSpec, sample_id: str, allow_absolute: bool) -> Any:
    """An image path inside the dataset's image folder; escaping it (../, symlinks) raises `SampleError`."""
    if not isinstance(path, str):
        return path  # an image stored in the dataset (HF Image feature)
    return ImageResolver(image_folder(spec), allow_absolute).resolve(path, sample_id, must_exist=False)
