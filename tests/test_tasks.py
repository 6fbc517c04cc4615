"""
Tests for tasks/common.py (views, mixture, validation, answer_match), tasks/hf.py (where a task's files come from:
local_path, the --hf-local mirror, an offline HF cache; readers) and the chat / multiple-choice / math loaders
(customjson, smoltalk, mmlu, arc, gsm8k) on small fixtures written in the hub's column layouts. No network: hub
downloads themselves are tested in tests/test_dataset.py (nanochat.dataset.hub_file).

    pytest -x -q tests/test_tasks.py
"""

import os
import re
import json
from collections import Counter
from fractions import Fraction

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.dataset import HubFileUnavailable
from nanochat.metrics import NO_ANSWER
from tasks.common import Task, TaskMixture, render_mc, validate_conversation, mc_letter, shuffled_order, answer_match
from tasks.hf import read_records, read_rows, task_files, ParquetRows
from nanochat.dataset import use_hf_local
from tasks.customjson import CustomJSON
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.arc import ARC
from tasks.gsm8k import GSM8K, parse_solution, extract_answer
from test_dataset import write_hub_cache  # the documented HF cache layout (tests/ is on sys.path under pytest)


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path, lines):
    """lines: str (written as is), bytes (raw, e.g. invalid UTF-8) or objects (json.dumps)."""
    with open(path, "wb") as f:
        for line in lines:
            raw = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            f.write(raw + b"\n")
    return str(path)


