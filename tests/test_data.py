"""Tests for cnnderive/train/data.py. None of them reaches the internet: downloads go to a local server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from cnnderive.train import data
from cnnderive.train.data import DataError, load_dataset, read_idx

SHIPPED = Path(data.__file__).resolve().parent / "_data" / "mnist-5k"
IMAGES, LABELS = data.TRAIN_FILES
TEST_IMAGES, TEST_LABELS = data.TEST_FILES
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8, 1 or 3 dimensions) as an IDX file, gzip if the name says so."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped() -> tuple[np.ndarray, np.ndarray]:
    return read_idx(SHIPPED / IMAGES), read_idx(SHIPPED / LABELS)


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on, so connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path, closed_port):
    """Every test: an empty cache, no system folders, and mirrors that refuse connections."""
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    dead = (f"http://127.0.0.1:{closed_port}/",)
    monkeypatch.setattr(data, "MIRRORS", {"mnist": dead, "fashion-mnist": dead})
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 5.0)


def make_dataset(directory: Path, shipped, *, per_class: int = 10, test: bool = False) -> Path:
    """A small valid dataset cut from the shipped subset: ``per_class`` images of each digit."""
    images, labels = shipped
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / IMAGES, images[keep])
    write_idx(directory / LABELS, labels[keep])
    if test:
        rest = np.concatenate([np.flatnonzero(labels == c)[-3:] for c in range(10)])
        write_idx(directory / TEST_IMAGES, images[rest])
        write_idx(directory / TEST_LABELS, labels[rest])
    return directory


# ---------------------------------------------------------------------------- read_idx


def test_shipped_files_match_published_md5():
    assert md5_of(SHIPPED / IMAGES) == "7a6d0e64b1649cd7f1e8bf4f4e3bb7b4"
    assert md5_of(SHIPPED / LABELS) == "73b6a6a8f98c69f0fa8cdcf5eeb35408"
    assert (SHIPPED / "ATTRIBUTION.md").is_file()


def test_read_idx_shipped_subset(shipped):
    images, labels = shipped
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.all(np.diff(labels.astype(int)) >= 0)  # sorted by class
    assert images.max() == 255 and images.min() == 0


def test_read_idx_uncompressed(tmp_path, shipped):
    images, _ = shipped
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images[:7])
    np.testing.assert_array_equal(read_idx(path), images[:7])


def test_read_idx_truncated_payload(tmp_path, shipped):
    images = shipped[0][:50]
    good = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    good += images.tobytes()
    path = tmp_path / "short-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(good[:-100], compresslevel=1))
    with pytest.raises(DataError, match="short-images-idx3-ubyte.gz") as info:
        read_idx(path)
    message = str(info.value)
    assert "truncated" in message
    assert str(images.size) in message and str(images.size - 100) in message


def test_read_idx_truncated_gzip_stream(tmp_path):
    raw = (SHIPPED / LABELS).read_bytes()
    path = tmp_path / "cut-labels-idx1-ubyte.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut-labels-idx1-ubyte.gz"):
        read_idx(path)


def test_read_idx_wrong_magic(tmp_path):
    payload = bytearray(gzip.decompress((SHIPPED / LABELS).read_bytes()))
    payload[2] = 0x0D  # float32 element type instead of uint8
    path = tmp_path / "odd-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(payload)))
    with pytest.raises(DataError, match="odd-labels-idx1-ubyte.gz") as info:
        read_idx(path)
    assert "magic number" in str(info.value)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "noise-images-idx3-ubyte.gz"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="noise-images-idx3-ubyte.gz") as info:
        read_idx(path)
    assert "gzip" in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing-here.gz"):
        read_idx(tmp_path / "nothing-here.gz")


def test_count_mismatch_names_both_files(tmp_path, shipped):
    images, labels = shipped
    write_idx(tmp_path / IMAGES, images[:100])
    write_idx(tmp_path / LABELS, labels[:90])
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert IMAGES in message and LABELS in message
    assert "100" in message and "90" in message


def test_images_and_labels_swapped(tmp_path, shipped):
    images, labels = shipped
    write_idx(tmp_path / IMAGES, labels[:100])
    write_idx(tmp_path / LABELS, images[:100])
    with pytest.raises(DataError, match=IMAGES):
        load_dataset("mnist", tmp_path)


def test_label_out_of_range(tmp_path, shipped):
    images, labels = shipped
    bad = labels[:100].copy()
    bad[5] = 11
    write_idx(tmp_path / IMAGES, images[:100])
    write_idx(tmp_path / LABELS, bad)
    with pytest.raises(DataError, match=LABELS):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------- splits


def test_shipped_subset_split(shipped):
    logs: list[str] = []
    bundle = load_dataset("mnist", allow_download=False, log=logs.append)
    assert bundle.name == "mnist-5k"
    assert bundle.test is None
    train, validation = bundle.train, bundle.validation
    assert train.images.shape == (4500, 28, 28, 1) and train.images.dtype == np.float32
    assert validation.images.shape == (500, 28, 28, 1)
    assert train.labels.dtype == np.int64 and validation.labels.dtype == np.int64
    assert np.bincount(validation.labels).tolist() == [50] * 10
    assert np.bincount(train.labels).tolist() == [450] * 10
    assert 0.0 <= train.images.min() and train.images.max() == 1.0

    # Disjoint, and together they are the whole file: match images back to file rows.
    images, labels = shipped
    rows = {img.tobytes(): i for i, img in enumerate(images)}
    assert len(rows) == 5000  # the subset has no duplicate images

    def to_rows(split):
        pixels = np.rint(split.images[..., 0] * 255).astype(np.uint8)
        return np.array([rows[p.tobytes()] for p in pixels])

    train_rows, val_rows = to_rows(train), to_rows(validation)
    assert not set(train_rows) & set(val_rows)
    assert len(set(train_rows) | set(val_rows)) == 5000
    assert np.all(np.diff(train_rows) > 0)  # training order is the file order
    np.testing.assert_array_equal(labels[train_rows], train.labels)
    np.testing.assert_array_equal(labels[val_rows], validation.labels)

    again = load_dataset("mnist", allow_download=False, log=logs.append)
    np.testing.assert_array_equal(again.validation.images, validation.images)
    np.testing.assert_array_equal(again.train.labels, train.labels)


def test_split_is_independent_of_global_seed():
    np.random.seed(123)
    first = load_dataset("mnist", allow_download=False, log=lambda _: None)
    np.random.seed(456)
    np.random.default_rng(99).random(10)
    second = load_dataset("mnist", allow_download=False, log=lambda _: None)
    np.testing.assert_array_equal(first.validation.images, second.validation.images)


def test_uneven_classes_hold_out_one_tenth(tmp_path, shipped):
    images, labels = shipped
    counts = [37, 12, 55, 9, 40, 23, 31, 18, 44, 26]
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)])
    write_idx(tmp_path / IMAGES, images[keep])
    write_idx(tmp_path / LABELS, labels[keep])
    bundle = load_dataset("mnist", tmp_path)
    n = sum(counts)
    assert len(bundle.validation.labels) == (n + 5) // 10
    assert len(bundle.train.labels) + len(bundle.validation.labels) == n
    per_class = np.bincount(bundle.validation.labels, minlength=10)
    assert np.all(np.abs(per_class - np.array(counts) / 10) < 1)


def test_too_few_images(tmp_path, shipped):
    images, labels = shipped
    write_idx(tmp_path / IMAGES, images[:5])
    write_idx(tmp_path / LABELS, labels[:5])
    with pytest.raises(DataError, match=IMAGES):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------- finding files


def test_unknown_dataset():
    with pytest.raises(DataError, match="fashion-mnist") as info:
        load_dataset("cifar10")
    assert "mnist" in str(info.value)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("mnist", tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_data_dir_with_files_directly_and_test_split(tmp_path, shipped):
    make_dataset(tmp_path / "flat", shipped, test=True)
    logs: list[str] = []
    bundle = load_dataset("mnist", tmp_path / "flat", log=logs.append)
    assert bundle.name == "mnist"
    assert str(tmp_path / "flat") in bundle.source
    assert len(bundle.train.labels) == 90 and len(bundle.validation.labels) == 10
    assert bundle.test is not None
    assert bundle.test.images.shape == (30, 28, 28, 1)
    assert bundle.test.labels.dtype == np.int64
    assert logs == []


def test_data_dir_with_named_subfolder(tmp_path, shipped):
    make_dataset(tmp_path / "fashion-mnist", shipped)
    bundle = load_dataset("fashion-mnist", tmp_path)
    assert bundle.name == "fashion-mnist" and bundle.test is None
    assert str(tmp_path / "fashion-mnist") in bundle.source


def test_uncompressed_files_accepted(tmp_path, shipped):
    directory = make_dataset(tmp_path / "plain", shipped)
    for name in (IMAGES, LABELS):
        gz = directory / name
        (directory / name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    bundle = load_dataset("mnist", directory)
    assert len(bundle.train.labels) == 90


def test_half_a_pair_is_an_error(tmp_path, shipped):
    directory = make_dataset(tmp_path / "half", shipped, test=True)
    (directory / TEST_LABELS).unlink()
    with pytest.raises(DataError, match=TEST_LABELS):
        load_dataset("mnist", directory)


def test_env_var_honoured(tmp_path, shipped, monkeypatch):
    make_dataset(tmp_path / "env" / "mnist", shipped, test=True)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    bundle = load_dataset("mnist", allow_download=False)
    assert bundle.name == "mnist" and bundle.test is not None
    assert str(tmp_path / "env" / "mnist") in bundle.source


def test_env_var_folder_holding_files_directly(tmp_path, shipped, monkeypatch):
    make_dataset(tmp_path / "env", shipped)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert load_dataset("mnist", allow_download=False).name == "mnist"


def test_default_cache_is_home(tmp_path, shipped, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path))
    make_dataset(tmp_path / ".cache" / "cnnderive" / "mnist", shipped)
    assert load_dataset("mnist", allow_download=False).name == "mnist"


def test_system_dir_for_fashion(tmp_path, shipped, monkeypatch):
    make_dataset(tmp_path / "system", shipped, test=True)
    monkeypatch.setattr(
        data, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (str(tmp_path / "system"),)}
    )
    bundle = load_dataset("fashion-mnist", allow_download=False)
    assert bundle.name == "fashion-mnist" and bundle.test is not None


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (str(FASHION_DIR),)})
    bundle = load_dataset("fashion-mnist", allow_download=False)
    assert bundle.train.images.shape == (54000, 28, 28, 1)
    assert np.bincount(bundle.validation.labels).tolist() == [600] * 10
    assert bundle.test is not None and bundle.test.images.shape == (10000, 28, 28, 1)


# ---------------------------------------------------------------------------- downloads


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over ``tmp_path / "www"``; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def publish(server, shipped, monkeypatch, name: str) -> dict[str, str]:
    """Serve a bad copy under /bad/ and a good one under /good/; patch the md5 table."""
    root, _ = server
    good = make_dataset(root / "good", shipped, test=True)
    bad = root / "bad"
    shutil.copytree(good, bad)
    for path in bad.iterdir():  # same size, one flipped byte near the end
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0xFF
        path.write_bytes(bytes(raw))
    sums = {p.name: md5_of(p) for p in good.iterdir()}
    monkeypatch.setitem(data.MD5, name, sums)
    return sums


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_download_skips_bad_mirror(tmp_path, server, shipped, monkeypatch, closed_port, name):
    sums = publish(server, shipped, monkeypatch, name)
    base = server[1]
    mirrors = (
        f"http://127.0.0.1:{closed_port}/",
        f"{base}/bad/",
        f"{base}/missing/",
        f"{base}/good/",
    )
    monkeypatch.setitem(data.MIRRORS, name, mirrors)
    logs: list[str] = []
    bundle = load_dataset(name, log=logs.append)

    target = tmp_path / "cache" / name
    assert sorted(p.name for p in target.iterdir()) == sorted(sums)  # no temporary files
    assert {p.name: md5_of(p) for p in target.iterdir()} == sums
    assert bundle.name == name
    assert bundle.test is not None and len(bundle.test.labels) == 30
    assert len(bundle.train.labels) == 90
    assert f"{base}/good/" in bundle.source and str(target) in bundle.source
    assert any("md5" in line for line in logs)

    # The next call finds the files in the cache and downloads nothing.
    logs.clear()
    again = load_dataset(name, log=logs.append)
    assert logs == [] and again.test is not None


def test_download_resumes_and_keeps_existing_files(tmp_path, server, shipped, monkeypatch):
    sums = publish(server, shipped, monkeypatch, "mnist")
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"{server[1]}/good/",))
    target = tmp_path / "cache" / "mnist"
    target.mkdir(parents=True)
    shutil.copy(server[0] / "good" / IMAGES, target / IMAGES)  # as if interrupted
    logs: list[str] = []
    bundle = load_dataset("mnist", log=logs.append)
    assert bundle.name == "mnist" and bundle.test is not None
    assert not any(IMAGES in line for line in logs)
    assert {p.name: md5_of(p) for p in target.iterdir()} == sums


def test_test_files_failing_still_loads_training_files(tmp_path, server, shipped, monkeypatch):
    publish(server, shipped, monkeypatch, "mnist")
    (server[0] / "aside").mkdir()
    for name in data.TEST_FILES:
        (server[0] / "good" / name).rename(server[0] / "aside" / name)
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"{server[1]}/good/",))
    logs: list[str] = []
    bundle = load_dataset("mnist", log=logs.append)
    assert bundle.name == "mnist" and bundle.test is None
    assert any("test" in line for line in logs)
    # The mirror has them again: the next load fetches them (the cache's training files
    # alone do not settle it).
    for name in data.TEST_FILES:
        (server[0] / "aside" / name).rename(server[0] / "good" / name)
    logs.clear()
    assert load_dataset("mnist", log=logs.append).test is None  # tried again only in a day
    assert logs == []
    tried = tmp_path / "cache" / "mnist" / ".test-files-tried"
    day_ago = tried.stat().st_mtime - 24 * 3600
    os.utime(tried, (day_ago, day_ago))
    again = load_dataset("mnist", log=logs.append)
    assert again.test is not None and len(again.test.labels) == 30
    assert all("train-" not in line for line in logs)


def test_download_md5_mismatch_everywhere_falls_back(tmp_path, server, shipped, monkeypatch):
    publish(server, shipped, monkeypatch, "mnist")
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"{server[1]}/bad/",))
    logs: list[str] = []
    bundle = load_dataset("mnist", log=logs.append)
    assert bundle.name == "mnist-5k"
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []  # temp file removed


def test_offline_mnist_falls_back_with_log(tmp_path):
    logs: list[str] = []
    bundle = load_dataset("mnist", log=logs.append)
    assert bundle.name == "mnist-5k"
    assert "shipped with cnnderive" in bundle.source
    fallback = logs[-1]
    assert "could not be downloaded" in fallback
    assert "5,000-image MNIST subset" in fallback
    assert str(tmp_path / "cache" / "mnist") in fallback
    assert "\n" not in fallback  # one line (issue 14)


def test_unreachable_mirrors_are_not_asked_again_for_an_hour(
    tmp_path, server, shipped, monkeypatch
):
    """Reference: the second offline run within the hour logs one line and asks no mirror;
    a run after the hour (the marker's time moved back) asks again, and succeeds."""
    first: list[str] = []
    assert load_dataset("mnist", log=first.append).name == "mnist-5k"
    assert any(line.startswith("Downloading") for line in first)
    second: list[str] = []
    assert load_dataset("mnist", log=second.append).name == "mnist-5k"
    assert len(second) == 1 and "could be reached 0 min ago" in second[0]
    marker = tmp_path / "cache" / "mnist" / ".mirrors-unreachable"
    assert str(marker) in second[0]  # how to try again at once
    hour_ago = time.time() - 3601
    os.utime(marker, (hour_ago, hour_ago))
    publish(server, shipped, monkeypatch, "mnist")
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"{server[1]}/good/",))
    third: list[str] = []
    assert load_dataset("mnist", log=third.append).name == "mnist"
    assert not marker.exists()


