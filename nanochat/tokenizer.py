"""
The BPE tokenizer of nanochat-rag, and the renderer that turns a conversation into (ids, mask) for training.

Training uses rustbpe (a small Rust BPE trainer); the result is exported to a tiktoken.Encoding, which does the
fast inference-time encoding. The vocabulary is: 256 byte tokens, the learned merges, then SPECIAL_TOKENS.

    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()                                   # $NANOCHAT_BASE_DIR/tokenizer (python -m scripts.tok_train)
    ids = tok.encode("hello world", prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})  # mask 1 only on what the assistant writes
    prompt = tok.render_for_completion({"messages": [...]})   # ends with <|assistant_start|>
    block = tok.render_documents(docs, first_number=4)        # a retrieval block, as the Engine forces it

Retrieved documents are numbered [1], [2], ... continuously across every retrieval block of a conversation (the
hop-0 retrieval message, then each documents part of a REFRAG trajectory), each cut to doc_chars characters
(cut_document) before it is encoded; trimming for the context drops whole documents and never renumbers.

Saved as plain JSON (tokenizer.json: format version, split pattern, base64 token bytes with ranks, special token
ids), never pickled. The conversation schema and the special tokens are described in shared/DESIGN.md.
"""

import os
import json
import base64
import hashlib

from nanochat.common import atomic_path, get_base_dir, print0

# -----------------------------------------------------------------------------
# vocabulary constants

# Every special token is reserved now, even the ones used only later (REFRAG queries): adding tokens later would
# change the vocabulary size and break every checkpoint. Their ids follow the BPE vocabulary in this order.
SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool (calculator)
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced by the Engine
    "<|retrieval_start|>", "<|retrieval_end|>",  # a block of retrieved documents
    "<|doc_start|>", "<|doc_end|>",  # one document inside a retrieval block
    "<|query_start|>", "<|query_end|>",  # the assistant writes a search query (REFRAG)
]

# Pre-tokenization split, GPT-4 style (contractions, letter runs with one leading non-letter, numbers, punctuation
# runs, newlines, whitespace), except that numbers are split into runs of at most 2 digits instead of 3: with a
# small vocabulary, 3-digit chunks would spend ~1000 tokens on numbers (nanochat makes the same choice).
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?+\p{L}+"
    r"|\p{N}{1,2}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s+(?!\S)"
    r"|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
FORMAT_NAME = "nanochat-rag tokenizer"
FORMAT_VERSION = 1


class ConversationTooLong(ValueError):
    """The conversation does not fit in max_tokens even after dropping every retrieved document."""


# Retrieved documents are cut to DOC_CHARS characters before encoding (cut_document), in training and in the Engine
# alike. 2000 keeps 99% of the multi-hop Wikipedia passages (median 371 chars) and ~90% of PubMedQA abstracts whole
# while no document can take more than ~500-700 tokens of the context (../shared/data, measured 2026-12-04).
DOC_CHARS = 2000
# A document longer than MAX_CHARS_PER_TOKEN * (the token budget) characters cannot fit in that budget (our BPE
# averages ~4 chars per token), so it is also cut there before encoding: a 50 MB document costs a slice, not a
# whole-document BPE pass (issue 15, item 8).
MAX_CHARS_PER_TOKEN = 8
# What the Engine writes inside a retrieval block that carries no documents (a documents part's "notice").
NOTICE_NO_NEW_DOCUMENTS = "No new documents found for this query."
NOTICE_HOP_CAP = "No more searches allowed: answer from the documents above."
NOTICE_NO_ROOM = "No room for more documents: answer from the documents above."


