"""
Question-answering datasets in the shared QA schema, for retrieval-augmented fine-tuning and rag_eval:

    {"id": ..., "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
     "answers": [...],            # acceptable answers for EM/F1, first is canonical ([] = unanswerable)
     "gold_doc_ids": [...],       # KB documents that contain the answer
     "documents": [{"id", "title", "content"}, ...]}   # the example's own passages, gold first where known

    from tasks.qa import SQuAD, HotpotQA, PubMedQA, QAJsonl, squad_corpus, hotpot_corpus, pubmedqa_corpus
    val = SQuAD("validation")                                    # rajpurkar/squad (v2: version="v2")
    kb_docs = squad_corpus(val)                                  # dedup'd paragraphs -> KB document JSONL lines
    hp = HotpotQA("validation", setting="distractor")            # hotpotqa/hotpot_qa
    pm = PubMedQA("test", local_path="../shared/data/pubmedqa")  # expert-labelled PubMedQA, 500 test ids
    mine = QAJsonl("my_qa.jsonl")

Every task is generative; evaluate() strips citation markers ("[1]", "[DOC_2]") from the response and returns
the SQuAD-normalized exact match against `answers` (against NO_ANSWER when there are none).
"""

import os
import copy
import json
import hashlib

from tqdm import tqdm

from nanochat.common import get_base_dir
from nanochat.metrics import NO_ANSWER, exact_match, strip_citations
from tasks.common import (Task, check_choice, shuffled_order, validate_conversation, validate_documents,
                          assistant_text)
from tasks.hf import read_records, read_rows, task_files, download_url, hf_dataset_file

# -----------------------------------------------------------------------------
# shared pieces


def make_qa_example(id, question, answers, documents=None, gold_doc_ids=None, target=None, **extra):
    """A QA example; the assistant target is `target`, else the first answer, else NO_ANSWER."""
    answers = list(answers)
    if target is None:
        target = answers[0] if answers else NO_ANSWER
    example = {
        "id": id,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": target}],
        "answers": answers,
    }
    if gold_doc_ids is not None:
        example["gold_doc_ids"] = list(gold_doc_ids)
    if documents is not None:
        example["documents"] = documents
    example.update(extra)
    return example


def validate_qa_example(example, where="QA example"):
    """Check an example against the QA schema (conversation + answers/gold_doc_ids/documents); ValueError."""
    validate_conversation(example, where)
    answers = example.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a list of strings, got {answers!r:.200}")
    gold = example.get("gold_doc_ids")
    if gold is not None and (not isinstance(gold, list) or not all(isinstance(g, str) for g in gold)):
        raise ValueError(f"{where}: 'gold_doc_ids' must be a list of strings, got {gold!r:.200}")
    if "documents" in example:
        validate_documents(example["documents"], where)
        for j, doc in enumerate(example["documents"]):
            if not isinstance(doc.get("id"), str):
                raise ValueError(f"{where}: document {j} needs a string 'id'")


def corpus_from_examples(examples, source):
    """The examples' documents, deduplicated by id (first seen wins), as KB document dicts
    {"id", "title", "content", "metadata"} ready for `python -m nanochat.retrieval --documents`."""
    seen = {}
    total = len(examples) if hasattr(examples, "__len__") else None
    for ex in tqdm(examples, total=total, desc=f"{source} corpus", disable=total is not None and total < 5000):
        for doc in ex.get("documents", []):
            if doc["id"] not in seen:
                seen[doc["id"]] = {"id": doc["id"], "title": doc.get("title") or "", "content": doc["content"],
                                   "metadata": {"source": source}}
    return list(seen.values())


class QATask(Task):
    """Base of the QA tasks: generative, scored by citation-stripped exact match against `answers`."""

    @property
    def eval_type(self):
        return "generative"

    def evaluate(self, conversation, assistant_response):
        answers = conversation.get("answers")
        if answers is None:  # a plain conversation: its assistant message is the answer
            answers = [assistant_text(conversation["messages"][-1])]
        return exact_match(strip_citations(assistant_response), answers or [NO_ANSWER])


