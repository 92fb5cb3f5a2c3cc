"""A layer's generated code, for its page: the module that codegen renders for that layer
alone, loaded so that the page's numeric check runs the very code it shows, and each
gradient's statements picked out of the backward function to stand beside its closed form.
"""

from __future__ import annotations

import ast
import itertools
import textwrap
import types

from codegen.render import render
from derive.layer import Layer
from derive.verify import LayerResult

_loaded = itertools.count()


def module_source(layer: Layer, result: LayerResult) -> str:
    """The source of ``layer``'s generated module with only this layer's functions in it,
    exactly as `cnnderive generate` writes it (same templates, same ruff formatting).
    ``result`` must be a successful proof: codegen renders proven closed forms only."""
    if not result.ok:
        raise ValueError(f"{layer.name} is not proven; codegen emits no code for it")
    return render([layer], {layer.name: result})[f"{layer.module}.py"]


def load(layer: Layer, source: str) -> types.ModuleType:
    """``source`` (from module_source) as a module of the generated package, so that its
    ``from . import _kernels`` finds generated/_kernels.py."""
    module = types.ModuleType(f"generated._book_{layer.module}_{next(_loaded)}")
    module.__package__ = "generated"
    code = compile(source, f"<{layer.module}.py generated for {layer.name}>", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the code codegen just rendered
    return module


def function_source(source: str, name: str) -> str:
    """The text of top-level function ``name`` in ``source`` (decorators have none here)."""
    function = _function(ast.parse(source), name)
    lines = source.splitlines()
    return "\n".join(lines[function.lineno - 1 : function.end_lineno]) + "\n"


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"no function {name} in the generated module")


def _written(statement: ast.stmt) -> set[str]:
    """Names that ``statement`` assigns or fills in place (NumPy's ``out=`` argument):
    generated code often makes an array first and writes its values by a later call."""
    names = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.keyword) and node.arg == "out":
            names |= {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
    return names


def _read(statement: ast.stmt) -> set[str]:
    return {
        node.id
        for node in ast.walk(statement)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }


def _reads_cache(statement: ast.stmt) -> bool:
    """``name = cache["name"]``: how backward gets back what forward kept."""
    return (
        isinstance(statement, ast.Assign)
        and isinstance(statement.value, ast.Subscript)
        and isinstance(statement.value.value, ast.Name)
        and statement.value.value.id == "cache"
    )


def gradient_statements(source: str, function: str, gradient: str) -> str:
    """The statements of ``function`` that compute ``gradient``: those that write it and,
    before them, those that write what they read (transitively), in the function's
    order.  Reading the cache is left out: the page shows the whole function below."""
    body = _function(ast.parse(source), function).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    chosen = {index for index, s in enumerate(body) if gradient in _written(s)}
    if not chosen:
        raise KeyError(f"{function} computes no {gradient}")
    wanted = set().union(*(_read(body[index]) for index in chosen))
    for index in range(max(chosen) - 1, -1, -1):
        statement = body[index]
        if index in chosen or _reads_cache(statement):
            continue
        if _written(statement) & wanted:
            chosen.add(index)
            wanted |= _read(statement)
    lines = source.splitlines()
    pieces = [
        textwrap.dedent("\n".join(lines[body[i].lineno - 1 : body[i].end_lineno]))
        for i in sorted(chosen)
    ]
    return "\n".join(pieces) + "\n"
