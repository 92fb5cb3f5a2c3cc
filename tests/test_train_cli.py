"""Tests for ``cnnderive train`` and ``cnnderive evaluate`` (train/cli.py), through cnnderive.cli.main."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from cnnderive.cli import main
from cnnderive.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Run in tmp_path with an empty data cache, so the shipped subset is what gets loaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNNDERIVE_DATA", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(capsys, *argv, match: str):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnderive "), err
    assert match in lines[0], lines[0]


TRAIN = ("train", "--no-download")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of the seed network on the first 256 images, and what it printed."""
    where = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNDERIVE_DATA", str(where / "cache"))
    try:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(
                [
                    *TRAIN,
                    "--net",
                    "seed",
                    "--limit",
                    "256",
                    "--epochs",
                    "1",
                    "--out",
                    str(where / "r"),
                ]
            )
    finally:
        mp.undo()
    return where / "r", code, out.getvalue(), err.getvalue()


def test_tiny_train_run_writes_its_files(tiny_run):
    run_dir, code, out, err = tiny_run
    assert code == 0, err
    assert "5,000-image MNIST subset" in out  # the fallback sentence is printed
    assert "epoch 1/1" in out
    for name in ("metrics.json", "checkpoint.npz", "curves.png", "filters.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["net"] == "seed" and metrics["data"] == "mnist-5k"
    assert metrics["recipe"]["limit"] == 256
    (row,) = metrics["epochs"]
    assert row["epoch"] == 1 and row["test_accuracy"] is None
    assert 0 <= row["val_accuracy"] <= 1 and row["images_per_second"] > 0
    saved = ckpt.load(run_dir / "checkpoint.npz")
    assert saved.epoch == 1 and saved.meta["net"] == "seed" and saved.meta["seed"] == 0
    assert "subset" in saved.meta["source"]
    assert all(p.dtype == np.float32 for p in saved.params.values())


def test_evaluate_prints_accuracy_and_json(tiny_run, capsys):
    run_dir = tiny_run[0]
    code, out, err = run(capsys, "evaluate", str(run_dir), "--no-download")
    assert code == 0, err
    assert "validation accuracy" in out and "of 500 images" in out
    code, out, err = run(capsys, "evaluate", str(run_dir), "--no-download", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "validation" and result["count"] == 500
    assert result["net"] == "seed" and result["epoch"] == 1
    assert result["accuracy"] == pytest.approx(result["correct"] / 500)
    history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert result["accuracy"] == pytest.approx(history[-1]["val_accuracy"])


def test_toy_train_resume_and_nothing_to_do(capsys, tmp_path):
    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "toy")
    code, out, err = run(capsys, *args, "--epochs", "1")
    assert code == 0, err
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0, err
    assert "Resuming toy" in out and "epoch 2/2" in out
    assert ckpt.load(tmp_path / "toy" / "checkpoint.npz").epoch == 2
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0 and "nothing to do" in out


def test_default_out_folder_and_the_alternative_optimiser(capsys, tmp_path):
    code, out, err = run(
        capsys, *TRAIN, "--net", "toy", "--limit", "1000", "--epochs", "1", "--seed", "3",
        "--optimizer", "adam",
    )  # fmt: skip
    assert code == 0, err
    run_dir = tmp_path / "runs" / "toy-mnist-seed3"
    assert (run_dir / "checkpoint.npz").is_file()
    recipe = json.loads((run_dir / "metrics.json").read_text())["recipe"]
    assert recipe["optimizer"] == "adam" and recipe["lr"] == 0.02 and recipe["seed"] == 3


def test_nan_loss_exits_1_and_keeps_the_checkpoint(capsys, tmp_path):
    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "t", "--optimizer", "sgd")
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    before = (tmp_path / "t" / "checkpoint.npz").read_bytes()
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume", "--lr", "1e38")
    assert code == 1
    assert "Traceback" not in err
    assert "epoch 2, step" in err and "last good checkpoint (epoch 1)" in err
    assert (tmp_path / "t" / "checkpoint.npz").read_bytes() == before


def test_a_worker_process_that_dies_stops_the_run_with_exit_1(capsys, monkeypatch):
    """The worker (forked, so it inherits this patch) exits during its first backward
    pass; the parent must report it, not hang, and keep the epoch-0 checkpoint."""
    import os

    from cnnderive.train.networks import Network

    parent = os.getpid()
    own_backward = Network._own_backward

    def dying_in_the_worker(self, *args):
        if os.getpid() != parent:
            os._exit(3)
        return own_backward(self, *args)

    monkeypatch.setattr(Network, "_own_backward", dying_in_the_worker)
    args = (*TRAIN, "--net", "seed", "--limit", "64", "--epochs", "1", "--threads", "2")
    code, out, err = run(capsys, *args, "--out", "w")
    assert code == 1
    assert "Traceback" not in err
    assert "worker process 1 died (exit code 3)" in err and "--resume" in err
    assert ckpt.load("w/checkpoint.npz").epoch == 0


