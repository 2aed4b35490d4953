"""The image folder: one sub-folder of images per category, listed and split by file-name hash.

No TensorFlow here. Splits are decided per file name (not at random), so adding images to a
category never moves the images already there from one split to another.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass

from common.images import FILE_EXTENSIONS

log = logging.getLogger(__name__)

SPLITS = ("training", "validation", "testing")
MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1  # as in the original retrain.py: keeps splits stable
MIN_IMAGES_PER_CLASS = 3
ADVISED_IMAGES_PER_CLASS = 20


class RetrainError(RuntimeError):
    """The data or options cannot produce a model; the message says what to fix."""


@dataclass
class ImageLists:
    """Image paths by label and split: ``lists[label]["training"|"validation"|"testing"]``.

    Paths are relative to ``image_dir`` (``"<label>/<file>"``); ``labels`` is sorted and gives
    the class index of each label (the model's output order).
    """

    image_dir: str
    labels: list[str]
    lists: dict[str, dict[str, list[str]]]

    def paths(self, split: str) -> list[tuple[str, int]]:
        """``[(relative path, class index)]`` of one split, label by label."""
        return [(p, i) for i, label in enumerate(self.labels) for p in self.lists[label][split]]

    def all_paths(self) -> list[str]:
        """Every listed relative path, split by split."""
        return [p for split in SPLITS for p, _ in self.paths(split)]


def which_set(file_name: str, validation_percentage: int, testing_percentage: int) -> str:
    """Split by a hash of the file name, so adding images never moves the others.

    ``_nohash_`` and anything after it are ignored, as in the original script, so variants of one
    picture land in the same split.
    """
    base = re.sub(r"_nohash_.*$", "", os.path.basename(file_name))
    digest = int(hashlib.sha1(base.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def create_image_lists(image_dir: str, validation_percentage: int = 10,
                       testing_percentage: int = 10) -> ImageLists:
    """List images per category folder (sorted names = labels, in output order) and split them.

    Raises RetrainError for a missing folder, fewer than 2 categories with images, a category
    with fewer than MIN_IMAGES_PER_CLASS images or none in training.
    """
    if not os.path.isdir(image_dir):
        raise RetrainError(f"image folder not found: {image_dir}")
    if validation_percentage + testing_percentage >= 100:
        raise RetrainError("validation and testing percentages must leave images for training")
    lists = {}
    for label in _category_folders(image_dir):
        files = _image_files(os.path.join(image_dir, label))
        if not files:
            log.warning("skipping folder %s: no images in it", label)
            continue
        lists[label] = _split_category(label, files, validation_percentage, testing_percentage)
    if len(lists) < 2:
        raise RetrainError(f"{image_dir} needs at least 2 category folders with images, "
                           f"found {len(lists)}")
    return ImageLists(image_dir, sorted(lists), lists)


def _category_folders(image_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(image_dir)
                  if os.path.isdir(os.path.join(image_dir, d)) and not d.startswith("."))


def _image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(FILE_EXTENSIONS) and not f.startswith("."))


def _split_category(label: str, files: list[str], validation_percentage: int,
                    testing_percentage: int) -> dict[str, list[str]]:
    """One category's files -> ``{split: ["<label>/<file>", ...]}``; checks the counts."""
    if len(files) < MIN_IMAGES_PER_CLASS:
        raise RetrainError(f"category {label!r} has {len(files)} images; "
                           f"at least {MIN_IMAGES_PER_CLASS} are needed "
                           f"({ADVISED_IMAGES_PER_CLASS}+ advised)")
    if len(files) < ADVISED_IMAGES_PER_CLASS:
        log.warning("category %r has only %d images; results may be poor", label, len(files))
    split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in files:
        split[which_set(name, validation_percentage, testing_percentage)].append(
            os.path.join(label, name))
    if not split["training"]:
        raise RetrainError(f"category {label!r} got no training images; add more images")
    return split
