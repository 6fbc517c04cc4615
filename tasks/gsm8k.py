"""
GSM8K (Cobbe et al., 2021): grade-school math word problems with worked solutions, from openai/gsm8k
(subsets main / socratic, splits train 7473 / test 1319).

    from tasks.gsm8k import GSM8K
    task = GSM8K("main", "test")
    task.evaluate(task[0], "... #### 72")   # -> True if 72 is the reference answer

The solutions carry calculator annotations, "48/2 = <<48/2=24>>24 clips". Following nanochat, each one becomes
a tool call: a {"type": "python", "text": "48/2"} part (the model writes it) and a
{"type": "python_output", "text": "24"} part (the Engine's calculator forces it in; never trained on), between
the text parts. The final "#### 72" line stays in the text.
"""

import re
from fractions import Fraction

from tasks.hf import SubsetSplitTask

REPO_ID = "openai/gsm8k"
SUBSETS = ("main", "socratic")
SPLITS = {subset: ("train", "test") for subset in SUBSETS}
CALC_RE = re.compile(r"<<([^<>]*)>>")
ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")


def parse_solution(answer):
    """A GSM8K solution string -> assistant parts: text, then (python, python_output) per <<expr=result>>."""
    parts = []
    pos = 0
    for m in CALC_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        inner = m.group(1)
        expr, eq, result = inner.rpartition("=")
        if not eq:  # an annotation without "=": the whole thing is the expression, no output
            expr, result = inner, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def extract_answer(text):
    """The number after the last '####' in text, as a Fraction (commas and a $ allowed); None if absent."""
    matches = ANSWER_RE.findall(text)
    if not matches:
        return None
    return Fraction(matches[-1].replace(",", ""))


class GSM8K(SubsetSplitTask):
    eval_type = "generative"

    repo_id, splits = REPO_ID, SPLITS

    def make_example(self, row, where):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or extract_answer(answer) is None:
            raise ValueError(f"{where}: expected question and answer strings with a '#### number' answer")
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": parse_solution(answer)},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        """True if the '#### number' of the response equals the reference's numerically (1,000 == 1000.0)."""
        parts = conversation["messages"][-1]["content"]
        reference = extract_answer("".join(p["text"] for p in parts if p["type"] == "text"))
        predicted = extract_answer(assistant_response)
        return predicted is not None and predicted == reference
