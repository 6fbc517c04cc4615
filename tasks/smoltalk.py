"""
SmolTalk: general chat conversations for SFT, from HuggingFaceTB/smol-smoltalk (Allal et al., 2025,
arXiv:2502.02737; the subset built for models under 1B parameters: ~460K train / ~24K test conversations).

    from tasks.smoltalk import SmolTalk
    train = SmolTalk("train")                         # downloads 4 parquet shards (~920 MB) once
    test = SmolTalk("test", local_path="test.parquet")  # or a local copy (parquet/jsonl with a messages column)

Each row has a `messages` column: an optional system message, then user/assistant turns.
"""

from nanochat.metrics import exact_match
from tasks.common import Task, check_choice, shuffled_order, validate_conversation, assistant_text
from tasks.hf import read_rows, task_files

REPO_ID = "HuggingFaceTB/smol-smoltalk"
FILES = {
    "train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}


class SmolTalk(Task):

    def __init__(self, split, local_path=None, seed=42, **view):
        super().__init__(**view)
        self.split = check_choice("SmolTalk split", split, list(FILES))
        self.paths = task_files(REPO_ID, FILES[split], local_path)
        self.rows = read_rows(self.paths)
        if len(self.rows) == 0:
            raise ValueError(f"SmolTalk: no rows in {self.paths}")
        self.order = shuffled_order(len(self.rows), seed)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row_idx = self.order[index]
        row = self.rows[row_idx]
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise ValueError(f"{REPO_ID} {self.split} row {row_idx} ({self.paths}): no 'messages' list")
        # keep only the schema's keys (hub rows may carry extras per message)
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                    for m in messages]
        # a trailing user turn has nothing to learn from (no reply follows): drop it rather than fail mid-run
        while len(messages) > 1 and isinstance(messages[-1], dict) and messages[-1]["role"] == "user":
            messages.pop()
        conversation = {"messages": messages}
        validate_conversation(conversation, f"{REPO_ID} {self.split} row {row_idx}")
        return conversation

    def evaluate(self, conversation, assistant_response):
        """Normalized exact match against the reference's last assistant message (a chat set: only a sanity
        check, not a benchmark)."""
        return exact_match(assistant_response, [assistant_text(conversation["messages"][-1])])
