"""Issue 14 ("no tracebacks, no silent surprises"): each repro of the issue, as a test.

Commands run in a subprocess where the behaviour is about the process itself (a closed
pipe, the output encoding, a signal, the import path); the rest through cnnderive.cli.main.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnderive.cli import main
from cnnderive.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
TRAIN = ("train", "--no-download")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Run in tmp_path with an empty data cache, so the shipped subset is what gets loaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNNDERIVE_DATA", str(tmp_path / "cache"))


def environment(tmp_path, **extra) -> dict[str, str]:
    """The subprocesses' environment: this checkout first on the import path."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, CNNDERIVE_DATA=str(tmp_path / "cache"), **extra)


def shell(tmp_path, command: str, **extra) -> subprocess.CompletedProcess:
    """``command`` in bash, in tmp_path; `$CNNDERIVE` is `python -m cnnderive`."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        env=environment(tmp_path, CNNDERIVE=f"{sys.executable} -m cnnderive", **extra),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Two epochs of the toy network, trained once for the tests that read a run."""
    where = tmp_path_factory.mktemp("toy")
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNDERIVE_DATA", str(where / "cache"))
    try:
        code = main([*TRAIN, "--net", "toy", "--epochs", "2", "--out", str(where / "r")])
    finally:
        mp.undo()
    assert code == 0
    return where / "r"


# ---------------------------------------------------------------------------- 1. tracebacks


@pytest.mark.parametrize(
    "command",
    [
        "$CNNDERIVE derive relu | head -0",
        "$CNNDERIVE evaluate r | head -0",
        "$CNNDERIVE train --no-download --net toy --limit 200 --epochs 2 --out t | head -1",
    ],
    ids=["derive", "evaluate", "train"],
)
def test_a_closed_pipe_ends_quietly(tmp_path, toy_run, command):
    import shutil

    shutil.copytree(toy_run, tmp_path / "r")
    done = shell(tmp_path, command + '; echo "exit ${PIPESTATUS[0]}"')
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert "could not write" not in done.stderr  # not blamed on the run folder
    assert done.stdout.strip().splitlines()[-1] == "exit 141", done.stderr


def test_a_pipe_closed_during_training_says_where_the_run_stands(tmp_path):
    """The reader leaves after the first epoch's line: the run stops, keeps its checkpoint
    and says so on stderr, like an interruption."""
    command = (
        "$CNNDERIVE train --no-download --net seed --limit 300 --epochs 50 --threads 1 "
        "--out t | head -3"
    )
    done = shell(tmp_path, command, PYTHONUNBUFFERED="1")
    assert "Traceback" not in done.stderr
    assert "the output was closed" in done.stderr and "--resume" in done.stderr, done.stderr
    assert ckpt.load(tmp_path / "t" / "checkpoint.npz").epoch < 50


def test_an_ascii_terminal_gets_ascii_names(tmp_path):
    done = shell(tmp_path, "$CNNDERIVE derive relu", PYTHONIOENCODING="ascii")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "delta" in done.stdout and "dL/dz" in done.stdout
    assert done.stderr.count("\n") == 1 and "ASCII" in done.stderr


