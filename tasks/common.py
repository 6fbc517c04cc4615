"""
The Task abstraction shared by every dataset in tasks/, and the conversation-schema checks its loaders use.

A Task is a lazy, sliceable view over a list of examples. Each example is a conversation dict
({"messages": [...]}, see ../shared/DESIGN.md), possibly with extra keys (QA examples carry "answers",
"gold_doc_ids", "documents"; multiple-choice ones carry "letters"). Views compose:

    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk
    train = TaskMixture([GSM8K("main", "train"), SmolTalk("train")], seed=42)  # shuffled (task, idx) pairs
    rank_view = GSM8K("main", "test", start=rank, step=world_size)            # DDP striding
    conversation = train[0]

Answer metrics (EM, F1, citation stripping, NO_ANSWER) live in nanochat/metrics.py; answer_match here is how the
generative tasks apply them to an example.
"""

import bisect
import random
from abc import ABC, abstractmethod

from nanochat.metrics import NO_ANSWER, exact_match, strip_citations

# -----------------------------------------------------------------------------
# Task views


class Task(ABC):
    """
    A view over the examples of a dataset: examples start, start+step, ... (< stop) of get_example().
    Subclasses implement num_examples(), get_example(index), eval_type and evaluate().
    """

    def __init__(self, start=0, stop=None, step=1):
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"Task view: start must be an int >= 0, got {start!r}")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise ValueError(f"Task view: stop must be None or an int >= start ({start}), got {stop!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"Task view: step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    @property
    @abstractmethod
    def eval_type(self):
        """'categorical' (pick one of conversation['letters']) or 'generative' (free text)."""

    @abstractmethod
    def num_examples(self):
        """Number of underlying examples, before the start/stop/step view."""

    @abstractmethod
    def get_example(self, index):
        """The underlying example at index (0 <= index < num_examples()), a conversation dict."""

    @abstractmethod
    def evaluate(self, conversation, assistant_response):
        """Score a model's response to conversation (an example of this task): bool or float."""

    def _view(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self._view())

    def __getitem__(self, index):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(index).__name__}")
        view = self._view()
        try:
            physical = view[index]  # range handles negative indices and raises IndexError out of range
        except IndexError:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(view)}") from None
        return self.get_example(physical)

    def __iter__(self):
        for physical in self._view():
            yield self.get_example(physical)


class TaskOver(Task):
    """
    One example per example of base_task, made from it (the RAG views: RAGTask, MultiHopRAGTask, RefragTask): the
    same length, eval type and scoring as the base task; subclasses implement get_example.
    """

    def __init__(self, base_task, **view):
        super().__init__(**view)
        self.base_task = base_task

    @property
    def eval_type(self):
        return self.base_task.eval_type

    def num_examples(self):
        return len(self.base_task)

    def evaluate(self, conversation, assistant_response):
        return self.base_task.evaluate(conversation, assistant_response)


class TaskMixture(Task):
    """
    All (task, idx) pairs of the tasks, shuffled once with a fixed seed, so a training loop sees the datasets
    interleaved. Listing a task twice oversamples it (each copy contributes all its examples).
    The order is a pure function of (the tasks' lengths, seed): every rank of a DDP run agrees on it.
    """

    def __init__(self, tasks, seed=42, **view):
        super().__init__(**view)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.seed = seed
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))
        # a permutation of global indices (a flat int list: far lighter than a list of tuples for 1M examples)
        self.order = list(range(self.offsets[-1]))
        random.Random(seed).shuffle(self.order)

    @property
    def eval_type(self):
        raise TypeError("a TaskMixture has no single eval type; evaluate each of its tasks on its own")

    def num_examples(self):
        return len(self.order)

    def locate(self, index):
        """(task_idx, idx within that task's view) of an underlying (shuffled) index."""
        g = self.order[index]
        task_idx = bisect.bisect_right(self.offsets, g) - 1
        return task_idx, g - self.offsets[task_idx]

    def get_example(self, index):
        task_idx, local = self.locate(index)
        return self.tasks[task_idx][local]

    def evaluate(self, conversation, assistant_response):
        raise TypeError("a TaskMixture does not know which of its tasks a conversation came from; "
                        "call evaluate on the task itself")


# -----------------------------------------------------------------------------
# small helpers shared by the loaders


