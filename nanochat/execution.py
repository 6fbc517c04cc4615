"""
The calculator tool, sandboxed. The model writes <|python_start|>expr<|python_end|>; the Engine calls
use_calculator(expr) and forces <|output_start|>result<|output_end|> into the row. A refused expression gives a
short "error: ..." result that is forced the same way, so the model sees that its call failed (issue 15, item 9).

Sandboxing: nothing is passed to eval() or exec(). The expression is parsed with ast and walked by a tiny
interpreter that knows numbers, + - * / // % **, unary +/-, parentheses, string literals and str.count
(nanochat's "strawberry".count("r")). Sizes are bounded (exponents, digits, string lengths) and a deadline
stops anything slow, so a model cannot make the tool hang, allocate without bound or touch the system.

    from nanochat.execution import use_calculator
    use_calculator("48/2")   # -> "24"
    use_calculator("1/0")    # -> "error: division by zero"
"""

import re
import ast
import math
import time
import operator

MAX_EXPR_CHARS = 200
MAX_ABS_EXPONENT = 100
MAX_RESULT_DIGITS = 100
MAX_STR_LEN = 1000
TIMEOUT_S = 0.1
MAX_ERROR_CHARS = 80  # error texts quote the model's input at most this much (they are forced into its context)

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def _check_number(x):
    if isinstance(x, complex):  # (-8) ** 0.5 is complex in Python: not a calculator answer
        raise CalculatorError("complex result")
    if isinstance(x, bool):
        raise CalculatorError("booleans are not supported")
    if isinstance(x, int) and abs(x).bit_length() > MAX_RESULT_DIGITS * 3.33:
        raise CalculatorError("result too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    return x


def _eval(node, deadline):
    if time.monotonic() > deadline:
        raise CalculatorError("timeout")
    if isinstance(node, ast.Expression):
        return _eval(node.body, deadline)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _check_number(node.value)
        if isinstance(node.value, str) and len(node.value) <= MAX_STR_LEN:
            return node.value
        raise CalculatorError(f"unsupported constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        v = _eval(node.operand, deadline)
        if isinstance(v, str):
            raise CalculatorError("unary operator on a string")
        return _check_number(_UNARY[type(node.op)](v))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left, deadline), _eval(node.right, deadline)
        if isinstance(a, str) or isinstance(b, str):
            raise CalculatorError("arithmetic on strings is not supported")
        if isinstance(node.op, ast.Pow) and (abs(b) > MAX_ABS_EXPONENT or abs(a) > 1e12):
            raise CalculatorError("exponent too large")
        try:
            return _check_number(_BINOPS[type(node.op)](a, b))
        except ZeroDivisionError:
            raise CalculatorError("division by zero")
        except OverflowError:
            raise CalculatorError("result too large")
        except ValueError as e:
            raise CalculatorError(str(e))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        s, sub = _eval(node.func.value, deadline), _eval(node.args[0], deadline)
        if not (isinstance(s, str) and isinstance(sub, str)):
            raise CalculatorError(".count() needs strings")
        return s.count(sub)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def format_number(x):
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.10g}"
    return str(x)


def use_calculator(expr, timeout_s=TIMEOUT_S):
    """
    Evaluate a calculator expression. Returns the result as a string, or "error: <reason>" when the expression
    is not allowed or fails (a result is a number or a count, so it never starts with "error:").
    """
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr.strip())  # "1,000" means one thousand
    if not expr:
        return "error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"error: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        tree = ast.parse(expr, mode="eval")
        return format_number(_eval(tree, time.monotonic() + timeout_s))
    except SyntaxError:
        return "error: invalid syntax"
    except RecursionError:
        return "error: expression nested too deeply"
    except MemoryError:
        return "error: out of memory"
    except CalculatorError as e:
        return "error: " + str(e)[:MAX_ERROR_CHARS]