@pytest.mark.parametrize(
    ("shadow", "command"),
    [
        ("derive.py", "--help"),
        ("codegen.py", "--help"),
        ("generated/__init__.py", "train --net toy"),
        ("generated.py", "evaluate r"),
    ],
    ids=["derive", "codegen", "generated-package", "generated-module"],
)
def test_a_users_module_that_shadows_a_package_is_named(tmp_path, shadow, command):
    """derive and codegen build the parser: every command stops.  generated serves the
    training commands only: they stop, and derive works on."""
    (tmp_path / shadow).parent.mkdir(exist_ok=True)
    (tmp_path / shadow).write_text("# the user's own\n")
    done = shell(tmp_path, f"$CNNDERIVE {command}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / shadow) in lines[0]
    assert "rename that file or run cnnderive from another folder" in lines[0]
    if shadow.startswith("generated"):
        assert shell(tmp_path, "$CNNDERIVE derive relu").returncode == 0
    # ... and so does the library's entry point.
    done = subprocess.run(
        [sys.executable, "-c", "import cnnderive; cnnderive.load_run('r')"],
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
    )
    assert "ImportError" in done.stderr and str(tmp_path / shadow) in done.stderr


def test_a_users_train_py_does_not_matter(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user module ran')\n")
    done = shell(tmp_path, "$CNNDERIVE --help")
    assert done.returncode == 0, done.stderr


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """Reference: the Ctrl-C test in test_train_cli.py; SIGTERM to the main process gives
    exit 143, a message naming the saved epoch, and the plots."""
    command = [sys.executable, "-m", "cnnderive", *TRAIN, "--net", "lenet", "--limit", "200"]
    command += ["--epochs", "1000", "--threads", "2", "--out", "r"]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environment(tmp_path, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("epoch 2/"):
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert "terminated" in err and "--resume" in err
    assert (tmp_path / "r" / "curves.png").is_file() and (tmp_path / "r" / "filters.png").is_file()


# ------------------------------------------------------------------ 2. long silent derivations


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["derive", "softmax", "--features", "200"], "--features 104 or less"),
        (["derive", "softmax", "--features", "100", "--batch", "4"], "--features 63 or less"),
        (["derive", "softmax_cross_entropy", "--classes", "60"], "--classes 53 or less"),
    ],
)
def test_derivations_that_would_take_minutes_are_refused_at_once(
    argv, expected, capsys, monkeypatch
):
    import derive.report

    def no_derivation(*args, **kwargs):
        raise AssertionError("the derivation started")

    monkeypatch.setattr(derive.report, "derivation", no_derivation)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "would take an estimated" in lines[0] and expected in lines[0]


def test_a_softmax_row_is_proven_with_its_sum_as_one_symbol():
    """The structure that makes softmax derivations fast: the row's sum of exponentials,
    held as a symbol, leaves a small rational identity; a wrong form is not taken for
    zero by it."""
    import sympy

    from derive.verify import _zero_with_denominators_as_symbols, is_zero

    z = sympy.symbols("z0:30", real=True)
    d = sympy.symbols("d0:30", real=True)
    e = [sympy.exp(v) for v in z]
    total = sum(e)
    a = [v / total for v in e]
    derived = sum(d[j] * sympy.diff(a[j], z[0]) for j in range(30))
    closed = a[0] * (d[0] - sum(d[j] * a[j] for j in range(30)))
    assert _zero_with_denominators_as_symbols(derived - closed)
    wrong = a[0] * (d[0] - sum(d[j] * a[j] for j in range(1, 30)))  # one term left out
    assert not _zero_with_denominators_as_symbols(derived - wrong)
    assert not is_zero((derived - wrong).subs({v: 0 for v in z[2:]}))


def test_softmax_with_40_features_is_derived_now(capsys):
    """It used to run for about two minutes without a word; now it is proven (by the
    structure above), and says how long it takes when that is more than a few seconds."""
    code, out, err = run(capsys, "derive", "softmax", "--features", "40")
    assert code == 0, err
    assert "verified for this configuration" in out


def test_derive_help_gives_each_layers_default_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["derive", "--help"])
    out = capsys.readouterr().out
    assert out.count("default: the layer's worked example") == 0
    assert "conv2d:" in out and "--kernel 2" in out and "softmax_cross_entropy:" in out


def test_train_help_gives_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: the network's recipe" in out and "lenet: sgd lr 0.05" in out
    assert "seed 0.002" in out  # Adam's learning rates


def test_verify_explains_the_stable_forms_row(capsys, monkeypatch):
    import derive.verify

    monkeypatch.setattr(derive.verify, "verify_layers", lambda layers, **_: [])
    code, out, _ = run(capsys, "verify")
    assert code == 0
    assert "stable forms" in out and "overflow-free forms" in out and "sigmoid" in out


# ------------------------------------------------------------------ 4. silent acceptance


