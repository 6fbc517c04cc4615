"""
Building a knowledge base (KB) directory from document files: our JSONL {id?, title?, content|text|contents,
metadata?}, BEIR corpus.jsonl {_id, title, text} and FlashRAG {id, contents}, detected per line; optional
chunking into overlapping word windows; exact duplicates dropped; bad lines stop with file:line (or are
skipped and counted with --skip-bad); --append adds documents without re-encoding the old ones. Everything is
written into a temp dir next to the output and renamed into place (nanochat.common.atomic_dir).

    python -m nanochat.retrieval --documents docs.jsonl --output kb/ --type bm25     # the CLI (also: -m nanochat.kb)
    from nanochat.kb import build_knowledge_base
    build_knowledge_base(["docs.jsonl"], "kb/", "dense")

The retrievers themselves and the KB's on-disk format live in nanochat/retrieval.py.
"""

import os
import sys
import json
import time

from nanochat.common import print0, ArgumentParser
from nanochat.retrieval import (DEFAULT_DENSE_MODEL, RETRIEVER_TYPES, Document, doc_hash, load_retriever, make_retriever,
                                read_kb_meta)



def parse_document(obj, where):
    """One JSON line in any supported format -> {id (None if absent), title, content, metadata}."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
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


def chunk_words(content, chunk_size, chunk_overlap=0):
    """Split content into windows of chunk_size words, consecutive windows sharing chunk_overlap words."""
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"need chunk_size >= 1 and 0 <= chunk_overlap < chunk_size, got {chunk_size}, {chunk_overlap}")
    words = content.split()
    if len(words) <= chunk_size:
        return [content]
    step = chunk_size - chunk_overlap
    starts = range(0, len(words) - chunk_overlap, step)
    return [" ".join(words[s:s + chunk_size]) for s in starts]


def read_documents(paths, skip_bad=False, chunk_size=None, chunk_overlap=0, existing=(), show_progress=True):
    """
    Read document files into a list of Document (chunked when chunk_size is set). Exact duplicates (same
    title + content, also against `existing` documents) are dropped; a duplicate id with other text, invalid
    JSON or a missing/empty text stops with "file:line: reason", or is skipped and counted with skip_bad.
    Returns (docs, stats).
    """
    from tqdm import tqdm
    stats = {"lines": 0, "documents": 0, "chunks": 0, "duplicates": 0, "bad_lines": 0}
    seen_hashes = {d.metadata.get("doc_hash") or doc_hash(d.title, d.content) for d in existing}
    seen_ids = {d.metadata.get("parent_id", d.id): "the existing knowledge base" for d in existing}
    seen_ids.update({d.id: "the existing knowledge base" for d in existing})
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"document file {path} does not exist")
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, named like the others
            for lineno, raw in enumerate(tqdm(f, desc=os.path.basename(path), unit=" lines", disable=not show_progress,
                                              mininterval=1.0), 1):
                if not raw.strip():
                    continue
                stats["lines"] += 1
                where = f"{path}:{lineno}"
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
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
                    docs.append(Document(chunk_id, d["title"], piece, meta))
    stats["chunks"] = len(docs)
    return docs, stats


def build_knowledge_base(document_paths, output, retriever_type="bm25", model_name=None, index_type=None,
                         chunk_size=None, chunk_overlap=0, append=False, skip_bad=False, batch_size=64,
                         show_progress=True):
    """Read, chunk, dedup, index and save a KB directory atomically (see the CLI below). Returns a summary."""
    t0 = time.time()
    if retriever_type not in RETRIEVER_TYPES:
        raise ValueError(f"unknown retriever type {retriever_type!r}; choose from {list(RETRIEVER_TYPES)}")
    dense = retriever_type in ("dense", "hybrid")
    previous_builds = []
    if append:
        if not os.path.exists(os.path.join(output, "kb.json")):
            raise FileNotFoundError(f"--append: {output} is not a knowledge base (no kb.json); build it first")
        meta = read_kb_meta(output)
        stored_index = (meta.get("config") or {}).get("index_type")
        if dense and index_type is not None and stored_index is not None and index_type != stored_index:
            raise ValueError(f"--append: {output} has a {stored_index!r} index but --index {index_type} was given "
                             f"(appending keeps the KB's index; rebuild without --append to change it)")
        ba = meta.get("build_args") or {}
        previous_builds = list(ba.get("previous_builds") or []) + [{k: v for k, v in ba.items() if k != "previous_builds"}]
        retriever = load_retriever(output, retriever_type=retriever_type, model_name=model_name,
                                   **({"batch_size": batch_size} if dense else {}))
        index_type = stored_index
    else:
        index_type = index_type or "flat"
        kwargs = {"model_name": model_name or DEFAULT_DENSE_MODEL, "index_type": index_type,
                  "batch_size": batch_size} if dense else {}
        retriever = make_retriever(retriever_type, **kwargs)
    old = len(retriever)
    docs, stats = read_documents(document_paths, skip_bad=skip_bad, chunk_size=chunk_size,
                                 chunk_overlap=chunk_overlap, existing=retriever.documents, show_progress=show_progress)
    if not docs:
        raise ValueError(f"no {'new ' if append else ''}documents to index in {', '.join(map(str, document_paths))} "
                         f"({stats['duplicates']} duplicates, {stats['bad_lines']} bad lines)")
    retriever.add_documents(docs)
    build_args = {"documents": [os.path.abspath(p) for p in document_paths], "type": retriever_type,
                  "model": model_name, "index": index_type, "chunk_size": chunk_size, "chunk_overlap": chunk_overlap,
                  "append": append, "skip_bad": skip_bad}
    if previous_builds:  # an appended KB remembers every build that went into it
        build_args["previous_builds"] = previous_builds
    retriever.save(output, build_args=build_args)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(output) for f in fs)
    return {**stats, "previous_chunks": old, "total_chunks": len(retriever), "seconds": time.time() - t0,
            "index_bytes": size, "output": os.path.abspath(output)}


def main(argv=None):
    parser = ArgumentParser(
        description="Build (or --append to) a knowledge base directory: documents.jsonl + the retriever's index + "
                    "kb.json, written to a temp dir and renamed into place.")
    parser.add_argument("--documents", nargs="+", required=True,
                        help="JSONL files, one document per line: ours {id?, title?, content|text, metadata?}, "
                             "BEIR corpus.jsonl {_id, title, text} or FlashRAG {id, contents}")
    parser.add_argument("--output", required=True,
                        help="KB directory; an existing KB there is replaced atomically (a non-empty directory "
                             "without kb.json is refused)")
    parser.add_argument("--type", default="bm25", choices=RETRIEVER_TYPES,
                        help="simple (TF-IDF), bm25, dense (sentence-transformers + FAISS) or hybrid (bm25 + dense, RRF)")
    parser.add_argument("--model", default=None, help=f"dense/hybrid: sentence-transformers name or path "
                                                      f"(None means {DEFAULT_DENSE_MODEL})")
    parser.add_argument("--index", default=None, choices=("flat", "ivf", "hnsw"),
                        help="dense/hybrid FAISS index: flat (exact), ivf or hnsw (None: flat, or the KB's own with --append)")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk documents into N-word windows (None: off)")
    parser.add_argument("--chunk-overlap", type=int, default=0, help="words shared by consecutive chunks")
    parser.add_argument("--append", action="store_true", help="add to an existing KB without re-encoding it")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) bad lines instead of stopping")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (dense/hybrid)")
    args = parser.parse_args(argv)
    try:
        s = build_knowledge_base(args.documents, args.output, args.type, args.model, args.index, args.chunk_size,
                                 args.chunk_overlap, args.append, args.skip_bad, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from nanochat.report import write_stage
    write_stage("kb_build", dict(kb=s["output"], retriever=args.type, documents=s["documents"], chunks=s["chunks"],
                                 total_chunks=s["total_chunks"], duplicates_dropped=s["duplicates"],
                                 bad_lines_skipped=s["bad_lines"], index_mb=round(s["index_bytes"] / 1e6, 2)),
                time_s=s["seconds"])
    print0(f"{'appended to' if args.append else 'built'} {args.type} KB {s['output']}: {s['documents']} documents -> "
           f"{s['chunks']} chunks (total {s['total_chunks']}), {s['duplicates']} duplicates dropped, "
           f"{s['bad_lines']} bad lines skipped, {s['seconds']:.1f}s, index size {s['index_bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
