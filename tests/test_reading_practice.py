"""
Tests for tasks/reading_practice.py: reading exercises for pretraining show only train-module documents, every answer
is a verbatim span of the document it cites, and each exercise fits its character budget.

    pytest -q tests/test_reading_practice.py
"""

import re

import pytest

from tasks.reading_practice import reading_exercises, format_exercise, document_text
from tasks.stdlib_docs import harvest, module_split, squash
from tasks.stdlib_qa import READING_TYPES

MODULES = ["json", "textwrap", "shlex", "os", "heapq", "glob", "base64", "fnmatch"]
DOC = re.compile(r"^\[(\d+)\] Title: (\S+)\nContent: ", re.M)
QA = re.compile(r"^Question: (.+)\nAnswer: (.+) \[(\d+)\]$", re.M)


@pytest.fixture(scope="module")
def records():
    return harvest(modules=MODULES, progress=False, include_topics=False)


def parse(text):
    """({number: (title, block text)}, [(question, answer, cited number)])."""
    starts = list(DOC.finditer(text))
    qa_start = text.index("\n\nQuestion: ")
    docs = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else qa_start
        docs[int(m.group(1))] = (m.group(2), text[m.end():end])
    return docs, [(q, a, int(n)) for q, a, n in QA.findall(text[qa_start:])]


def test_exercises_show_only_train_modules_and_answers_are_spans(records):
    assert {module_split(m) for m in MODULES} == {"train", "rag", "eval"}  # held-out modules are in the input
    stats = {}
    texts = reading_exercises(records, doc_chars=300, max_chars=750, stats=stats)
    assert texts and stats["exercises"] == len(texts)
    train_ids = {r["id"] for r in records if module_split(r["module"]) == "train" and r["kind"] != "module"}
    held_out = {r["id"] for r in records if module_split(r["module"]) != "train"}
    assert held_out  # the check below could fail
    n_questions = 0
    for text in texts:
        assert len(text) <= 750
        docs, qas = parse(text)
        assert docs and qas
        assert sorted(docs) == list(range(1, len(docs) + 1)) and len(docs) <= 3
        for title, _ in docs.values():
            assert title in train_ids and title not in held_out, title
        cited = {n for _, _, n in qas}
        assert len(cited) == 1  # one exercise, one gold document
        title, content = docs[cited.pop()]
        for _, answer, _ in qas:  # in the content, or the title ("which module": the title minus its last part)
            assert squash(answer) in squash(title + "\n" + content), (answer, title, content)
        n_questions += len(qas)
    assert n_questions == stats["questions"] > len(texts)  # records with several questions get several
    assert set(stats["question_types"]) & set(READING_TYPES)  # not only the fixed-position kinds
    # the gold document is not always first
    assert len({parse(t)[1][0][2] for t in texts}) > 1


def test_format_exercise_fits_the_budget():
    gold = {"id": "m.f", "title": "m.f", "content": "f(x=1)\n\nDo f."}
    other = {"id": "m.g", "title": "m.g", "content": "g()\n\n" + "Long text. " * 20}
    qas = [("What does `x` default to in `m.f`?", "1"), ("What does `m.f` do?", "Do f.")]
    text, used = format_exercise([other, gold], "m.f", qas, 10_000)
    assert used == 2 and text == (document_text(1, other) + "\n\n" + document_text(2, gold) +
                                  "\n\nQuestion: What does `x` default to in `m.f`?\nAnswer: 1 [2]"
                                  "\nQuestion: What does `m.f` do?\nAnswer: Do f. [2]")
    # too long with the distractor: it goes, and the gold document becomes [1]
    short = len(document_text(1, gold)) + 60
    text, used = format_exercise([other, gold], "m.f", qas, short)
    assert used == 1 and text.startswith(document_text(1, gold)) and text.endswith("Answer: 1 [1]")
    assert format_exercise([other, gold], "m.f", qas, 20) == (None, 0)
