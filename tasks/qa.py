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

SQuAD and HotpotQA come from the HF hub (tasks/hf.py: HubTask); PubMedQA's standard split is not on the hub, so it
reads a local copy of the PubMedQA repository's data directory. Every task is generative; evaluate() is
tasks.common.answer_match: citation markers ("[1]", "[DOC_2]") stripped, SQuAD-normalized exact match against
`answers` (against NO_ANSWER when there are none).
"""

import os
import copy
import hashlib

from tqdm import tqdm

from nanochat.metrics import NO_ANSWER
from tasks.common import Task, check_choice, shuffled_order, validate_conversation, validate_documents, answer_match
from tasks.customjson import CustomJSON
from tasks.hf import HubTask, read_json, read_records

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


# -----------------------------------------------------------------------------
# SQuAD (Rajpurkar et al., 2016; v2 with unanswerable questions, 2018)

SQUAD_FILES = {
    "v1": ("rajpurkar/squad", "plain_text"),
    "v2": ("rajpurkar/squad_v2", "squad_v2"),
}


def squad_doc_id(title, context):
    """A paragraph's KB id: article title + a hash of the paragraph (SQuAD has ~5 questions per paragraph)."""
    return f"{title}#{hashlib.sha1(context.encode('utf-8')).hexdigest()[:12]}"


class SQuAD(HubTask):
    eval_type = "generative"

    def __init__(self, split, version="v1", local_path=None, seed=42, **view):
        self.split = check_choice("SQuAD split", split, ("train", "validation"))
        self.version = check_choice("SQuAD version", version, list(SQUAD_FILES))
        repo_id, config = SQUAD_FILES[version]
        super().__init__(repo_id, [f"{config}/{split}-00000-of-00001.parquet"], local_path, seed, **view)

    def make_example(self, row, where):
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

    def evaluate(self, conversation, assistant_response):
        return answer_match(conversation, assistant_response)


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


class HotpotQA(HubTask):
    eval_type = "generative"

    def __init__(self, split, setting="distractor", local_path=None, seed=42, **view):
        self.split = check_choice("HotpotQA split", split, ("train", "validation"))
        self.setting = check_choice("HotpotQA setting", setting, ("distractor", "fullwiki"))
        super().__init__(HOTPOT_REPO, HOTPOT_FILES[(setting, split)], local_path, seed, **view)

    def make_example(self, row, where):
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

    def evaluate(self, conversation, assistant_response):
        return answer_match(conversation, assistant_response)


def hotpot_corpus(examples):
    """Deduplicated HotpotQA paragraphs (id = Wikipedia title) of `examples` as KB documents."""
    return corpus_from_examples(examples, "hotpotqa")


# -----------------------------------------------------------------------------
# PubMedQA (Jin et al., 2019): the 1000 expert-labelled questions, yes/no/maybe over an abstract

DECISIONS = ("yes", "no", "maybe")
PUBMEDQA_FILES = ("ori_pqal.json", "test_ground_truth.json")  # data/ of github.com/pubmedqa/pubmedqa


def _pubmedqa_record(rec, where):
    """(pmid, question, decision, long_answer, document, metadata) of an ori_pqal.json record."""
    pmid, question, contexts = rec.get("_key"), rec.get("QUESTION"), rec.get("CONTEXTS")
    labels, decision = rec.get("LABELS") or [], rec.get("final_decision")
    if pmid is None or not isinstance(question, str) or not isinstance(contexts, list) or not contexts:
        raise ValueError(f"{where}: expected a PubMed id, a QUESTION and a list of CONTEXTS")
    if decision not in DECISIONS:
        raise ValueError(f"{where}: final_decision must be one of {DECISIONS}, got {decision!r}")
    pmid = str(pmid)
    if len(labels) == len(contexts):  # "BACKGROUND: ...", "METHODS: ..." as in the abstract
        content = "\n".join(f"{label}: {text}" for label, text in zip(labels, contexts))
    else:
        content = "\n".join(contexts)
    doc = {"id": pmid, "title": f"PubMed {pmid}", "content": content}
    meta = {"year": rec.get("YEAR"), "meshes": list(rec.get("MESHES") or [])}
    return pmid, question, decision, rec.get("LONG_ANSWER"), doc, meta


def _pubmedqa_all(local_path):
    """The records of ori_pqal.json (_pubmedqa_record) and the test ids {pmid: decision}, checked against each
    other."""
    ori, gt = (os.path.join(os.fspath(local_path), name) for name in PUBMEDQA_FILES)
    for p in (ori, gt):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"PubMedQA local_path: {p} not found (local_path must be a directory holding "
                                    f"{' and '.join(PUBMEDQA_FILES)}: the data/ of github.com/pubmedqa/pubmedqa)")
    test_ids = read_json(gt)
    if not isinstance(test_ids, dict):
        raise ValueError(f"{gt}: expected an object mapping PubMed ids to decisions")
    test_ids = {str(k): v for k, v in test_ids.items()}
    out = [_pubmedqa_record(rec, f"{ori}: record {rec.get('_key')}") for rec in read_records(ori)]
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


class PubMedQA(Task):
    """
    question -> "yes" | "no" | "maybe". split "test" is the standard 500 ids of test_ground_truth.json, "train"
    the other 500. The document is the abstract without its conclusion (the reasoning-required setting); the
    conclusion is kept as "long_answer".
    """

    eval_type = "generative"

    def __init__(self, split, local_path, seed=42, **view):
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

    def evaluate(self, conversation, assistant_response):
        return answer_match(conversation, assistant_response)


def pubmedqa_corpus(local_path):
    """The 1000 PubMedQA abstracts (both splits) as KB documents, id = PubMed id."""
    records, _ = _pubmedqa_all(local_path)
    return [{**doc, "metadata": {"source": "pubmedqa", **meta}} for _, _, _, _, doc, meta in records]


# -----------------------------------------------------------------------------
# our own QA JSONL


class QAJsonl(CustomJSON):
    """A local JSONL file of QA examples in the schema above, validated line by line (errors name file:line); an
    example without an "id" gets "<file name>:<line>"."""

    def validate(self, example, where):
        if "answers" not in example:
            raise ValueError(f"{where}: missing 'answers' (a list of acceptable answer strings)")
        validate_qa_example(example, where)
        example.setdefault("id", os.path.basename(where))  # where is "path:line"