def test_a_download_that_breaks_off_is_tried_again_next_run(tmp_path, server, shipped, monkeypatch):
    """A mirror that served a file and then dropped the connection is no offline machine:
    no marker, so the next run asks again (and here succeeds)."""
    publish(server, shipped, monkeypatch, "mnist")
    monkeypatch.setitem(data.MIRRORS, "mnist", (f"{server[1]}/good/",))
    real_fetch, fetched = data._fetch, []

    def breaks_off(url, target, md5, timeout):
        if fetched:
            raise urllib.error.URLError("connection reset")
        fetched.append(url)
        real_fetch(url, target, md5, timeout)

    monkeypatch.setattr(data, "_fetch", breaks_off)
    assert load_dataset("mnist", log=lambda _: None).name == "mnist-5k"
    assert not (tmp_path / "cache" / "mnist" / ".mirrors-unreachable").exists()
    monkeypatch.setattr(data, "_fetch", real_fetch)
    assert load_dataset("mnist", log=lambda _: None).name == "mnist"


def test_download_disabled_mnist_falls_back(tmp_path):
    logs: list[str] = []
    bundle = load_dataset("mnist", allow_download=False, log=logs.append)
    assert bundle.name == "mnist-5k"
    assert len(logs) == 1 and "turned off" in logs[0] and str(tmp_path / "cache") in logs[0]
    assert not (tmp_path / "cache" / "mnist").exists()


