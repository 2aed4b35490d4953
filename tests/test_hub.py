"""scripts/training/hub.py: TF Hub handles resolved and loaded without the tensorflow_hub package.

The committed demo feature module, packed as TF Hub serves modules (a gzipped tarball at the
handle + ``?tf-hub-format=compressed``), is served from loopback behind a redirect, as
tfhub.dev redirects to Kaggle.
"""
import io
import os
import tarfile

import numpy as np
import pytest
from helpers import ROOT
from webservers import Recorder, body, redirect

from scripts.training import RetrainError, hub, load_module

MODULE = os.path.join(ROOT, "tf_files", "modules", "sketch_features")


def tarball(folder: str | None = None, extra: dict | None = None) -> bytes:
    """A .tar.gz of ``folder``'s contents (names relative to it), plus ``extra`` {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if folder:
            for name in sorted(os.listdir(folder)):
                tar.add(os.path.join(folder, name), arcname=name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def hub_server():
    packed = tarball(MODULE)
    server = Recorder("127.0.0.1", {
        "/google/sketch/1": redirect("/models/google/sketch/TensorFlow2/1?tf-hub-format=compressed",
                                     301),
        "/models/google/sketch/TensorFlow2/1": body(packed, "application/x-gzip"),
        "/truncated/1": body(packed[: len(packed) // 2], "application/x-gzip"),
        "/escape/1": body(tarball(extra={"../outside.txt": b"x"}), "application/x-gzip"),
        "/html/1": body(b"<html>not a module</html>", "text/html"),
    })
    yield server
    server.close()


def test_a_url_handle_is_downloaded_once_and_loads_like_the_folder(hub_server, tmp_path):
    handle = hub_server.base + "/google/sketch/1"
    images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)

    module = hub.load(handle, cache=str(tmp_path), progress=False)

    assert hub_server.hits[0] == "/google/sketch/1?tf-hub-format=compressed"
    expected = load_module(MODULE, progress=False)(images).numpy()
    np.testing.assert_allclose(module(images).numpy(), expected, rtol=1e-6)
    # tensorflow_hub's cache layout: <sha1 of the handle>/ and its descriptor, nothing else.
    folder = hub.resolve(handle, cache=str(tmp_path), progress=False)
    assert os.path.dirname(folder) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(folder),
                                                  os.path.basename(folder) + ".descriptor.txt"])
    assert len(hub_server.hits) == 2  # the redirect and the tarball; the second resolve is cached


@pytest.mark.parametrize("path, message", [
    ("/truncated/1", "not a module tarball"),
    ("/escape/1", "leaves the module folder"),
    ("/html/1", "not a module tarball"),
    ("/missing/1", "404"),
])
def test_a_failed_download_leaves_nothing_in_the_cache(hub_server, tmp_path, path, message):
    with pytest.raises(RetrainError, match=message):
        hub.resolve(hub_server.base + path, cache=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_a_local_folder_is_used_as_it_is_and_other_handles_are_refused(tmp_path):
    assert hub.resolve(MODULE, cache=str(tmp_path)) == MODULE
    with pytest.raises(RetrainError, match="neither a folder nor"):
        hub.resolve("gs://bucket/module.tar.gz", cache=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_the_cache_is_tensorflow_hubs(tmp_path):
    assert hub.cache_dir({"TFHUB_CACHE_DIR": str(tmp_path)}) == str(tmp_path)
    assert hub.cache_dir({}).endswith("tfhub_modules")
    assert (hub.compressed_url("https://tfhub.dev/google/x/1?a=b")
            == "https://tfhub.dev/google/x/1?a=b&tf-hub-format=compressed")
