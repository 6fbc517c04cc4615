"""
Tests for tasks/baselines.py: each model-free rule on hand-made documents and questions, the oracle's document
order, and the scoring table (checked by hand).

    pytest -q tests/test_baselines.py
"""

import json

import pytest

from tasks.baselines import (baseline_answers, oracle_documents, score_baselines, per_type_rule, question_type,
                             pick_document, first_sentence, header_line, overlap_sentence, main, BASELINE_RULES,
                             COPY_RULES)

DEDENT = {"id": "textwrap.dedent", "title": "textwrap.dedent",
          "content": "dedent(text)\n\nRemove any common leading whitespace from every line in `text`.\n\nThis can be "
                     "used to make triple-quoted strings line up with the left edge. If the text is empty, an empty "
                     "string is returned."}
FILL = {"id": "textwrap.fill", "title": "textwrap.fill",
        "content": "fill(text, width=70, *, tabsize: int = 8, **kwargs)\n\nFill a single paragraph of text, "
                   "returning a new string.\n\nReformat the single paragraph in 'text' to fit in lines of no more "
                   "than 'width' columns. Returns a single string.\n\nArguments:\ntext -- the paragraph to fill\n"
                   "width -- the maximum line length; lines are\n         never longer than this.\n\n"
                   "Raises ValueError if width is not positive. Use shorten() instead for a single line."}
WRAPPER = {"id": "textwrap.TextWrapper", "title": "textwrap.TextWrapper",
           "content": "class TextWrapper(width=70, expand_tabs=True)\n\nObject for wrapping/filling text.  The "
                      "public interface consists of the wrap() and fill() methods.\n\n*width* is the maximum "
                      "length of wrapped lines. See also `textwrap.fill`."}
GETVALUE = {"id": "io.StringIO.getvalue", "title": "io.StringIO.getvalue",
            "content": "StringIO.getvalue()\n\nRetrieve the entire contents of the object. Same as read() from the "
                       "start, but the position is not changed."}
SQUAD = {"id": "p1", "title": "Normans", "content": "The Normans were people of Normandy, e.g. in France. They gave "
                                                     "their name to the region in the 10th century."}


def ex(question, answers, qtype=None, gold=None, documents=None):
    example = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}],
               "answers": answers}
    if qtype:
        example["question_type"] = qtype
    if gold:
        example["gold_doc_ids"] = gold
    if documents is not None:
        example["documents"] = documents
    return example


def test_copy_rules():
    assert header_line(FILL) == "fill(text, width=70, *, tabsize: int = 8, **kwargs)"
    assert first_sentence(DEDENT) == "Remove any common leading whitespace from every line in `text`."
    assert first_sentence(WRAPPER) == "Object for wrapping/filling text."  # "class X(...)" header skipped
    assert first_sentence(SQUAD) == "The Normans were people of Normandy, e.g. in France."  # no header
    assert header_line(SQUAD) == SQUAD["content"]
    # the unit with most question words (stop words aside): the second sentence, not the first
    assert overlap_sentence("What can make triple-quoted strings line up?", DEDENT) == \
        "This can be used to make triple-quoted strings line up with the left edge."
    assert overlap_sentence("signature of dedent text", DEDENT) == "dedent(text)"  # the header line is a unit too
    assert overlap_sentence("zzz", DEDENT) == "dedent(text)"  # a tie (no word in common): the first unit
    got = baseline_answers(ex("What does `textwrap.dedent` do?", ["x"]), [DEDENT, FILL])
    assert list(got) == list(BASELINE_RULES) and set(COPY_RULES) < set(got)
    assert got["first_sentence"] == first_sentence(DEDENT) and got["header_line"] == "dedent(text)"
    assert baseline_answers(ex("q?", ["x"]), []) == {rule: "" for rule in BASELINE_RULES}