def conv(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


class ListTask(Task):
    """A task over n numbered examples, for testing the views."""

    def __init__(self, n, name="t", kind="generative", **view):
        super().__init__(**view)
        self.n, self.name, self.kind = n, name, kind

    @property
    def eval_type(self):
        return self.kind

    def num_examples(self):
        return self.n

    def get_example(self, index):
        assert 0 <= index < self.n
        return conv(f"q{index}", f"a{index}", key=(self.name, index))

    def evaluate(self, conversation, assistant_response):
        return assistant_response == conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------
# views


def test_task_view_slicing_and_negative_index():
    t = ListTask(10, start=2, stop=9, step=3)
    assert len(t) == 3
    assert [ex["key"][1] for ex in t] == [2, 5, 8]
    assert t[0]["key"][1] == 2 and t[2]["key"][1] == 8
    assert t[-1]["key"][1] == 8 and t[-3]["key"][1] == 2
    for bad in (3, -4, 100):
        with pytest.raises(IndexError, match="out of range"):
            t[bad]
    with pytest.raises(TypeError):
        t["0"]
    assert len(ListTask(10, stop=50)) == 10  # stop past the end clamps
    assert len(ListTask(10, start=12)) == 0
    assert len(ListTask(0)) == 0
    assert [ex["key"][1] for ex in ListTask(7, start=1, step=2)] == [1, 3, 5]
    assert len(list(ListTask(7, start=1, step=2))) == len(ListTask(7, start=1, step=2))


@pytest.mark.parametrize("view", [dict(start=-1), dict(step=0), dict(start=5, stop=4), dict(stop=1.5)])
def test_task_view_rejects_bad_arguments(view):
    with pytest.raises(ValueError, match="Task view"):
        ListTask(10, **view)


def test_task_base_is_abstract():
    with pytest.raises(TypeError):
        Task()


def test_task_mixture_deterministic_and_complete():
    a, b = ListTask(5, "a"), ListTask(3, "b", start=1)  # b's view: examples 1, 2
    mix = TaskMixture([a, b, a], seed=42)  # a listed twice = oversampled 2x
    assert len(mix) == 5 + 2 + 5
    keys = [tuple(ex["key"]) for ex in mix]
    counts = Counter(keys)
    assert counts == Counter({**{("a", i): 2 for i in range(5)}, ("b", 1): 1, ("b", 2): 1})
    # every (task, idx) pair exactly once per listing
    pairs = Counter(mix.locate(i) for i in range(len(mix)))
    assert pairs == Counter([(0, i) for i in range(5)] + [(1, i) for i in range(2)] + [(2, i) for i in range(5)])
    # deterministic for a seed, different across seeds, actually shuffled
    assert keys == [tuple(ex["key"]) for ex in TaskMixture([a, b, a], seed=42)]
    assert keys != [tuple(ex["key"]) for ex in TaskMixture([a, b, a], seed=7)]
    assert mix.order != sorted(mix.order)
    # a strided view of the mixture (one DDP rank) is a slice of the same order
    rank1 = TaskMixture([a, b, a], seed=42, start=1, step=2)
    assert [tuple(ex["key"]) for ex in rank1] == keys[1::2]
    with pytest.raises(TypeError, match="eval type"):
        mix.eval_type
    with pytest.raises(TypeError):
        mix.evaluate(mix[0], "a0")
    with pytest.raises(ValueError):
        TaskMixture([])


def test_shuffled_order():
    assert shuffled_order(5, None) == [0, 1, 2, 3, 4]
    order = shuffled_order(100, 42)
    assert sorted(order) == list(range(100)) and order != list(range(100)) and order == shuffled_order(100, 42)


def test_render_mc_and_letters():
    q = render_mc("What is the capital of France?", ("A", "B", "C"), ["Lyon", "Paris", "Nice"])
    lines = q.split("\n")
    assert "What is the capital of France?" in lines[0]
    assert "- Lyon=A" in lines and "- Paris=B" in lines and "- Nice=C" in lines
    assert lines.index("- Lyon=A") < lines.index("- Paris=B") < lines.index("- Nice=C")
    assert "letter" in lines[-1]
    with pytest.raises(ValueError):
        render_mc("q", ("A", "B"), ["x"])
    assert [mc_letter(r) for r in ("B", " b ", "(B)", "B.", "[C]")] == ["B", "B", "B", "B", "C"]


# -----------------------------------------------------------------------------
# conversation validation


def test_validate_conversation_accepts_schema():
    docs = [{"id": "d1", "title": "T", "content": "text", "score": 1.5}]
    validate_conversation(conv("hi", "hello"))
    validate_conversation({"messages": [{"role": "system", "content": "be nice"},
                                        {"role": "retrieval", "documents": docs},
                                        {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a [1]"},
                                        {"role": "retrieval", "documents": docs},
                                        {"role": "user", "content": "q2"},
                                        {"role": "assistant", "content": [
                                            {"type": "text", "text": "let me compute "},
                                            {"type": "python", "text": "1+1"},
                                            {"type": "python_output", "text": "2"},
                                            {"type": "query", "text": "capital of france"},
                                            {"type": "documents", "documents": docs},
                                            {"type": "text", "text": "2"}]}]})


@pytest.mark.parametrize("conversation, reason", [
    ([], "expected an object"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected role 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "expected role 'user'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "end with an assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message may only come first"),
    ({"messages": [{"role": "retrieval", "documents": [{"content": "x"}]}, {"role": "assistant", "content": "a"}]},
     "right before a user message"),
    ({"messages": [{"role": "retrieval", "documents": [{"title": "no content"}]}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "string 'content'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "user content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image"}]}]},
     "unknown type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "python"}]}]},
     "needs a string 'text'"),
])
def test_validate_conversation_rejects(conversation, reason):
    with pytest.raises(ValueError, match=reason) as e:
        validate_conversation(conversation, "f.jsonl:7")
    assert str(e.value).startswith("f.jsonl:7")


# -----------------------------------------------------------------------------
# where a task's files come from


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: a task gets only what a test puts there (or in a local mirror)."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_HF_LOCAL", "")  # recorded, so that what use_hf_local sets is undone after the test
    monkeypatch.delenv("NANOCHAT_HF_LOCAL")
    return cache


def test_task_from_the_hf_cache_and_the_offline_message(hf_offline):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}]), buf)
    write_hub_cache(hf_offline, "openai/gsm8k", {"socratic/train-00000-of-00001.parquet": buf.getvalue().to_pybytes()})
    task = GSM8K("socratic", "train")
    assert len(task) == 1 and task.evaluate(task[0], "#### 5") and task.paths[0].startswith(str(hf_offline))
    with pytest.raises(HubFileUnavailable) as e:
        GSM8K("main", "test")
    msg = str(e.value)
    assert msg.startswith("openai/gsm8k: main/test-00000-of-00001.parquet (revision main) is not in the Hugging Face "
                          f"cache ({hf_offline}) and HF_HUB_OFFLINE is set")
    assert "--hf-local DIR" in msg and "local_path=" in msg and "HF_ENDPOINT" in msg


