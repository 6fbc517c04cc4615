"""Tests for nanochat/execution.py: the calculator computes and refuses everything else."""

import time

import pytest

from nanochat.execution import use_calculator


@pytest.mark.parametrize("expr,expected", [
    ("48/2", "24"), ("2+3*4", "14"), ("(2+3)*4", "20"), ("7//2", "3"), ("7%3", "1"), ("2**10", "1024"),
    ("-3+1", "-2"), ("0.1+0.2", "0.3"), ("1,000*3", "3000"), ("10/4", "2.5"), ('"strawberry".count("r")', "3"),
    ("  5 - 2 ", "3"), ("(-8)**2", "64"), ("(-8)**(1/3)*0", None),
])
def test_arithmetic(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()",
    "x", "lambda: 1", "[1, 2]", "{'a': 1}", "print(1)", "1 if 1 else 2", "'a' * 10**9", "9**9**9", "10**1000",
    "1/0", "", "a=1", "import os", "'abc'.upper()", "True + 1", "(1).__class__", "1e308*10", "'x'+'y'", "(-8)**0.5", "(-1)**0.5*2",
])
def test_refusals(expr):
    assert use_calculator(expr) is None


def test_bounded_time_and_size():
    t0 = time.time()
    assert use_calculator("99999999999**100") is None or len(use_calculator("99999999999**100")) < 1200
    assert use_calculator("2**100*" * 30 + "1") is None  # grows past the digit limit
    assert use_calculator("(" * 200 + "1" + ")" * 200) is None  # longer than the expression limit
    assert time.time() - t0 < 1.0