def _where(paths, row_idx):
    return f"{paths[0] if len(paths) == 1 else paths}: row {row_idx}"


# -----------------------------------------------------------------------------
# SQuAD (Rajpurkar et al., 2016; v2 with unanswerable questions, 2018)

SQUAD_FILES = {
    "v1": ("rajpurkar/squad", "plain_text"),
    "v2": ("rajpurkar/squad_v2", "squad_v2"),
}


def squad_doc_id(title, context):
    """A paragraph's KB id: article title + a hash of the paragraph (SQuAD has ~5 questions per paragraph)."""
    return f"{title}#{hashlib.sha1(context.encode('utf-8')).hexdigest()[:12]}"


class SQuAD(QATask):

    def __init__(self, split, version="v1", local_path=None, seed=42, **view):
        super().__init__(**view)
        self.split = check_choice("SQuAD split", split, ("train", "validation"))
        self.version = check_choice("SQuAD version", version, list(SQUAD_FILES))
        repo_id, config = SQUAD_FILES[version]
        self.paths = task_files(repo_id, [f"{config}/{split}-00000-of-00001.parquet"], local_path)
        self.rows = read_rows(self.paths)
        self.order = shuffled_order(len(self.rows), seed)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row_idx = self.order[index]
        row = self.rows[row_idx]
        where = _where(self.paths, row_idx)
        for key in ("id", "title", "context", "question"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: expected a string {key!r}, got {row.get(key)!r:.100}")
        ans = row.get("answers")
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), list):
            raise ValueError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
        answers = list(dict.fromkeys(a for a in ans["text"] if isinstance(a, str)))  # dedup, keep order
        if not answers and self.version == "v1":
            raise ValueError(f"{where}: SQuAD v1 question {row['id']} has no answer")
        doc_id = squad_doc_id(row["title"], row["context"])
        doc = {"id": doc_id, "title": row["title"].replace("_", " "), "content": row["context"]}
        return make_qa_example(row["id"], row["question"], answers, documents=[doc], gold_doc_ids=[doc_id],
                               answerable=bool(answers))


def squad_corpus(examples):
    """Deduplicated SQuAD paragraphs of `examples` (e.g. a SQuAD task) as KB documents."""
    return corpus_from_examples(examples, "squad")


# -----------------------------------------------------------------------------
# HotpotQA (Yang et al., 2018): multi-hop questions over Wikipedia paragraphs

HOTPOT_REPO = "hotpotqa/hotpot_qa"
HOTPOT_FILES = {
    ("distractor", "train"): [f"distractor/train-{i:05d}-of-00002.parquet" for i in range(2)],
    ("distractor", "validation"): ["distractor/validation-00000-of-00001.parquet"],
    ("fullwiki", "train"): [f"fullwiki/train-{i:05d}-of-00002.parquet" for i in range(2)],
    ("fullwiki", "validation"): ["fullwiki/validation-00000-of-00001.parquet"],
}


def join_sentences(sentences):
    """HotpotQA paragraphs come as sentence lists whose later sentences usually carry their leading space;
    join them as the original text, adding a space only where none is there."""
    text = ""
    for s in sentences:
        if text and s and not text[-1].isspace() and not s[0].isspace():
            text += " "
        text += s
    return text.strip()