@pytest.mark.parametrize(
    "argv, match",
    [
        ((*TRAIN, "--net", "seed", "--batch-size", "0"), "--batch-size must be at least 1"),
        ((*TRAIN, "--net", "seed", "--batch-size", "-4"), "--batch-size must be at least 1"),
        ((*TRAIN, "--net", "seed", "--epochs", "0"), "--epochs must be at least 1"),
        ((*TRAIN, "--net", "seed", "--limit", "0"), "--limit must be at least 1"),
        ((*TRAIN, "--net", "seed", "--seed", "-1"), "--seed must be at least 0"),
        ((*TRAIN, "--net", "seed", "--lr", "-0.1"), "--lr must be a positive number"),
        ((*TRAIN, "--net", "seed", "--lr", "nan"), "--lr must be a positive number"),
        ((*TRAIN, "--net", "seed", "--shift", "-1"), "--shift must be at least 0"),
        ((*TRAIN, "--net", "seed", "--shift", "28"), "image side (28 pixels), got 28"),
        ((*TRAIN, "--net", "toy", "--shift", "6"), "image side (6 pixels), got 6"),
        ((*TRAIN, "--net", "seed", "--threads", "0"), "--threads must be at least 1"),
        ((*TRAIN, "--net", "seed", "--weight-decay", "-1"), "--weight-decay must be a number"),
        (
            (*TRAIN, "--net", "seed", "--data-dir", "missing"),
            "data directory missing does not exist",
        ),
        ((*TRAIN, "--net", "seed", "--resume", "--out", "nowhere"), "no checkpoint to resume"),
        (("evaluate", "nowhere"), "nowhere is not a folder"),
        (("evaluate", "."), "no checkpoint at"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, match):
    assert_usage_error(capsys, *argv, match=match)


def test_argparse_rejects_an_unknown_network(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--net", "resnet"])
    assert caught.value.code == 2
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


def test_broken_data_file_exits_2(capsys, tmp_path):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03junk"))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"junk"))
    code, out, err = run(capsys, *TRAIN, "--net", "seed", "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "train-" in err


def test_resume_refuses_a_different_recipe_and_new_run_refuses_an_existing_one(capsys):
    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "r")
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    assert_usage_error(capsys, *args, "--epochs", "1", match="already holds a run; pass --resume")
    assert_usage_error(
        capsys, *args, "--epochs", "2", "--resume", "--seed", "4", match="--seed 4 differs"
    )
    assert_usage_error(
        capsys, *args, "--epochs", "2", "--resume", "--optimizer", "adam", match="--optimizer adam"
    )
    # --net cannot be left out (it is required), so the message names the right one.
    seed_args = (*TRAIN, "--net", "seed", "--out", "r", "--resume")
    assert_usage_error(
        capsys, *seed_args, match="differs from the checkpoint's toy; pass --net toy"
    )


def test_resume_with_another_lr_says_so_and_records_each_epochs_lr(capsys):
    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "r")
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume", "--lr", "0.05")
    assert code == 0, err
    assert "--lr 0.05 replaces the checkpoint's 0.2 from epoch 2 on" in err
    epochs = json.loads(open("r/metrics.json").read())["epochs"]
    assert [(e["lr"], e["batch_size"]) for e in epochs] == [
        (0.2, 32),
        (pytest.approx(0.05 * 0.8), 32),
    ]


def test_toy_runs_say_which_images_their_task_uses(capsys):
    code, out, err = run(capsys, *TRAIN, "--net", "toy", "--epochs", "1", "--out", "t")
    assert code == 0, err
    # The shipped subset holds 450 training and 50 validation images of each digit.
    assert (
        "The toy network trains on 900 of the 4,500 training images and is scored on 100 of "
        "the 500 validation images (digit 1 against digit 0)." in out
    )


def test_ctrl_c_during_training_keeps_the_last_epoch_and_says_how_to_resume(tmp_path):
    """Reference: Ctrl-C at a terminal sends SIGINT to the whole process group, here the
    training process and its worker; the run exits with 130, names the epoch its checkpoint
    holds, and leaves no process behind."""
    import os
    import re
    import signal
    import time

    command = [sys.executable, "-m", "cnnderive", *TRAIN, "--net", "lenet", "--limit", "200"]
    command += ["--epochs", "1000", "--threads", "2", "--out", "r"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CNNDERIVE_DATA=str(tmp_path / "cache"))
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    try:
        for line in process.stdout:  # a few epochs first, so that one has been saved
            if line.startswith("epoch 3/"):
                break
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    saved = re.search(
        r"r/checkpoint.npz holds epoch (\d+); run the same command with --resume", err
    )
    assert saved and int(saved.group(1)) >= 3, err
    assert ckpt.load(tmp_path / "r" / "checkpoint.npz").epoch == int(saved.group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the worker process is gone too
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a process of the run outlived it")


def test_evaluate_given_the_checkpoint_file_names_its_folder(capsys):
    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "r")
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    assert_usage_error(
        capsys, "evaluate", "r/checkpoint.npz", match="pass the run folder that holds it (r)"
    )


def test_evaluate_rejects_a_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.npz").write_bytes(b"garbage")
    assert_usage_error(capsys, "evaluate", "bad", match="not a cnnderive checkpoint: not an .npz")
    # An archive holding pickled objects: refused without numpy's advice to load it unsafely.
    np.savez(tmp_path / "bad" / "checkpoint.npz", meta=np.array([None], dtype=object))
    code, out, err = run(capsys, "evaluate", "bad")
    assert code == 2 and "pickled Python objects" in err and "allow_pickle" not in err


def test_resume_through_the_cli_is_bitwise_exact(capsys, tmp_path):
    args = (*TRAIN, "--net", "lenet", "--limit", "300", "--batch-size", "64")
    assert run(capsys, *args, "--epochs", "2", "--out", "straight")[0] == 0
    assert run(capsys, *args, "--epochs", "1", "--out", "split")[0] == 0
    assert run(capsys, *args, "--epochs", "2", "--out", "split", "--resume")[0] == 0
    a = ckpt.load(tmp_path / "straight" / "checkpoint.npz")
    b = ckpt.load(tmp_path / "split" / "checkpoint.npz")
    assert a.epoch == b.epoch == 2
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key]), key


