"""The equation language: one line of index notation that defines a layer's forward pass.

    Z[n,i,j,o] = b[o] + sum[c,u,v](X[n, 2*i+u, 2*j+v, c] * W[u,v,c,o])

Grammar (``NAME`` is a letter or underscore followed by letters, digits, underscores)::

    equation  := NAME "[" NAME ("," NAME)* "]" "=" expr
    expr      := term (("+" | "-") term)*
    term      := unary (("*" | "/") unary)*
    unary     := ("+" | "-") unary | power
    power     := atom ("**" unary)?
    atom      := NUMBER | "(" expr ")" | reduction | call | element
    reduction := ("sum" | "max" | "mean") "[" bound ("," bound)* "]" "(" expr ")"
    bound     := NAME ("<" INTEGER)?
    call      := FUNCTION "(" expr ")"          FUNCTION: exp log tanh sigmoid relu sqrt abs
    element   := array "[" index ("," index)* "]"
    array     := NAME | "pad" "(" NAME ("," INTEGER)+ ")"
    index     := an integer-affine combination of index names: 2*i+u, i+2*u, h-1, 3

``pad(X, 0, 1, 1, 0)`` is X with that many zeros added before and after each axis; its
indices address the padded array.  Parsing only checks the form; ``derive.equation.model``
gives the indices their ranges and checks the meaning.

Every error is an ``EquationError``: one line that quotes the offending part of the
equation and says what would be accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FUNCTIONS = ("abs", "exp", "log", "relu", "sigmoid", "sqrt", "tanh")
REDUCTIONS = ("max", "mean", "sum")


class EquationError(ValueError):
    """A problem with an equation, as one line: what is wrong, where, and what would do."""

    def __init__(self, message: str, text: str = "", start: int | None = None, end=None):
        if start is not None and text:
            end = max(end if end is not None else start + 1, start + 1)
            fragment = text[start:end].strip() or text[start:].strip()[:20] or "the end"
            message = f"at column {start + 1} ({fragment!r}): {message}"
        super().__init__(message)


# ---------------------------------------------------------------------------
# Syntax tree
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """``sum(coefficient * index) + constant``; coefficients are integers (or, for the
    catalogue's run-time stride and padding, integer parameters)."""

    coefficients: tuple[tuple[str, object], ...]  # (index name, coefficient), sorted by name
    constant: object = 0

    @staticmethod
    def of(coefficients: dict, constant=0) -> "Affine":
        kept = tuple(sorted((k, c) for k, c in coefficients.items() if c != 0))
        return Affine(kept, constant)

    @property
    def indices(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.coefficients)

    def coefficient(self, index: str):
        return dict(self.coefficients).get(index, 0)

    def standalone(self) -> str | None:
        """The index if this is that index alone (``u``), else None."""
        if self.constant == 0 and len(self.coefficients) == 1 and self.coefficients[0][1] == 1:
            return self.coefficients[0][0]
        return None

    def __str__(self) -> str:
        parts = []
        for name, coefficient in self.coefficients:
            parts.append(name if coefficient == 1 else f"{coefficient}*{name}")
        if self.constant != 0 or not parts:
            parts.append(str(self.constant))
        return "+".join(parts).replace("+-", "-")


@dataclass(frozen=True)
class Node:
    start: int
    end: int


@dataclass(frozen=True)
class Number(Node):
    value: str


@dataclass(frozen=True)
class Element(Node):
    array: str
    indices: tuple[Affine, ...]
    padding: tuple[int, ...] | None  # pad(X, ...) widths, one per axis
    index_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Call(Node):
    function: str  # one of FUNCTIONS, or "+", "-", "*", "/", "**", "neg"
    arguments: tuple[Node, ...]


@dataclass(frozen=True)
class Reduction(Node):
    kind: str  # sum, max, mean
    indices: tuple[str, ...]
    bounds: tuple[int | None, ...]
    body: Node


@dataclass(frozen=True)
class Equation:
    text: str
    output: str
    output_indices: tuple[str, ...]
    output_span: tuple[int, int]
    rhs: Node


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>\*\*|//|[-+*/%()\[\],=<])|(?P<bad>\S))"
)