def cut_document(text, doc_chars=DOC_CHARS):
    """
    A document's content as shown to the model: unchanged if it has at most doc_chars characters, else cut at the
    last space in the window (when that keeps at least half of it) and ended with "...". The result never exceeds
    doc_chars characters, so cutting twice changes nothing (the Engine cuts, records, and the renderer cuts again).
    """
    if isinstance(doc_chars, bool) or not isinstance(doc_chars, int) or doc_chars < 1:
        raise ValueError(f"doc_chars must be a positive int, got {doc_chars!r}")
    if len(text) <= doc_chars:
        return text
    if doc_chars <= 3:
        return text[:doc_chars]
    head = text[:doc_chars - 3]
    space = head.rfind(" ")
    if space >= len(head) // 2:
        head = head[:space]
    return head.rstrip() + "..."


def _ranks_digest(ranks_b64):
    """sha256 over the saved (base64, rank) list, so a corrupted tokenizer.json is caught at load time."""
    h = hashlib.sha256()
    for b64, rank in ranks_b64:
        h.update(f"{b64} {rank}\n".encode("ascii"))
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A tiktoken.Encoding plus our special tokens and the conversation renderer."""

    def __init__(self, enc, bos_token="<|bos|>", mergeable_ranks=None):
        # enc: a tiktoken.Encoding. mergeable_ranks: its {bytes: rank}, kept for save() (None for pretrained ones)
        self.enc = enc
        self._mergeable_ranks = mergeable_ranks
        self._special = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self._special = dict(sorted(self._special.items(), key=lambda kv: kv[1]))
        if bos_token not in self._special:
            raise ValueError(f"bos token {bos_token!r} is not a special token of encoding {enc.name!r}")
        self.bos_token_id = self._special[bos_token]
        # short names -> ids for the renderer ("user_start": id, ...); None on encodings without our chat tokens
        has_all = all(name in self._special for name in SPECIAL_TOKENS)
        self._sp = {name.strip("<|>"): self._special[name] for name in SPECIAL_TOKENS} if has_all else None

    # ---- construction

    @classmethod
    def train_from_iterator(cls, text_iter, vocab_size):
        """
        Train a byte-level BPE with rustbpe on an iterator of strings. vocab_size counts everything: 256 bytes,
        the merges and the len(SPECIAL_TOKENS) special tokens. If the text runs out of pairs to merge first, the
        vocabulary is smaller (see get_vocab_size()).
        """
        import rustbpe
        n_special = len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size must be an int >= {256 + n_special} (256 byte tokens + {n_special} "
                             f"special tokens), got {vocab_size!r}")

        def checked(it):
            for i, text in enumerate(it):
                if not isinstance(text, str):
                    raise TypeError(f"train_from_iterator: item {i} is a {type(text).__name__}, expected str")
                yield text

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(checked(iter(text_iter)), vocab_size - n_special, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): int(r) for b, r in bpe.get_mergeable_ranks()}
        if len(ranks) < vocab_size - n_special:
            print0(f"note: the training text only supported {len(ranks) - 256} merges "
                  f"({len(ranks) + n_special} tokens instead of {vocab_size})")
        return cls._from_ranks(bpe.get_pattern(), ranks)

    @classmethod
    def _from_ranks(cls, pattern, ranks):
        import tiktoken
        n = len(ranks)
        special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="nanochat-rag", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=special_tokens)
        return cls(enc, bos_token="<|bos|>", mergeable_ranks=ranks)

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A tiktoken encoding (e.g. "gpt2", "cl100k_base") for comparisons; bos is its <|endoftext|>.
        Downloads its files on first use, so it fails offline unless they are cached."""
        import tiktoken
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except Exception as e:
            raise RuntimeError(f"could not load tiktoken encoding {tiktoken_name!r} (needs network access the first "
                               f"time, or TIKTOKEN_CACHE_DIR): {type(e).__name__}: {e}") from e
        return cls(enc, bos_token="<|endoftext|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load and validate <tokenizer_dir>/tokenizer.json written by save()."""
        path = os.path.join(os.fspath(tokenizer_dir), TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: run python -m scripts.tok_train first "
                                    f"(or pass the directory that holds {TOKENIZER_FILE})")
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON (corrupted or truncated?): {e}") from e

        def bad(msg):
            return ValueError(f"{path}: {msg}")

        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise bad(f"not a nanochat-rag tokenizer file (expected \"format\": {FORMAT_NAME!r})")
        if data.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported tokenizer format version {data.get('version')!r} "
                      f"(this code reads version {FORMAT_VERSION})")
        pattern, ranks_b64 = data.get("pattern"), data.get("mergeable_ranks")
        if not isinstance(pattern, str) or not pattern:
            raise bad("missing or empty \"pattern\"")
        if not isinstance(ranks_b64, list) or len(ranks_b64) < 256:
            raise bad("\"mergeable_ranks\" must be a list of at least 256 [base64, rank] entries")
        ranks = {}
        for i, entry in enumerate(ranks_b64):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[1] == i
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
                raise bad(f"mergeable_ranks entry {i} is {str(entry)[:80]}, expected [base64, {i}]")
            try:
                token = base64.b64decode(entry[0], validate=True)
            except ValueError as e:
                raise bad(f"mergeable_ranks entry {i}: bad base64 {entry[0][:40]!r}: {e}") from e
            if not token or token in ranks:
                raise bad(f"mergeable_ranks entry {i}: empty or duplicate token {token!r}")
            ranks[token] = i
        if any(bytes([b]) not in ranks for b in range(256)):
            raise bad("mergeable_ranks does not contain all 256 single bytes")
        if data.get("mergeable_ranks_sha256") != _ranks_digest(ranks_b64):
            raise bad("mergeable_ranks_sha256 does not match the ranks (the file is corrupted)")
        expected_special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if data.get("special_tokens") != expected_special:
            raise bad(f"special_tokens {data.get('special_tokens')!r} differ from this code's SPECIAL_TOKENS "
                      f"with ids from {len(ranks)} (a tokenizer from another version?)")
        if data.get("vocab_size") != len(ranks) + len(SPECIAL_TOKENS):
            raise bad(f"vocab_size {data.get('vocab_size')!r} != {len(ranks)} + {len(SPECIAL_TOKENS)}")
        try:
            return cls._from_ranks(pattern, ranks)
        except Exception as e:
            raise bad(f"could not build the encoding (bad pattern?): {type(e).__name__}: {e}") from e

    def save(self, tokenizer_dir):
        """Write <tokenizer_dir>/tokenizer.json atomically (plain JSON, one token per line)."""
        if self._mergeable_ranks is None:
            raise ValueError("only tokenizers trained here (train_from_iterator / from_directory) can be saved")
        ranks_b64 = [[base64.b64encode(b).decode("ascii"), r]
                     for b, r in sorted(self._mergeable_ranks.items(), key=lambda kv: kv[1])]
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.enc._pat_str,
            "vocab_size": self.get_vocab_size(),
            "special_tokens": self._special,
            "mergeable_ranks_sha256": _ranks_digest(ranks_b64),
        }
        head = json.dumps(header, indent=2, ensure_ascii=False)
        assert head.endswith("\n}")
        text = (head[:-2] + ',\n  "mergeable_ranks": [\n    '
                + ",\n    ".join(json.dumps(e) for e in ranks_b64) + "\n  ]\n}\n")
        path = os.path.join(os.fspath(tokenizer_dir), TOKENIZER_FILE)
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        return path

    # ---- vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        """{name: id} of the special tokens, in id order (supports `name in tok.get_special_tokens()`)."""
        return dict(self._special)

    def id_to_token(self, id):
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < self.get_vocab_size():
            raise ValueError(f"token id {id!r} is out of range [0, {self.get_vocab_size()})")
        return self.enc.decode([id])

    def id_to_token_bytes(self, id):
        """The raw bytes of one token (special tokens: their name in UTF-8). Used to fingerprint a vocabulary."""
        return self.enc.decode_single_token_bytes(id)

    def render_documents(self, documents, first_number=1, doc_chars=DOC_CHARS, notice=None):
        """
        Token ids of one retrieval block, exactly as render_conversation writes a block whose first document has
        number first_number (numbers run on across all the blocks of a conversation): the Engine forces this when
        the model's <|query_end|> triggers retrieval mid-answer. notice: text inside the block after the documents
        (the Engine's NOTICE_* when there is nothing to show). No documents and no notice -> [].
        """
        if isinstance(first_number, bool) or not isinstance(first_number, int) or first_number < 1:
            raise ValueError(f"first_number must be a positive int, got {first_number!r}")
        segments = []
        self._doc_block(documents, "documents", 0, segments, first_number, doc_chars, notice)
        return [t for seg in segments for t in seg[0]]

    def encode_special(self, name):
        if name not in self._special:
            raise ValueError(f"{name!r} is not a special token; known: {list(self._special)}")
        return self._special[name]

    def get_bos_token_id(self):
        return self.bos_token_id

    def _resolve(self, tok):
        # prepend/append: a special token name or a token id
        if isinstance(tok, str):
            return self.encode_special(tok)
        if isinstance(tok, int) and not isinstance(tok, bool) and 0 <= tok < self.get_vocab_size():
            return tok
        raise ValueError(f"prepend/append must be a special token name or a token id in range, got {tok!r}")

    # ---- encode / decode

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        Ordinary text -> ids. Special-token strings in the text (e.g. "<|bos|>") are encoded as plain bytes,
        never as special ids. text: a str (-> list[int]) or a list of str (-> list[list[int]], in parallel).
        prepend/append: a special token name or id to put around each sequence.
        """
        pre = None if prepend is None else self._resolve(prepend)
        post = None if append is None else self._resolve(append)
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, list):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(f"encode: list item {i} is a {type(t).__name__}, expected str")
            rows, single = self.enc.encode_ordinary_batch(text, num_threads=num_threads), False
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        if pre is not None:
            rows = [[pre] + r for r in rows]
        if post is not None:
            for r in rows:
                r.append(post)
        return rows[0] if single else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        ids = [int(i) for i in ids]  # accepts lists, tuples, 1-D tensors and numpy arrays
        n = self.get_vocab_size()
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"decode: token id {i} is out of range [0, {n})")
        return self.enc.decode(ids)

    # ---- conversations

    def _doc_block(self, documents, where, block_idx, segments, first_number, doc_chars, notice=None, records=None):
        """
        Append the segments of one retrieval block whose documents are numbered first_number, first_number + 1, ...
        Each segment is (ids, mask, block, rank): rank is the document's 1-based place in its block (it orders the
        trimming in _fit), 0 for the block's notice, None for its start/end tokens. Each content is cut with
        cut_document before it is encoded. No documents and no notice renders nothing (no empty block), the same as
        a block whose documents were all trimmed away. records (a list, optional) gets (block, rank, document as
        shown: number, id, title, content, plus parent_id/score when given). Returns the number of documents.
        """
        sp = self._sp
        if sp is None:
            raise ValueError(f"encoding {self.enc.name!r} lacks the chat special tokens: "
                             f"use a nanochat-rag tokenizer to render documents")
        if not isinstance(documents, list):
            raise ValueError(f"{where}: \"documents\" must be a list, got {type(documents).__name__}")
        if notice is not None and not isinstance(notice, str):
            raise ValueError(f"{where}: \"notice\" must be a str, got {type(notice).__name__}")
        if not documents and not notice:
            return 0
        segments.append(([sp["retrieval_start"]], 0, block_idx, None))
        for rank, doc in enumerate(documents, start=1):
            if not isinstance(doc, dict) or not isinstance(doc.get("content"), str):
                raise ValueError(f"{where}, document {rank - 1}: expected a dict with a str \"content\", "
                                 f"got {str(doc)[:100]!r}")
            title = doc.get("title")
            if title is not None and not isinstance(title, str):
                raise ValueError(f"{where}, document {rank - 1}: \"title\" must be a str, got {title!r}")
            number = first_number + rank - 1
            content = cut_document(doc["content"], doc_chars)
            text = f"[{number}] Title: {title}\nContent: {content}" if title else f"[{number}] Content: {content}"
            ids = [sp["doc_start"]] + self.enc.encode_ordinary(text) + [sp["doc_end"]]
            segments.append((ids, 0, block_idx, rank))
            if records is not None:
                shown = {"number": number, "id": doc.get("id"), "title": title or "", "content": content}
                shown.update({k: doc[k] for k in ("parent_id", "score") if doc.get(k) is not None})
                records.append((block_idx, rank, shown))
        if notice:
            segments.append((self.enc.encode_ordinary(notice), 0, block_idx, 0))
        segments.append(([sp["retrieval_end"]], 0, block_idx, None))
        return len(documents)

    def _segments(self, messages, doc_chars, records=None):
        """
        Validate the messages and encode each piece once: a list of (ids, mask, block, rank) segments. Documents
        are numbered continuously across all the retrieval blocks of the conversation, in order of appearance
        (retrieval messages and the assistant's documents parts alike), and cut to doc_chars characters.
        """
        sp = self._sp
        if sp is None:
            raise ValueError(f"encoding {self.enc.name!r} lacks the chat special tokens: "
                             f"use a nanochat-rag tokenizer to render conversations")
        enc = self.enc.encode_ordinary
        if not isinstance(messages, list) or not messages:
            raise ValueError("conversation[\"messages\"] must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")

        def text_of(i, m, key="content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"message {i} (role {m.get('role')!r}): {key!r} must be a str, "
                                 f"got {type(m.get(key)).__name__}")
            return m[key]

        segments = [([sp["bos"]], 0, None, None)]
        system, start = None, 0
        if messages[0].get("role") == "system":
            system, start = text_of(0, messages[0]), 1
        expect, n_blocks, seen_user, number = "user", 0, False, 1
        for i in range(start, len(messages)):
            m = messages[i]
            role = m.get("role")
            if role == "retrieval":
                # retrieval messages sit just before the user turn they support (or after the system message)
                j = i + 1
                while j < len(messages) and messages[j].get("role") == "retrieval":
                    j += 1
                if expect != "user" or j == len(messages) or messages[j].get("role") != "user":
                    nxt = "the end of the conversation" if j == len(messages) else \
                        f"message {j} with role {messages[j].get('role')!r}"
                    raise ValueError(f"message {i} (role 'retrieval') must come before a user turn "
                                     f"(it is followed by {nxt}, while a {expect} turn is expected)")
                number += self._doc_block(m.get("documents"), f"message {i} (role 'retrieval')", n_blocks, segments,
                                          number, doc_chars, m.get("notice"), records)
                n_blocks += 1
            elif role == "user":
                if expect != "user":
                    raise ValueError(f"message {i} has role 'user' but roles must alternate user/assistant: "
                                     f"an assistant message is expected here")
                content = text_of(i, m)
                if system is not None:  # nanochat convention: the system prompt is merged into the first user turn
                    content, system = system + "\n\n" + content, None
                segments.append(([sp["user_start"]] + enc(content) + [sp["user_end"]], 0, None, None))
                expect, seen_user = "assistant", True
            elif role == "assistant":
                if expect != "assistant":
                    raise ValueError(f"message {i} has role 'assistant' but roles must alternate user/assistant: "
                                     f"a user message is expected here")
                segments.append(([sp["assistant_start"]], 0, None, None))
                content = m.get("content")
                if isinstance(content, str):
                    segments.append((enc(content), 1, None, None))
                elif isinstance(content, list):
                    for k, part in enumerate(content):
                        where = f"message {i} (role 'assistant'), part {k}"
                        ptype = part.get("type") if isinstance(part, dict) else None
                        if ptype == "documents":
                            number += self._doc_block(part.get("documents"), where, n_blocks, segments, number,
                                                      doc_chars, part.get("notice"), records)
                            n_blocks += 1
                            continue
                        if ptype not in ("text", "python", "python_output", "query"):
                            raise ValueError(f"{where}: unknown part {str(part)[:100]!r} (type must be text, python, "
                                             f"python_output, query or documents)")
                        if not isinstance(part.get("text"), str):
                            raise ValueError(f"{where} (type {ptype!r}): \"text\" must be a str")
                        ids = enc(part["text"])
                        if ptype == "text":
                            segments.append((ids, 1, None, None))
                        elif ptype == "python":  # the assistant writes the tool call: learned
                            segments.append(([sp["python_start"]] + ids + [sp["python_end"]], 1, None, None))
                        elif ptype == "python_output":  # forced by the Engine: never learned
                            segments.append(([sp["output_start"]] + ids + [sp["output_end"]], 0, None, None))
                        else:  # query: the assistant writes a search query (REFRAG): learned
                            segments.append(([sp["query_start"]] + ids + [sp["query_end"]], 1, None, None))
                else:
                    raise ValueError(f"message {i} (role 'assistant'): content must be a str or a list of parts, "
                                     f"got {type(content).__name__}")
                segments.append(([sp["assistant_end"]], 1, None, None))
                expect = "user"
            elif role == "system":
                raise ValueError(f"message {i} has role 'system': a system message is only allowed first")
            else:
                raise ValueError(f"message {i} has unknown role {role!r} "
                                 f"(expected system, retrieval, user or assistant)")
        if not seen_user:
            raise ValueError("the conversation has no user message")
        return segments

    def _fit(self, segments, max_tokens):
        """
        Drop retrieved documents until the total fits in max_tokens. Order: the lowest-ranked first across the
        whole conversation, i.e. the last place in its block first, and among equal places the later block first
        (so with blocks A and B of 3 docs: B3, A3, B2, A2, B1, A1). Numbers were written before trimming, so a
        dropped document leaves its number unused and every other document keeps its number: citations to them stay
        valid. A block that loses all its documents disappears with its start/end tokens, unless it carries a
        notice. Nothing else is ever cut.
        """
        total = sum(len(s[0]) for s in segments)
        if total <= max_tokens:
            return segments
        noticed = {s[2] for s in segments if s[3] == 0}
        docs = [(s[3], s[2], len(s[0])) for s in segments if s[3]]
        docs.sort(key=lambda d: (-d[0], -d[1]))
        left = {}
        for rank, block, _ in docs:
            left[block] = left.get(block, 0) + 1
        dropped = set()
        length = total
        for rank, block, n in docs:
            if length <= max_tokens:
                break
            dropped.add((block, rank))
            length -= n
            left[block] -= 1
            if left[block] == 0 and block not in noticed:
                dropped.add((block, None))
                length -= 2  # <|retrieval_start|> and <|retrieval_end|>
        if length > max_tokens:
            raise ConversationTooLong(f"conversation is {length} tokens even with all retrieved documents dropped "
                                      f"({total} with them), more than max_tokens={max_tokens}")
        return [s for s in segments if s[2] is None or (s[2], s[3]) not in dropped]

    def render_conversation(self, conversation, max_tokens=2048, doc_chars=DOC_CHARS):
        """
        Conversation dict -> (ids, mask), both lists of length <= max_tokens. mask is 1 exactly on the tokens the
        assistant writes (its text, python calls, queries and <|assistant_end|>); 0 on bos, user turns,
        <|assistant_start|>, tool outputs and retrieved documents. Too long -> documents are dropped (see _fit);
        still too long -> ConversationTooLong. Messages: an optional system message first (merged into the first
        user turn as system + "\\n\\n" + user), retrieval messages just before the user turn they support, and
        user/assistant alternating from a user turn. Documents are numbered [1], [2], ... continuously across all
        retrieval blocks and cut to doc_chars characters (cut_document; also to MAX_CHARS_PER_TOKEN * max_tokens,
        which only a document that could not fit anyway reaches), so a huge document is never encoded whole.
        """
        if not isinstance(conversation, dict) or "messages" not in conversation:
            raise ValueError("render_conversation expects a dict with a \"messages\" list")
        doc_chars = self._doc_chars(doc_chars, max_tokens, 1)
        segments = self._fit(self._segments(conversation["messages"], doc_chars), max_tokens)
        ids, mask = [], []
        for seg_ids, m, _, _ in segments:
            ids.extend(seg_ids)
            mask.extend([m] * len(seg_ids))
        return ids, mask

    def render_for_completion(self, conversation, max_tokens=2048, doc_chars=DOC_CHARS, return_documents=False):
        """
        Prompt ids for generation/eval: the conversation without its final assistant message (if any), rendered
        and trimmed like render_conversation, then <|assistant_start|>. The total is <= max_tokens.
        return_documents=True returns (ids, documents): every numbered document of the prompt in number order
        (documents[i]["number"] == i + 1), as shown (number, id, title, cut content, parent_id/score when given),
        with "shown": False for those trimmed away. The Engine continues the numbering and the dedupe from it.
        """
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise ValueError("render_for_completion expects a dict with a \"messages\" list")
        messages = list(conversation["messages"])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            last = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
            raise ValueError(f"render_for_completion needs the conversation to end with a user message (after "
                             f"dropping a final assistant message); it ends with role {last!r}")
        doc_chars = self._doc_chars(doc_chars, max_tokens, 2)
        records = []
        segments = self._fit(self._segments(messages, doc_chars, records), max_tokens - 1)
        ids = [t for seg in segments for t in seg[0]]
        ids.append(self.encode_special("<|assistant_start|>"))
        if not return_documents:
            return ids
        kept = {(s[2], s[3]) for s in segments if s[3]}
        return ids, [dict(doc, shown=(block, rank) in kept) for block, rank, doc in records]

    @staticmethod
    def _doc_chars(doc_chars, max_tokens, least):
        """Validate max_tokens (>= least) and doc_chars; the character cap applied before encoding a document."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < least:
            raise ValueError(f"max_tokens must be an int >= {least}, got {max_tokens!r}")
        if isinstance(doc_chars, bool) or not isinstance(doc_chars, int) or doc_chars < 1:
            raise ValueError(f"doc_chars must be a positive int, got {doc_chars!r}")
        return min(doc_chars, MAX_CHARS_PER_TOKEN * max_tokens)

    def visualize_tokenization(self, ids, mask=None, color=True):
        """A debug string: tokens separated by '|', green where mask is 1, red where 0 (ANSI colors)."""
        if mask is not None and len(mask) != len(ids):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) differ in length")
        green, red, gray, reset = ("\033[92m", "\033[91m", "\033[90m", "\033[0m") if color else ("",) * 4
        out = []
        for k, i in enumerate(ids):
            text = self.id_to_token(int(i)).replace("\n", "\\n")
            if mask is None:
                out.append(text)
            else:
                out.append((green if mask[k] else red) + text + reset)
        return (gray + "|" + reset).join(out)


# -----------------------------------------------------------------------------
# module-level helpers


def get_tokenizer(tokenizer_dir=None):
    """The trained tokenizer from tokenizer_dir (default: get_base_dir()/tokenizer)."""
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    return Tokenizer.from_directory(tokenizer_dir)


def get_token_bytes(tokenizer, device="cpu"):
    """LongTensor (vocab_size,): UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
    import torch
    special = set(tokenizer.get_special_tokens().values())
    lengths = [0 if i in special else len(tokenizer.enc.decode_single_token_bytes(i))
               for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.long, device=device)