def check_choice(name, value, allowed):
    """Raise a ValueError naming the argument and the allowed values unless value is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def shuffled_order(n, seed):
    """range(n) shuffled by random.Random(seed); seed=None keeps file order. Shuffling once makes any
    prefix (eval with max_problems, a quick look at the first 100) a random sample of the split."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def render_mc(question, letters, choices):
    """
    The user prompt of a multiple-choice question. Each choice comes before its letter ("- Paris=A"): a small
    model reading left to right then sees the content first and the letter it must copy right after it.
    """
    if len(letters) != len(choices):
        raise ValueError(f"render_mc: {len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple choice question: {question}", ""]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


def mc_letter(response):
    """The letter a multiple-choice response names: 'B', ' b ', '(B)', 'B.' -> 'B'."""
    return response.strip().strip("().:[] ").upper()


def assistant_text(message):
    """The text an assistant message says: its content string, or its text parts joined (tool calls and
    their outputs left out)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def answer_match(conversation, assistant_response):
    """How the generative tasks score a response: SQuAD-normalized exact match, citations stripped on both sides,
    against the example's "answers" ([] = unanswerable: NO_ANSWER), or, for a conversation without "answers",
    against its last assistant message."""
    answers = conversation.get("answers")
    if answers is None:
        answers = [assistant_text(conversation["messages"][-1])]
    gold = [strip_citations(a) for a in answers] or [NO_ANSWER]
    return exact_match(strip_citations(assistant_response), gold)


# -----------------------------------------------------------------------------
# conversation validation (used by every loader that reads user-supplied or hub data)

ROLES = ("system", "retrieval", "user", "assistant")
TEXT_PART_TYPES = ("text", "python", "python_output", "query")


def validate_documents(docs, where):
    """Check a list of documents ({"id"?, "title"?, "content": str, ...}); ValueError("{where}: ...") if bad."""
    if not isinstance(docs, list):
        raise ValueError(f"{where}: 'documents' must be a list, got {type(docs).__name__}")
    for j, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: document {j} must be an object, got {type(doc).__name__}")
        if not isinstance(doc.get("content"), str):
            raise ValueError(f"{where}: document {j} needs a string 'content'")
        if "title" in doc and doc["title"] is not None and not isinstance(doc["title"], str):
            raise ValueError(f"{where}: document {j} 'title' must be a string, got {doc['title']!r}")


def validate_conversation(conversation, where="conversation"):
    """
    Check a conversation against the shared schema; raise ValueError("{where}: reason") on the first problem.
    Rules: optional system message first; a retrieval message (documents) only right before a user message;
    then user/assistant alternating, starting with user and ending with assistant; assistant content is a
    string or a list of parts ({"type": text|python|python_output|query, "text": str} or
    {"type": "documents", "documents": [...]}).
    """
    if not isinstance(conversation, dict):
        raise ValueError(f"{where}: expected an object with 'messages', got {type(conversation).__name__}")
    messages = conversation.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    expect = "user"  # the next role of the user/assistant alternation
    for i, msg in enumerate(messages):
        here = f"{where}: message {i}"
        if not isinstance(msg, dict):
            raise ValueError(f"{here}: expected an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{here}: role must be one of {list(ROLES)}, got {role!r}")
        if role == "system":
            if i != 0:
                raise ValueError(f"{here}: a system message may only come first")
            if not isinstance(msg.get("content"), str):
                raise ValueError(f"{here}: system content must be a string")
        elif role == "retrieval":
            validate_documents(msg.get("documents"), here)
            nxt = messages[i + 1]["role"] if i + 1 < len(messages) and isinstance(messages[i + 1], dict) else None
            if nxt != "user":
                raise ValueError(f"{here}: a retrieval message must come right before a user message")
        else:
            if role != expect:
                raise ValueError(f"{here}: expected role {expect!r} (user/assistant alternate), got {role!r}")
            expect = "assistant" if role == "user" else "user"
            content = msg.get("content")
            if role == "user" and not isinstance(content, str):
                raise ValueError(f"{here}: user content must be a string")
            if role == "assistant" and not isinstance(content, str):
                if not isinstance(content, list) or not content:
                    raise ValueError(f"{here}: assistant content must be a string or a non-empty list of parts")
                for j, part in enumerate(content):
                    ptype = part.get("type") if isinstance(part, dict) else None
                    if ptype in TEXT_PART_TYPES:
                        if not isinstance(part.get("text"), str):
                            raise ValueError(f"{here}: part {j} ({ptype}) needs a string 'text'")
                    elif ptype == "documents":
                        validate_documents(part.get("documents"), f"{here}: part {j}")
                    else:
                        raise ValueError(f"{here}: part {j} has unknown type {ptype!r}")
    if expect != "user":
        raise ValueError(f"{where}: the conversation must end with an assistant message")