def test_pick_document():
    docs = [DEDENT, FILL, WRAPPER, GETVALUE]
    assert pick_document("What does `textwrap.fill` do?", docs) is FILL  # the full title
    assert pick_document("What does `fill` from the `textwrap` module do?", docs) is FILL  # name + module
    assert pick_document("What is the `getvalue` method of `io.StringIO`?", docs) is GETVALUE
    assert pick_document("What is the `TextWrapper` class of the `textwrap` module?", docs) is WRAPPER
    assert pick_document("Who were the Normans?", [SQUAD, DEDENT]) is SQUAD  # nothing matches: document 1


@pytest.mark.parametrize("question, qtype, answer", [
    ("What does `dedent` from the `textwrap` module do?", "desc",
     "Remove any common leading whitespace from every line in `text`."),
    ("What is the signature of `textwrap.fill`?", "sig", "fill(text, width=70, *, tabsize: int = 8, **kwargs)"),
    ("How is `textwrap`'s class `TextWrapper` called? Give its signature.", "sig", "TextWrapper(width=70, expand_tabs=True)"),
    ("Which standard library module provides `TextWrapper`?", "module", "textwrap"),
    ("What is the `getvalue` method of `io.StringIO` for?", "desc", "Retrieve the entire contents of the object."),
    ("What does `width` default to in `textwrap.fill`?", "default", "70"),
    ("If the `textwrap` function `fill` is called without `tabsize`, what value does `tabsize` take?", "default", "8"),
    ("What is the default value of the `expand_tabs` parameter of `textwrap.TextWrapper`?", "default", "True"),
    ("What does `textwrap.fill` return?", "returns", "a single string"),
    ("Which exception does `textwrap.fill` raise?", "raises", "ValueError"),
    ("When does `textwrap.fill` raise `ValueError`?", "raises_when", "if width is not positive"),
    ("According to the documentation of `textwrap.dedent`, what happens if the text is empty?", "condition",
     "an empty string is returned"),
    ("What is the `width` argument of `textwrap.fill`?", "param", "the maximum line length; lines are never longer "
                                                                  "than this"),
    ("In `textwrap.TextWrapper`, what is `width`?", "param", "the maximum length of wrapped lines"),
    ("What does the documentation of `textwrap.fill` say to use instead?", "xref", "shorten"),
    ("Which other function, method or class does the documentation of `textwrap.TextWrapper` refer to?", "xref",
     "textwrap.fill"),
    ("Which other function or method is `io.StringIO.getvalue` compared to in its documentation?", "xref", "read"),
])
def test_per_type_rule(question, qtype, answer):
    docs = [SQUAD, DEDENT, FILL, WRAPPER, GETVALUE]  # the right document is never first
    assert per_type_rule(ex(question, [answer], qtype), docs) == answer
    # without a question_type the wording gives the type away, and the rule still finds the span
    assert question_type(ex(question, [answer])) == qtype
    assert per_type_rule(ex(question, [answer]), docs) == answer


def test_per_type_rule_unknown_type_and_fallbacks():
    # another dataset (no question_type, a wording we do not know): the overlap sentence of document 1
    q = ex("When did the Normans give their name to the region?", ["10th century"])
    assert question_type(q) is None
    assert per_type_rule(q, [SQUAD, DEDENT]) == "They gave their name to the region in the 10th century."
    # a multi-hop example carries "type", not question_type: the rules run on its wording ("What does ... do?"
    # reads as a description question about the document its `name` matches)
    mh = {**ex("What does the function named in the documentation of `textwrap.TextWrapper` do?", ["x"]), "type": "ref"}
    assert question_type(mh) == "desc"
    assert per_type_rule(mh, [FILL, WRAPPER]) == first_sentence(WRAPPER)
    assert baseline_answers(mh, [FILL, WRAPPER])["first_sentence"] == first_sentence(FILL)
    assert per_type_rule(ex("What does `textwrap.fill` return?", ["x"], "returns"), []) == ""
    # a type whose span is missing falls back: no "Return" sentence -> the first sentence
    assert per_type_rule(ex("What does `textwrap.dedent` return?", ["x"], "returns"), [DEDENT]) == \
        first_sentence(DEDENT)
    assert per_type_rule(ex("What does `nope` default to in `textwrap.dedent`?", ["x"], "default"), [DEDENT]) == "None"


