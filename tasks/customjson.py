"""
CustomJSON: a task from a local JSONL file of conversations, one per line, in the shared schema, and the base of
every JSONL-backed task (QAJsonl, StaticRAGTask, the built-in StdlibQA / StdlibChat):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], ...extra keys}

A bare list of messages per line (nanochat's identity_conversations.jsonl format) is accepted too. Every line is
read with nanochat.common.iter_jsonl and validated up front (subclasses add their own checks in validate()); a bad
line raises ValueError("file:line: reason"). Extra keys are kept.

    from tasks.customjson import CustomJSON
    task = CustomJSON("my_convos.jsonl", start=0, stop=100)
"""

import os
import copy

from nanochat.common import iter_jsonl
from tasks.common import Task, validate_conversation, answer_match


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, filepath, **view):
        super().__init__(**view)
        self.filepath = os.fspath(filepath)
        self.examples = []
        for where, obj in iter_jsonl(self.filepath, allow_lists=True):
            if isinstance(obj, list):
                obj = {"messages": obj}
            self.validate(obj, where)
            self.examples.append(obj)
        if not self.examples:
            raise ValueError(f"{self.filepath}: no examples in file")

    def validate(self, example, where):
        """Raise ValueError(f"{where}: ...") unless example fits this task (here: a conversation)."""
        if "messages" not in example:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        validate_conversation(example, where)

    def num_examples(self):
        return len(self.examples)

    def get_example(self, index):
        return copy.deepcopy(self.examples[index])  # callers may augment it in place

    def evaluate(self, conversation, assistant_response):
        """Normalized exact match (citations stripped) against the example's answers, else its last assistant text
        (tasks.common.answer_match)."""
        return answer_match(conversation, assistant_response)
