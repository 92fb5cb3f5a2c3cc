"""Load MNIST or Fashion-MNIST as NumPy arrays ready for training.

Only NumPy and the standard library are used here, so ``cnnderive train`` starts quickly.

Where the data comes from, in this order:

1. ``data_dir`` if it is given: first ``<data_dir>/<name>/``, then ``data_dir`` itself.
2. The cache directory, ``$CNNDERIVE_DATA`` if that is set, else ``~/.cache/cnnderive``:
   ``<cache>/<name>/`` (and ``$CNNDERIVE_DATA`` itself, since the user chose that folder;
   the default cache root is never read directly, so MNIST files lying there can't be
   mistaken for Fashion-MNIST).
3. For Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian's
   ``dataset-fashion-mnist`` package).
4. A download of the four standard files into ``<cache>/<name>/`` from the public mirrors
   in :data:`MIRRORS`, each file checked against its published md5 (:data:`MD5`).
5. MNIST only: the 5,000-image subset shipped in ``cnnderive/train/_data/mnist-5k`` (a log line says so).

A folder counts as holding the dataset when it has both training files
(``train-images-idx3-ubyte.gz`` and ``train-labels-idx1-ubyte.gz``, or the same names
without ``.gz``); the ``t10k-*`` test files beside them are optional. Files found in a
folder are checked for structure only (IDX header, sizes, matching counts, labels 0-9),
so subsets work too.

The validation split is a stratified hold-out of one tenth of the training files, drawn
with its own ``np.random.default_rng(0)``: it is the same on every call and does not depend
on any training seed. The 5,000-image subset therefore splits 4,500 / 500, 50 images of
each digit in validation. Training images keep their file order; shuffling is the
training loop's job.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnderive_common.files import replace_atomically

__all__ = ["DataBundle", "DataError", "Split", "first_of_each_class", "load_dataset", "read_idx"]


class DataError(ValueError):
    """A data problem. The message names the file or folder and says what to do about it."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28, 1) float32 in [0, 1], NHWC
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class DataBundle:
    name: str  # "mnist", "mnist-5k" or "fashion-mnist"
    source: str  # a plain sentence saying where the data came from
    train: Split
    validation: Split
    test: Split | None  # None when there were no t10k files

    @property
    def fingerprint(self) -> str:
        """A short digest of the training and validation files' content (all labels and
        the first images), recorded by a run so that ``evaluate`` can tell whether the
        data it finds is the data the run trained on: MNIST and Fashion-MNIST files are
        alike in every other respect."""
        digest = hashlib.sha256()
        for split in (self.train, self.validation):
            digest.update(np.ascontiguousarray(split.labels).tobytes())
            digest.update(np.ascontiguousarray(split.images[:64]).tobytes())
        return digest.hexdigest()[:16]


DATASETS = ("mnist", "fashion-mnist")
TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Base URLs tried in order; a file's URL is the base followed by its name.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Published md5 sums of the .gz files as the mirrors serve them. Only downloads are checked
# against them. Debian's dataset-fashion-mnist files do not match: the package strips the
# file name and time stamp from each gzip header (its md5s are cf8536b0..., 10bea18f...,
# f78720b4..., 0d30e22e...), but the compressed data is byte for byte the published files'.
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# Folders that system packages install datasets into.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": (),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}

SUBSET_DIR = Path(__file__).resolve().parent / "_data" / "mnist-5k"
SUBSET_MD5 = {
    "train-images-idx3-ubyte.gz": "7a6d0e64b1649cd7f1e8bf4f4e3bb7b4",
    "train-labels-idx1-ubyte.gz": "73b6a6a8f98c69f0fa8cdcf5eeb35408",
}

ENV_VAR = "CNNDERIVE_DATA"
DOWNLOAD_TIMEOUT = 30.0  # seconds, for connecting and for each read
VALIDATION_FRACTION = 10  # one image in this many is held out
NUM_CLASSES = 10
IMAGE_SIZE = 28