@dataclass(frozen=True)
class Token:
    kind: str  # number, name, op, end
    text: str
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:  # only blanks were left
            break
        kind = match.lastgroup
        start, end = match.start(kind), match.end(kind)
        if kind == "bad":
            raise EquationError(
                f"unexpected character {text[start]!r}; an equation uses names, numbers, "
                "+ - * / ** ( ) [ ] , = and <",
                text,
                start,
            )
        tokens.append(Token(kind, match.group(kind), start, end))
        position = match.end()
    tokens.append(Token("end", "", len(text), len(text)))
    return tokens


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------

_CLOSING = {"(": ")", "[": "]"}


class _Parser:
    def __init__(self, text: str, parameters: dict):
        self.text = text
        self.tokens = tokenize(text)
        self.position = 0
        self.parameters = parameters
        self.open: list[Token] = []  # brackets not closed yet, for the error message

    # -- token helpers ---------------------------------------------------------
    @property
    def token(self) -> Token:
        return self.tokens[self.position]

    def error(self, message: str, token: Token | None = None, end: int | None = None):
        token = token or self.token
        return EquationError(message, self.text, token.start, end if end else token.end)

    def take(self, text: str | None = None, kind: str | None = None) -> Token | None:
        token = self.token
        if (text is None or token.text == text) and (kind is None or token.kind == kind):
            if token.kind != "end":
                self.position += 1
            return token
        return None

    def expect(self, text: str, what: str) -> Token:
        token = self.take(text)
        if token is None:
            found = "the end of the equation" if self.token.kind == "end" else repr(self.token.text)
            if text in (")", "]") and self.open:
                opener = self.open[-1]
                raise EquationError(
                    f"the {opener.text!r} opened here is not closed: expected {text!r} {what}, "
                    f"found {found}",
                    self.text,
                    opener.start,
                )
            raise self.error(f"expected {text!r}{' ' + what if what else ''}, found {found}")
        return token

    def opening(self, text: str) -> Token:
        token = self.expect(text, "")
        self.open.append(token)
        return token

    def closing(self, what: str) -> Token:
        opener = self.open[-1]
        token = self.expect(_CLOSING[opener.text], what)
        self.open.pop()
        return token

    # -- grammar ---------------------------------------------------------------
    def equation(self) -> Equation:
        name = self.take(kind="name")
        if name is None:
            raise self.error(
                "an equation starts with the output and its indices, e.g. Z[n,i,j,o] = ..."
            )
        if self.token.text != "[":
            raise self.error(
                f"the output needs its indices, e.g. {name.text}[n,o] = ...; write the output "
                "and its indices on the left"
            )
        self.opening("[")
        indices = [self.index_name("an output index")]
        while self.take(","):
            indices.append(self.index_name("an output index"))
        close = self.closing("after the output's indices")
        if self.token.text != "=":
            raise self.error("expected '=' after the output, e.g. Z[n,o] = ...")
        self.take("=")
        if self.token.kind == "end":
            raise self.error("the right side of the equation is missing")
        rhs = self.expr()
        if self.token.kind != "end":
            if self.token.text in (")", "]"):
                raise self.error(f"this {self.token.text!r} closes nothing")
            raise self.error("unexpected text after a complete expression; join terms with + - * /")
        seen = set()
        for token_name in indices:
            if token_name in seen:
                raise EquationError(
                    f"output index {token_name!r} appears twice on the left; each output "
                    "axis needs its own index",
                    self.text,
                    name.start,
                    close.end,
                )
            seen.add(token_name)
        return Equation(self.text, name.text, tuple(indices), (name.start, close.end), rhs)

    def index_name(self, what: str) -> str:
        token = self.take(kind="name")
        if token is None:
            raise self.error(f"expected {what} (a name)")
        return token.text

    def expr(self) -> Node:
        node = self.term()
        while self.token.text in ("+", "-"):
            op = self.take()
            right = self.term()
            node = Call(node.start, right.end, op.text, (node, right))
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.token.text in ("*", "/", "//", "%"):
            op = self.take()
            if op.text in ("//", "%"):
                raise EquationError(
                    f"{op.text!r} is only meaningful on integers; values use + - * / **",
                    self.text,
                    op.start,
                    op.end,
                )
            right = self.unary()
            node = Call(node.start, right.end, op.text, (node, right))
        return node

    def unary(self) -> Node:
        if self.token.text in ("+", "-"):
            op = self.take()
            inner = self.unary()
            return inner if op.text == "+" else Call(op.start, inner.end, "neg", (inner,))
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.take("**"):
            exponent = self.unary()
            return Call(base.start, exponent.end, "**", (base, exponent))
        return base

    def atom(self) -> Node:
        token = self.token
        if token.kind == "number":
            self.take()
            return Number(token.start, token.end, token.text)
        if token.text == "(":
            self.opening("(")
            inner = self.expr()
            self.closing("to close the parenthesis")
            return inner
        if token.kind == "name":
            following = self.tokens[self.position + 1].text
            if token.text in REDUCTIONS and following == "[":
                return self.reduction()
            if token.text == "pad" and following == "(":
                return self.element()
            if following == "(" and token.text in REDUCTIONS:
                raise self.error(
                    f"{token.text} needs its indices before its body: {token.text}[u,v](...)"
                )
            if following == "(":
                return self.call()
            if following == "[":
                return self.element()
            if token.text in FUNCTIONS or token.text in REDUCTIONS:
                raise self.error(
                    f"{token.text} needs its argument: {token.text}(...)"
                    if token.text in FUNCTIONS
                    else f"{token.text} needs its indices and body: {token.text}[u,v](...)"
                )
            raise self.error(
                f"{token.text!r} stands alone: an array needs its indices, e.g. {token.text}[n,i]; "
                "index names appear only inside [...]"
            )
        if token.kind == "end":
            raise self.error("the expression ends too early: a value is missing")
        raise self.error(
            f"expected a value (a number, an array element, a function call), found {token.text!r}"
        )

    def call(self) -> Node:
        name = self.take()
        if name.text not in FUNCTIONS:
            raise self.error(
                f"unknown function {name.text!r}; known functions: {', '.join(FUNCTIONS)} "
                f"(and the reductions {', '.join(REDUCTIONS)}[...](...))",
                name,
            )
        self.opening("(")
        argument = self.expr()
        if self.token.text == ",":
            raise self.error(f"{name.text} takes one argument")
        close = self.closing(f"to close {name.text}(")
        return Call(name.start, close.end, name.text, (argument,))

    def reduction(self) -> Node:
        kind = self.take()
        self.opening("[")
        indices, bounds = [], []
        while True:
            index = self.take(kind="name")
            if index is None:
                raise self.error(
                    f"expected an index to {kind.text} over, e.g. {kind.text}[u,v](...)"
                )
            bound = None
            if self.take("<"):
                parameter = self.token
                if parameter.kind == "name" and parameter.text in self.parameters:
                    self.take()  # a run-time parameter as the bound (catalogue only)
                    indices.append(index.text)
                    bounds.append(self.parameters[parameter.text])
                    if not self.take(","):
                        break
                    continue
                number = self.take(kind="number")
                if number is None or not number.text.isdigit() or int(number.text) < 1:
                    raise self.error(
                        f"the bound of {index.text!r} must be a positive integer, e.g. {index.text}<3",
                        number or self.token,
                    )
                bound = int(number.text)
            if index.text in indices:
                raise self.error(f"index {index.text!r} is listed twice in this {kind.text}", index)
            indices.append(index.text)
            bounds.append(bound)
            if not self.take(","):
                break
        self.closing(f"after the indices of {kind.text}[...]")
        if self.token.text != "(":
            raise self.error(f"expected '(' and the body after {kind.text}[...]")
        self.opening("(")
        body = self.expr()
        close = self.closing(f"to close {kind.text}[...](")
        return Reduction(kind.start, close.end, kind.text, tuple(indices), tuple(bounds), body)

    def element(self) -> Node:
        start = self.token
        padding = None
        if start.text == "pad":
            self.take()
            self.opening("(")
            array = self.take(kind="name")
            if array is None:
                raise self.error(
                    "pad(...) takes an array name and one width per axis: pad(X, 0, 1, 1, 0)"
                )
            widths = []
            while self.take(","):
                number = self.take(kind="number") or self.take(kind="name")
                if number is not None and number.kind == "name" and number.text in self.parameters:
                    widths.append(self.parameters[number.text])  # catalogue only
                    continue
                if number is None or not number.text.isdigit():
                    raise self.error(
                        "a padding width is a whole number of zeros, e.g. pad(X, 0, 1, 1, 0)",
                        number or self.token,
                    )
                widths.append(int(number.text))
            if not widths:
                raise self.error(
                    "pad(...) needs one width per axis of the array: pad(X, 0, 1, 1, 0)"
                )
            self.closing("to close pad(")
            name, padding = array.text, tuple(widths)
        else:
            name = self.take().text
            if name in FUNCTIONS or name in REDUCTIONS:
                raise self.error(f"{name!r} is a function; it cannot be an array name", start)
        self.opening("[")
        indices, spans = [], []
        while True:
            first = self.token
            indices.append(self.affine())
            spans.append((first.start, self.tokens[self.position - 1].end))
            if not self.take(","):
                break
        close = self.closing(f"after the indices of {name}")
        return Element(start.start, close.end, name, tuple(indices), padding, tuple(spans))

    # -- indices -----------------------------------------------------------------
    def affine(self) -> Affine:
        """An index: parsed as an expression, then required to be integer-affine."""
        first = self.token
        if first.text in ("]", ","):
            raise self.error("an index is missing here")
        terms, constant = self.affine_sum()
        last = self.tokens[self.position - 1]
        if self.token.text not in (",", "]"):
            bad = self.token
            if bad.text in ("//", "%", "/"):
                raise EquationError(
                    f"index {self.text[first.start : self.index_end()].strip()!r} is not affine: "
                    f"{bad.text!r} is not allowed in an index; use integer multiples and sums, e.g. 2*i+u",
                    self.text,
                    first.start,
                    self.index_end(),
                )
            if (bad.kind == "end" or bad.text == ")") and self.open:
                opener = self.open[-1]
                raise EquationError(
                    f"the {opener.text!r} opened here is not closed: expected ',' or ']' after "
                    "an index",
                    self.text,
                    opener.start,
                )
            raise self.error("expected ',' or ']' after an index")
        del last
        return Affine.of(terms, constant)

    def index_end(self) -> int:
        depth, position = 0, self.position
        while self.tokens[position].kind != "end":
            text = self.tokens[position].text
            if text in ("(", "["):
                depth += 1
            elif text in (")", "]"):
                if depth == 0:
                    break
                depth -= 1
            elif text == "," and depth == 0:
                break
            position += 1
        return self.tokens[position].start

    def affine_sum(self):
        terms, constant = self.affine_product()
        while self.token.text in ("+", "-"):
            sign = -1 if self.take().text == "-" else 1
            more, more_constant = self.affine_product()
            for name, value in more.items():
                terms[name] = terms.get(name, 0) + sign * value
            constant = constant + sign * more_constant
        return terms, constant

    def affine_product(self):
        start = self.token
        terms, constant = self.affine_atom()
        while self.token.text == "*":
            self.take()
            right_terms, right_constant = self.affine_atom()
            if terms and right_terms:
                raise EquationError(
                    f"index {self.text[start.start : self.index_end()].strip()!r} is not affine: "
                    "it multiplies two indices; an index may only be multiplied by an integer",
                    self.text,
                    start.start,
                    self.index_end(),
                )
            if terms:
                terms = {k: v * right_constant for k, v in terms.items()}
                constant = constant * right_constant
            else:
                terms = {k: v * constant for k, v in right_terms.items()}
                constant = constant * right_constant
        return terms, constant

    def affine_atom(self):
        token = self.token
        if token.text == "-":
            self.take()
            terms, constant = self.affine_atom()
            return {k: -v for k, v in terms.items()}, -constant
        if token.kind == "number":
            self.take()
            if not token.text.isdigit():
                raise self.error("an index takes whole numbers only", token)
            return {}, int(token.text)
        if token.kind == "name":
            self.take()
            if self.token.text in ("(", "["):
                raise EquationError(
                    f"{token.text}{self.token.text}...{_CLOSING[self.token.text]} inside an index is not "
                    "affine; an index is an integer combination of index names",
                    self.text,
                    token.start,
                    self.index_end(),
                )
            if token.text in self.parameters:
                return {}, self.parameters[token.text]  # a run-time parameter (catalogue only)
            return {token.text: 1}, 0
        if token.text == "(":
            self.opening("(")
            result = self.affine_sum()
            self.closing("in the index")
            return result
        if token.text in ("]", ",") or token.kind == "end":
            raise self.error("an index ends too early: a term is missing")
        raise self.error(f"{token.text!r} cannot appear in an index; use e.g. 2*i+u")


def parse(text: str, parameters=None) -> Equation:
    """The syntax tree of ``text``, or an ``EquationError``.

    ``parameters`` maps names to integer SymPy symbols that may stand in indices as
    coefficients or offsets (``s*i + u - p``) and as padding widths: the catalogue's
    run-time stride and padding."""
    if not text.strip():
        raise EquationError("the equation is empty; write e.g. Z[n,o] = sum[f](X[n,f] * W[f,o])")
    return _Parser(text, dict(parameters or {})).equation()
