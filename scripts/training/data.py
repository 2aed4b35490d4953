"""The image folder: one sub-folder of images per category, listed and split by file-name hash.

No TensorFlow here. Splits are decided per file name (not at random), so adding images to a
category never moves the images already there from one split to another.

Extra folders in the same layout (``retrain.py --extra_image_dir feedback/``, the folder the
service's ``POST /feedback`` fills) add their images to the categories of the same name, or
make new categories (at least ``MIN_IMAGES_PER_CLASS`` images, else they are skipped with a
warning). In an extra folder, sub-folders whose names start with ``_`` or ``.`` are not
categories (the service keeps low-confidence uploads in ``_review/``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

from common.inference.images import FILE_EXTENSIONS

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
    the class index of each label (the model's output order). With extra folders,
    ``image_dir`` is the folder that holds them all and paths start with each one's place
    under it (``"photos/<label>/<file>"``, ``"feedback/<label>/<file>"``); ``folders`` are the
    folders as given (the image folder first) and ``extra`` counts each label's images from the
    extra folders.
    """

    image_dir: str
    labels: list[str]
    lists: dict[str, dict[str, list[str]]]
    folders: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)

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
                       testing_percentage: int = 10,
                       extra_dirs: list[str] | tuple[str, ...] = ()) -> ImageLists:
    """List images per category folder (sorted names = labels, in output order) and split them;
    ``extra_dirs``: more folders of the same layout whose images join the same categories.

    Raises RetrainError for a missing folder, fewer than 2 categories with images, a category
    of the image folder with fewer than MIN_IMAGES_PER_CLASS images or none in training.
    """
    folders = [image_dir, *extra_dirs]
    for folder in folders:
        if not os.path.isdir(folder):
            raise RetrainError(f"image folder not found: {folder}")
    if validation_percentage + testing_percentage >= 100:
        raise RetrainError("validation and testing percentages must leave images for training")
    root = image_dir if not extra_dirs else os.path.commonpath(
        [os.path.abspath(f) for f in folders])
    found: dict[str, list[str]] = {}  # label -> paths relative to root
    extra: dict[str, int] = {}
    for index, folder in enumerate(folders):
        for label in _category_folders(folder, service_folders=index > 0):
            files = _image_files(os.path.join(folder, label))
            if not files:
                log.warning("skipping folder %s: no images in it", os.path.join(folder, label))
                continue
            paths = [os.path.relpath(os.path.join(folder, label, f), root) if extra_dirs
                     else os.path.join(label, f) for f in files]
            found.setdefault(label, []).extend(paths)
            if index > 0:
                extra[label] = extra.get(label, 0) + len(files)
    lists = {}
    for label, paths in found.items():
        if extra.get(label) == len(paths) and len(paths) < MIN_IMAGES_PER_CLASS:
            log.warning("skipping category %r: it is only in the extra folders, with %d "
                        "images; %d make a category", label, len(paths), MIN_IMAGES_PER_CLASS)
            del extra[label]
            continue
        lists[label] = _split_category(label, paths, validation_percentage, testing_percentage)
    if len(lists) < 2:
        raise RetrainError(f"{image_dir} needs at least 2 category folders with images, "
                           f"found {len(lists)}")
    labels = sorted(lists)
    return ImageLists(root, labels, lists, folders,
                      {label: extra.get(label, 0) for label in labels} if extra_dirs else {})


def _category_folders(image_dir: str, service_folders: bool = False) -> list[str]:
    """Sub-folders that are categories (``service_folders``: also not those starting with
    ``_``, the service's own in a feedback folder)."""
    hidden = (".", "_") if service_folders else (".",)
    return sorted(d for d in os.listdir(image_dir)
                  if os.path.isdir(os.path.join(image_dir, d)) and not d.startswith(hidden))


def _image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(FILE_EXTENSIONS) and not f.startswith("."))


def _split_category(label: str, paths: list[str], validation_percentage: int,
                    testing_percentage: int) -> dict[str, list[str]]:
    """One category's image paths -> ``{split: [path, ...]}``; checks the counts."""
    if len(paths) < MIN_IMAGES_PER_CLASS:
        raise RetrainError(f"category {label!r} has {len(paths)} images; "
                           f"at least {MIN_IMAGES_PER_CLASS} are needed "
                           f"({ADVISED_IMAGES_PER_CLASS}+ advised)")
    if len(paths) < ADVISED_IMAGES_PER_CLASS:
        log.warning("category %r has only %d images; results may be poor", label, len(paths))
    split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in paths:
        split[which_set(path, validation_percentage, testing_percentage)].append(path)
    if not split["training"]:
        raise RetrainError(f"category {label!r} got no training images; add more images")
    return split