_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
_UINT8_CODE = 0x08
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) as a uint8 array.

    Only the two MNIST layouts are accepted: magic 2051 (images, 3 dimensions) and
    magic 2049 (labels, 1 dimension), both with element type 0x08 (unsigned byte).
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except gzip.BadGzipFile as error:
        raise DataError(
            f"{path} is not a gzip file ({error}); download it again, or drop the .gz "
            "from its name if it is an uncompressed IDX file"
        ) from None
    except (EOFError, zlib.error) as error:
        raise DataError(
            f"{path} is a damaged or truncated gzip file ({error}); download it again"
        ) from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None

    if len(raw) < 4:
        raise DataError(
            f"{path} is too short ({len(raw)} bytes) to be an IDX file; download it again"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IMAGES_MAGIC, _LABELS_MAGIC):
        raise DataError(
            f"{path} has magic number {magic} (0x{magic:08x}); an MNIST-style IDX file "
            f"starts with {_IMAGES_MAGIC} (images) or {_LABELS_MAGIC} (labels). "
            "Check that it is the right file, and that it is compressed only if its name "
            "ends in .gz"
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path} ends inside its header ({len(raw)} of {header_len} bytes); download it again"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 1
    for d in dims:
        expected *= d
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: its header declares shape {dims}, which needs "
            f"{expected} bytes of data, but it holds {actual}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an images file and its labels file."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path} holds labels, not images (shape {images.shape}); "
            f"check that it is not swapped with {labels_path.name}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path} holds images, not labels (shape {labels.shape}); "
            f"check that it is not swapped with {images_path.name}"
        )
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; "
            f"cnnderive needs {IMAGE_SIZE}x{IMAGE_SIZE} (MNIST or Fashion-MNIST)"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same set"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{labels_path} has label {int(labels.max())}; MNIST and Fashion-MNIST "
            f"labels run from 0 to {NUM_CLASSES - 1}"
        )
    return images, labels


# ---------------------------------------------------------------------------- splits


