"""common/storage.py: safe names, atomic writes, caps with oldest-first eviction."""
import multiprocessing
import os
import random
import threading
import time

import pytest

from common.errors import PayloadTooLarge, StorageUnavailable
from common.storage import ImageStore


def stored(folder) -> list[str]:
    """The stored images in ``folder`` (its other entries are the ledger and .part files)."""
    return sorted(n for n in os.listdir(folder) if ImageStore.is_name(n))


def test_names_are_content_addressed(tmp_path):
    store = ImageStore(str(tmp_path))
    a = store.save(b"abc", "jpg")
    assert a == ImageStore.name_for(b"abc", "jpg") and len(a) == 20
    assert store.save(b"abc", "jpg") == a
    assert store.save(b"abd", "jpg") != a
    assert stored(tmp_path) == sorted([a, store.name_for(b"abd", "jpg")])
    assert sorted(os.listdir(tmp_path)) == sorted(stored(tmp_path) + [".ledger"])


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
    assert stored(tmp_path) == sorted(names[-3:])


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


def test_saves_scan_only_when_the_ledger_says_full(tmp_path, monkeypatch):
    """A save does not list the folder each time: the ledger counts what is stored, a scan
    comes only when the next file would not fit, and near full the folder is trimmed to 90%
    (359, then the new file), so the next scan is 41 saves away; the caps hold throughout."""
    store = ImageStore(str(tmp_path), max_files=400)
    scans = []
    files = store.files
    monkeypatch.setattr(store, "files", lambda: scans.append(1) or files())
    for i in range(1000):
        store.save(i.to_bytes(4, "big"), "png")
        assert len(stored(tmp_path)) <= 400
    rescans = range(400, 1000, 41)  # the saves that found 400 files: 360 after each
    assert len(scans) == 1 + len(rescans)  # and the first save: no ledger yet
    left = 360 + (999 - rescans[-1])
    assert store.usage() == (left, 4 * left)


def _hammer_store(root: str, max_files: int, max_bytes: int, seed: int, count: int,
                  threads: int) -> None:
    """Save ``count`` distinct blobs of 5-60 KB from ``threads`` threads."""
    store = ImageStore(root, max_files=max_files, max_bytes=max_bytes)
    rnd = random.Random(seed)
    blobs = iter([rnd.randbytes(rnd.randint(5_000, 60_000)) for _ in range(count)])
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                data = next(blobs, None)
            if data is None:
                return
            store.save(data, "jpg")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _watch(folder, max_files: int, max_bytes: int, done: threading.Event) -> list[tuple]:
    """Sample the folder until ``done``; returns the samples over a cap. A listing's files all
    existed at once, and a file that is gone by its stat only lowers the sum."""
    over = []
    while not done.is_set():
        names = stored(folder)
        total = 0
        for name in names:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:
                continue
        if len(names) > max_files or total > max_bytes:
            over.append((len(names), total))
    return over


@pytest.mark.parametrize("processes", [1, 3])
def test_caps_hold_at_every_instant_under_concurrent_writers(tmp_path, processes):
    """Threads in one process, and several processes (gunicorn's workers) sharing the folder,
    never take it past a cap, not even for a moment: each rename waits for the ledger's lock
    and makes room first. (Before the ledger, a thread wrote before it counted its file, and
    each process kept its own count of the room: the soak test once found temp/ 62 KB over.)"""
    max_files, max_bytes = 60, 1_000_000
    done = threading.Event()
    over = []
    watcher = threading.Thread(target=lambda: over.extend(
        _watch(tmp_path, max_files, max_bytes, done)))
    watcher.start()
    try:
        if processes == 1:
            _hammer_store(str(tmp_path), max_files, max_bytes, 0, 600, 8)
        else:
            context = multiprocessing.get_context("fork")
            children = [context.Process(target=_hammer_store,
                                        args=(str(tmp_path), max_files, max_bytes, seed, 300, 4))
                        for seed in range(processes)]
            for child in children:
                child.start()
            for child in children:
                child.join(120)
            assert [child.exitcode for child in children] == [0] * processes
    finally:
        done.set()
        watcher.join()
    assert over == []
    count, total = ImageStore(str(tmp_path)).usage()
    assert 0 < count <= max_files and total <= max_bytes
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == [".ledger"]


def test_the_ledger_follows_files_removed_or_added_by_hand(tmp_path):
    """A scan corrects the ledger: after the folder is emptied by hand the store fills it to
    the cap again, and files dropped in by hand under stored names are counted."""
    store = ImageStore(str(tmp_path), max_files=20)
    for i in range(30):
        store.save(i.to_bytes(4, "big"), "png")
    for name in stored(tmp_path):
        os.unlink(tmp_path / name)
    for i in range(30, 50):
        store.save(i.to_bytes(4, "big"), "png")
    assert len(stored(tmp_path)) == 20  # filled again, not held back by the old count
    for i in range(100, 130):  # 30 more, by hand
        (tmp_path / ImageStore.name_for(i.to_bytes(4, "big"), "png")).write_bytes(b"x")
    store.save(b"one more", "png")  # the ledger says full: a scan counts the hand-made ones
    assert len(stored(tmp_path)) <= 20


def test_an_image_larger_than_the_byte_cap_is_413_and_evicts_nothing(tmp_path):
    store = ImageStore(str(tmp_path), max_bytes=1000)
    kept = store.save(b"small", "png")
    with pytest.raises(PayloadTooLarge) as info:
        store.save(b"x" * 1001, "png")
    assert info.value.status == 413 and "TEMP_MAX_MB" in info.value.message
    assert stored(tmp_path) == [kept]


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
