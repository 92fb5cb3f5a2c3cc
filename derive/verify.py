"""The proof: SymPy derives each gradient from the index-level definition, and every
closed form must equal it, element by element, on every configuration of the sweep.

For one configuration of a layer:

1. every input becomes an array of element symbols (``x_{0,1,2,0}``, ...);
2. the index-level definition is expanded into one expression per output element,
   and the forward tree must produce exactly those expressions;
3. the upstream gradient becomes symbols ``delta_{...}`` and SymPy differentiates:
   ``dL/dx_e = sum_k delta_k * dZ_k/dx_e`` (the chain rule; for a loss, ``dL/dx_e``);
4. each closed-form tree is evaluated on the same symbols, and the difference from
   the derived gradient must simplify to zero in every element.

Max pooling needs numbers to decide which element is a window's maximum: its
definition is differentiated symbolically and then both sides are evaluated at
integer inputs full of ties.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import sympy

from derive import functions
from derive.ir import Case
from derive.layer import Configuration, Layer
from derive.multilinear import Polynomial
from derive.symbolic import Evaluator, symbol_array, total


class VerificationError(AssertionError):
    """A closed form (or forward tree) differs from what SymPy derived."""


# ---------------------------------------------------------------------------
# Equality of two expressions
# ---------------------------------------------------------------------------


def is_zero(expr) -> bool:
    """Whether ``expr`` simplifies to zero, trying cheap steps before expensive ones.

    Polynomial closed forms (convolution, pooling, dense) cancel on construction or
    after ``expand``; the activations and losses need their named functions rewritten
    as exponentials and the logarithms expanded before ``simplify`` sees the zero."""
    if isinstance(expr, Polynomial):
        return expr == 0
    expr = sympy.sympify(expr)
    if expr == 0:
        return True
    if _zero_with_denominators_as_symbols(expr):
        return True
    if expr.has(sympy.Piecewise, sympy.Max, sympy.Min):
        expr = sympy.piecewise_fold(expr.rewrite(sympy.Piecewise))
        if expr == 0 or sympy.simplify(expr) == 0:
            return True
    if sympy.expand(expr) == 0:
        return True
    rewritten = expr.rewrite(sympy.exp)
    for step in (sympy.cancel, sympy.simplify):
        if step(rewritten) == 0:
            return True
    logs = sympy.expand_log(rewritten, force=True)
    return sympy.simplify(logs) == 0


def _zero_with_denominators_as_symbols(expr) -> bool:
    """Whether ``expr`` is zero with every sum it divides by taken as a symbol of its own.

    A softmax row's gradient divides by the sum of the row's K exponentials: putting
    that sum over a common denominator multiplies out K-term sums, so that proving a
    row costs about K**3.5 (a minute at K = 40).  Held as one symbol S, the same
    identity is a small rational function.  An identity in independent S holds for
    S = that sum too, so True is a proof; False proves nothing, and is_zero goes on."""
    sums = {
        power.base
        for power in expr.atoms(sympy.Pow)
        if power.exp.is_negative and isinstance(power.base, sympy.Add)
    }
    if not sums:
        return False
    replaced = expr.xreplace({total: sympy.Dummy(positive=True) for total in sums})
    return sympy.cancel(sympy.together(replaced)) == 0


def first_difference(
    name: str, derived: np.ndarray, closed: np.ndarray, layer: Layer, config_text: str
):
    derived = np.asarray(derived, dtype=object)
    closed = np.asarray(closed, dtype=object)
    if derived.shape != closed.shape:
        raise VerificationError(
            f"{layer.name} {name} on [{config_text}]: the tree gives shape {closed.shape}, "
            f"the definition (and SymPy's derivative of it) {derived.shape}"
        )
    known_zero: set = set()
    for index in np.ndindex(*derived.shape):
        if not _is_zero_remembered(derived[index] - closed[index], known_zero):
            raise VerificationError(
                f"{layer.name} {name} on [{config_text}]: first differing element {list(index)}: "
                f"derived {_readable(derived[index])}, closed form {_readable(closed[index])}"
            )


def _renamed(expr: sympy.Expr) -> tuple[sympy.Expr, dict]:
    """``expr`` with its symbols renamed to canonical ones (with the same assumptions),
    and the renaming.  Expressions that differ only in their symbols' names, like the
    elements of an elementwise layer (z_{0,1} where another has z_{0,2}), mostly rename to
    the same expression.  Renaming symbols one to one commutes with differentiation and
    keeps zero zero, so a derivative or a proof of zero of the renamed expression serves
    all of them (at the networks' sizes, thousands)."""
    symbols = sorted(expr.free_symbols, key=lambda s: (s.name.split("_")[0], s.name))
    renaming = {s: sympy.Symbol(f"_canonical{n}", **s.assumptions0) for n, s in enumerate(symbols)}
    return expr.xreplace(renaming), renaming


def _is_zero_remembered(difference, known_zero: set) -> bool:
    """is_zero, remembering the differences found zero up to a renaming of their symbols
    (see _renamed)."""
    if isinstance(difference, Polynomial):
        return difference == 0
    difference = sympy.sympify(difference)
    canonical, _ = _renamed(difference)
    if canonical in known_zero:
        return True
    if is_zero(difference):
        known_zero.add(canonical)
        return True
    return False


def _readable(value):
    return value.as_expr() if isinstance(value, Polynomial) else value


# ---------------------------------------------------------------------------
# Differentiation
# ---------------------------------------------------------------------------


def chain_rule(
    outputs: np.ndarray,
    upstream: np.ndarray | None,
    wrt: Mapping[str, np.ndarray],
    method: str = "diff",
) -> dict[str, np.ndarray]:
    """``dL/dv = sum_k upstream_k * d outputs_k / dv`` for every element v of ``wrt``.

    Only the elements an output actually depends on are differentiated (the free
    symbols of that output), which keeps a convolution's proof linear in its size.

    ``method="diff"`` uses ``sympy.diff`` on SymPy expressions.  ``method="coefficients"``
    works on ``Polynomial`` tables (see ``derive.multilinear``) and reads each
    derivative off the table by coefficient extraction; it is exact for polynomials
    (convolution and dense layers are linear in each operand) and far cheaper at the
    seed network's size.
    """
    terms: dict[str, dict] = {name: defaultdict(list) for name in wrt}
    if method == "coefficients":
        position = {}
        for name, array in wrt.items():
            for index in np.ndindex(*array.shape):
                (number,) = array[index].variables()
                position[number] = (name, index)
        for out_index in np.ndindex(*outputs.shape):
            expr = outputs[out_index]
            weight = 1 if upstream is None else upstream[out_index]
            for number, derivative in expr.partials().items():
                if number in position:
                    name, index = position[number]
                    terms[name][index].append(weight * derivative)
    else:
        position = {}
        for name, array in wrt.items():
            for index in np.ndindex(*array.shape):
                position[array[index]] = (name, index)
        derivatives: dict = {}  # see _renamed
        for out_index in np.ndindex(*outputs.shape):
            expr = sympy.sympify(outputs[out_index])
            weight = sympy.S.One if upstream is None else upstream[out_index]
            canonical, renaming = _renamed(expr)
            back = {new: old for old, new in renaming.items()}
            for symbol in expr.free_symbols:
                if symbol in position:
                    name, index = position[symbol]
                    key = canonical, renaming[symbol]
                    if key not in derivatives:
                        derivatives[key] = canonical.diff(renaming[symbol])
                    terms[name][index].append(weight * derivatives[key].xreplace(back))
    gradients = {}
    for name, array in wrt.items():
        out = np.empty(array.shape, dtype=object)
        for index in np.ndindex(*array.shape):
            out[index] = total(terms[name].get(index, [sympy.S.Zero]))
        gradients[name] = out
    return gradients


# ---------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------


@dataclass
class Proof:
    """Everything computed while proving one configuration (the LaTeX report shows it)."""

    layer: Layer
    config: Configuration
    inputs: dict[str, np.ndarray]
    defined: np.ndarray
    upstream: np.ndarray | None
    derived: dict[str, np.ndarray]
    closed: dict[str, dict[str, np.ndarray]]  # gradient name -> case name -> value
    substitution: dict = field(default_factory=dict)


def prove(layer: Layer, config: Configuration, method: str = "diff", rng_seed: int = 0) -> Proof:
    """Prove the forward tree and every applicable closed form of ``layer`` on ``config``.

    Raises ``VerificationError`` naming the first differing element."""
    text = layer.describe(config)
    problems = layer.violated(config)
    if problems:
        raise ValueError(f"{layer.name}: invalid configuration [{text}]: " + "; ".join(problems))
    shapes = layer.shapes(config)
    polynomial = method == "coefficients"
    inputs = {
        item.name: symbol_array(
            item.name if item.differentiable else item.latex.lower(),
            shapes[item.name],
            polynomial,
            real=True,
        )
        for item in layer.inputs
    }
    sizes = dict(config)

    substitution = {}
    tree_inputs = dict(inputs)
    if layer.samples is not None:
        values = layer.samples(shapes, np.random.default_rng(rng_seed))
        for name, value in values.items():
            tree_inputs[name] = value
            for index in np.ndindex(*value.shape):
                substitution[inputs[name][index]] = sympy.Integer(int(value[index]))

    evaluator = Evaluator(tree_inputs, sizes)
    for name, node in layer.forward:
        try:
            evaluator.env[name] = evaluator(node)
        except (ValueError, IndexError) as error:  # e.g. operands whose shapes do not fit
            raise VerificationError(
                f"{layer.name} forward ({name}) on [{text}]: the tree cannot be evaluated: {error}"
            ) from error
    out = np.asarray(evaluator.env[layer.output], dtype=object)

    # Expanded over the definition's own index ranges: the tree's output shape is checked
    # against them, not assumed.
    defined = layer.definition.expand(inputs, sizes)
    first_difference("forward", substituted(defined, substitution), out, layer, text)

    upstream = None
    if layer.kind != "loss":
        upstream = symbol_array("delta", defined.shape, polynomial, real=True)
        evaluator.env[layer.upstream] = upstream
    wrt = {item.name: inputs[item.name] for item in layer.inputs if item.differentiable}
    derived = chain_rule(defined, upstream, wrt, method=method)

    closed: dict[str, dict[str, np.ndarray]] = {}
    for gradient in layer.gradients:
        expected = substituted(derived[gradient.wrt], substitution)
        closed[gradient.name] = {}
        for case in applicable_cases(gradient.cases, evaluator):
            try:
                value = evaluator(case.tree)
            except (ValueError, IndexError) as error:  # e.g. operands whose shapes do not fit
                raise VerificationError(
                    f"{layer.name} {gradient.name} ({case.name or 'closed form'}) on [{text}]: "
                    f"the closed form cannot be evaluated: {error}"
                ) from error
            first_difference(
                f"{gradient.name} ({case.name or 'closed form'})", expected, value, layer, text
            )
            closed[gradient.name][case.name] = value
    return Proof(layer, config, inputs, defined, upstream, derived, closed, substitution)


def applicable_cases(cases: tuple[Case, ...], evaluator: Evaluator) -> list[Case]:
    return [case for case in cases if evaluator.condition(case.condition)]


def substituted(array: np.ndarray, substitution: dict) -> np.ndarray:
    if not substitution:
        return array
    out = np.empty(array.shape, dtype=object)
    for index in np.ndindex(*array.shape):
        out[index] = sympy.sympify(array[index]).xreplace(substitution)
    return out


# ---------------------------------------------------------------------------
# A whole layer, and everything
# ---------------------------------------------------------------------------


@dataclass
class LayerResult:
    """The verified description of one layer: which closed forms hold, on which configurations."""

    name: str
    ok: bool
    seconds: float
    configurations: list[str]
    cases: dict[str, dict[str, list[str]]]  # gradient -> case name -> configurations proven
    error: str = ""
    # gradient -> case name -> size or parameter name -> [smallest, largest] value proven
    ranges: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)


