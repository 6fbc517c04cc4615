"""
Reading practice for pretraining: documents of TRAIN modules followed by questions about them and their verbatim
answers, made by the built-in QA's own question generator (tasks/stdlib_qa.question_candidates: all ten question
types) applied to train-module records. tasks/builtin_corpus.py --reading-practice puts them in the train shards.

    python -m tasks.reading_practice --doc-chars 300 --show 3      # counts and a few exercises (nothing written)

    from tasks.reading_practice import reading_exercises
    texts = reading_exercises(records, doc_chars=300, max_chars=900)

One exercise per train-module function/class/method record that has a question, laid out as the tokenizer shows
retrieved documents (nanochat/tokenizer.py, _doc_block) and as a RAG answer cites them:

    [1] Title: textwrap.indent
    Content: indent(text, prefix, predicate=None)
    ...

    [2] Title: textwrap.dedent
    Content: dedent(text)
    ...

    Question: What does `textwrap.dedent` return?
    Answer: <a verbatim span of document 2> [2]

Why (dev/LOG.md, 2026-12-04): the 1.4M-parameter CPU model never learned to copy a span from a document during
RAG fine-tuning alone (~2,000 questions). Here it practises exactly that on thousands of train-module records
while pretraining, so rag_finetune starts from a model that already copies. The documents are those of the KB
(tasks/stdlib_qa.kb_document, at the same --doc-chars), the distractors come from the same train module (as in
tasks/stdlib_qa.qa_example) and the documents are in a sha1 order, so the gold document is not always first.

Only train modules: every record shown, gold or distractor, has record_split == "train", so no rag, dev or test
module (tasks/stdlib_docs.module_split) ever reaches pretraining (tests/test_reading_practice.py checks it).
"""

from collections import Counter

from nanochat.common import ArgumentParser, print0, run_main
from tasks.stdlib_docs import harvest, record_split, squash
from tasks.stdlib_qa import (question_candidates, api_name_sets, kb_document, qa_example, KB_DOC_CHARS,
                             NUM_DISTRACTORS, QUESTION_TYPES)

API_KINDS = ("function", "class", "method")


def document_text(number, doc):
    """A document as the tokenizer lays out a retrieved one (Tokenizer._doc_block, without the special tokens)."""
    return f"[{number}] Title: {doc['title']}\nContent: {doc['content']}"


def format_exercise(documents, gold_id, qas, max_chars):
    """(text, questions used): the documents, then as many (question, answer) pairs as fit in max_chars characters,
    each answer citing the gold document's number. Distractors are dropped (last first) when not even one question
    fits beside them; (None, 0) when it does not fit alone either."""
    documents = list(documents)
    while True:
        number = next(i for i, d in enumerate(documents, start=1) if d["id"] == gold_id)
        text = "\n\n".join(document_text(i, d) for i, d in enumerate(documents, start=1))
        lines = []
        for question, answer in qas:
            qa = f"Question: {question}\nAnswer: {answer} [{number}]"
            if len(text) + 2 + len("\n".join(lines + [qa])) > max_chars:
                break
            lines.append(qa)
        if lines:
            return text + "\n\n" + "\n".join(lines), len(lines)
        others = [d for d in documents if d["id"] != gold_id]
        if not others:
            return None, 0
        documents.remove(others[-1])


def reading_exercises(records, doc_chars=KB_DOC_CHARS, max_chars=900, num_distractors=NUM_DISTRACTORS,
                      stats=None):
    """
    Exercise texts (format_exercise) for every train-module API record of `records` with at least one question
    (question_candidates, the built-in QA's generator, at most one question per type), in record id order.
    Distractors: up to num_distractors (at most NUM_DISTRACTORS) documents of the same class or module, chosen and
    ordered as tasks/stdlib_qa.qa_example does (no distractor holds one of the record's longer answers). stats (a
    dict, optional) gets the number of exercises, questions and characters, and the questions per type.
    """
    api = [r for r in records if r["kind"] in API_KINDS]
    unique_names, known_names = api_name_sets(api)  # the same name sets as the QA build
    train = sorted((r for r in api if record_split(r) == "train"), key=lambda r: r["id"])
    docs = {r["id"]: kb_document(r, doc_chars) for r in train}
    by_module = {}
    for r in train:
        by_module.setdefault(r["module"], []).append(docs[r["id"]])
    squashed = {i: squash(d["title"] + "\n" + d["content"]) for i, d in docs.items()}
    texts, types = [], Counter()
    for rec in train:
        cands = question_candidates(rec, unique_names, known_names, doc_chars)
        if not cands:
            continue
        answers = [a for *_, ans in cands for a in ans]  # no distractor may hold a long answer of any question
        shown = qa_example(rec["id"], "reading", "", answers, rec, docs[rec["id"]], by_module[rec["module"]],
                           squashed)["documents"]
        keep = {rec["id"]} | {d["id"] for d in [d for d in shown if d["id"] != rec["id"]][:num_distractors]}
        cands.sort(key=lambda c: QUESTION_TYPES.index(c[1]))  # the reading types first: they fit before the fixed
        text, used = format_exercise([d for d in shown if d["id"] in keep], rec["id"],
                                     [(q, ans[0]) for _, _, q, ans in cands], max_chars)
        if text is None:
            continue
        texts.append(text)
        types.update(qtype for _, qtype, _, _ in cands[:used])
    if stats is not None:
        stats.update(exercises=len(texts), questions=sum(types.values()), question_types=dict(sorted(types.items())),
                     chars=sum(map(len, texts)))
    return texts


def main():
    parser = ArgumentParser(description="Print what reading practice the built-in corpus would get (nothing written)")
    parser.add_argument("--doc-chars", type=int, default=KB_DOC_CHARS, help="cap on each document's docstring")
    parser.add_argument("--max-chars", type=int, default=900, help="cap on each exercise's length")
    parser.add_argument("--show", type=int, default=2, help="exercises to print")
    args = parser.parse_args()
    stats = {}
    texts = reading_exercises(harvest(), args.doc_chars, args.max_chars, stats=stats)
    for text in texts[::max(1, len(texts) // max(1, args.show))][:args.show]:
        print0(text + "\n" + "-" * 80)
    print0(stats)


if __name__ == "__main__":
    run_main(main)