def test_oracle_documents():
    shown = [DEDENT, WRAPPER]
    # the gold document comes from the example's own documents when retrieval missed it
    e = ex("q?", ["a"], gold=["textwrap.fill"], documents=[FILL, GETVALUE])
    assert [d["id"] for d in oracle_documents(e, shown)] == ["textwrap.fill", "textwrap.dedent", "textwrap.TextWrapper"]
    # a retrieved gold document moves to the front; two gold documents (multi-hop) keep gold_doc_ids' order
    e = ex("q?", ["a"], gold=["textwrap.TextWrapper", "textwrap.dedent"])
    assert [d["id"] for d in oracle_documents(e, shown)] == ["textwrap.TextWrapper", "textwrap.dedent"]
    # a chunk answers for its parent id; no gold at all: the shown order
    chunk = {"id": "textwrap.fill#1", "parent_id": "textwrap.fill", "title": "textwrap.fill", "content": "x"}
    e = ex("q?", ["a"], gold=["textwrap.fill"])
    assert oracle_documents(e, [DEDENT, chunk]) == [chunk, DEDENT]
    assert oracle_documents(ex("q?", ["a"]), shown) == shown
    assert oracle_documents(ex("q?", ["a"], gold=["missing"]), shown) == shown


def test_score_baselines_by_hand():
    a = ex("What does `textwrap.fill` return?", ["a single string"], "returns", gold=["textwrap.fill"],
           documents=[DEDENT, FILL])
    b = ex("What does `textwrap.dedent` do?", ["Remove any common leading whitespace from every line in `text`."],
           "desc", gold=["textwrap.dedent"], documents=[FILL, DEDENT])
    shown = {id(a): [DEDENT, FILL], id(b): [FILL, DEDENT]}  # neither gold document is first
    table = score_baselines([a, b], lambda e: shown[id(e)])
    assert table["all"]["n"] == 2 and table["returns"]["n"] == 1 and table["desc"]["n"] == 1
    # document 1 is wrong for both: every copy rule misses; the per-type rule finds the right one by its title
    assert table["all"]["first_sentence:em"] == 0.0 and table["all"]["best_copy_rule:em"] == 0.0
    assert table["all"]["per_type_rule:em"] == 100.0 and table["all"]["oracle:em"] == 100.0
    # gold first: the first-sentence rule answers the desc question only; F1 of "Fill a single paragraph of text,
    # returning a new string." vs "a single string": common {single, string} -> P 2/8, R 2/2 -> F1 0.4
    gold_first = score_baselines([a, b], lambda e: oracle_documents(e, e["documents"]))
    assert gold_first["all"]["first_sentence:em"] == 50.0 and gold_first["all"]["best_copy_rule:em"] == 50.0
    assert gold_first["returns"]["first_sentence:f1"] == 40.0


def test_cli(tmp_path, capsys, monkeypatch):
    path = tmp_path / "qa.jsonl"
    rows = [ex("What does `width` default to in `textwrap.fill`?", ["70"], "default", gold=["textwrap.fill"],
               documents=[DEDENT, FILL]),
            ex("What does `textwrap.dedent` do?", ["Remove any common leading whitespace from every line in `text`."],
               gold=["textwrap.dedent"], documents=[FILL, DEDENT])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr("sys.argv", ["baselines", "--qa", str(path), "--json"])
    main()
    table = json.loads(capsys.readouterr().out)
    assert table["all"]["n"] == 2 and table["default"]["per_type_rule:em"] == 100.0
    assert table["desc"]["first_sentence:em"] == 100.0 and table["all"]["header_line:em"] == 0.0
