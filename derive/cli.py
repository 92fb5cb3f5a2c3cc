"""``cnnderive derive`` and ``cnnderive verify``.

SymPy is imported only when one of these commands runs, never when the parser
is built, so the training commands stay free of it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

# Command-line option -> the size or parameter names it sets (a layer has at most one of each).
SIZE_OPTIONS = {
    "batch": ("batch",),
    "height": ("in_height",),
    "width": ("in_width",),
    "channels": ("in_channels", "channels"),
    "out_channels": ("out_channels",),
    "kernel": ("kernel_height", "kernel_width"),
    "stride": ("stride",),
    "padding": ("padding",),
    "size": ("size",),
    "in_features": ("in_features",),
    "out_features": ("out_features",),
    "features": ("features",),
    "classes": ("classes",),
}
SIZE_HELP = {
    "batch": "batch size m",
    "height": "input height H",
    "width": "input width W",
    "channels": "input channels C",
    "out_channels": "output channels (conv2d)",
    "kernel": "kernel height and width (conv2d)",
    "stride": "stride s",
    "padding": "zero padding p (conv2d)",
    "size": "pool window size k",
    "in_features": "input features (dense)",
    "out_features": "output features (dense)",
    "features": "features per example (activations, softmax)",
    "classes": "classes K (losses)",
}
MAX_DERIVATION_ELEMENTS = (
    400  # input elements: beyond this a step-by-step derivation is unreadable and slow
)

# Layers whose proof, not their size, limits a derivation: every output of a softmax row
# depends on all K inputs of the row, and the whole derivation of one row grows about as
# K**power even with the row's sum held as one symbol (derive.verify.is_zero).  The
# seconds per row are fitted to measured derivations (AMD EPYC, one core: softmax, 1 row
# of 40 / 100 features, 4.2 / 53.5 s; softmax cross-entropy, 3 rows of 20 / 50 classes,
# 6.5 / 51.4 s).  A derivation estimated above MAX_DERIVATION_SECONDS is refused, naming
# the largest K that fits.
ROW_COUPLED = {
    # layer: (option of the row length K, seconds per row at K = 1, power of K)
    "softmax": ("features", 1.45e-4, 2.78),
    "softmax_cross_entropy": ("classes", 2.47e-3, 2.26),
}
MAX_DERIVATION_SECONDS = 60


def add_parsers(commands) -> None:
    derive = commands.add_parser(
        "derive",
        add_help=False,
        help="print the derivation of one layer's gradients, step by step",
        description="Derive a layer's gradients with SymPy and print the derivation: the forward "
        "equation, the chain rule, the partials element by element, the matrix form, the closed "
        "form and its verification.  Sizes default to the seeds' worked example.",
    )
    derive.add_argument(
        "layer",
        nargs="?",
        help="conv2d, maxpool2d, avgpool2d, dense, flatten, sigmoid, relu, tanh, "
        "softmax, bce, bce_with_logits, softmax_cross_entropy or mse (or --equation)",
    )
    derive.add_argument(
        "--equation",
        metavar='"[NAME:] EQ"',
        help="a layer written as one equation in index notation, e.g. "
        '"Z[n,o] = sum[f](X[n,f] * W[f,o])" (see the README\'s grammar)',
    )
    derive.add_argument(
        "-h", "--help", action=_HelpWithExamples, help="show this help message and exit"
    )
    sizes = derive.add_argument_group(
        "sizes",
        "A size left out takes the value of the layer's worked example (listed below).",
    )
    for option in SIZE_OPTIONS:
        sizes.add_argument(
            "--" + option.replace("_", "-"),
            dest=option,
            type=int,
            metavar="N",
            help=SIZE_HELP[option],
        )
    derive.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")
    derive.add_argument(
        "--standalone", action="store_true", help="with --latex: a complete LaTeX document"
    )
    derive.set_defaults(run=run_derive)

    verify = commands.add_parser(
        "verify",
        help="prove every closed form on the sweep of configurations",
        description="Prove every layer's forward pass and closed-form gradients against SymPy's "
        "derivative of its index-level definition, on every configuration of the sweep.",
    )
    verify.add_argument("--json", action="store_true", help="print the results as JSON")
    verify.add_argument(
        "--seed-size",
        action="store_true",
        help="prove conv2d (28x28x1 input, 9x9x1x20 kernel) and dense (2000 -> 10) at the "
        "seed network's size instead",
    )
    verify.add_argument(
        "--network-sizes",
        action="store_true",
        help="instead, prove every layer configuration of the shipped networks (seed, toy, "
        "lenet) at its real size (about two minutes; CI runs it)",
    )
    verify.add_argument(
        "--all-sizes",
        action="store_true",
        help="prove the closed forms for symbolic sizes, stride included; a layer that cannot "
        "be is said so, with the reason, and proven on the sweep",
    )
    verify.add_argument(
        "--layer", action="append", metavar="NAME", help="only this layer (repeatable)"
    )
    verify.add_argument(
        "--equation",
        action="append",
        metavar='"[NAME:] EQ"',
        help="prove the gradients derived from this equation instead (repeatable)",
    )
    verify.set_defaults(run=run_verify)
    _add_check_parser(commands)


def _add_check_parser(commands) -> None:
    check = commands.add_parser(
        "check",
        help="judge a gradient you wrote for an equation layer, for all sizes",
        description="Judge a claimed gradient of an equation layer for every size: 'proven' "
        "(exit 0), or 'refuted' (exit 1) with the smallest sizes at which it fails and one "
        "element where it differs, with both values. In the claim, dA is the gradient with "
        "respect to the array A and dZ the upstream gradient of the output Z; the claim's "
        "indices range over A's axes, every other index over its bound or an axis where it "
        "stands alone, and a read outside an array is zero.",
    )
    check.add_argument("--equation", required=True, metavar="EQ", help="the layer, e.g. "
                       "'Z[n,i,j,o] = sum[c,u,v](X[n, i+u, j+v, c] * W[u,v,c,o])'")  # fmt: skip
    check.add_argument("--claim", required=True, metavar="CLAIM", help="the gradient, e.g. "
                       "'dX[n,h,w,c] = sum[i,j,o](dZ[n,i,j,o] * W[h-i, w-j, c, o])'")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.set_defaults(run=run_check)


def run_check(args) -> int:
    """``cnnderive check``: a claimed gradient judged for all sizes."""
    from derive.claims import ClaimError, judge_claim
    from derive.equation import EquationError

    try:
        outcome, arrays = judge_claim(args.equation, args.claim)
    except (EquationError, ClaimError) as error:
        raise _usage_error(str(error)) from None
    example = outcome.counterexample
    shapes = None
    if example is not None:
        shapes = {name: [example.sizes.get(d, "?") for d in dims] for name, dims in arrays.items()}
    if args.json:
        payload = {"status": outcome.status, "sizes": shapes if shapes else "all"}
        if example is not None:
            payload["counterexample"] = {
                "element": list(example.element),
                "derived": str(example.left),
                "claimed": str(example.right),
            }
        if outcome.status == "undecided":
            payload["reason"] = outcome.reason
        print(json.dumps(payload, indent=2))
        return 0 if outcome.status == "proven" else 1
    claimed = args.claim.split("=", 1)[0].strip()
    name = claimed.split("[", 1)[0]
    if outcome.status == "proven":
        print(f"proven: {claimed} is the gradient for all sizes the equation allows")
        return 0
    if outcome.status == "undecided":
        print(f"undecided: {outcome.reason}")
        return 1
    text = ", ".join(f"{array}.shape = ({', '.join(map(str, s))})" for array, s in shapes.items())
    element = ", ".join(map(str, example.element))
    print(f"refuted: {claimed} is not the gradient. Smallest sizes where it fails: {text}.")
    print(
        f"At {name}[{element}]: the chain rule gives {example.left}; the claim gives {example.right}."
    )
    return 1


class _HelpWithExamples(argparse.Action):
    """``derive --help``, with each layer's worked-example sizes (the defaults) added.
    They come from the catalogue, which imports SymPy: so only when help is asked for,
    not whenever the parser is built."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import textwrap

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.description = textwrap.fill(parser.description, 79)
        parser.epilog = "defaults (each layer's worked example):\n" + "\n".join(
            "  " + line for line in _example_defaults()
        )
        parser.print_help()
        parser.exit()


