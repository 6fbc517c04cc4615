"""
MMLU (Hendrycks et al., 2021): 4-way multiple choice over 57 subjects, from cais/mmlu.

    from tasks.mmlu import MMLU
    test = MMLU("all", "test")                  # 14042 questions; categorical eval over letters ABCD
    aux = MMLU("auxiliary_train", "train")      # ~100K training questions (ARC, OBQA, RACE, MCTest)

Rows: question (str), subject (str), choices (4 str), answer (int 0..3; a letter A-D is accepted in local files).
The auxiliary_train parquet wraps each row in a single `train` column; it is unwrapped here.
"""

from tasks.common import render_mc, mc_letter
from tasks.hf import SubsetSplitTask

REPO_ID = "cais/mmlu"
SPLITS = {
    "all": ("validation", "dev", "test"),
    "auxiliary_train": ("train",),
}
LETTERS = ("A", "B", "C", "D")


class MMLU(SubsetSplitTask):
    eval_type = "categorical"

    repo_id, splits = REPO_ID, SPLITS

    def make_example(self, row, where):
        if set(row) == {"train"} and isinstance(row["train"], dict):
            row = row["train"]
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) != 4:
            raise ValueError(f"{where}: expected a question string and 4 choices, got {row!r:.200}")
        if isinstance(answer, str) and answer.strip().upper() in LETTERS:
            answer = LETTERS.index(answer.strip().upper())
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise ValueError(f"{where}: answer must be 0..3 or A-D, got {answer!r}")
        messages = [
            {"role": "user", "content": render_mc(question, LETTERS, [str(c) for c in choices])},
            {"role": "assistant", "content": LETTERS[answer]},
        ]
        return {"messages": messages, "subject": row.get("subject", ""), "letters": LETTERS}

    def evaluate(self, conversation, assistant_response):
        """True if the response names the correct letter."""
        return mc_letter(assistant_response) == conversation["messages"][-1]["content"]
