"""derive/: the proofs hold, the verifier can fail, and the derivations print as valid LaTeX."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sympy

from cnnderive.cli import main
from derive import ir
from derive.ir import Case, MatMul, Operand
from derive.layers import LAYERS
from derive.report import derivation, equations, paragraph, to_latex, to_text
from derive.verify import VerificationError, prove, verify_layers, verify_stable_forms

REPO = Path(__file__).resolve().parent.parent
KATEX = Path(os.environ.get("CNNDERIVE_KATEX", REPO / ".cache" / "node" / "node_modules" / "katex"))
IN_CI = bool(os.environ.get("CI"))


def _replace_case(layer, gradient_name, tree):
    gradients = tuple(
        dataclasses.replace(g, cases=(Case(tree, name="wrong on purpose"),))
        if g.name == gradient_name
        else g
        for g in layer.gradients
    )
    return dataclasses.replace(layer, gradients=gradients)


# ---------------------------------------------------------------------------
# The proofs
# ---------------------------------------------------------------------------


def test_every_layer_is_proven_on_its_sweep():
    results = verify_layers(list(LAYERS.values()))
    failures = {r.name: r.error for r in results if not r.ok}
    assert failures == {}
    by_name = {r.name: r for r in results}
    # The sweep covers what the issue asks of conv2d: strides 1-2, paddings 0-1, channels 1-2, batch 1-2.
    conv = by_name["conv2d"].ranges["dx"][LAYERS["conv2d"].gradients[0].cases[0].name]
    assert conv["stride"] == [1, 2] and conv["padding"] == [0, 1]
    assert (
        conv["in_channels"] == [1, 2] and conv["out_channels"] == [1, 2] and conv["batch"] == [1, 2]
    )
    # Average pooling proves both of its closed forms, each on configurations of its own.
    avg = by_name["avgpool2d"].cases["dx"]
    assert all(len(configs) > 0 for configs in avg.values()) and len(avg) == 2


def test_stable_forms_equal_textbook_forms():
    result = verify_stable_forms()
    assert result.ok, result.error


def test_seed_worked_example_matches_seed_002():
    """3x3 input, 2x2 kernel: dL/dw_11 = sum of delta times the 2x2 window of x (seed 002, 0-based)."""
    layer = LAYERS["conv2d"]
    proof = prove(layer, layer.example)
    x, delta = proof.inputs["x"], proof.upstream
    expected = sum(delta[0, i, j, 0] * x[0, i + 1, j + 1, 0] for i in range(2) for j in range(2))
    assert sympy.expand(proof.derived["w"][1, 1, 0, 0] - expected) == 0


def test_coefficient_extraction_agrees_with_sympy_diff():
    layer = LAYERS["conv2d"]
    config = next(c for c in layer.configurations() if c[ir.Param("stride", "s")] == 2)
    by_diff = prove(layer, config, method="diff")
    by_coefficients = prove(layer, config, method="coefficients")
    for name in ("x", "w", "b"):
        for a, b in zip(
            by_diff.derived[name].ravel(), by_coefficients.derived[name].ravel(), strict=True
        ):
            assert sympy.expand(a - b.as_expr()) == 0


# ---------------------------------------------------------------------------
# The verifier can fail
# ---------------------------------------------------------------------------


def test_conv_dx_without_rot180_is_rejected():
    layer = LAYERS["conv2d"]
    good = layer.gradients[0].cases[0].tree
    assert isinstance(good.a.kernel, ir.Rot180)
    wrong = dataclasses.replace(good, a=dataclasses.replace(good.a, kernel=Operand("w")))
    bad = _replace_case(layer, "dx", wrong)
    with pytest.raises(
        VerificationError, match=r"dx \(wrong on purpose\).*first differing element \[0, 0, 0, 0\]"
    ):
        prove(bad, layer.example)


def test_avgpool_without_the_one_over_k_squared_is_rejected():
    layer = LAYERS["avgpool2d"]
    good = layer.gradients[0].cases[1].tree  # ScatterWindows(pointwise(dout / k^2), ...)
    assert isinstance(good.g, ir.Pointwise)
    bad = _replace_case(layer, "dx", dataclasses.replace(good, g=Operand("dout")))
    with pytest.raises(VerificationError, match=r"first differing element \[0, 0, 0, 0\]"):
        prove(bad, layer.example)


def test_dense_dw_without_the_transpose_is_rejected():
    layer = LAYERS["dense"]
    bad = _replace_case(layer, "dw", MatMul(Operand("x"), Operand("dout")))
    config = (
        layer.example
    )  # batch = in_features = 2, so X dZ has the shape of X^T dZ and only values differ
    with pytest.raises(VerificationError, match=r"dw .*first differing element \[0, 0\]"):
        prove(bad, config)


def test_verify_command_exits_nonzero_for_a_failed_proof(monkeypatch, capsys):
    import derive.layers

    layer = LAYERS["dense"]
    bad = _replace_case(layer, "dx", MatMul(Operand("dout"), Operand("w")))
    monkeypatch.setitem(derive.layers.LAYERS, "dense", bad)
    assert main(["verify", "--layer", "dense"]) == 1
    assert "FAILED" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_verify_json_lists_every_layer(capsys):
    assert main(["verify", "--json", "--layer", "dense", "--layer", "maxpool2d"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is True
    assert [entry["layer"] for entry in payload["layers"]] == ["dense", "maxpool2d"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["derive", "conv2d", "--kernel", "9"], "kernel 9x9 is larger than the padded input 3x3"),
        (["derive", "conv2d", "--stride", "0"], "stride must be at least 1, got 0"),
        (["derive", "maxpool2d", "--size", "5"], "pool window 5x5 does not fit the input 4x4"),
        (["derive", "nosuchlayer"], "unknown layer 'nosuchlayer'; choose one of: conv2d"),
        (["derive", "dense", "--stride", "2"], "dense has no option --stride"),
        (["derive", "conv2d", "--height", "0"], "--height must be at least 1, got 0"),
        (["derive", "conv2d", "--standalone"], "use it with --latex"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("name", list(LAYERS))
def test_derive_prints_every_step_as_text(name, capsys):
    assert main(["derive", name]) == 0
    out = capsys.readouterr().out
    for step in (
        "1. Forward pass",
        "2. Chain rule",
        "3. Element by element",
        "4. Matrix form",
        "5. Closed form",
    ):
        assert step in out
    assert "verified for this configuration" in out
    # Plain text: no LaTeX commands, no SymPy's Python syntax.
    for leftover in ("\\", "Piecewise", "**", "$", "_{"):
        assert leftover not in out, leftover
    assert not re.search(r"(?<![a-z])exp\(", out)  # SymPy's exp(z), not e^z (logaddexp( is fine)


# ---------------------------------------------------------------------------
# The LaTeX is valid: KaTeX for every equation, pdflatex for a whole document
# ---------------------------------------------------------------------------


def _need(tool_ok: bool, what: str):
    if not tool_ok:
        if IN_CI:
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is not installed here (.ci/run installs it)")


def test_katex_accepts_every_equation_of_every_layer():
    _need(KATEX.is_dir() and shutil.which("node") is not None, f"KaTeX ({KATEX}) or node")
    all_equations = []
    for layer in LAYERS.values():
        all_equations += equations(derivation(layer, layer.example))
    assert len(all_equations) > 100
    completed = subprocess.run(
        ["node", str(REPO / "tests" / "latex" / "katex_check.js"), str(KATEX)],
        input=json.dumps(all_equations),
        capture_output=True,
        text=True,
        check=True,
    )
    failures = json.loads(completed.stdout)
    assert failures == [], [(all_equations[f["index"]], f["error"]) for f in failures[:3]]


def test_katex_checker_rejects_broken_latex():
    _need(KATEX.is_dir() and shutil.which("node") is not None, f"KaTeX ({KATEX}) or node")
    completed = subprocess.run(
        ["node", str(REPO / "tests" / "latex" / "katex_check.js"), str(KATEX)],
        input=json.dumps([r"\frac{1}{2}", r"\frac{1}{2", r"\notamacro{x}"]),
        capture_output=True,
        text=True,
        check=True,
    )
    assert [f["index"] for f in json.loads(completed.stdout)] == [1, 2]


@pytest.mark.parametrize(
    "argv",
    [[name] for name in LAYERS]
    + [  # sizes whose equations are wider than a line: scaled down to fit
        ["softmax_cross_entropy", "--classes", "3", "--batch", "1"],
        ["conv2d", "--channels", "2", "--out-channels", "2", "--batch", "2"],
    ],
    ids=" ".join,
)
def test_pdflatex_compiles_the_standalone_document(argv, tmp_path, capsys):
    _need(shutil.which("pdflatex") is not None, "pdflatex (Debian package texlive-latex-base)")
    assert main(["derive", *argv, "--latex", "--standalone"]) == 0
    document = capsys.readouterr().out
    (tmp_path / "derivation.tex").write_text(document, encoding="utf-8")
    completed = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "derivation.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    assert (tmp_path / "derivation.pdf").stat().st_size > 1000
    # Nothing runs off the page by more than a few points (the log reports each line that does).
    log = (tmp_path / "derivation.log").read_text(encoding="latin-1")
    widths = [float(w) for w in re.findall(r"Overfull \\hbox \(([0-9.]+)pt too wide", log)]
    assert max(widths, default=0.0) < 5.0, widths


def test_verify_reports_its_progress_up_to_every_configuration():
    from derive.verify import verify_layers

    calls = []
    layers = [LAYERS["relu"], LAYERS["dense"]]
    results = verify_layers(layers, progress=lambda done, total: calls.append((done, total)))
    total = sum(len(result.configurations) for result in results)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_paragraphs_keep_inline_math_and_escape_the_prose():
    """Reference: LaTeX's default font prints a text-mode > as an inverted question mark,
    and 'word' with two closing quotes; $...$ is math in LaTeX and readable text in text."""
    note = "For stride $s > 1$ and x > 0: 'correlate', SymPy's x_1"
    block = paragraph(note)
    assert to_latex([block]).strip() == (
        r"For stride $s > 1$ and x \textgreater{} 0: `correlate', SymPy's x\_1"
    )
    assert to_text([block]).strip() == "For stride s > 1 and x > 0: 'correlate', SymPy's x_1"


def test_powers_in_prose_are_math_but_not_in_code_or_math():
    latex = to_latex([paragraph("each δ/k^2, `x^2` and $\\frac{1}{k^2}$")]).strip()
    assert latex == r"each $\delta$/$k^{2}$, \texttt{x\^{}2} and $\frac{1}{k^2}$"


def test_derivations_say_what_m_is_and_which_cases_do_not_apply(capsys):
    assert main(["derive", "mse"]) == 0
    assert "The loss is a mean over m = 3 examples." in capsys.readouterr().out
    assert main(["derive", "mse", "--batch", "1"]) == 0
    assert "a mean over m = 1 example." in capsys.readouterr().out
    assert main(["derive", "avgpool2d", "--stride", "1"]) == 0
    assert "not this configuration's case" in capsys.readouterr().out  # the kron form, s = k
    assert main(["derive", "avgpool2d"]) == 0  # stride = size = 2: both forms apply
    assert "not this configuration's case" not in capsys.readouterr().out


def test_plain_text_and_latex_carry_the_same_steps():
    layer = LAYERS["avgpool2d"]
    blocks = derivation(layer, layer.example)
    text, latex = to_text(blocks), to_latex(blocks)
    assert "kron" in text and r"\operatorname{kron}" in latex
    assert "when" in text  # the kron form holds when stride = size


def test_ctrl_c_to_the_main_process_only_stops_verify_at_once():
    """Reference: exit code 130 within 3 s of SIGINT sent to the command's process alone (as
    `kill -INT` or a cancelled CI job does; the pool's workers get no signal).  Leaving the
    pool used to wait for every proof still queued or running (6-8 s here)."""
    import signal
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "cnnderive.cli", "verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal: a shell starts background jobs (`pytest &`) with SIGINT
        # ignored, the command inherits that, and Python then leaves it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(3)  # the whole sweep takes 6 s or more
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 3
    assert err.strip().splitlines()[-1] == "interrupted"