def _example_defaults() -> list[str]:
    """Each layer's worked-example sizes, as 'conv2d: --batch 1 --height 3 ...'."""
    from derive.layers import LAYERS

    parts = []
    for layer in LAYERS.values():
        by_name = {symbol.name: value for symbol, value in layer.example.items()}
        flags = []
        for option, names in SIZE_OPTIONS.items():
            value = next((by_name[n] for n in names if n in by_name), None)
            if value is not None:
                flags.append(f"--{option.replace('_', '-')} {value}")
        parts.append(f"{layer.name + ':':<23}{' '.join(flags)}")
    return parts


def _usage_error(message: str):
    from cnnderive_common.commandline import UsageError

    return UsageError(message)


def _layer(name: str):
    from derive.layers import LAYERS

    if name not in LAYERS:
        raise _usage_error(f"unknown layer {name!r}; choose one of: {', '.join(LAYERS)}")
    return LAYERS[name]


def equation_layer(text: str, default_name: str = "equation"):
    """The layer an ``--equation`` option defines; a bad equation is a usage error."""
    from derive.equation import EquationError, layer_from_named_equation

    try:
        return layer_from_named_equation(text, default_name)
    except EquationError as error:
        raise _usage_error(f"equation: {error}") from None


def configuration_from(layer, args):
    """The layer's worked example with the sizes given on the command line."""
    config = dict(layer.example)
    by_name = {symbol.name: symbol for symbol in config}
    for option, names in SIZE_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        targets = [by_name[n] for n in names if n in by_name]
        if not targets:
            valid = [o for o, ns in SIZE_OPTIONS.items() if any(n in by_name for n in ns)]
            flags = ", ".join("--" + o.replace("_", "-") for o in valid) or "none"
            raise _usage_error(
                f"{layer.name} has no option --{option.replace('_', '-')}; its options are: {flags}"
            )
        for target in targets:
            config[target] = value
    param_names = {p.symbol.name for p in layer.params}
    for symbol, value in config.items():
        if symbol.name not in param_names and value < 1:
            flag = next(
                ("--" + o.replace("_", "-") for o, ns in SIZE_OPTIONS.items() if symbol.name in ns),
                symbol.name,
            )
            raise _usage_error(f"{flag} must be at least 1, got {value}")
    problems = layer.violated(config)
    if problems:
        raise _usage_error(f"{layer.name}: " + "; ".join(problems))
    elements = sum(int(math.prod(shape)) for shape in layer.shapes(config).values())
    if elements > MAX_DERIVATION_ELEMENTS:
        raise _usage_error(
            f"{layer.name} with {layer.describe(config)} has {elements} input elements; a step-by-step "
            f"derivation is limited to {MAX_DERIVATION_ELEMENTS}: choose smaller sizes "
            f"(`cnnderive verify --seed-size` proves the seed network's size)"
        )
    _refuse_slow_proofs(layer, config)
    return config