def test_hf_local_mirror(tmp_path, monkeypatch, hf_offline):
    # --hf-local DIR (NANOCHAT_HF_LOCAL=DIR): DIR/<repo_id>/<file> comes before the HF cache
    root = tmp_path / "mirror"
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data/test-00000-of-00001.parquet", smoltalk_rows(5))
    use_hf_local(None)
    assert "NANOCHAT_HF_LOCAL" not in os.environ
    with pytest.raises(FileNotFoundError, match="--hf-local"):
        use_hf_local(str(tmp_path / "nowhere"))
    use_hf_local(str(root))
    assert os.environ["NANOCHAT_HF_LOCAL"] == str(root)
    task = SmolTalk("test")
    assert len(task) == 5 and task.paths[0].startswith(str(root))
    with pytest.raises(HubFileUnavailable, match=r"--hf-local DIR"):  # not in the mirror: the HF cache, offline
        GSM8K("main", "test")


# -----------------------------------------------------------------------------
# readers


def test_read_records_errors_name_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"x": 1}, "", "{not json", {"y": 2}])
    with pytest.raises(ValueError, match=r"a\.jsonl:3: invalid JSON"):
        read_records(p)
    p = write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, "[1, 2]"])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: expected a JSON object"):
        read_records(p)
    p = tmp_path / "c.json"
    p.write_text('[\n{"x": 1},\n{"x": oops}\n]')
    with pytest.raises(ValueError, match=r"c\.json:3: invalid JSON"):
        read_records(p)
    (tmp_path / "c2.json").write_bytes(b'[\n{"x": "\xff"}\n]')
    with pytest.raises(ValueError, match=r"c2\.json:2: not valid UTF-8"):
        read_records(tmp_path / "c2.json")
    (tmp_path / "d.json").write_text('{"k1": {"v": 1}, "k2": {"v": 2}}')
    assert read_records(tmp_path / "d.json") == [{"_key": "k1", "v": 1}, {"_key": "k2", "v": 2}]
    (tmp_path / "e.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"e\.parquet: could not read parquet"):
        read_records(tmp_path / "e.parquet")
    (tmp_path / "f.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_records(tmp_path / "f.csv")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_read_rows_parquet_lazy_and_concatenated(tmp_path):
    p1 = write_parquet(tmp_path / "1.parquet", [{"i": i, "s": f"s{i}"} for i in range(3)])
    p2 = write_parquet(tmp_path / "2.parquet", [{"i": i, "s": f"s{i}"} for i in range(3, 5)])
    rows = read_rows([p1, p2])
    assert isinstance(rows, ParquetRows) and len(rows) == 5
    assert [rows[i]["i"] for i in range(5)] == [0, 1, 2, 3, 4] and rows[4] == {"i": 4, "s": "s4"}
    with pytest.raises(IndexError):
        rows[5]


def test_task_files_local_path_forms(tmp_path):
    names = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    mirror = tmp_path / "mirror"
    for n in names:
        write_parquet(mirror / n, [{"i": 0}])
    assert task_files("org/x", names, mirror) == [str(mirror / n) for n in names]
    flat = tmp_path / "flat"
    write_parquet(flat / "b.parquet", [{"i": 0}])
    write_parquet(flat / "a.parquet", [{"i": 0}])
    assert task_files("org/x", names, flat) == [str(flat / "a.parquet"), str(flat / "b.parquet")]
    assert task_files("org/x", names, str(flat / "a.parquet")) == [str(flat / "a.parquet")]
    with pytest.raises(FileNotFoundError, match="local_path"):
        task_files("org/x", names, tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither"):
        task_files("org/x", names, tmp_path / "empty")


# -----------------------------------------------------------------------------
# CustomJSON


def test_customjson_loads_and_evaluates(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        conv("Who are you?", "I am nanochat.", source="identity"),
        "",
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],  # bare list form
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                        {"type": "python_output", "text": "4"},
                                                        {"type": "text", "text": "4"}]}]},
    ])
    task = CustomJSON(p)
    assert len(task) == 3 and task.eval_type == "generative"
    assert task[0]["source"] == "identity"
    for ex in task:
        validate_conversation(ex)
    assert task.evaluate(task[0], "i am nanochat") and not task.evaluate(task[0], "I am GPT.")
    assert task.evaluate(task[2], " 4 ")
    task[0]["messages"].append("junk")  # callers may mutate what they get; the task is unaffected
    assert len(task[0]["messages"]) == 2
    assert len(CustomJSON(p, start=1)) == 2


