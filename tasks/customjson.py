"""
CustomJSON: a task from a local JSONL file of conversations, one per line, in the shared schema:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], ...extra keys}

A bare list of messages per line (nanochat's identity_conversations.jsonl format) is accepted too. Every line
is validated up front; a bad one raises ValueError("file:line: reason"). Extra keys are kept.

    from tasks.customjson import CustomJSON
    task = CustomJSON("my_convos.jsonl", start=0, stop=100)
"""

import os
import copy
import json

from tasks.common import Task, validate_conversation, assistant_text, exact_match


def read_conversations_jsonl(filepath):
    """All conversations of a JSONL file, validated; errors name file:line."""
    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        raise FileNotFoundError(f"CustomJSON: no such file {filepath}")
    conversations = []
    with open(filepath, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{filepath}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, list):
                obj = {"messages": obj}
            if not isinstance(obj, dict) or "messages" not in obj:
                raise ValueError(f"{where}: expected an object with a 'messages' list")
            validate_conversation(obj, where)
            conversations.append(obj)
    if not conversations:
        raise ValueError(f"{filepath}: no conversations in file")
    return conversations


class CustomJSON(Task):

    def __init__(self, filepath, **view):
        super().__init__(**view)
        self.filepath = os.fspath(filepath)
        self.conversations = read_conversations_jsonl(self.filepath)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return copy.deepcopy(self.conversations[index])  # callers may augment it in place

    def evaluate(self, conversation, assistant_response):
        """Normalized exact match of the response against the conversation's last assistant message."""
        reference = assistant_text(conversation["messages"][-1])
        return exact_match(assistant_response, [reference])