@pytest.mark.parametrize("allow_download", [False, True])
def test_a_data_dir_without_the_data_is_an_error_not_a_fallback(tmp_path, allow_download):
    """The user asked for a folder: the shipped subset (or a download) is not what they meant."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path / "empty", allow_download=allow_download)
    message = str(info.value)
    assert str(tmp_path / "empty") in message and "holds no MNIST training files" in message
    assert IMAGES in message and "leave the data directory out" in message


def test_a_data_cache_variable_naming_a_file_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "afile"))
    with pytest.raises(DataError, match=f"{data.ENV_VAR}=.*afile is a file, not a folder"):
        load_dataset("mnist", allow_download=False)


def test_offline_fashion_is_an_error(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", log=lambda _: None)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert str(tmp_path / "cache" / "fashion-mnist") in message
    assert "could not be downloaded" in message


def test_unwritable_cache_falls_back(tmp_path, monkeypatch):
    # (A $CNNDERIVE_DATA that is itself a file is refused: see the test above.)
    blocker = tmp_path / "cache" / "mnist"
    blocker.parent.mkdir()
    blocker.write_text("a file where the cache folder should be")
    logs: list[str] = []
    assert load_dataset("mnist", log=logs.append).name == "mnist-5k"
    assert str(blocker) in logs[-1]


def test_download_disabled_creates_nothing(tmp_path):
    load_dataset("mnist", allow_download=False, log=lambda _: None)
    assert not (tmp_path / "cache").exists()


def test_first_of_each_class_takes_the_classes_in_turn_in_file_order():
    """Reference: the selection written out by hand for labels 0 0 0 1 1 2 (sorted by class,
    as the shipped subset is): 4 images are the first 0, 1 and 2, then the second 0."""
    labels = np.array([0, 0, 0, 1, 1, 2])
    split = data.Split(images=np.arange(6.0).reshape(6, 1, 1, 1), labels=labels)
    picked = data.first_of_each_class(split, 4)
    assert picked.labels.tolist() == [0, 0, 1, 2]
    assert picked.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 3.0, 5.0]  # file order kept
    assert data.first_of_each_class(split, 100).labels.tolist() == labels.tolist()


def test_limit_on_the_shipped_subset_holds_every_digit():
    """The shipped subset is sorted by digit: its first 400 training images are all zeros.
    --limit 400 must still give 40 images of each digit."""
    bundle = data._load_subset()  # not load_dataset: full MNIST in the cache would win
    assert set(bundle.train.labels[:400].tolist()) == {0}
    picked = data.first_of_each_class(bundle.train, 400)
    assert np.bincount(picked.labels, minlength=10).tolist() == [40] * 10


def test_missing_test_files_are_tried_again_once_a_day(tmp_path):
    """The marker's age decides: none or a day old -> try (and mark), fresh -> not, dated in
    the future (a clock set back) -> try."""
    cache = tmp_path / "mnist"
    cache.mkdir()
    marker = cache / ".test-files-tried"
    assert data._test_files_due(cache) and marker.exists()
    assert not data._test_files_due(cache)
    day = 24 * 3600
    for age, due in ((day + 60, True), (-30 * day, True), (60, False)):
        when = time.time() - age
        os.utime(marker, (when, when))
        assert data._test_files_due(cache) is due, age


def test_the_shipped_subset_is_checked_against_its_md5(tmp_path, monkeypatch):
    """A damaged copy of the shipped subset is refused with the file and the way out."""
    copy = tmp_path / "mnist-5k"
    copy.mkdir()
    for name in data.TRAIN_FILES:
        (copy / name).write_bytes((data.SUBSET_DIR / name).read_bytes())
    monkeypatch.setattr(data, "SUBSET_DIR", copy)
    assert len(data._load_subset().train.labels) == 4500
    damaged = bytearray((copy / data.TRAIN_FILES[1]).read_bytes())
    damaged[-1] ^= 1
    (copy / data.TRAIN_FILES[1]).write_bytes(bytes(damaged))
    with pytest.raises(data.DataError, match="damaged.*reinstall cnnderive"):
        data._load_subset()