@pytest.mark.parametrize("bad, reason", [
    ("{oops", "invalid JSON"),
    ('{"conversation": []}', "'messages'"),
    ('"just a string"', "expected a JSON object"),
    (b'{"messages": "\xff"}', "not valid UTF-8"),
    (json.dumps({"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "end with an assistant"),
])
def test_customjson_bad_line_names_file_and_line(tmp_path, bad, reason):
    p = write_jsonl(tmp_path / "bad.jsonl", [conv("a", "b"), conv("c", "d"), bad])
    with pytest.raises(ValueError, match=reason) as e:
        CustomJSON(p)
    assert f"{p}:3:" in str(e.value)


def test_answer_match():
    plain = conv("Who wrote it?", "Ann Roe [1].")
    assert answer_match(plain, "ann roe") and answer_match(plain, "Ann Roe [2]") and not answer_match(plain, "Bo")
    qa = conv("q", "It is 42 [1].", answers=["42", "forty-two [1]"])
    assert answer_match(qa, "42 [3].") and answer_match(qa, "Forty-two") and not answer_match(qa, "It is 42")
    unanswerable = conv("q", "Not in the documents [1].", answers=[])  # [] means: the answer is NO_ANSWER
    assert answer_match(unanswerable, NO_ANSWER + " [1]") and not answer_match(unanswerable, "Not in the documents")


def test_customjson_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        CustomJSON(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        CustomJSON(write_jsonl(tmp_path / "empty.jsonl", [""]))


# -----------------------------------------------------------------------------
# SmolTalk


def smoltalk_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        msgs = [{"content": f"question {i}", "role": "user"}, {"content": f"answer {i}", "role": "assistant"}]
        if i % 2:
            msgs = [{"content": "You are helpful.", "role": "system"}] + msgs + [
                {"content": "thanks", "role": "user"}, {"content": "welcome", "role": "assistant"}]
        rows.append({"messages": msgs, "source": "fixture"})
    return rows


def test_smoltalk_local_file_and_mirror(tmp_path):
    p = write_parquet(tmp_path / "test.parquet", smoltalk_rows(6))
    task = SmolTalk("test", local_path=p, seed=None)
    assert len(task) == 6 and task.eval_type == "generative"
    for ex in task:
        validate_conversation(ex)
    assert task[1]["messages"][0] == {"role": "system", "content": "You are helpful."}
    assert task[0]["messages"][0] == {"role": "user", "content": "question 0"}
    assert task.evaluate(task[0], "Answer 0")
    # shuffled by default, same content
    assert sorted(ex["messages"][-1]["content"] for ex in SmolTalk("test", local_path=p)) == \
        sorted(ex["messages"][-1]["content"] for ex in task)
    # a directory mirroring the hub layout: the 4 train shards
    mirror = tmp_path / "mirror"
    for k in range(4):
        write_parquet(mirror / f"data/train-{k:05d}-of-00004.parquet", smoltalk_rows(3, offset=3 * k))
    write_parquet(mirror / "data/test-00000-of-00001.parquet", smoltalk_rows(2))
    assert len(SmolTalk("train", local_path=mirror)) == 12 and len(SmolTalk("test", local_path=mirror)) == 2
    with pytest.raises(ValueError, match="SmolTalk split"):
        SmolTalk("validation", local_path=p)


def test_smoltalk_bad_row(tmp_path):
    rows = smoltalk_rows(2)
    rows[1]["messages"] = [{"content": "a", "role": "assistant"}, {"content": "b", "role": "user"}]
    task = SmolTalk("test", local_path=write_parquet(tmp_path / "t.parquet", rows), seed=None)
    with pytest.raises(ValueError, match="row 1.*expected role 'user'"):
        task[1]
    # a dangling last user turn is dropped (no reply to train on); a lone user turn is an error
    rows[1]["messages"] = [{"content": "a", "role": "user"}, {"content": "b", "role": "assistant"},
                           {"content": "c", "role": "user"}]
    rows.append({"messages": [{"content": "a", "role": "user"}], "source": "x"})
    task = SmolTalk("test", local_path=write_parquet(tmp_path / "t2.parquet", rows), seed=None)
    assert [m["content"] for m in task[1]["messages"]] == ["a", "b"]
    with pytest.raises(ValueError, match="row 2.*end with an assistant"):
        task[2]


# -----------------------------------------------------------------------------
# MMLU and ARC


def mmlu_rows():
    return [
        {"question": "Which planet is largest?", "subject": "astronomy",
         "choices": ["Mars", "Jupiter", "Venus", "Earth"], "answer": 1},
        {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "5", "6", "4"], "answer": 3},
        {"question": "H2O is?", "subject": "chemistry", "choices": ["water", "salt", "air", "gold"], "answer": 0},
    ]


def test_mmlu(tmp_path):
    task = MMLU("all", "test", local_path=write_parquet(tmp_path / "all/test-00000-of-00001.parquet", mmlu_rows()),
                seed=None)
    assert len(task) == 3 and task.eval_type == "categorical"
    ex = task[0]
    validate_conversation(ex)
    assert ex["letters"] == ("A", "B", "C", "D") and ex["subject"] == "astronomy"
    assert ex["messages"][-1]["content"] == "B" and "- Jupiter=B" in ex["messages"][0]["content"]
    assert task[1]["messages"][-1]["content"] == "D" and task[2]["messages"][-1]["content"] == "A"
    assert task.evaluate(ex, "B") and task.evaluate(ex, " (B) ") and not task.evaluate(ex, "A")
    # the repo mirror layout picks all/<split>
    assert len(MMLU("all", "test", local_path=tmp_path)) == 3
    # auxiliary_train rows are wrapped in a `train` struct column
    aux = write_parquet(tmp_path / "auxiliary_train/train-00000-of-00001.parquet", [{"train": r} for r in mmlu_rows()])
    atask = MMLU("auxiliary_train", "train", local_path=aux, seed=None)
    assert [e["messages"][-1]["content"] for e in atask] == ["B", "D", "A"]
    with pytest.raises(ValueError, match="MMLU split"):
        MMLU("auxiliary_train", "test", local_path=aux)
    with pytest.raises(ValueError, match="MMLU subset"):
        MMLU("astronomy", "test", local_path=aux)
    bad = write_parquet(tmp_path / "bad.parquet", [{**mmlu_rows()[0], "answer": 7}])
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: answer must be"):
        MMLU("all", "test", local_path=bad)[0]


def test_arc(tmp_path):
    rows = [
        {"id": "q1", "question": "What do plants need?", "answerKey": "C",
         "choices": {"text": ["rocks", "noise", "sunlight", "plastic"], "label": ["A", "B", "C", "D"]}},
        {"id": "q2", "question": "Ice is?", "answerKey": "2",
         "choices": {"text": ["gas", "solid", "plasma", "liquid"], "label": ["1", "2", "3", "4"]}},
        {"id": "q3", "question": "Which is a mammal?", "answerKey": "A",
         "choices": {"text": ["whale", "shark", "trout"], "label": ["A", "B", "C"]}},
    ]
    p = write_parquet(tmp_path / "ARC-Challenge/test-00000-of-00001.parquet", rows)
    task = ARC("ARC-Challenge", "test", local_path=p, seed=None)
    assert len(task) == 3 and task.eval_type == "categorical"
    for ex in task:
        validate_conversation(ex)
    assert task[0]["messages"][-1]["content"] == "C" and "- sunlight=C" in task[0]["messages"][0]["content"]
    assert task[1]["letters"] == ("A", "B", "C", "D") and task[1]["messages"][-1]["content"] == "B"
    assert "- solid=B" in task[1]["messages"][0]["content"]
    assert task[2]["letters"] == ("A", "B", "C")
    assert task.evaluate(task[1], "B") and not task.evaluate(task[1], "2")
    assert len(ARC("ARC-Challenge", "test", local_path=tmp_path)) == 3
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Hard", "test", local_path=p)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), empty)
    with pytest.raises(ValueError, match=r"ARC: no rows in .*empty\.parquet"):
        ARC("ARC-Easy", "train", local_path=empty)
    bad = write_parquet(tmp_path / "bad.parquet", [{**rows[0], "answerKey": "E"}])
    with pytest.raises(ValueError, match="answerKey 'E'"):
        ARC("ARC-Easy", "train", local_path=bad)[0]


# -----------------------------------------------------------------------------
# GSM8K

SOLUTION = ("Tom has 3 bags of 12 apples, so 3*12=<<3*12=36>>36 apples.\n"
            "He gives away 1,000/100 = <<1000/100=10>>10 apples.\n"
            "He keeps 36-10=<<36-10=26>>26 apples.\n#### 26")


def test_gsm8k_parse_solution():
    parts = parse_solution(SOLUTION)
    assert [p["type"] for p in parts] == ["text", "python", "python_output"] * 3 + ["text"]
    assert [p["text"] for p in parts if p["type"] == "python"] == ["3*12", "1000/100", "36-10"]
    assert [p["text"] for p in parts if p["type"] == "python_output"] == ["36", "10", "26"]
    # text parts are the solution with the annotations cut out, in order
    assert "".join(p["text"] for p in parts if p["type"] == "text") == re.sub(r"<<[^<>]*>>", "", SOLUTION)
    assert parts[-1]["text"].endswith("#### 26")
    assert parse_solution("<<2+2=4>>4 #### 4")[0] == {"type": "python", "text": "2+2"}
    assert parse_solution("x <<2+2>> #### 4")[1:3] == [{"type": "python", "text": "2+2"},
                                                        {"type": "python_output", "text": ""}]


@pytest.mark.parametrize("text, value", [
    ("#### 26", Fraction(26)), ("so #### 1,000", Fraction(1000)), ("#### -3.5", Fraction(-7, 2)),
    ("#### $18.", Fraction(18)), ("#### 3 then #### 4", Fraction(4)), ("#### .5", Fraction(1, 2)),
    ("the answer is 26", None), ("####", None),
])
def test_gsm8k_extract_answer(text, value):
    assert extract_answer(text) == value


def test_gsm8k_task(tmp_path):
    rows = [{"question": "Tom has 3 bags of 12 apples and gives away 10. How many are left?", "answer": SOLUTION},
            {"question": "What is 500 * 2?", "answer": "500*2=<<500*2=1000>>1000\n#### 1000"}]
    task = GSM8K("main", "test", local_path=write_parquet(tmp_path / "g.parquet", rows), seed=None)
    assert len(task) == 2 and task.eval_type == "generative"
    for ex in task:
        validate_conversation(ex)
    ex = task[1]
    assert task.evaluate(ex, "I compute 500*2.\n#### 1,000")
    assert task.evaluate(ex, "#### 1000.0")
    assert not task.evaluate(ex, "#### 999") and not task.evaluate(ex, "1000")
    with pytest.raises(ValueError, match="GSM8K split"):
        GSM8K("main", "validation", local_path=tmp_path / "g.parquet")
    bad = write_parquet(tmp_path / "bad.parquet", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match="#### number"):
        GSM8K("main", "test", local_path=bad)[0]