def estimated_seconds(layer, config) -> float | None:
    """About how long the proof of a row-coupled layer (ROW_COUPLED) takes, or None."""
    from derive.layers import LAYERS

    if layer.name not in ROW_COUPLED or LAYERS.get(layer.name) is not layer:
        return None  # (an equation layer may take a catalogue name)
    option, per_row, power = ROW_COUPLED[layer.name]
    by_name = {symbol.name: value for symbol, value in config.items()}
    row = by_name[SIZE_OPTIONS[option][0]]
    rows = by_name.get("batch", 1)
    return per_row * rows * row**power


def _refuse_slow_proofs(layer, config) -> None:
    seconds = estimated_seconds(layer, config)
    if seconds is None or seconds <= MAX_DERIVATION_SECONDS:
        return
    option, per_row, power = ROW_COUPLED[layer.name]
    rows = {symbol.name: value for symbol, value in config.items()}.get("batch", 1)
    largest = int((MAX_DERIVATION_SECONDS / (per_row * rows)) ** (1 / power))
    flag = "--" + option.replace("_", "-")
    raise _usage_error(
        f"{layer.name} with {layer.describe(config)} would take an estimated "
        f"{_duration(seconds)} (a row's every output depends on all its {option}, and the "
        f"time grows about as {option}^{power:g} per row); derivations are "
        f"limited to about {MAX_DERIVATION_SECONDS} s: choose {flag} {largest} or less "
        f"at this batch size, or a smaller --batch"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.0f} hours"