class HotpotQA(QATask):

    def __init__(self, split, setting="distractor", local_path=None, seed=42, **view):
        super().__init__(**view)
        self.split = check_choice("HotpotQA split", split, ("train", "validation"))
        self.setting = check_choice("HotpotQA setting", setting, ("distractor", "fullwiki"))
        self.paths = task_files(HOTPOT_REPO, HOTPOT_FILES[(setting, split)], local_path)
        self.rows = read_rows(self.paths)
        self.order = shuffled_order(len(self.rows), seed)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row_idx = self.order[index]
        row = self.rows[row_idx]
        where = _where(self.paths, row_idx)
        qid = row.get("id", row.get("_id"))
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{where}: expected string 'question' and 'answer'")
        ctx, sf = row.get("context"), row.get("supporting_facts")
        # hub layout: context {title: [...], sentences: [[...]]}; original JSON: [[title, [sentences]], ...]
        if isinstance(ctx, dict):
            pairs = list(zip(ctx.get("title") or [], ctx.get("sentences") or []))
        elif isinstance(ctx, list):
            pairs = [(p[0], p[1]) for p in ctx if isinstance(p, list) and len(p) == 2]
        else:
            raise ValueError(f"{where}: 'context' must be {{title, sentences}} or a list of [title, sentences]")
        if isinstance(sf, dict):
            gold_titles = list(sf.get("title") or [])
        elif isinstance(sf, list):
            gold_titles = [f[0] for f in sf if isinstance(f, list) and f]
        else:
            raise ValueError(f"{where}: 'supporting_facts' must be {{title, sent_id}} or a list of [title, id]")
        documents, seen = [], set()
        for title, sentences in pairs:
            if title in seen:
                continue
            seen.add(title)
            documents.append({"id": title, "title": title, "content": join_sentences(sentences)})
        return make_qa_example(qid, row["question"], [row["answer"]], documents=documents,
                               gold_doc_ids=list(dict.fromkeys(gold_titles)),
                               type=row.get("type"), level=row.get("level"))


def hotpot_corpus(examples):
    """Deduplicated HotpotQA paragraphs (id = Wikipedia title) of `examples` as KB documents."""
    return corpus_from_examples(examples, "hotpotqa")


# -----------------------------------------------------------------------------
# PubMedQA (Jin et al., 2019): the 1000 expert-labelled questions, yes/no/maybe over an abstract

PUBMEDQA_REPO = "qiaojin/PubMedQA"
PUBMEDQA_HF_FILE = "pqa_labeled/train-00000-of-00001.parquet"
PUBMEDQA_TEST_IDS_URL = "https://raw.githubusercontent.com/pubmedqa/pubmedqa/master/data/test_ground_truth.json"
DECISIONS = ("yes", "no", "maybe")


def _pubmedqa_files(local_path):
    """(records, test_ids {pmid: decision}) from a local dir or, with local_path=None, the hub + GitHub."""
    if local_path is not None:
        local_path = os.fspath(local_path)
        ori, gt = os.path.join(local_path, "ori_pqal.json"), os.path.join(local_path, "test_ground_truth.json")
        for p in (ori, gt):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"PubMedQA local_path: {p} not found (local_path must be a directory "
                                        f"holding ori_pqal.json and test_ground_truth.json)")
        records = read_records(ori)
    else:
        records = read_records(hf_dataset_file(PUBMEDQA_REPO, PUBMEDQA_HF_FILE))
        gt = os.path.join(get_base_dir(), "hf_cache", "pubmedqa-github", "test_ground_truth.json")
        if not os.path.isfile(gt):
            download_url(PUBMEDQA_TEST_IDS_URL, gt, hint="Or pass local_path= (a directory with ori_pqal.json "
                                                         "and test_ground_truth.json).")
    with open(gt, "r", encoding="utf-8") as f:
        try:
            test_ids = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{gt}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(test_ids, dict):
        raise ValueError(f"{gt}: expected an object mapping PubMed ids to decisions")
    return records, {str(k): v for k, v in test_ids.items()}


def _pubmedqa_record(rec, where):
    """Normalize an ori_pqal.json record or a hub pqa_labeled row."""
    if "QUESTION" in rec:  # ori_pqal.json
        pmid, question, contexts = rec.get("_key"), rec.get("QUESTION"), rec.get("CONTEXTS")
        labels, meshes, year = rec.get("LABELS") or [], rec.get("MESHES") or [], rec.get("YEAR")
        decision, long_answer = rec.get("final_decision"), rec.get("LONG_ANSWER")
    else:  # hub parquet
        ctx = rec.get("context") or {}
        pmid, question, contexts = rec.get("pubid"), rec.get("question"), ctx.get("contexts")
        labels, meshes, year = ctx.get("labels") or [], ctx.get("meshes") or [], None
        decision, long_answer = rec.get("final_decision"), rec.get("long_answer")
    if pmid is None or not isinstance(question, str) or not isinstance(contexts, list) or not contexts:
        raise ValueError(f"{where}: expected a PubMed id, a question and a list of contexts")
    if decision not in DECISIONS:
        raise ValueError(f"{where}: final_decision must be one of {DECISIONS}, got {decision!r}")
    pmid = str(pmid)
    if len(labels) == len(contexts):  # "BACKGROUND: ...", "METHODS: ..." as in the abstract
        content = "\n".join(f"{label}: {text}" for label, text in zip(labels, contexts))
    else:
        content = "\n".join(contexts)
    doc = {"id": pmid, "title": f"PubMed {pmid}", "content": content}
    meta = {"year": year, "meshes": list(meshes)}
    return pmid, question, decision, long_answer, doc, meta