# The layers of the running ``verify_layers`` call.  Worker processes are forked, so they
# inherit this list and prove exactly the Layer objects they were given (layers hold
# lambdas, which cannot be pickled, and looking them up by name could prove another layer).
_LAYERS_BEING_PROVEN: list[Layer] = []


def _ignore_ctrl_c() -> None:
    """In a proof worker: Ctrl-C at a terminal reaches the whole process group; the main
    process handles it and stops the workers, which need not print tracebacks of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prove_chunk(args) -> list[tuple]:
    """Prove some configurations of one layer (runs in a worker process).

    Returns (number, description, proven cases, seconds, error, {size name: value}) per configuration."""
    layer_number, indices, method = args
    layer = _LAYERS_BEING_PROVEN[layer_number]
    configs = configurations_of(layer, method)
    results = []
    for number in indices:
        config = configs[number]
        values = {s.name: v for s, v in config.items()}
        start = time.perf_counter()
        try:
            proof = prove(layer, config, method=method)
            cases = {g: list(by_case) for g, by_case in proof.closed.items()}
            error = ""
        except VerificationError as failure:
            cases, error = {}, str(failure)
        results.append(
            (number, layer.describe(config), cases, time.perf_counter() - start, error, values)
        )
    return results


def configurations_of(layer: Layer, method: str) -> list[Configuration]:
    if method == "coefficients":
        return [layer.seed_size] if layer.seed_size else []
    return layer.configurations()


def verify_layers(
    layers: list[Layer],
    *,
    seed_size: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[LayerResult]:
    """Prove every layer on its sweep (or at the seed network's size), in parallel.

    ``progress(done, total)`` is called as configurations are proven.
    """
    method = "coefficients" if seed_size else "diff"
    jobs = []
    for number, layer in enumerate(layers):
        count = len(configurations_of(layer, method))
        # Chunks of about an eighth of a layer's sweep keep both workers busy to the end.
        chunk = max(1, count // 8)
        for first in range(0, count, chunk):
            jobs.append((number, list(range(first, min(count, first + chunk))), method))
    workers = workers or min(2, os.cpu_count() or 1)
    collected: dict[str, list] = {layer.name: [] for layer in layers}
    total, done = sum(len(job[1]) for job in jobs), 0

    def finished(job, results):
        nonlocal done
        collected[layers[job[0]].name].extend(results)
        done += len(job[1])
        if progress is not None:
            progress(done, total)

    _LAYERS_BEING_PROVEN[:] = layers
    try:
        if workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=_ignore_ctrl_c
            )
            try:
                futures = [pool.submit(_prove_chunk, job) for job in jobs]
                for job, future in zip(jobs, futures):
                    finished(job, future.result())
                pool.shutdown()
            except BaseException:
                # Ctrl-C or an error: leaving the pool as a with-block does would wait for
                # every proof still queued or running, minutes of them.  The workers are
                # stopped first, so that the pool marks what is left as failed rather than
                # waiting (a dead worker, too, fails the pool instead of hanging it).  Then
                # the pool's own thread is let finish, now at once: left running, it is
                # joined at exit, where a Ctrl-C printed a traceback.
                processes = list((getattr(pool, "_processes", None) or {}).values())
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.join()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        else:
            for job in jobs:
                finished(job, _prove_chunk(job))
    finally:
        _LAYERS_BEING_PROVEN.clear()
    out = []
    for layer in layers:
        results = sorted(collected[layer.name])
        errors = [r[4] for r in results if r[4]]
        cases: dict[str, dict[str, list[str]]] = {
            g.name: {c.name: [] for c in g.cases} for g in layer.gradients
        }
        ranges: dict = {g.name: {c.name: {} for c in g.cases} for g in layer.gradients}
        for _, text, proven, _, _, values in results:
            for gradient, names in proven.items():
                for name in names:
                    cases[gradient][name].append(text)
                    for key, value in values.items():
                        low, high = ranges[gradient][name].get(key, [value, value])
                        ranges[gradient][name][key] = [min(low, value), max(high, value)]
        missing = [
            f"{g} / {c}"
            for g, by_case in cases.items()
            for c, configs in by_case.items()
            if not configs
        ]
        if missing and not errors and results:
            errors.append(
                f"{layer.name}: no configuration of the sweep exercised " + ", ".join(missing)
            )
        out.append(
            LayerResult(
                name=layer.name,
                ok=not errors and bool(results),
                seconds=sum(r[3] for r in results),
                configurations=[r[1] for r in results],
                cases=cases,
                error=errors[0] if errors else ("" if results else "no configurations"),
                ranges=ranges,
            )
        )
    return out


def verify_stable_forms() -> LayerResult:
    """The stable forms the printer emits equal the textbook forms (case split on the sign)."""
    start = time.perf_counter()
    u = functions.STABLE_FORM_SYMBOL
    t = sympy.Symbol("t", positive=True)
    errors = []
    for name, (textbook, stable) in functions.STABLE_FORMS.items():
        for sign in (1, -1):
            difference = (textbook - stable).xreplace({u: sign * t})
            if not is_zero(difference):
                errors.append(
                    f"stable form of {name} differs from the textbook form for u = {sign} t: {difference}"
                )
    return LayerResult(
        name="stable forms",
        ok=not errors,
        seconds=time.perf_counter() - start,
        configurations=[f"{name}, u > 0 and u < 0" for name in functions.STABLE_FORMS],
        cases={},
        error=errors[0] if errors else "",
    )