def test_the_train_command_never_imports_sympy(tmp_path):
    """`cnnderive train` builds the whole parser (derive and codegen commands included) but
    must not load SymPy or Jinja2: their commands import them only when they run."""
    script = (
        "import sys\n"
        "from cnnderive.cli import main\n"
        f"code = main(['train', '--net', 'toy', '--epochs', '1', '--limit', '200', '--no-download',\n"
        f"             '--no-progress', '--out', {str(tmp_path / 'run')!r}])\n"
        "assert code == 0, code\n"
        "loaded = {'sympy', 'jinja2', 'mpmath'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_an_unwritable_out_is_a_usage_error_before_any_work(capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    assert_usage_error(
        capsys, *TRAIN, "--net", "toy", "--out", "a_file", match="a_file is a file, not a folder"
    )
    assert_usage_error(
        capsys, *TRAIN, "--net", "toy", "--out", "a_file/run", match="choose another --out"
    )
    assert_usage_error(capsys, "generate", "--output", "a_file", match="choose another --output")
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_a_full_disk_while_saving_exits_1_and_keeps_the_last_checkpoint(
    capsys, tmp_path, monkeypatch
):
    """Reference: the checkpoint of epoch 1, byte for byte, after a save in epoch 2 fails."""
    import cnnderive_common.files

    args = (*TRAIN, "--net", "toy", "--limit", "1000", "--out", "full")
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    before = (tmp_path / "full" / "checkpoint.npz").read_bytes()

    def no_room(path, write):
        raise OSError(28, "No space left on device", str(path))

    for module in ("cnnderive.train.checkpoint", "cnnderive.train.loop", "cnnderive.train.plots"):
        monkeypatch.setattr(f"{module}.replace_atomically", no_room)
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 1 and "Traceback" not in err
    assert "No space left on device" in err and "--resume" in err
    assert (tmp_path / "full" / "checkpoint.npz").read_bytes() == before
    assert cnnderive_common.files.replace_atomically is not no_room


def test_evaluate_warns_when_the_validation_images_come_from_other_data(tiny_run, capsys, tmp_path):
    """A run trained on full MNIST, evaluated where only the shipped subset is found: the
    subset's validation images are full MNIST training images, so the score is suspect."""
    import dataclasses
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run[0], copy)
    saved = ckpt.load(copy / "checkpoint.npz")
    meta = {**saved.meta, "data": "mnist"}
    ckpt.save(copy / "checkpoint.npz", dataclasses.replace(saved, meta=meta))
    code, out, err = run(capsys, "evaluate", str(copy), "--no-download")
    assert code == 0, err
    assert "warning" in err and "trained on mnist" in err and "--data-dir" in err
    code, out, err = run(capsys, "evaluate", str(tiny_run[0]), "--no-download")
    assert code == 0 and "warning" not in err


def test_resuming_a_finished_run_needs_no_writable_folder(capsys, tmp_path, monkeypatch):
    """A finished run on a read-only disk: --resume has nothing to do, and says so."""
    import cnnderive.train.cli

    args = (*TRAIN, "--net", "toy", "--limit", "200", "--epochs", "1", "--out", "done")
    assert run(capsys, *args)[0] == 0
    monkeypatch.setattr(
        cnnderive.train.cli, "folder_problem", lambda folder: "read-only file system"
    )
    code, out, err = run(capsys, *args, "--resume")
    assert code == 0 and "nothing to do" in out, err
    assert_usage_error(capsys, *args[:-4], "--epochs", "2", "--out", "done", "--resume",
                       match="read-only file system")  # fmt: skip


def test_a_dead_proof_worker_is_one_line_and_exit_1(capsys, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import derive.cli

    def dies(args):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(derive.cli, "run_verify", dies)
    code, out, err = run(capsys, "verify")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "worker process died" in err