# Plain-text symbols written another way where the output cannot encode them
# (PYTHONIOENCODING=ascii, an old terminal).
ASCII_NAMES = {
    "δ": "delta",
    "∂": "d",
    "Σ": "sum",
    "×": "x",
    "≤": "<=",
    "≥": ">=",
    "≠": "!=",
    "⌊": "floor(",
    "⌋": ")",
    "⌈": "ceil(",
    "⌉": ")",
    "…": "...",
    "−": "-",
    "·": "*",
    "→": "->",
    "\u0303": "~",  # combining tilde (X̃, the padded input)
}


def _encodable(text: str) -> str:
    """``text``, with ASCII names for its symbols if stdout's encoding lacks them (and a
    note saying so on stderr); a character still unencodable then is an error."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        pass
    except LookupError:  # an encoding Python does not know: leave it to the write
        return text
    spelled = "".join(ASCII_NAMES.get(char, char) for char in text)
    try:
        spelled.encode(encoding)
    except UnicodeEncodeError as error:
        raise _usage_error(
            f"the output encoding ({encoding}) cannot show "
            f"{error.object[error.start : error.end]!a}; set PYTHONIOENCODING=utf-8"
        ) from None
    print(
        f"note: the output encoding ({encoding}) cannot show Greek letters and math "
        "symbols; they are spelled in ASCII (delta, d, sum, <=, ...); "
        "PYTHONIOENCODING=utf-8 shows them",
        file=sys.stderr,
    )
    return spelled


def run_derive(args) -> int:
    from derive import report

    if (args.layer is None) == (args.equation is None):
        raise _usage_error(
            "name a layer (e.g. cnnderive derive conv2d) or give --equation, not both"
            if args.layer
            else 'name a layer (e.g. cnnderive derive conv2d) or give --equation "Z[n,o] = ..."'
        )
    layer = _layer(args.layer) if args.layer else equation_layer(args.equation)
    if args.standalone and not args.latex:
        raise _usage_error("--standalone wraps LaTeX output: use it with --latex")
    config = configuration_from(layer, args)
    seconds = estimated_seconds(layer, config)
    if seconds is not None and seconds >= 5:
        print(f"note: this derivation takes an estimated {_duration(seconds)}", file=sys.stderr)
    blocks = report.derivation(layer, config)
    text = (
        report.to_latex(blocks, standalone=args.standalone)
        if args.latex
        else report.to_text(blocks)
    )
    sys.stdout.write(_encodable(text))
    failed = any(block.kind == "text" and block.text.startswith("FAILED") for block in blocks)
    return 1 if failed else 0


def run_verify(args) -> int:
    from derive.layers import LAYERS
    from derive.rewrites import as_row, verify_swaps
    from derive.verify import verify_layers, verify_stable_forms

    if args.network_sizes and (
        args.seed_size or args.layer or args.equation or getattr(args, "all_sizes", False)
    ):
        raise _usage_error("--network-sizes proves the networks' layers: use it alone")
    if args.equation:
        if args.layer or args.seed_size:
            raise _usage_error(
                "--equation proves the equations given; leave out --layer and --seed-size"
            )
        layers = []
        for number, text in enumerate(args.equation):
            layer = equation_layer(
                text, f"equation{number + 1}" if len(args.equation) > 1 else "equation"
            )
            if any(layer.name == other.name for other in layers):
                raise _usage_error(
                    f'two equations are named {layer.name!r}; name each one: "NAME: EQ"'
                )
            layers.append(layer)
    else:
        layers = [_layer(name) for name in args.layer or list(LAYERS)]
    if getattr(args, "all_sizes", False):
        if args.seed_size:
            raise _usage_error("--all-sizes and --seed-size exclude each other: choose one")
        return run_verify_all_sizes(args, layers)
    if args.seed_size:
        layers = [layer for layer in layers if layer.seed_size]
        if not layers:
            raise _usage_error(
                "none of the chosen layers has a seed-size configuration (conv2d and dense do)"
            )
    start = time.perf_counter()
    from cnnderive_common.commandline import proof_progress

    with proof_progress() as progress:
        if args.network_sizes:
            from derive.network_sizes import verify_network_sizes

            results = verify_network_sizes(progress=progress)
        else:
            results = verify_layers(layers, seed_size=args.seed_size, progress=progress)
    if not args.seed_size and not args.layer and not args.equation and not args.network_sizes:
        results.append(verify_stable_forms())
        results += [as_row(result) for result in verify_swaps()]
    elapsed = time.perf_counter() - start
    ok = all(result.ok for result in results)
    if args.json:
        payload = {
            "ok": ok,
            "seconds": round(elapsed, 3),
            "seed_size": args.seed_size,
            "network_sizes": args.network_sizes,
            "layers": [
                {
                    "layer": r.name,
                    "ok": r.ok,
                    "configurations": len(r.configurations),
                    "cpu_seconds": round(r.seconds, 3),
                    "closed_forms": {
                        gradient: {
                            case or "closed form": len(configs) for case, configs in by_case.items()
                        }
                        for gradient, by_case in r.cases.items()
                    },
                    "error": r.error,
                }
                for r in results
            ],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(f"{'layer':<24}{'configurations':>15}  {'status':<8}{'cpu seconds':>12}")
        for r in results:
            status = "proven" if r.ok else "FAILED"
            print(f"{r.name:<24}{len(r.configurations):>15}  {status:<8}{r.seconds:>12.2f}")
        if any(r.name == "stable forms" for r in results):
            from derive import functions

            print(
                "\nstable forms: the overflow-free forms in which the generated code evaluates "
                f"{', '.join(functions.STABLE_FORMS)}, proven equal to the textbook functions "
                "for a positive and for a negative argument (one configuration per function)."
            )
        for r in results:
            if not r.ok:
                print(f"\n{r.name}: {r.error}")
        what = (
            "seed-size proofs"
            if args.seed_size
            else "proofs at the networks' sizes"
            if args.network_sizes
            else "sweep"
        )
        print(
            f"\n{'all closed forms proven' if ok else 'SOME PROOFS FAILED'}; {what} took {elapsed:.1f} s wall time"
        )
    return 0 if ok else 1


def run_verify_all_sizes(args, layers) -> int:
    """``verify --all-sizes``: symbolic sizes where the prover can, the sweep where it
    cannot (said, with the reason)."""
    from derive.allsizes import prove_layer, summary, to_json
    from derive.verify import verify_layers

    start = time.perf_counter()
    results = [prove_layer(layer) for layer in layers]
    # Layers the prover could not decide for all sizes are proven on the sweep instead.
    fallback = [
        layer for layer, r in zip(layers, results) if r.route == "sweep" or r.status == "undecided"
    ]
    sweeps = {}
    if fallback:
        from cnnderive_common.commandline import proof_progress

        with proof_progress() as progress:
            sweeps = {r.name: r for r in verify_layers(fallback, progress=progress)}
    elapsed = time.perf_counter() - start
    ok = all(r.status == "proven" or (r.layer in sweeps and sweeps[r.layer].ok) for r in results)
    if args.json:
        payload = {"ok": ok, "seconds": round(elapsed, 3), "layers": []}
        for r in results:
            entry = to_json(r)
            if r.layer in sweeps:
                entry["sweep"] = {
                    "ok": sweeps[r.layer].ok,
                    "configurations": len(sweeps[r.layer].configurations),
                    "error": sweeps[r.layer].error,
                }
            payload["layers"].append(entry)
        print(json.dumps(payload, indent=2))
        return 0 if ok else 1
    print(f"{'layer':<24}{'route':<17}{'status':<11}{'seconds':>8}")
    for r in results:
        status = r.status
        if r.layer in sweeps:
            status = "swept" if sweeps[r.layer].ok else "FAILED"
        seconds = r.seconds + (sweeps[r.layer].seconds if r.layer in sweeps else 0.0)
        print(f"{r.layer:<24}{r.route:<17}{status:<11}{seconds:>8.2f}")
    print()
    for r in results:
        for line in summary(r):
            print(line)
        if r.layer in sweeps:
            sweep = sweeps[r.layer]
            if sweep.ok:
                print(
                    f"{r.layer}: proven on the sweep instead: {len(sweep.configurations)} "
                    "configurations"
                )
            else:
                print(f"{r.layer}: the sweep FAILED: {sweep.error}")
    proven = sum(1 for r in results if r.status == "proven")
    verdict = "all closed forms proven" if ok else "SOME PROOFS FAILED"
    print(
        f"\n{verdict}: {proven} of {len(results)} layers for all sizes, "
        f"{len(fallback)} on the sweep; {elapsed:.1f} s wall time"
    )
    return 0 if ok else 1
