"""
Knowledge-base (KB) directories as files, independent of any index: reading document files into chunks, and
kb.json, the KB's manifest. nanochat/retrieval.py builds the indexes on top of this (and holds the CLI,
`python -m nanochat.retrieval --documents docs.jsonl --output kb/ --type bm25`); this module imports nothing of it.

Document files: our JSONL {id?, title?, content|text|contents, metadata?}, BEIR corpus.jsonl {_id, title, text}
and FlashRAG {id, contents}, detected per line; optional chunking into overlapping word windows; exact duplicates
dropped; a bad line stops with file:line (or is skipped and counted with skip_bad).

kb.json (format 2) records the retriever type, model, dim, doc count, build args and "files": every file of the
KB with its size and sha256. Loading checks every size and hash, so an index file swapped in from another KB or
an edited documents.jsonl is a ValueError naming the file; replacing a directory is allowed only when it is a KB
and holds nothing but the files its kb.json lists (the CLI's --replace deletes the others, and says which).
Format-1 KBs (kb.json without "files", only documents.jsonl's sha256) still load; their own files are the fixed
set of index files each retriever type wrote then.

    from nanochat.kb import read_kb_meta, read_documents
    meta = read_kb_meta("kb/")                   # kb.json, validated (killed builds' temp dirs next to it removed)
    records, stats = read_documents(["docs.jsonl"], chunk_size=200)
"""

import os
import re
import sys
import json
import hashlib

from tqdm import tqdm

from nanochat.common import iter_jsonl, recover_dir

FORMAT_VERSION = 2  # 2: "files" lists every file with size + sha256; 1: only documents.jsonl's sha256 (content_hash)
RETRIEVER_TYPES = ("simple", "bm25", "dense", "hybrid")

# The files a format-1 KB of each type consists of (besides kb.json and documents.jsonl): what the retrievers of
# nanochat/retrieval.py wrote before kb.json listed them. Used only to recognise such a KB as ours.
_BM25_V1 = ("bm25_counts.npz",) + tuple(f"bm25s/{n}" for n in (
    "params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
    "nonoccurrence_array.index.npy"))
_DENSE_V1 = ("embeddings.npy", "index.faiss")
V1_INDEX_FILES = {"simple": ("tfidf_counts.npz", "tfidf_vocab.json"), "bm25": _BM25_V1, "dense": _DENSE_V1,
                  "hybrid": _BM25_V1 + _DENSE_V1}

# A retrieved document goes into a prompt whole (trimmed only there), so one far beyond any prompt is almost
# always a file that should have been chunked: a 50 MB document cost 8 s and 1.25 GB per prompt (issue 15).
LONG_DOC_CHARS = 100_000


# -----------------------------------------------------------------------------
# document files -> chunk records


def doc_hash(title, content):
    """Identity of a document's text (used to drop exact duplicates and to make missing ids)."""
    return hashlib.sha256(f"{title}\x00{content}".encode("utf-8")).hexdigest()


def parse_document(obj, where):
    """One JSON object in any supported format -> {id (None if absent), title, content, metadata}."""
    title = obj.get("title") or ""
    if "_id" in obj:  # BEIR corpus.jsonl: {_id, title, text}
        doc_id, content = obj["_id"], obj.get("text")
    elif "contents" in obj:  # FlashRAG: {id, contents}, contents = '"Title"\ntext'
        doc_id, content = obj.get("id"), obj["contents"]
        if isinstance(content, str) and content.startswith('"') and "\n" in content:
            first, rest = content.split("\n", 1)
            if len(first) >= 2 and first.endswith('"'):
                title, content = title or first[1:-1], rest
    else:  # ours: {id?, title?, content | text, metadata?}
        doc_id, content = obj.get("id"), obj.get("content", obj.get("text"))
    if content is None:
        raise ValueError(f"{where}: no text field (expected content, text or contents)")
    if not isinstance(content, str) or not isinstance(title, str):
        raise ValueError(f"{where}: title/text must be strings")
    if not content.strip():
        raise ValueError(f"{where}: empty text")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata must be an object, got {type(meta).__name__}")
    return {"id": None if doc_id is None else str(doc_id), "title": title, "content": content, "metadata": meta}