def _pubmedqa_all(local_path):
    records, test_ids = _pubmedqa_files(local_path)
    out = []
    for i, rec in enumerate(records):
        out.append(_pubmedqa_record(rec, f"PubMedQA record {i} ({rec.get('_key', rec.get('pubid'))})"))
    pmids = [r[0] for r in out]
    if len(set(pmids)) != len(pmids):
        raise ValueError("PubMedQA: duplicate PubMed ids in the labelled set")
    by_id = {r[0]: r for r in out}
    missing = [k for k in test_ids if k not in by_id]
    if missing:
        raise ValueError(f"PubMedQA: {len(missing)} test ids are not in the labelled set, e.g. {missing[:3]}")
    wrong = [k for k, v in test_ids.items() if by_id[k][2] != v]
    if wrong:
        raise ValueError(f"PubMedQA: test_ground_truth disagrees with final_decision for ids {wrong[:3]}")
    return out, test_ids


class PubMedQA(QATask):
    """
    question -> "yes" | "no" | "maybe". split "test" is the standard 500 ids of test_ground_truth.json, "train"
    the other 500. The document is the abstract without its conclusion (the reasoning-required setting); the
    conclusion is kept as "long_answer".
    """

    def __init__(self, split, local_path=None, seed=42, **view):
        super().__init__(**view)
        self.split = check_choice("PubMedQA split", split, ("train", "test"))
        records, test_ids = _pubmedqa_all(local_path)
        self.examples = []
        for pmid, question, decision, long_answer, doc, meta in records:
            if (pmid in test_ids) != (split == "test"):
                continue
            self.examples.append(make_qa_example(pmid, question, [decision], documents=[doc],
                                                 gold_doc_ids=[pmid], long_answer=long_answer, **meta))
        self.order = shuffled_order(len(self.examples), seed)

    def num_examples(self):
        return len(self.examples)

    def get_example(self, index):
        return copy.deepcopy(self.examples[self.order[index]])


def pubmedqa_corpus(local_path=None):
    """The 1000 PubMedQA abstracts (both splits) as KB documents, id = PubMed id."""
    records, _ = _pubmedqa_all(local_path)
    return [{**doc, "metadata": {"source": "pubmedqa", **meta}} for _, _, _, _, doc, meta in records]


# -----------------------------------------------------------------------------
# our own QA JSONL


class QAJsonl(QATask):
    """A local JSONL file of QA examples in the schema above, validated line by line (errors name file:line)."""

    def __init__(self, filepath, **view):
        super().__init__(**view)
        self.filepath = os.fspath(filepath)
        if not os.path.isfile(self.filepath):
            raise FileNotFoundError(f"QAJsonl: no such file {self.filepath}")
        self.examples = []
        with open(self.filepath, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.filepath}:{lineno}"
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(ex, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
                if "answers" not in ex:
                    raise ValueError(f"{where}: missing 'answers' (a list of acceptable answer strings)")
                validate_qa_example(ex, where)
                ex.setdefault("id", f"{os.path.basename(self.filepath)}:{lineno}")
                self.examples.append(ex)
        if not self.examples:
            raise ValueError(f"{self.filepath}: no examples in file")

    def num_examples(self):
        return len(self.examples)

    def get_example(self, index):
        return copy.deepcopy(self.examples[index])