def _validation_indices(labels: np.ndarray, path: Path) -> np.ndarray:
    """Sorted indices of the stratified validation hold-out (one tenth, rng seed 0).

    Each class gives ``floor(n_c / 10)`` images; the images still needed to reach ``N / 10``
    (rounded half up) come one each from the classes with the largest remainders, lowest
    class first on ties. So the total is one tenth and each class is held out in
    proportion. The images of each class are then drawn, class 0 first, from one
    ``np.random.default_rng(0)``, which nothing else uses.
    """
    n = labels.shape[0]
    if n < VALIDATION_FRACTION:
        raise DataError(
            f"{path} holds only {n} images; at least {VALIDATION_FRACTION} are needed to "
            "hold out a validation split"
        )
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    quota = counts // VALIDATION_FRACTION
    remainder = counts % VALIDATION_FRACTION
    missing = (n + VALIDATION_FRACTION // 2) // VALIDATION_FRACTION - int(quota.sum())
    if missing > 0:
        order = sorted(range(NUM_CLASSES), key=lambda c: (-remainder[c], c))
        for c in order[:missing]:
            quota[c] += 1
    rng = np.random.default_rng(0)
    chosen = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if quota[c]:
            chosen.append(rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.intp)


def first_of_each_class(split: Split, count: int) -> Split:
    """``count`` images of ``split`` taken from every class in turn, in file order.

    The first image of each class, then the second of each, and so on (classes in
    increasing order; a class that runs out is skipped), so that a small ``count`` still
    holds every class: the shipped 5k subset is sorted by digit, and its first 500 images
    are all zeros.  The chosen images keep their order in ``split``.  No randomness: the
    same images for every seed.
    """
    labels = split.labels
    rank = np.empty(labels.shape[0], dtype=np.intp)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(members.size)
    order = np.lexsort((np.arange(labels.shape[0]), labels, rank))  # by rank, class, position
    chosen = np.sort(order[:count])
    return Split(images=split.images[chosen], labels=labels[chosen])


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    pixels = images.astype(np.float32)
    pixels /= 255.0
    return Split(
        images=pixels.reshape(images.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1),
        labels=labels.astype(np.int64),
    )


def _split_train(images: np.ndarray, labels: np.ndarray, path: Path) -> tuple[Split, Split]:
    held_out = _validation_indices(labels, path)
    keep = np.ones(labels.shape[0], dtype=bool)
    keep[held_out] = False
    train = _to_split(images[keep], labels[keep])
    validation = _to_split(images[held_out], labels[held_out])
    return train, validation


# ---------------------------------------------------------------------------- finding files


def _find(directory: Path, gz_name: str) -> Path | None:
    """The file ``gz_name`` in ``directory``, compressed or not, or None."""
    for candidate in (directory / gz_name, directory / gz_name[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


def _find_pair(directory: Path, names: Sequence[str]) -> tuple[Path, Path] | None:
    """Both files of a pair in ``directory``; None if neither; DataError if only one."""
    found = [_find(directory, n) for n in names]
    if all(found):
        return found[0], found[1]
    if any(found):
        have = next(p for p in found if p is not None)
        lacking = names[found.index(None)]
        raise DataError(
            f"{directory} has {have.name} but not {lacking}; add the missing file "
            "or remove the other one"
        )
    return None


def _cache_root() -> tuple[Path, bool]:
    """The cache directory, and whether the user chose it through ``$CNNDERIVE_DATA``."""
    env = os.environ.get(ENV_VAR)
    if env:
        chosen = Path(env).expanduser()
        if chosen.exists() and not chosen.is_dir():
            raise DataError(
                f"{ENV_VAR}={env} is a file, not a folder; point {ENV_VAR} to a folder "
                "(it is made if missing) or unset it"
            )
        return chosen, True
    return Path.home() / ".cache" / "cnnderive", False


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        if not given.is_dir():
            what = "is a file, not a folder" if given.exists() else "does not exist"
            raise DataError(
                f"data directory {given} {what}; create it and put the "
                f"{TITLES[name]} files there, or leave the data directory unset to use "
                f"the cache ({_cache_root()[0]})"
            )
        dirs += [given / name, given]
    cache, chosen = _cache_root()
    dirs.append(cache / name)
    if chosen:
        dirs.append(cache)
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


# ---------------------------------------------------------------------------- downloads


def _fetch(url: str, target: Path, md5: str, timeout: float) -> None:
    """Download ``url`` to ``target`` through a temporary file; raise OSError on failure.

    The temporary file sits in the target's folder and is removed unless its md5 matches,
    in which case it is renamed into place in one step.
    """

    def download(out) -> None:
        digest = hashlib.md5()
        request = urllib.request.Request(url, headers={"User-Agent": "cnnderive"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise OSError(f"md5 {digest.hexdigest()} differs from the published {md5}")

    replace_atomically(target, download)


def _download(
    name: str,
    target_dir: Path,
    files: Sequence[str],
    *,
    mirrors: Sequence[str] | None = None,
    md5s: dict[str, str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
    unreachable: set[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Download those of ``files`` missing from ``target_dir``, trying each mirror in turn.

    Files already in ``target_dir`` are left alone. A mirror that cannot be reached at all
    (as opposed to answering with an error or a wrong file) is not asked again for the
    other files (nor by a later call given the same ``unreachable`` set), so an offline
    machine gives up after one timeout per mirror. Returns the
    mirrors that served files and, for each file that could not be had, the reason from
    the last mirror tried.
    """
    mirrors = MIRRORS[name] if mirrors is None else mirrors
    md5s = MD5[name] if md5s is None else md5s
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    used: list[str] = []
    unreachable = set() if unreachable is None else unreachable
    failures: dict[str, str] = {}
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return used, {f: f"cannot create {target_dir}: {error}" for f in files}
    for filename in files:
        if _find(target_dir, filename) is not None:
            continue
        reason = "no mirror could be reached"
        for base in mirrors:
            if base in unreachable:
                continue
            url = base + filename
            log(f"Downloading {url} ...")
            try:
                _fetch(url, target_dir / filename, md5s[filename], timeout)
            except urllib.error.HTTPError as error:
                detail = str(error)
            except urllib.error.URLError as error:
                detail = str(error.reason)
                unreachable.add(base)
            except TimeoutError as error:  # connected, then no answer: as good as unreachable
                detail = str(error) or "timed out"
                unreachable.add(base)
            except (OSError, http.client.HTTPException, ValueError) as error:
                detail = str(error) or type(error).__name__
            else:
                if base not in used:
                    used.append(base)
                break
            reason = f"{url}: {detail}"
            log(f"Could not use it ({detail})")
        else:
            failures[filename] = reason
    return used, failures


# ---------------------------------------------------------------------------- loading


# In the cache folder: when the test files last failed to download.  They are tried again
# a day later, not on every run (each try can wait for a timeout per mirror).
_TEST_FILES_TRIED = ".test-files-tried"
_TEST_FILES_RETRY_SECONDS = 24 * 3600


# In the cache folder: when no mirror could be reached.  For an hour after that, runs use
# what they have without trying again: an offline machine then prints one line per run,
# not a "Downloading ... / Could not use it" pair per mirror.
_MIRRORS_UNREACHABLE = ".mirrors-unreachable"
_MIRRORS_RETRY_SECONDS = 3600


def _seconds_since(marker: Path, within: float) -> float | None:
    """Seconds since ``marker`` was touched, if fewer than ``within``; None otherwise (no
    marker, or one dated in the future: then the thing it stands for is tried again)."""
    try:
        age = time.time() - marker.stat().st_mtime
    except OSError:
        return None
    return age if 0 <= age < within else None


def _touch(marker: Path) -> bool:
    """Record now in ``marker``; False where the cache is read-only."""
    try:
        marker.touch()
    except OSError:
        return False
    return True


def _minutes_since_mirrors_failed(cache_dir: Path) -> int | None:
    """Minutes since every mirror was found unreachable, if that was less than an hour ago."""
    age = _seconds_since(cache_dir / _MIRRORS_UNREACHABLE, _MIRRORS_RETRY_SECONDS)
    return None if age is None else int(age // 60)


def _record_mirrors(cache_dir: Path, all_unreachable: bool) -> None:
    marker = cache_dir / _MIRRORS_UNREACHABLE
    if all_unreachable:
        _touch(marker)
        return
    try:
        marker.unlink(missing_ok=True)
    except OSError:  # a read-only cache: the next run tries again
        pass


def _test_files_due(cache_dir: Path) -> bool:
    """Whether the cache lacks test files that are worth trying to download now; if so,
    the try is recorded first (the files could not be saved where that fails)."""
    if all(_find(cache_dir, name) is not None for name in TEST_FILES):
        return False
    marker = cache_dir / _TEST_FILES_TRIED
    if _seconds_since(marker, _TEST_FILES_RETRY_SECONDS) is not None:
        return False
    return _touch(marker)


def _test_files_failed(cache_dir: Path, title: str, log: Callable[[str], None]) -> None:
    _touch(cache_dir / _TEST_FILES_TRIED)
    log(
        f"Could not download the {title} test files; carrying on without a test set "
        "(they are tried again in a day, or put them in the cache folder yourself)."
    )


def _bundle(
    name: str, source: str, directory: Path, train_pair: tuple[Path, Path], *, cache: bool = False
) -> DataBundle:
    images, labels = _read_pair(*train_pair)
    train, validation = _split_train(images, labels, train_pair[0])
    test = None
    try:
        test_pair = _find_pair(directory, TEST_FILES)
    except DataError:
        if not cache:
            raise
        test_pair = None  # an interrupted download: carry on without a test set
    if test_pair is not None:
        test = _to_split(*_read_pair(*test_pair))
    sizes = f"{len(train.labels):,} training and {len(validation.labels):,} validation images"
    sizes += f", {len(test.labels):,} test images" if test is not None else ", no test set"
    return DataBundle(
        name=name, source=f"{source} ({sizes}).", train=train, validation=validation, test=test
    )


def _check_subset(directory: Path) -> None:
    """The shipped subset's files must be the ones shipped: their md5 against SUBSET_MD5."""
    for name, expected in SUBSET_MD5.items():
        path = directory / name
        if not path.is_file():
            raise DataError(
                f"the MNIST subset shipped with cnnderive lacks {path}; reinstall cnnderive"
            )
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(
                f"the MNIST subset shipped with cnnderive is damaged: {path} has md5 {digest}, "
                f"not {expected}; reinstall cnnderive"
            )


def _load_subset() -> DataBundle:
    pair = _find_pair(SUBSET_DIR, TRAIN_FILES)
    if pair is None:
        raise DataError(
            f"the MNIST subset shipped with cnnderive is missing from {SUBSET_DIR}; "
            "reinstall cnnderive"
        )
    _check_subset(SUBSET_DIR)
    return _bundle(
        "mnist-5k", "the 5,000-image MNIST subset shipped with cnnderive", SUBSET_DIR, pair
    )


def _listing(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    log: Callable[[str], None] = print,
) -> DataBundle:
    """Load ``"mnist"`` or ``"fashion-mnist"`` with its train / validation / test splits.

    See the module docstring for where the files are looked for and how the validation
    split is chosen. ``log`` receives the lines meant for the user (downloads, the
    fallback to the shipped subset). Raises :class:`DataError` for every data problem.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    title = TITLES[name]
    cache_dir = _cache_root()[0] / name
    searched = _search_dirs(name, data_dir)
    if data_dir is not None:
        # The user asked for this folder: data found elsewhere would not be what they meant.
        given = searched[:2]
        if all(_find_pair(directory, TRAIN_FILES) is None for directory in given):
            raise DataError(
                f"data directory {given[1]} holds no {title} training files "
                f"({' and '.join(TRAIN_FILES)}, with or without .gz, in it or in "
                f"{given[0]}); put them there, or leave the data directory out to use "
                f"the cache ({cache_dir})"
            )
    for directory in searched:
        is_cache = directory == cache_dir
        try:
            pair = _find_pair(directory, TRAIN_FILES)
        except DataError:
            if not is_cache:
                raise
            pair = None  # an interrupted download: the download below completes it
        if pair is not None:
            if is_cache and allow_download and _test_files_due(cache_dir):
                # The test files of an earlier download failed: try again (once a day).
                _, test_failures = _download(name, cache_dir, TEST_FILES, log=log)
                if test_failures:
                    _test_files_failed(cache_dir, title, log)
            source = f"{title} files in {directory}"
            return _bundle(name, source, directory, pair, cache=is_cache)

    minutes = _minutes_since_mirrors_failed(cache_dir) if allow_download else None
    if minutes is not None:
        why = (
            f"no download mirror could be reached {minutes} min ago (they are tried again "
            f"an hour after that; delete {cache_dir / _MIRRORS_UNREACHABLE} to try now)"
        )
    elif allow_download:
        unreachable: set[str] = set()
        used, failures = _download(name, cache_dir, TRAIN_FILES, log=log, unreachable=unreachable)
        # Only when no mirror served anything: a connection lost halfway through says
        # nothing about the next run.
        _record_mirrors(
            cache_dir, not used and bool(failures) and set(MIRRORS[name]) <= unreachable
        )
        if not failures:
            more, test_failures = _download(
                name, cache_dir, TEST_FILES, log=log, unreachable=unreachable
            )
            used += [m for m in more if m not in used]
            if test_failures:
                _test_files_failed(cache_dir, title, log)
            pair = _find_pair(cache_dir, TRAIN_FILES)
            if pair is None:  # pragma: no cover - the download just put both files there
                raise DataError(f"the {title} training files vanished from {cache_dir}")
            where = f" from {_listing(used)}" if used else ""
            source = f"{title} downloaded{where} into {cache_dir}"
            return _bundle(name, source, cache_dir, pair, cache=True)
        why = f"could not be downloaded ({next(iter(failures.values()))})"
    else:
        why = "downloading was turned off"

    wanted = ", ".join(TRAIN_FILES + TEST_FILES)
    if name == "mnist":
        log(
            f"note: full MNIST is not in {_listing(searched)} and {why}: using the "
            f"5,000-image MNIST subset shipped with cnnderive (for full MNIST, put its "
            f"four files in {cache_dir})"
        )
        return _load_subset()
    raise DataError(
        f"{title} was not found in {_listing(searched)} and {why}. Put {wanted} in "
        f"{cache_dir} or in a folder you pass as the data directory, or install "
        "Debian's package: apt-get update && apt-get install -y dataset-fashion-mnist "
        "(it puts the files in /usr/share/datasets/fashion-mnist)."
    )