def check_chunking(chunk_size, chunk_overlap):
    if chunk_size is not None and (chunk_size < 1 or not 0 <= chunk_overlap < chunk_size):
        raise ValueError(f"need chunk_size >= 1 and 0 <= chunk_overlap < chunk_size, got {chunk_size}, {chunk_overlap}")


def chunk_words(content, chunk_size, chunk_overlap=0):
    """Split content into windows of chunk_size words, consecutive windows sharing chunk_overlap words."""
    check_chunking(chunk_size, chunk_overlap)
    words = content.split()
    if len(words) <= chunk_size:
        return [content]
    step = chunk_size - chunk_overlap
    starts = range(0, len(words) - chunk_overlap, step)
    return [" ".join(words[s:s + chunk_size]) for s in starts]


def long_chunk_limit(chunk_size):
    """Characters beyond which a chunk is reported at build time: LONG_DOC_CHARS unchunked; with chunking, 10x the
    chunk size at 10 characters a word (such a chunk has 'words' of hundreds of characters: no whitespace)."""
    return LONG_DOC_CHARS if chunk_size is None else 100 * chunk_size


def read_documents(paths, skip_bad=False, chunk_size=None, chunk_overlap=0, existing=(), show_progress=True):
    """
    Read document files into chunk records {id, title, content, metadata (+ parent_id, doc_hash, chunk)} (one per
    document when chunk_size is None). Exact duplicates (same title + content, also against `existing` documents,
    anything with .id/.title/.content/.metadata) are dropped; a duplicate id with other text, invalid UTF-8 or JSON
    or a missing/empty text stops with "file:line: reason", or is skipped and counted with skip_bad.
    Returns (records, stats); stats["long"] counts records beyond long_chunk_limit, stats["longest"] = (id, chars).
    """
    check_chunking(chunk_size, chunk_overlap)
    for path in paths:  # all of them before reading any
        if not os.path.isfile(path):
            raise FileNotFoundError(f"document file {path} does not exist")
    stats = {"lines": 0, "documents": 0, "chunks": 0, "duplicates": 0, "bad_lines": 0, "long": 0, "longest": None}
    seen_hashes = {d.metadata.get("doc_hash") or doc_hash(d.title, d.content) for d in existing}
    seen_ids = {d.metadata.get("parent_id", d.id): "the existing knowledge base" for d in existing}
    seen_ids.update({d.id: "the existing knowledge base" for d in existing})
    limit = long_chunk_limit(chunk_size)

    def bad_line(where, reason):  # iter_jsonl's on_error under skip_bad: invalid UTF-8 / JSON / not an object
        stats["lines"] += 1
        stats["bad_lines"] += 1

    records = []
    for path in paths:
        lines = iter_jsonl(path, on_error=bad_line if skip_bad else None)
        for where, obj in tqdm(lines, desc=os.path.basename(path), unit=" lines", disable=not show_progress,
                               mininterval=1.0):
            stats["lines"] += 1
            try:
                d = parse_document(obj, where)
                h = doc_hash(d["title"], d["content"])
                if h in seen_hashes:
                    stats["duplicates"] += 1
                    continue
                d["id"] = d["id"] if d["id"] is not None else "doc_" + h[:16]
                if d["id"] in seen_ids:
                    raise ValueError(f"{where}: duplicate id {d['id']!r} with different text (first in {seen_ids[d['id']]})")
            except ValueError:
                if not skip_bad:
                    raise
                stats["bad_lines"] += 1
                continue
            seen_hashes.add(h)
            seen_ids[d["id"]] = where
            stats["documents"] += 1
            pieces = [d["content"]] if chunk_size is None else chunk_words(d["content"], chunk_size, chunk_overlap)
            for i, piece in enumerate(pieces):
                chunk_id = d["id"] if len(pieces) == 1 else f"{d['id']}#{i}"
                meta = {**d["metadata"], "parent_id": d["id"], "doc_hash": h}
                if len(pieces) > 1:
                    meta["chunk"] = i
                records.append({"id": chunk_id, "title": d["title"], "content": piece, "metadata": meta})
                if len(piece) > limit:
                    stats["long"] += 1
                    if stats["longest"] is None or len(piece) > stats["longest"][1]:
                        stats["longest"] = (chunk_id, len(piece))
    stats["chunks"] = len(records)
    return records, stats


