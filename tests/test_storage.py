"""common/storage.py: safe names, atomic writes, caps with oldest-first eviction."""
import os
import time

import pytest

from common.errors import StorageUnavailable
from common.storage import ImageStore


def test_names_are_content_addressed(tmp_path):
    store = ImageStore(str(tmp_path))
    a = store.save(b"abc", "jpg")
    assert a == ImageStore.name_for(b"abc", "jpg") and len(a) == 20
    assert store.save(b"abc", "jpg") == a
    assert store.save(b"abd", "jpg") != a
    assert sorted(os.listdir(tmp_path)) == sorted([a, store.name_for(b"abd", "jpg")])


def test_bad_extension_is_refused(tmp_path):
    with pytest.raises(ValueError):
        ImageStore(str(tmp_path)).save(b"x", "../x")


def test_count_cap_evicts_oldest(tmp_path):
    store = ImageStore(str(tmp_path), max_files=3)
    names = []
    for i in range(5):
        names.append(store.save(bytes([i]) * 10, "png"))
        os.utime(tmp_path / names[-1], ns=(i * 10**9, i * 10**9))
        time.sleep(0.001)
    store.trim()
    assert sorted(os.listdir(tmp_path)) == sorted(names[-3:])


def test_byte_cap_evicts_oldest(tmp_path):
    store = ImageStore(str(tmp_path), max_files=100, max_bytes=250)
    for i in range(4):
        name = store.save(bytes([i]) * 100, "png")
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    store.trim()
    count, total = store.usage()
    assert count == 2 and total == 200


def test_other_files_are_left_alone(tmp_path):
    (tmp_path / ".gitkeep").write_text("")
    store = ImageStore(str(tmp_path), max_files=1)
    store.save(b"1", "png")
    store.save(b"2", "png")
    assert ".gitkeep" in os.listdir(tmp_path)


def test_unwritable_folder_is_503(tmp_path):
    store = ImageStore(str(tmp_path / "missing" / "deeper"))
    with pytest.raises(StorageUnavailable) as info:
        store.save(b"x", "png")
    assert info.value.status == 503


def test_saves_scan_once_per_share_of_the_room(tmp_path, monkeypatch):
    """A save does not list the folder each time: a scan leaves a room and each of the
    ``writers`` processes scans again after writing its share of it; the caps still hold."""
    store = ImageStore(str(tmp_path), max_files=400, writers=2)
    scans = []
    files = store.files
    monkeypatch.setattr(store, "files", lambda: scans.append(1) or files())
    for i in range(1000):
        store.save(i.to_bytes(4, "big"), "png")
        assert len(os.listdir(tmp_path)) <= 400
    # near full, the folder is trimmed to 360: a room of 40, 20 then 10 files per writer
    assert 1000 / 200 <= len(scans) <= 1000 / 10


def test_same_bytes_are_written_once(tmp_path):
    store = ImageStore(str(tmp_path))
    name = store.save(b"abc", "jpg")
    os.utime(tmp_path / name, ns=(0, 0))
    assert store.save(b"abc", "jpg") == name
    assert os.stat(tmp_path / name).st_mtime_ns > 0  # touched: now the newest, not rewritten


def test_a_symlink_in_the_folder_is_not_a_stored_image(tmp_path):
    """A link planted under a name the store could give is never read through (O_NOFOLLOW),
    and saving the bytes of that name replaces the link with the real file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not an upload")
    store = ImageStore(str(tmp_path / "temp"))
    store.ensure()
    data = b"\x89PNG pretend"
    name = store.name_for(data, "png")
    os.symlink(secret, os.path.join(store.root, name))
    with store.open(name) as fh:
        assert fh is None
    assert store.save(data, "png") == name
    assert not os.path.islink(os.path.join(store.root, name))
    with store.open(name) as fh:
        assert fh.read() == data
    assert secret.read_text() == "not an upload"
