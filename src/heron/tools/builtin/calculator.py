"""`calculator`: arithmetic on a Python-like expression, read with `ast` and never executed.

Only numbers, + - * / // % **, unary signs, parentheses and a short list of math functions and
constants are understood; anything else (names, attributes, calls to anything else) is an error.
Limits keep one expression cheap: its length, its nesting, and the size of every intermediate
integer (so `9**9**9` is refused before it is computed, not after minutes of work).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated, TypeAlias

from pydantic import Field

from heron.tools.registry import (
    Tool,
    ToolArguments,
    ToolContext,
    ToolFailure,
    ToolInputError,
    ToolRegistry,
)

Number: TypeAlias = int | float

MAX_LENGTH = 1000
MAX_DEPTH = 200  # operations chained or nested; `1+1+...` of 200 terms is 200 deep
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_ROUND_DIGITS = 100


class CalculatorError(Exception):
    pass


class ExpressionError(CalculatorError):
    """The expression is not one this calculator reads; correct it."""


class EvaluationError(CalculatorError):
    """The expression is well formed but has no (representable) value."""


def _too_large() -> EvaluationError:
    return EvaluationError("the result is too large")


def _checked(value: Number) -> Number:
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise _too_large()
    elif not math.isfinite(value):
        raise _too_large() if not math.isnan(value) else EvaluationError("the result is undefined")
    return value


def _multiply(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
        raise _too_large()
    return a * b


def _power(base: Number, exponent: Number) -> Number:
    # Refuse before computing: an integer result has about exponent * log2(|base|) bits.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > MAX_INT_BITS
    ):
        raise _too_large()
    result = base**exponent
    if isinstance(result, complex):
        raise EvaluationError("a negative number to a fractional power is not a real number")
    return result


def _round(value: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int):
        raise ExpressionError("round(): the number of digits must be a whole number")
    if abs(digits) > MAX_ROUND_DIGITS:
        raise ExpressionError(f"round(): at most {MAX_ROUND_DIGITS} digits")
    return round(value, digits) if digits else round(value)


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_HINTS: dict[type[ast.AST], str] = {
    ast.BitXor: "^ is not supported; write powers with **",
    ast.Attribute: "attribute access is not allowed",
    ast.Compare: "comparisons are not supported",
    ast.BoolOp: "and/or are not supported",
}
# name: (function, fewest arguments, most arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def evaluate(expression: str) -> Number:
    """The value of `expression`; ExpressionError or EvaluationError says why there is none."""
    text = expression.strip()
    if not text:
        raise ExpressionError("the expression is empty")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not a valid expression ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is nested too deeply") from None
    if _depth(tree) > MAX_DEPTH:
        raise ExpressionError(f"the expression nests or chains more than {MAX_DEPTH} operations")
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise EvaluationError("division by zero") from None
    except OverflowError:
        raise _too_large() from None


def _depth(tree: ast.AST) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "complex numbers" if isinstance(value, complex) else repr(value)
            raise ExpressionError(f"{kind} cannot be calculated with; only numbers can")
        return _checked(value)
    if isinstance(node, ast.BinOp):
        binary = _BINARY.get(type(node.op))
        if binary is None:
            raise ExpressionError(_HINTS.get(type(node.op), "this operator is not supported"))
        return _checked(binary(_eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp):
        unary = _UNARY.get(type(node.op))
        if unary is None:
            raise ExpressionError("only + and - may precede a number")
        return _checked(unary(_eval(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        known = ", ".join(sorted(_CONSTANTS))
        raise ExpressionError(f"unknown name {node.id!r} (the constants are {known})")
    if isinstance(node, ast.Call):
        return _checked(_call(node))
    hint = _HINTS.get(type(node), f"{type(node).__name__} expressions are not supported")
    raise ExpressionError(f"{hint}; use numbers, + - * / // % **, parentheses and functions")


def _call(node: ast.Call) -> Number:
    known = ", ".join(sorted(_FUNCTIONS))
    if isinstance(node.func, ast.Attribute):
        raise ExpressionError(_HINTS[ast.Attribute])
    if not isinstance(node.func, ast.Name):
        raise ExpressionError(f"only these functions can be called: {known}")
    name = node.func.id
    if name not in _FUNCTIONS:
        raise ExpressionError(f"unknown function {name!r} (available: {known})")
    function, fewest, most = _FUNCTIONS[name]
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ExpressionError(f"{name}() takes plain positional arguments")
    if not fewest <= len(node.args) <= most:
        count = str(fewest) if fewest == most else f"{fewest} or {most}"
        raise ExpressionError(f"{name}() takes {count} argument{'s' if most > 1 else ''}")
    args = [_eval(a) for a in node.args]
    try:
        return function(*args)
    except ValueError:
        shown = ", ".join(map(format_number, args))
        raise EvaluationError(f"{name}() is undefined for {shown}") from None


def format_number(value: Number) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


class CalculatorArgs(ToolArguments):
    expression: Annotated[
        str,
        Field(
            max_length=MAX_LENGTH,
            description="An arithmetic expression, e.g. `(2 + 3) * 4 ** 2` or `sqrt(2) / 2`.",
            examples=["17 * 23", "round(100 * 1.07 ** 10, 2)"],
        ),
    ]


async def calculate(ctx: ToolContext, args: CalculatorArgs) -> str:
    try:
        return format_number(evaluate(args.expression))
    except ExpressionError as exc:
        raise ToolInputError(str(exc)) from exc
    except EvaluationError as exc:
        raise ToolFailure(str(exc)) from exc


calculator = Tool(
    name="calculator",
    description=(
        "Evaluate an arithmetic expression exactly and return its value. Use it instead of doing "
        "arithmetic yourself. Supports numbers (1_000, 2.5, 1e-3), + - * / // % ** (power), "
        "parentheses, the functions sqrt, sin, cos, tan, asin, acos, atan (radians), log(x) or "
        "log(x, base), log10, log2, exp, abs, round(x) or round(x, digits), floor, ceil, and the "
        "constants pi, e and tau."
    ),
    arguments=CalculatorArgs,
    function=calculate,
)


def register_tools(registry: ToolRegistry) -> None:
    registry.register(calculator)
