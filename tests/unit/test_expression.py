"""Tests of target expressions (dispers.core.expression) against a reference evaluator over sets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.expression import (
    MAX_LENGTH,
    compile_named,
    evaluate,
    parse_positional,
    render,
)

# --- a reference: trees, their evaluation over Python sets, and their rendering to text ---------


@dataclass(frozen=True)
class Leaf:
    name: str


@dataclass(frozen=True)
class Neg:
    operand: Tree


@dataclass(frozen=True)
class Bin:
    op: str  # "and" | "or"
    left: Tree
    right: Tree


Tree = Leaf | Neg | Bin


def reference(tree: Tree, sets: dict[str, frozenset[bytes]], universe: frozenset[bytes]) -> set[bytes]:
    """Plain set semantics: NOT is the complement within the universe."""
    if isinstance(tree, Leaf):
        return set(sets[tree.name])
    if isinstance(tree, Neg):
        return set(universe) - reference(tree.operand, sets, universe)
    left = reference(tree.left, sets, universe)
    right = reference(tree.right, sets, universe)
    return left & right if tree.op == "and" else left | right


def leaves(tree: Tree) -> list[str]:
    """Leaf names in reading order."""
    if isinstance(tree, Leaf):
        return [tree.name]
    if isinstance(tree, Neg):
        return leaves(tree.operand)
    return leaves(tree.left) + leaves(tree.right)


_PREC = {"or": 1, "and": 2, "not": 3, "leaf": 4}
_SPELLINGS = {"and": ["&", "AND", "and", "And"], "or": ["|", "OR", "or", "Or"], "not": ["!", "NOT", "not"]}
_SPACE = ["", " ", "  ", "\t", "\n", " \n "]


def _prec(tree: Tree) -> int:
    if isinstance(tree, Leaf):
        return _PREC["leaf"]
    if isinstance(tree, Neg):
        return _PREC["not"]
    return _PREC[tree.op]


class Renderer:
    """Renders a tree with only the parentheses precedence needs, plus random extra ones.

    Also tracks the nesting the parser counts (parentheses and NOTs on one path), so that the
    property test stays within the documented depth limit.
    """

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.max_depth = 0

    def space(self, required: bool) -> str:
        s = self.data.draw(st.sampled_from(_SPACE))
        return s if s or not required else " "

    def op(self, name: str) -> tuple[str, bool]:
        text = self.data.draw(st.sampled_from(_SPELLINGS[name]))
        return text, text.isalpha()  # a word operator needs whitespace around it

    def render(self, tree: Tree, need: int = 0, depth: int = 0) -> str:
        # parentheses where precedence needs them, and now and then where it does not
        parens = _prec(tree) < need or self.data.draw(st.integers(0, 5)) == 0
        inner_depth = depth + 1 if parens else depth
        self.max_depth = max(self.max_depth, inner_depth)
        if isinstance(tree, Leaf):
            body = tree.name
        elif isinstance(tree, Neg):
            text, word = self.op("not")
            self.max_depth = max(self.max_depth, inner_depth + 1)
            body = text + self.space(word) + self.render(tree.operand, _PREC["not"], inner_depth + 1)
        else:
            text, word = self.op(tree.op)
            left = self.render(tree.left, _PREC[tree.op], inner_depth)
            right = self.render(tree.right, _PREC[tree.op], inner_depth)
            body = left + self.space(word) + text + self.space(word) + right
        if parens:
            return "(" + self.space(False) + body + self.space(False) + ")"
        return body


CONCEPT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}:[A-Za-z0-9_.\-]{1,8}", fullmatch=True)


@st.composite
def trees(draw: st.DrawFn) -> tuple[Tree, list[str]]:
    names = draw(st.lists(CONCEPT, min_size=1, max_size=6, unique=True))
    leaf = st.sampled_from(names).map(Leaf)
    tree = draw(
        st.recursive(
            leaf,
            lambda sub: st.one_of(
                sub.map(Neg),
                st.tuples(st.sampled_from(["and", "or"]), sub, sub).map(lambda t: Bin(*t)),
            ),
            max_leaves=24,
        )
    )
    return tree, names


UNIVERSE = frozenset(bytes([i]) for i in range(24))


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_compiled_expression_evaluates_like_the_reference(
    tree_names: tuple[Tree, list[str]], data: st.DataObject
) -> None:
    tree, names = tree_names
    renderer = Renderer(data)
    text = renderer.space(False) + renderer.render(tree) + renderer.space(False)
    assume(renderer.max_depth <= 60 and len(text) <= MAX_LENGTH and len(leaves(tree)) <= 64)
    masks = data.draw(st.lists(st.integers(0, 2**24 - 1), min_size=len(names), max_size=len(names)))
    sets = {
        name: frozenset(bytes([i]) for i in range(24) if mask >> i & 1)
        for name, mask in zip(names, masks, strict=True)
    }

    concepts, positional = compile_named(text)

    # concepts are listed once each, in order of first appearance
    assert list(concepts) == list(dict.fromkeys(leaves(tree)))
    expr = parse_positional(positional, len(concepts))
    assert render(expr) == positional  # the positional form is a fixed point
    got = evaluate(expr, [sets[c] for c in concepts], UNIVERSE)
    assert got == reference(tree, sets, UNIVERSE)


# --- precedence and spellings, worked by hand --------------------------------------------------

A, B, C = frozenset(b"ab"), frozenset(b"bc"), frozenset(b"cd")  # elements are ints, fine as a set
U = frozenset(b"abcdef")
NAMED = {"x:a": A, "x:b": B, "x:c": C}


def _eval(text: str) -> frozenset[int]:
    concepts, positional = compile_named(text)
    expr = parse_positional(positional, len(concepts))
    return evaluate(expr, [NAMED[c] for c in concepts], U)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x:a | x:b & x:c", A | (B & C)),
        ("x:a OR x:b AND x:c", A | (B & C)),
        ("(x:a | x:b) & x:c", (A | B) & C),
        ("x:a & x:b | x:c", (A & B) | C),
        ("x:a AND (x:b OR x:c)", A & (B | C)),
        ("!x:a & x:b", (U - A) & B),
        ("NOT x:a AND x:b", (U - A) & B),
        ("!(x:a & x:b)", U - (A & B)),
        ("not x:a or x:b", (U - A) | B),
        ("!x:a | !x:b & x:c", (U - A) | ((U - B) & C)),
        ("!!x:a", A),
        ("NOT NOT x:a", A),
        ("x:a&x:b", A & B),
        ("x:a|!x:c", A | (U - C)),
        ("((((x:a))))", A),
    ],
)
def test_precedence_not_over_and_over_or(text: str, expected: frozenset[int]) -> None:
    assert _eval(text) == expected


def test_compile_named_lists_each_concept_once_and_renders_positions() -> None:
    concepts, positional = compile_named("age:12-25 OR age:25-50 OR age:50-100 AND NOT age:12-25")
    assert concepts == ("age:12-25", "age:25-50", "age:50-100")
    assert positional == "((#0 | #1) | (#2 & !#0))"


def test_keyword_like_concept_names_are_concepts() -> None:
    concepts, positional = compile_named("and:x | NOT:y & or:z")
    assert concepts == ("and:x", "NOT:y", "or:z")
    assert positional == "(#0 | (#1 & #2))"


def test_parse_positional_accepts_positions_below_the_count() -> None:
    expr = parse_positional("#0 & !#2 | #1", 3)
    sets = [frozenset({b"a", b"b"}), frozenset({b"c"}), frozenset({b"b"})]
    universe = frozenset({b"a", b"b", b"c", b"d"})
    assert evaluate(expr, sets, universe) == frozenset({b"a", b"c"})


# --- errors -------------------------------------------------------------------------------------

SECRET_A, SECRET_B = "hivstatus:positive", "diagnosis:E11.9"


def _invalid(call: object, *args: object) -> DispersError:
    with pytest.raises(DispersError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.code is ErrorCode.INVALID_EXPRESSION
    return info.value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t",
        f"({SECRET_A}",
        f"{SECRET_A})",
        f"({SECRET_A} & ({SECRET_B})",
        f"{SECRET_A} &",
        f"{SECRET_A} AND",
        f"& {SECRET_A}",
        f"OR {SECRET_A}",
        f"{SECRET_A} | | {SECRET_B}",
        f"{SECRET_A} & | {SECRET_B}",
        "!",
        "NOT",
        "()",
        f"{SECRET_A} ()",
        f"{SECRET_A} {SECRET_B}",
        f"{SECRET_A} & #0",
        f"#0 | {SECRET_A}",
        f"{SECRET_A} & hivstatus",
        f"{SECRET_A} XOR {SECRET_B}",
        f"{SECRET_A} $ {SECRET_B}",
        f"{SECRET_A} && {SECRET_B}",
        f"{SECRET_A} & {SECRET_B}" + " " * MAX_LENGTH,
        "(" * 70 + SECRET_A + ")" * 70,
        "!" * 70 + SECRET_A,
        "NOT " * 70 + SECRET_A,
        " | ".join([SECRET_A] * 65),
    ],
)
def test_malformed_named_expressions_are_invalid(text: str) -> None:
    err = _invalid(compile_named, text)
    for secret in (SECRET_A, SECRET_B, "hivstatus", "positive", "diagnosis", "E11.9"):
        assert secret not in str(err)


@pytest.mark.parametrize("value", [None, 42, b"x:a", ["x:a"]])
def test_non_string_expression_is_invalid(value: object) -> None:
    _invalid(compile_named, value)


def test_the_limits_themselves_are_accepted() -> None:
    assert compile_named("(" * 64 + "x:a" + ")" * 64)[0] == ("x:a",)
    assert compile_named(" | ".join(["x:a"] * 64))[0] == ("x:a",)
    text = "x:a" + " " * (MAX_LENGTH - 3)
    assert len(text) == MAX_LENGTH
    assert compile_named(text)[0] == ("x:a",)


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("#0 & #3", 3),
        ("#5", 5),
        ("#0", 0),
        ("!#1", 1),
        ("#0 & x:a", 2),
        ("x:a", 1),
        ("#0 #1", 2),
        ("#", 1),
        ("#-1", 1),
        ("#1000", 2000),
        ("(#0 | #1", 2),
        ("", 1),
    ],
)
def test_malformed_positional_expressions_are_invalid(text: str, n: int) -> None:
    _invalid(parse_positional, text, n)


_CORRUPTIONS = [
    lambda t: t + " &",
    lambda t: t + " OR",
    lambda t: "(" + t,
    lambda t: t + ")",
    lambda t: "| " + t,
    lambda t: t + " #0",
    lambda t: t + " $",
    lambda t: t + " !",
    lambda t: t + " " * (MAX_LENGTH + 1),
]


@settings(max_examples=80, deadline=None)
@given(trees(), st.data(), st.sampled_from(range(len(_CORRUPTIONS))))
def test_errors_never_name_a_concept(
    tree_names: tuple[Tree, list[str]], data: st.DataObject, which: int
) -> None:
    tree, names = tree_names
    renderer = Renderer(data)
    text = renderer.render(tree)
    assume(renderer.max_depth <= 60 and len(text) <= MAX_LENGTH and len(leaves(tree)) <= 64)
    err = _invalid(compile_named, _CORRUPTIONS[which](text))
    for name in names:
        assert name not in str(err)


@settings(max_examples=200, deadline=None)
@given(trees(), st.data())
def test_evaluating_without_the_universe_when_none_is_needed_gives_the_same_set(
    tree_names: tuple[Tree, list[str]], data: st.DataObject
) -> None:
    """AND NOT is a set difference: when needs_universe says no complement is taken, evaluating
    with an empty universe gives exactly the reference result (the TF then skips fetching it)."""
    from dispers.core.expression import needs_universe

    tree, names = tree_names
    renderer = Renderer(data)
    text = renderer.render(tree)
    assume(renderer.max_depth <= 60 and len(text) <= MAX_LENGTH and len(leaves(tree)) <= 64)
    masks = data.draw(st.lists(st.integers(0, 2**24 - 1), min_size=len(names), max_size=len(names)))
    sets = {
        name: frozenset(bytes([i]) for i in range(24) if mask >> i & 1)
        for name, mask in zip(names, masks, strict=True)
    }
    concepts, positional = compile_named(text)
    expr = parse_positional(positional, len(concepts))
    ordered = [sets[c] for c in concepts]
    assert evaluate(expr, ordered, UNIVERSE) == reference(tree, sets, UNIVERSE)
    if not needs_universe(expr):
        assert evaluate(expr, ordered, frozenset()) == reference(tree, sets, UNIVERSE)
