"""
Tests for nanochat/execution.py: the calculator computes, and refuses everything else with a short "error: ..."
result (which the Engine forces like any result). No wall-clock asserts: the deadline is tested with a fake clock.

    pytest -q tests/test_execution.py
"""

import pytest

import nanochat.execution as execution
from nanochat.execution import use_calculator, MAX_EXPR_CHARS


@pytest.mark.parametrize("expr,expected", [
    ("48/2", "24"), ("2+3*4", "14"), ("(2+3)*4", "20"), ("7//2", "3"), ("7%3", "1"), ("2**10", "1024"),
    ("-3+1", "-2"), ("0.1+0.2", "0.3"), ("1,000*3", "3000"), ("10/4", "2.5"), ('"strawberry".count("r")', "3"),
    ("  5 - 2 ", "3"), ("(-8)**2", "64"),
])
def test_arithmetic(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()",
    "x", "lambda: 1", "[1, 2]", "{'a': 1}", "print(1)", "1 if 1 else 2", "'a' * 10**9", "9**9**9", "10**1000",
    "1/0", "", "a=1", "import os", "'abc'.upper()", "True + 1", "(1).__class__", "1e308*10", "'x'+'y'", "(-8)**0.5",
    "(-1)**0.5*2", "(-8)**(1/3)*0",
])
def test_refusals(expr):
    out = use_calculator(expr)
    assert out.startswith("error: ") and len(out) < 120, out


@pytest.mark.parametrize("expr,reason", [
    ("1/0", "division by zero"), ("7//0", "division by zero"), ("7 % 0", "division by zero"),
    ("2++", "invalid syntax"), ("", "empty expression"), ("x", "unsupported syntax: Name"),
    ("9**9**9", "exponent too large"), ("(-8)**0.5", "complex result"), ("1e308*10", "result is not finite"),
    ("'a' * 3", "arithmetic on strings is not supported"), ("True + 1", "unsupported constant True"),
])
def test_error_texts(expr, reason):
    assert use_calculator(expr) == "error: " + reason


def test_error_text_is_bounded():
    # an error quotes the model's input at most MAX_ERROR_CHARS characters: it is forced into the context
    out = use_calculator("b'" + "x" * 150 + "'")
    assert out.startswith("error: unsupported constant b'xxx") and len(out) <= len("error: ") + execution.MAX_ERROR_CHARS


def test_size_limits():
    # each bound stops its case with its own reason (a missing bound computes a huge number or string instead)
    assert use_calculator("99999999999**100") == "error: result too large"  # ~1100 digits > MAX_RESULT_DIGITS
    assert use_calculator("2**100*" * 10 + "1") == "error: result too large"  # 2**1000: grows past the digit limit
    assert use_calculator("2**100*" * 3 + "1") == str(2 ** 300)  # 91 digits: within it
    assert use_calculator("10**1000") == "error: exponent too large"
    long_expr = "(" * 100 + "1" + ")" * 100
    assert len(long_expr) > MAX_EXPR_CHARS and use_calculator(long_expr) == \
        f"error: expression longer than {MAX_EXPR_CHARS} characters"
    assert use_calculator("(" * 99 + "1" + ")" * 99) == "1"  # just under the limit: computed
    assert use_calculator("'" + "a" * 150 + "'.count('a')") == "150"
    assert use_calculator("'a' * 10**9") == "error: arithmetic on strings is not supported"  # no string growth


def test_deadline_with_a_fake_clock(monkeypatch):
    # the deadline is checked at every node: with a clock that advances one second per reading, an expression of
    # a few nodes passes a 100 s deadline and one of many nodes does not (no real time is measured)
    ticks = iter(range(10**6))
    monkeypatch.setattr(execution.time, "monotonic", lambda: float(next(ticks)))
    assert use_calculator("1+2", timeout_s=100) == "3"
    assert use_calculator("+".join(["1"] * 90), timeout_s=100) == "error: timeout"
    assert use_calculator("1+2", timeout_s=-1) == "error: timeout"