def test_evaluate_warns_when_the_data_found_is_not_what_the_run_trained_on(
    toy_run, tmp_path, capsys
):
    """A Fashion-MNIST run evaluated on a folder of MNIST digits: the files look alike,
    but their content differs from the fingerprint the run recorded."""
    import dataclasses
    import gzip
    import shutil

    from cnnderive.train.data import SUBSET_DIR

    copy = tmp_path / "copy"
    shutil.copytree(toy_run, copy)
    saved = ckpt.load(copy / "checkpoint.npz")
    # What a run on Fashion-MNIST records: its name, and the fingerprint of its files.
    meta = {**saved.meta, "dataset": "fashion-mnist", "data": "fashion-mnist"}
    meta["data_fingerprint"] = "fashion-files-fp"
    meta["recipe"] = {**meta["recipe"], "dataset": "fashion-mnist"}
    ckpt.save(copy / "checkpoint.npz", dataclasses.replace(saved, meta=meta))
    digits = tmp_path / "digits"
    digits.mkdir()
    for path in SUBSET_DIR.glob("*.gz"):
        (digits / path.name[: -len(".gz")]).write_bytes(gzip.decompress(path.read_bytes()))
    code, out, err = run(capsys, "evaluate", str(copy), "--data-dir", str(digits))
    assert code == 0
    assert "warning" in err and "from other files than these" in err and "--data-dir" in err
    code, out, err = run(capsys, "evaluate", str(toy_run), "--no-download")
    assert code == 0 and "warning" not in err


def test_the_fallback_to_the_shipped_subset_is_one_line_on_stderr(capsys):
    code, out, err = run(capsys, *TRAIN, "--net", "toy", "--limit", "50", "--epochs", "1")
    assert code == 0
    assert "Full MNIST was not found" not in out and "full MNIST is not in" not in out
    notes = [line for line in err.splitlines() if "full MNIST" in line]
    assert len(notes) == 1 and "5,000-image MNIST subset" in notes[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--data-dir", "empty"), "holds no MNIST training files"),
        (("--threads", "100"), "more than the"),
        (("--batch-size", "100000"), "larger than the"),
    ],
    ids=["empty-data-dir", "threads", "batch-size"],
)
def test_settings_that_cannot_do_what_they_say_are_not_silent(capsys, tmp_path, argv, expected):
    (tmp_path / "empty").mkdir()
    code, out, err = run(
        capsys, *TRAIN, "--net", "toy", "--limit", "50", "--epochs", "1", "--out", "o", *argv
    )
    assert expected in err, err
    if argv[0] == "--data-dir":
        assert code == 2 and "leave the data directory out" in err


