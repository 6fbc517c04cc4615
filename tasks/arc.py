"""
ARC, the AI2 Reasoning Challenge (Clark et al., 2018): grade-school science multiple choice, from
allenai/ai2_arc. ARC-Easy and ARC-Challenge, splits train / validation / test.

    from tasks.arc import ARC
    task = ARC("ARC-Challenge", "test")    # 1172 questions, categorical eval over each question's letters

Rows: id, question, choices {text: [...], label: [...]}, answerKey. Most questions have 4 choices labelled
A-D; a few have 3 or 5, and a few are labelled 1-4: those are mapped to A-D here so every example asks for a
letter (the same answer space the model sees in MMLU).
"""

from tasks.common import render_mc, mc_letter
from tasks.hf import SubsetSplitTask

REPO_ID = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = {subset: ("train", "validation", "test") for subset in SUBSETS}
ALPHABET = "ABCDEFGH"


class ARC(SubsetSplitTask):
    eval_type = "categorical"

    repo_id, splits = REPO_ID, SPLITS

    def make_example(self, row, where):
        where = f"{where} (id {row.get('id')!r})"
        choices = row.get("choices") or {}
        texts, labels, key = choices.get("text"), choices.get("label"), row.get("answerKey")
        if not isinstance(row.get("question"), str) or not texts or not labels or len(texts) != len(labels):
            raise ValueError(f"{where}: expected a question and choices with as many texts as labels")
        if len(labels) > len(ALPHABET):
            raise ValueError(f"{where}: {len(labels)} choices, at most {len(ALPHABET)} supported")
        if key not in labels:
            raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        letters = tuple(ALPHABET[: len(labels)])  # position-based: "1".."4" -> "A".."D", "A".."D" unchanged
        answer = letters[labels.index(key)]
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, texts)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters, "id": row.get("id")}

    def evaluate(self, conversation, assistant_response):
        """True if the response names the correct letter."""
        return mc_letter(assistant_response) == conversation["messages"][-1]["content"]