def long_documents_warning(stats, chunk_size):
    """The one line build time prints about chunks far beyond any prompt (None when there are none)."""
    if not stats["long"]:
        return None
    (doc_id, chars), n, limit = stats["longest"], stats["long"], long_chunk_limit(chunk_size)
    if chunk_size is None:
        return (f"warning: {n} document(s) longer than {limit:,} characters (largest {doc_id!r}: {chars:,}); a "
                f"retrieved document goes into the prompt whole, so split them with --chunk-size (e.g. 200 words)")
    return (f"warning: {n} chunk(s) longer than {limit:,} characters, 10x --chunk-size {chunk_size} words at 10 "
            f"characters a word (largest {doc_id!r}: {chars:,}); their text has very long runs without whitespace, "
            f"which word chunking cannot split")


# -----------------------------------------------------------------------------
# kb.json: the manifest


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def need_file(d, name):
    """The path of a file the KB directory d must hold (FileNotFoundError naming it when missing)."""
    path = os.path.join(d, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"knowledge base {d}: missing file {name} (rebuild it with python -m nanochat.retrieval)")
    return path


def list_entries(d):
    """Every file under d as a relative path with "/" separators; an empty directory or a link to a directory
    as "name/" (so that nothing a user put there is left out)."""
    out = []
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        out.extend(prefix + f for f in files)
        out.extend(prefix + x + "/" for x in dirs if os.path.islink(os.path.join(root, x)))
        if not files and not dirs and prefix:
            out.append(prefix)
    return sorted(out)


def _names(entries, limit=10):
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


_SAFE_PATH = re.compile(r"[^/\\\x00]+(/[^/\\\x00]+)*")