def test_a_data_cache_variable_naming_a_file_is_a_usage_error(capsys, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CNNDERIVE_DATA", str(tmp_path / "afile"))
    code, out, err = run(capsys, *TRAIN, "--net", "toy", "--epochs", "1")
    assert code == 2 and "is a file, not a folder" in err


def test_the_toy_limit_counts_the_toys_own_images(capsys, tmp_path):
    code, out, err = run(capsys, *TRAIN, "--net", "toy", "--limit", "10", "--epochs", "1")
    assert code == 0, err
    assert "trains on 10 of the 4,500 training images" in out


def test_metrics_record_the_momentum_schedule(capsys, tmp_path):
    code, out, err = run(capsys, *TRAIN, "--net", "toy", "--limit", "50", "--epochs", "1")
    assert code == 0, err
    recipe = json.loads((tmp_path / "runs" / "toy-mnist-seed0" / "metrics.json").read_text())[
        "recipe"
    ]
    assert recipe["momentum"] == {"start": 0.5, "end": 0.95, "rises_over_steps": 500}


# --------------------------------------------------------------------------- 6. plots


@pytest.mark.parametrize("net", ["toy", "seed", "lenet"])
def test_the_filter_plot_has_room_for_its_title_and_no_wide_margins(tmp_path, net):
    """Reference: the figure is cropped to its content, so a title that fits leaves no
    clipped text at the image's edge: the outermost columns and rows are background."""
    from matplotlib import image

    from cnnderive.train import plots
    from cnnderive.train.networks import build

    network = build(net)
    path = tmp_path / "filters.png"
    title = f"{net} on fashion-mnist, seed 0: first convolution's filters"
    plots.plot_filters(network.params[network.first_conv], path, title)
    pixels = image.imread(path)[..., :3]
    ink = (pixels < 0.9).any(axis=2)
    for edge in (ink[:3], ink[-3:], ink[:, :3], ink[:, -3:]):
        assert not edge.any()  # nothing clipped at an edge
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    assert rows[0] < 20 and pixels.shape[0] - rows[-1] < 20  # margins of a few pixels
    assert cols[0] < 20 and pixels.shape[1] - cols[-1] < 20


# ----------------------------------------------------------------- 8. the trained run's API


def test_load_run_predicts_the_validation_digits(toy_run):
    import cnnderive
    from cnnderive.train.data import load_dataset

    run = cnnderive.load_run(toy_run)
    assert run.net == "toy" and run.epoch == 2 and run.labels == (0, 1)
    validation = load_dataset("mnist", allow_download=False, log=lambda _: None).validation
    chosen = validation.labels < 2
    images, labels = validation.images[chosen], validation.labels[chosen]
    assert np.mean(run.predict(images) == labels) > 0.95
    p = run.probabilities(images[:, :, :, 0])  # (N, 28, 28) works too
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    assert np.array_equal(run.predict((images * 255).astype(np.uint8)), run.predict(images))


def test_load_run_errors_name_the_problem(tmp_path):
    import cnnderive
    from cnnderive.train.run import RunError

    with pytest.raises(RunError, match="not a folder"):
        cnnderive.load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no checkpoint"):
        cnnderive.load_run(tmp_path / "empty")


def _draw_digit_one(path: Path, size=(120, 90)) -> None:
    """A hand-drawn '1': a dark vertical stroke on white paper, larger than MNIST's."""
    from matplotlib import image

    paper = np.ones(size + (3,))
    height, width = size
    paper[15 : height - 15, width // 2 - 5 : width // 2 + 5] = 0.05
    image.imsave(path, paper)


def test_predict_reads_a_drawn_png_and_an_idx_file(toy_run, tmp_path, capsys):
    import gzip

    from cnnderive.train.data import SUBSET_DIR

    _draw_digit_one(tmp_path / "one.png")
    code, out, err = run(capsys, "predict", str(toy_run), str(tmp_path / "one.png"))
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'one.png'}: 1 (") and "0 0." in out
    idx = tmp_path / "images.idx"
    raw = gzip.decompress((SUBSET_DIR / "train-images-idx3-ubyte.gz").read_bytes())
    count = 3
    header = bytearray(raw[:16])
    header[4:8] = count.to_bytes(4, "big")
    idx.write_bytes(bytes(header) + raw[16 : 16 + count * 28 * 28])
    code, out, err = run(capsys, "predict", str(toy_run), str(idx), "--json")
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [f"{idx}[{i}]" for i in range(count)]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in results)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_text("hello"), "neither a PNG file nor a readable IDX file"),
        (lambda p: None, "is not a file"),
    ],
    ids=["text-file", "missing"],
)
def test_predict_refuses_what_is_no_image_in_one_line(toy_run, tmp_path, capsys, make, expected):
    make(tmp_path / "x.png")
    code, out, err = run(capsys, "predict", str(toy_run), str(tmp_path / "x.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_evaluate_confusion_prints_per_class_accuracy_and_draws_it(toy_run, capsys):
    code, out, err = run(capsys, "evaluate", str(toy_run), "--confusion", "--no-download")
    assert code == 0, err
    assert "rows: true class, columns: predicted class" in out
    assert (toy_run / "confusion.png").is_file()
    code, out, err = run(capsys, "evaluate", str(toy_run), "--confusion", "--json", "--no-download")
    result = json.loads(out)
    matrix = np.array(result["confusion"])
    assert matrix.shape == (2, 2) and matrix.sum() == result["count"]
    assert np.trace(matrix) == result["correct"]
    assert result["class_accuracy"] == [matrix[i, i] / matrix[i].sum() for i in range(2)]
