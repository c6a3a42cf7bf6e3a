"""Target expressions: AND, OR, NOT and parentheses over concepts or concept positions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from dispers.core.errors import DispersError, ErrorCode

MAX_LENGTH = 4096
MAX_REFS = 64

_TOKEN = re.compile(
    r"\s*(?:(?P<op>\(|\)|&|\||!)|(?P<ref>#\d{1,3})|(?P<word>[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_.\-]+|[A-Za-z]+))"
)


@dataclass(frozen=True)
class Ref:
    """A reference to the concept at `index` of the query's concept list."""

    index: int


@dataclass(frozen=True)
class Not:
    """Everyone known to the Target Finder who is not in `operand`."""

    operand: Expr


@dataclass(frozen=True)
class And:
    """Intersection."""

    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    """Union."""

    left: Expr
    right: Expr


Expr = Union[Ref, Not, And, Or]  # noqa: UP007 (a runtime alias)


def _bad(message: str) -> DispersError:
    return DispersError(ErrorCode.INVALID_EXPRESSION, message)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    if not isinstance(text, str):
        raise _bad("the target expression is not a string")
    if len(text) > MAX_LENGTH:
        raise _bad(f"the target expression is longer than {MAX_LENGTH} characters")
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise _bad(f"the target expression does not parse (unexpected character at {pos})")
        start = m.start(m.lastgroup or 0)
        if m.group("op"):
            tokens.append(("op", m.group("op"), start))
        elif m.group("ref"):
            tokens.append(("ref", m.group("ref"), start))
        else:
            word = m.group("word")
            upper = word.upper()
            if upper in ("AND", "OR", "NOT"):
                tokens.append(("op", {"AND": "&", "OR": "|", "NOT": "!"}[upper], start))
            elif ":" in word:
                tokens.append(("concept", word, start))
            else:
                raise _bad(f"the target expression does not parse (unknown word at {start})")
        pos = m.end()
    if not tokens:
        raise _bad("the target expression is empty")
    return tokens


class _Parser:
    """Recursive descent: or := and ('|' and)*; and := unary ('&' unary)*; unary := '!' unary | atom."""

    def __init__(self, tokens: list[tuple[str, str, int]], allow_names: bool) -> None:
        self.tokens = tokens
        self.i = 0
        self.allow_names = allow_names
        self.concepts: list[str] = []
        self.refs = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def parse(self) -> Expr:
        expr = self.parse_or(0)
        tok = self.peek()
        if tok is not None:
            raise _bad(f"the target expression does not parse (unexpected token at {tok[2]})")
        return expr

    def parse_or(self, depth: int) -> Expr:
        left = self.parse_and(depth)
        while (tok := self.peek()) is not None and tok[:2] == ("op", "|"):
            self.take()
            left = Or(left, self.parse_and(depth))
        return left

    def parse_and(self, depth: int) -> Expr:
        left = self.parse_unary(depth)
        while (tok := self.peek()) is not None and tok[:2] == ("op", "&"):
            self.take()
            left = And(left, self.parse_unary(depth))
        return left

    def parse_unary(self, depth: int) -> Expr:
        if depth > 64:
            raise _bad("the target expression is nested too deeply")
        tok = self.peek()
        if tok is None:
            raise _bad("the target expression does not parse (it ends too early)")
        if tok[:2] == ("op", "!"):
            self.take()
            return Not(self.parse_unary(depth + 1))
        if tok[:2] == ("op", "("):
            self.take()
            inner = self.parse_or(depth + 1)
            close = self.peek()
            if close is None or close[:2] != ("op", ")"):
                raise _bad(f"the target expression does not parse (unclosed parenthesis at {tok[2]})")
            self.take()
            return inner
        self.take()
        self.refs += 1
        if self.refs > MAX_REFS:
            raise _bad(f"the target expression has more than {MAX_REFS} references")
        if tok[0] == "ref":
            if self.allow_names:
                raise _bad(f"the target expression mixes positions and names (at {tok[2]})")
            return Ref(int(tok[1][1:]))
        if tok[0] == "concept":
            if not self.allow_names:
                raise _bad(f"the target expression may only use positions (at {tok[2]})")
            if tok[1] not in self.concepts:
                self.concepts.append(tok[1])
            return Ref(self.concepts.index(tok[1]))
        raise _bad(f"the target expression does not parse (unexpected token at {tok[2]})")


def parse_positional(text: str, n_concepts: int) -> Expr:
    """Parse an expression over positions (#0, #1, ...), checking each is < n_concepts."""
    expr = _Parser(_tokenize(text), allow_names=False).parse()
    for index in refs(expr):
        if index >= n_concepts:
            raise _bad(f"the target expression refers to position {index} of {n_concepts} concepts")
    return expr


def compile_named(text: str) -> tuple[tuple[str, ...], str]:
    """Compile an expression over concept names into (concepts, positional expression)."""
    parser = _Parser(_tokenize(text), allow_names=True)
    expr = parser.parse()
    return tuple(parser.concepts), render(expr)


def refs(expr: Expr) -> list[int]:
    """Every position the expression refers to."""
    if isinstance(expr, Ref):
        return [expr.index]
    if isinstance(expr, Not):
        return refs(expr.operand)
    return refs(expr.left) + refs(expr.right)


def render(expr: Expr) -> str:
    """Positional text of an expression, fully parenthesised."""
    if isinstance(expr, Ref):
        return f"#{expr.index}"
    if isinstance(expr, Not):
        return f"!{render(expr.operand)}"
    op = "&" if isinstance(expr, And) else "|"
    return f"({render(expr.left)} {op} {render(expr.right)})"


def evaluate(expr: Expr, sets: Sequence[frozenset[bytes]], universe: frozenset[bytes]) -> frozenset[bytes]:
    """Evaluate over pseudonym sets; NOT is the complement within `universe`."""
    if isinstance(expr, Ref):
        return sets[expr.index]
    if isinstance(expr, Not):
        return universe - evaluate(expr.operand, sets, universe)
    if isinstance(expr, And):
        # X AND NOT Y is X minus Y (every set lies within the universe): no complement to build.
        if isinstance(expr.right, Not):
            return evaluate(expr.left, sets, universe) - evaluate(expr.right.operand, sets, universe)
        if isinstance(expr.left, Not):
            return evaluate(expr.right, sets, universe) - evaluate(expr.left.operand, sets, universe)
        return evaluate(expr.left, sets, universe) & evaluate(expr.right, sets, universe)
    return evaluate(expr.left, sets, universe) | evaluate(expr.right, sets, universe)


def needs_universe(expr: Expr) -> bool:
    """Whether `evaluate` will take a complement (a NOT that is not one side of an AND), so the
    Target Finder fetches the universe only then."""
    if isinstance(expr, Ref):
        return False
    if isinstance(expr, Not):
        return True
    if isinstance(expr, And):
        if isinstance(expr.right, Not):
            return needs_universe(expr.left) or needs_universe(expr.right.operand)
        if isinstance(expr.left, Not):
            return needs_universe(expr.right) or needs_universe(expr.left.operand)
    return needs_universe(expr.left) or needs_universe(expr.right)
