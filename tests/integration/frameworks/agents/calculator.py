"""The one tool every matrix agent has: arithmetic without ``eval`` (shared by the agents beside it)."""

import ast
import operator
from collections.abc import Callable

AGENT_NAME = "calculator_agent"
INSTRUCTIONS = "Solve the arithmetic. Use the calculator tool, then reply with the number only."
TOOL_DESCRIPTION = "Evaluate an arithmetic expression such as 12 + 30."
DEFAULT_QUESTIONS = ("What is 12 times 34?", "What is 7 plus 8?")

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"{type(node).__name__} is not arithmetic")


def calculate(expression: str) -> str:
    """The value of ``expression`` as text (``"12 * 34"`` -> ``"408"``), or an error message."""
    try:
        value = _evaluate(ast.parse(expression, mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError) as error:
        return f"error: {error}"
    return str(int(value)) if float(value).is_integer() else str(value)
