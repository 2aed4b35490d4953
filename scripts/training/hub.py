"""TF Hub handles without the tensorflow_hub package: resolve a handle to a local folder, load it.

Why not ``tensorflow_hub``: it requires ``tf-keras``, which requires the full ``tensorflow``
distribution, so installing it beside ``tensorflow-cpu`` puts two TensorFlows into one
``tensorflow/`` folder. ``hub.load(handle)`` is ``tf.saved_model.load(resolve(handle))``, and the
resolving is a small, documented protocol, done here the same way:

* a local folder is used as it is;
* an ``http(s)://`` handle (``https://tfhub.dev/...``, which redirects to Kaggle Models, or
  ``https://www.kaggle.com/models/...``) is downloaded once as a compressed tarball (the handle
  with ``?tf-hub-format=compressed``), unpacked into the cache and reused from then on. The cache
  is tensorflow_hub's: ``$TFHUB_CACHE_DIR`` or ``<tmp>/tfhub_modules``, one folder per handle
  named by the SHA-1 of the handle, so a cache filled by tensorflow_hub is reused and vice versa.

A download is unpacked into a temporary folder beside its final place and renamed into place in
one step, so an interrupted or failed download never leaves a half module in the cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import uuid

from .data import RetrainError

CACHE_ENV = "TFHUB_CACHE_DIR"  # tensorflow_hub's variable, same meaning
COMPRESSED_QUERY = ("tf-hub-format", "compressed")
CONNECT_TIMEOUT = 30  # seconds to connect; a module of hundreds of MB takes what it takes


def cache_dir(environ=os.environ) -> str:
    """Where downloaded modules live (tensorflow_hub's default and variable)."""
    return environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "tfhub_modules")


def is_url(handle: str) -> bool:
    return urllib.parse.urlsplit(handle).scheme in ("http", "https")


def compressed_url(handle: str) -> str:
    """The handle with ``tf-hub-format=compressed`` added to its query, as tensorflow_hub asks."""
    parts = urllib.parse.urlsplit(handle)
    query = urllib.parse.parse_qsl(parts.query) + [COMPRESSED_QUERY]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def resolve(handle: str, cache: str | None = None, progress: bool = True) -> str:
    """The local folder of ``handle``: the folder itself, or the cached download of a URL."""
    if os.path.isdir(handle):
        return handle
    if not is_url(handle):
        raise RetrainError(f"{handle} is neither a folder nor an http(s) TF Hub handle "
                           "(download and unpack other handles, then pass the folder)")
    cache = cache or cache_dir()
    name = hashlib.sha1(handle.encode("utf8")).hexdigest()
    folder = os.path.join(cache, name)
    if os.path.isdir(folder):
        return folder
    os.makedirs(cache, exist_ok=True)
    staging = os.path.join(cache, f"{name}.{uuid.uuid4().hex}.tmp")
    try:
        _download_and_unpack(compressed_url(handle), staging, progress)
        with open(os.path.join(cache, f"{name}.descriptor.txt"), "w") as fh:
            fh.write(f"Module: {handle}\nDownloaded by: scripts/training/hub.py\n")
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same download first: use theirs
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load(handle: str, cache: str | None = None, progress: bool = True):
    """``hub.load(handle)``: the SavedModel of a TF Hub handle, URL or local folder."""
    import tensorflow as tf

    folder = resolve(handle, cache, progress)
    if os.path.exists(os.path.join(folder, "tfhub_module.pb")):
        raise RetrainError(f"{handle} is in the TF1 Hub format; use its TF2 SavedModel version")
    try:
        return tf.saved_model.load(folder)
    except (OSError, ValueError) as exc:  # not a SavedModel, or a damaged one
        raise RetrainError(f"cannot load module {handle}: {exc}") from None


def _download_and_unpack(url: str, staging: str, progress: bool) -> None:
    """Stream the tarball at ``url`` (redirects followed) and unpack it into ``staging``."""
    import requests
    from tqdm import tqdm

    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, 300)) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading module",
                      disable=not progress) as bar:
                response.raw.decode_content = True
                reader = _Counting(response.raw, bar.update)
                with tarfile.open(fileobj=reader, mode="r|*") as archive:
                    _extract(archive, staging)
    except requests.RequestException as exc:
        raise RetrainError(f"cannot download {url}: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise RetrainError(f"{url} is not a module tarball: {exc}") from None


def _extract(archive: tarfile.TarFile, dest: str) -> None:
    """Unpack a streamed archive, refusing links and paths that leave ``dest``."""
    os.makedirs(dest)
    root = os.path.realpath(dest)
    for member in archive:
        target = os.path.realpath(os.path.join(dest, member.name))
        if os.path.commonpath([root, target]) != root:
            raise tarfile.TarError(f"member {member.name!r} leaves the module folder")
        if member.isdir():
            os.makedirs(target, exist_ok=True)
        elif member.isfile():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            raise tarfile.TarError(f"member {member.name!r} is not a plain file or folder")
    if not os.listdir(dest):
        raise tarfile.TarError("the archive is empty")


class _Counting:
    """A file wrapper that reports the bytes read (the progress bar)."""

    def __init__(self, raw, report):
        self.raw, self.report = raw, report

    def read(self, size=-1):
        data = self.raw.read(size)
        self.report(len(data))
        return data
