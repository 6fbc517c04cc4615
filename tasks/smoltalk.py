"""
SmolTalk: general chat conversations for SFT, from HuggingFaceTB/smol-smoltalk (Allal et al., 2025,
arXiv:2502.02737; the subset built for models under 1B parameters: ~460K train / ~24K test conversations).

    from tasks.smoltalk import SmolTalk
    train = SmolTalk("train")                         # downloads 4 parquet shards (~920 MB) once
    test = SmolTalk("test", local_path="test.parquet")  # or a local copy (parquet/jsonl with a messages column)

Each row has a `messages` column: an optional system message, then user/assistant turns.
"""

from tasks.common import check_choice, validate_conversation, answer_match
from tasks.hf import HubTask

REPO_ID = "HuggingFaceTB/smol-smoltalk"
FILES = {
    "train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}


class SmolTalk(HubTask):
    eval_type = "generative"

    def __init__(self, split, local_path=None, seed=42, **view):
        self.split = check_choice("SmolTalk split", split, list(FILES))
        super().__init__(REPO_ID, FILES[split], local_path, seed, **view)

    def make_example(self, row, where):
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise ValueError(f"{where}: no 'messages' list")
        # keep only the schema's keys (hub rows may carry extras per message)
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                    for m in messages]
        # a trailing user turn has nothing to learn from (no reply follows): drop it rather than fail mid-run
        while len(messages) > 1 and isinstance(messages[-1], dict) and messages[-1]["role"] == "user":
            messages.pop()
        conversation = {"messages": messages}
        validate_conversation(conversation, where)
        return conversation

    def evaluate(self, conversation, assistant_response):
        """Exact match against the reference's last assistant message (a chat set: only a sanity check, not a
        benchmark)."""
        return answer_match(conversation, assistant_response)