def check_manifest(meta, where):
    """Raise ValueError (naming `where`) unless meta is a kb.json this code reads; returns meta."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object (a KB manifest), got a JSON {type(meta).__name__}")
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{where}: format_version {version!r}, this code reads 1 and {FORMAT_VERSION} "
                         f"(not a KB manifest, or a KB from a newer version)")
    if meta.get("retriever_type") not in RETRIEVER_TYPES:
        raise ValueError(f"{where}: unknown retriever_type {meta.get('retriever_type')!r}")
    n = meta.get("num_documents")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{where}: num_documents must be a count, got {n!r}")
    if version == 1:
        if not isinstance(meta.get("content_hash"), str):
            raise ValueError(f"{where}: format-1 kb.json without content_hash")
        return meta
    files = meta.get("files")
    if not isinstance(files, dict) or "documents.jsonl" not in files:
        raise ValueError(f"{where}: 'files' must map each file of the KB (documents.jsonl first) to its size and sha256")
    for rel, rec in files.items():
        if not _SAFE_PATH.fullmatch(rel) or ".." in rel.split("/") or "." in rel.split("/") or rel == "kb.json":
            raise ValueError(f"{where}: 'files' names {rel!r}, not a relative path inside the KB")
        if (not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or isinstance(rec.get("size"), bool)
                or not re.fullmatch(r"[0-9a-f]{64}", str(rec.get("sha256")))):
            raise ValueError(f"{where}: 'files' entry {rel!r} must be {{size: int, sha256: 64 hex digits}}, got {rec!r}")
    return meta


def _load_kb_json(kb_json):
    try:
        with open(kb_json, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{kb_json}: not valid JSON ({e})") from None
    return check_manifest(meta, kb_json)


def kb_files(meta):
    """The relative paths a KB consists of according to its kb.json (kb.json included)."""
    if meta["format_version"] == 1:
        return {"kb.json", "documents.jsonl", *V1_INDEX_FILES[meta["retriever_type"]]}
    return {"kb.json", *meta["files"]}


def read_kb_meta(path):
    """
    kb.json of the KB directory at path, validated (check_manifest). First removes what killed builds left next to
    it (their temp dirs; if one died between its two renames, the complete new KB or the previous one is put back).
    """
    path = os.fspath(path)
    try:
        recover_dir(path)
    except OSError:  # another process (e.g. another rank of the same run) recovered it first: checked below
        pass
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"knowledge base {path} is a file, not a KB directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"knowledge base directory {path} does not exist")
    return _load_kb_json(need_file(path, "kb.json"))


def file_records(d):
    """{relative path: {size, sha256}} for every file under d except kb.json: the "files" of a new kb.json."""
    out = {}
    for rel in list_entries(d):
        if rel != "kb.json" and not rel.endswith("/"):
            path = os.path.join(d, *rel.split("/"))
            out[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def write_kb_json(d, fields):
    """Write d/kb.json: fields (retriever type, model, dim, doc count, config, build args, ...) + the manifest of
    every file already in d. Call it last, when the KB's other files are written."""
    files = file_records(d)
    if "documents.jsonl" not in files:
        raise ValueError(f"{d}: no documents.jsonl to list in kb.json")
    meta = {"format_version": FORMAT_VERSION, **fields, "content_hash": files["documents.jsonl"]["sha256"],
            "files": files}
    check_manifest(meta, os.path.join(d, "kb.json"))
    with open(os.path.join(d, "kb.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


def verify_kb_files(path, meta, verify=True):
    """
    Every file kb.json lists exists and has its recorded size; with verify, also its sha256 (a format-1 KB: only
    documents.jsonl's). A mismatch is a ValueError naming the file: it was edited, or swapped in from another KB.
    """
    path = os.fspath(path)
    if meta["format_version"] == 1:
        records = {"documents.jsonl": {"size": None, "sha256": meta["content_hash"]}}
    else:
        records = meta["files"]
    for rel, rec in records.items():
        p = need_file(path, rel)
        size = os.path.getsize(p)
        if rec["size"] is not None and size != rec["size"]:
            raise ValueError(f"{p}: {size} bytes but kb.json recorded {rec['size']} (the file was changed or copied "
                             f"in from another KB; rebuild the KB)")
        if verify:
            digest = sha256_file(p)
            if digest != rec["sha256"]:
                raise ValueError(f"{p}: sha256 {digest[:16]}... does not match kb.json's {rec['sha256'][:16]}... (the "
                                 f"file was changed or copied in from another KB; rebuild the KB)")


def check_output_dir(path, replace=False):
    """
    May a new KB replace the directory at path? Yes when it is missing or empty, or when it is a KB (a valid kb.json)
    holding only the files its kb.json lists. Files it does not list are refused by name, or with replace=True
    returned (the caller says it removes them). A file, or a non-empty directory that is not a KB, is always refused.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a KB directory; refusing to replace it")
    entries = list_entries(path) if os.path.isdir(path) else []
    if not entries:
        return []
    if "kb.json" not in entries:
        raise ValueError(f"{path} is not a knowledge base (no kb.json) and holds {_names(entries)}; refusing to "
                         f"replace it (choose another --output, or empty it)")
    try:
        meta = _load_kb_json(os.path.join(path, "kb.json"))
    except ValueError as e:
        raise ValueError(f"{path} is not a knowledge base ({e}) and holds {_names(entries)}; refusing to replace it "
                         f"(choose another --output, or empty it)") from None
    foreign = [e for e in entries if e not in kb_files(meta)]
    if foreign and not replace:
        raise ValueError(f"{path} holds files that are not part of its knowledge base: {_names(foreign)}; move them "
                         f"out, or pass --replace to delete them along with the old KB")
    return foreign


def report_removed(path, foreign):
    """The one line a replace prints about the user's files it deletes."""
    if foreign:
        print(f"--replace: deleting {len(foreign)} file(s) in {path} that are not part of the KB: {_names(foreign, 50)}",
              file=sys.stderr, flush=True)
