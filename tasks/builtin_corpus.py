"""
The built-in offline pretraining corpus: the Python standard library's docs of the TRAIN modules (tasks/stdlib_docs.py
holds the split), optionally the .py source of those modules and of installed packages. Everything here is text every
Python install has, so the whole pipeline runs with no network.

    python -m tasks.builtin_corpus                                # -> <repo>/data/builtin/corpus (10 parquet shards)
    python -m tasks.builtin_corpus --with-source --site-packages --max-chars 3e8 --output DIR   # the GPU corpus
    python -m tasks.builtin_corpus --with-source --site-packages --max-chars 3e8 --prose .carry/prose/prose.parquet
    python -m tasks.builtin_corpus --reading-practice --doc-chars 300 --practice-chars 750   # the CPU default's corpus

--prose FILE (repeatable) adds English prose documents (a parquet file with a "text" column, built by
dev/build_prose.sh / tasks/prose.py) to the TRAIN shards only: the validation shard stays exactly the Python-only
shard of the same build without --prose, so val bpb stays comparable across runs with and without prose (reading
is measured downstream, by rag_eval). The output is a data directory that nanochat.dataset reads like any other
(the last shard is validation), plus manifest.json with the counts, the held-out module list and what prose was
added (per source: documents, chars, package, licence).

--reading-practice adds, to the TRAIN shards only as well, reading exercises made from train-module records
(tasks/reading_practice.py: KB-style documents, then questions of the built-in QA's kinds and their verbatim answers
with a citation), so that a small model learns to copy an answer span from a document while pretraining. --doc-chars
should match the KB's (tasks.stdlib_qa --doc-chars), and --practice-chars keeps an exercise inside one row of the
base model's context (about 3 characters per token with the CPU default's 2048-token vocabulary).
"""

import os
import sys
import json
import random
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_dir, print0, ArgumentParser, run_main
from nanochat.dataset import builtin_corpus_dir
from tasks.stdlib_docs import harvest, record_split, module_split, first_sentence
from tasks.prose import read_prose
from tasks.reading_practice import reading_exercises
from tasks.stdlib_qa import KB_DOC_CHARS



def format_record(rec):
    """
    A harvested stdlib record as a pretraining document. API records end with a one-line recap (the name, its
    signature and the docstring's first sentence, repeated from above): answering from a retrieved document
    is mostly copying from context, and these recaps let even the tiny CPU model practise that while
    pretraining (only on train modules; held-out modules are not in the corpus at all).
    """
    kind, module, doc = rec["kind"], rec["module"], rec["doc"]
    if kind == "topic":
        return f"Python language reference: {rec['name']}\n\n{doc}"
    if kind == "module":
        return f"Module {module}\n\n{doc}"
    head = rec["signature"] or rec["name"]
    if kind == "class":
        head = "class " + head
    elif kind == "method":
        head = rec["name"].rsplit(".", 1)[0] + "." + head
    summary = first_sentence(doc)
    recap = f"\n\nIn short, `{module}.{rec['name']}`: {summary}" + (f" Signature: {rec['signature']}" if rec["signature"] else "")
    return f"Module {module}\n\n{head}\n\n{doc}" + (recap if summary else "")


def python_source_documents(site_packages=False, max_chars=None, max_file_bytes=1_000_000):
    """
    More real text that every Python install has: the .py source of the standard library's TRAIN modules
    (held-out modules, tests and idlelib skipped) and, with site_packages=True, of the installed packages.
    Returns documents "# file: <relative path>\n\n<source>", in a fixed order, up to max_chars in total.
    """
    roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
    if site_packages:
        roots += [("site-packages", p) for p in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})]
    skip_dirs = {"__pycache__", "test", "tests", "idlelib", "site-packages", "dist-packages", "testing"}
    docs, total = [], 0
    for kind, root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                top = rel.split(os.sep)[0].removesuffix(".py")
                if kind == "stdlib" and (top.startswith("_") or module_split(top) != "train"):
                    continue
                try:
                    if os.path.getsize(path) > max_file_bytes:
                        continue
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                if not text.strip():
                    continue
                docs.append(f"# file: {kind}/{rel}\n\n{text}")
                total += len(docs[-1])
                if max_chars is not None and total >= max_chars:
                    return docs
    return docs


def build_builtin_corpus(output_dir=None, num_shards=10, records=None, max_modules=None, row_group_size=1000,
                         progress=True, extra_docs=None, prose_files=None, reading_practice=False,
                         doc_chars=KB_DOC_CHARS, practice_chars=900):
    """
    Write the built-in corpus: every harvested stdlib record of a TRAIN module (eval and rag modules are left out
    entirely, see tasks/stdlib_docs.py), shuffled with a fixed seed, split evenly into num_shards parquet shards
    (column "text"; the last shard is validation) plus manifest.json, all written into a temp dir then renamed.
    records: pre-harvested records (else harvest(max_modules)). extra_docs: more documents (Python source) mixed
    in before the split. prose_files: prose parquet files (tasks/prose.py) whose documents are spread over the
    train shards only (each such shard shuffled with a fixed seed); the validation shard is the same as without
    them. reading_practice: reading exercises of train-module records (tasks/reading_practice.reading_exercises
    with doc_chars and max_chars=practice_chars) spread over the train shards like prose. Returns the output dir.
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (the last shard is validation), got {num_shards}")
    prose_docs, prose_meta = [], []  # read first: a bad prose file fails before the slow harvest
    for path in prose_files or []:
        texts, manifest = read_prose(path)
        prose_docs += texts
        prose_meta.append({"file": os.path.abspath(path), "documents": len(texts), "chars": sum(map(len, texts)),
                           "sources": {name: {k: v[k] for k in ("package", "licence", "documents", "chars") if k in v}
                                       for name, v in manifest.get("sources", {}).items()}})
    output_dir = os.fspath(output_dir or builtin_corpus_dir())
    if records is None:
        records = harvest(max_modules=max_modules, progress=progress)
    train = [r for r in records if record_split(r) == "train"]
    held_out = sorted({r["module"].split(".")[0] for r in records if record_split(r) != "train"})
    practice_stats = {}
    practice_docs = reading_exercises(records, doc_chars, practice_chars, stats=practice_stats) if reading_practice else []
    docs = [format_record(r) for r in sorted(train, key=lambda r: r["id"])] + list(extra_docs or [])
    if len(docs) < num_shards:
        raise ValueError(f"only {len(docs)} train documents for {num_shards} shards")
    random.Random(1337).shuffle(docs)  # shards (and the validation shard) mix all modules
    bounds = [len(docs) * i // num_shards for i in range(num_shards + 1)]
    train_only = prose_docs + practice_docs
    random.Random(4242).shuffle(train_only)  # then cut into num_shards - 1 even runs, one per train shard
    prose_bounds = [len(train_only) * i // (num_shards - 1) for i in range(num_shards)]
    shards = []
    with atomic_dir(output_dir, marker="manifest.json") as tmp:
        for i in range(num_shards):
            part = docs[bounds[i]:bounds[i + 1]]
            prose_part = train_only[prose_bounds[i]:prose_bounds[i + 1]] if i < num_shards - 1 else []
            if prose_part:  # mixed within the shard, so every stretch of training (and tok_train's sample) has both
                part = part + prose_part
                random.Random(1337 + i).shuffle(part)
            name = f"shard_{i:05d}.parquet"
            pq.write_table(pa.table({"text": part}), os.path.join(tmp, name), row_group_size=row_group_size)
            shards.append({"file": name, "documents": len(part), "chars": sum(len(d) for d in part),
                           "split": "val" if i == num_shards - 1 else "train"})
            if prose_files or reading_practice:  # prose and exercises together: one count of both
                shards[-1]["prose_documents" if not reading_practice else "train_only_documents"] = len(prose_part)
        manifest = {
            "what": "nanochat-rag built-in pretraining corpus: Python standard library docs of train modules"
                    + (", plus English prose in the train shards" if prose_files else ""),
            "python_version": sys.version.split()[0],
            "records_harvested": len(records),
            "documents": len(docs) + len(train_only),
            "chars": sum(s["chars"] for s in shards),
            "excluded_eval_records": len(records) - len(train),
            "extra_documents": len(extra_docs or []),
            "held_out_modules": held_out,
            "split_rule": "a top-level module is in this corpus iff int(sha1(name), 16) % 5 in (3, 4) (0: eval "
                          "questions, 1-2: RAG fine-tuning questions, tasks/stdlib_docs.py); the held-out ones' "
                          "records (and their submodules') are not. The last shard is validation.",
            "shards": shards,
        }
        if prose_files:
            manifest["prose"] = {
                "documents": len(prose_docs), "chars": sum(map(len, prose_docs)), "files": prose_meta,
                "in_validation": False,
                "why": "train shards only: the validation shard is byte-identical to the build without prose, so "
                       "val bpb stays comparable; reading English is measured by rag_eval",
            }
        if reading_practice:
            manifest["reading_practice"] = {
                **practice_stats, "doc_chars": doc_chars, "max_chars": practice_chars, "in_validation": False,
                "why": "copy practice for small models (tasks/reading_practice.py); train-module records only, train "
                       "shards only, so val bpb stays comparable",
            }
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    print0(f"built-in corpus: {manifest['documents']} documents, {manifest['chars']:,} chars in {num_shards} shards "
           f"-> {output_dir} ({manifest['excluded_eval_records']} records of {len(held_out)} held-out modules "
           f"left out" + (f"; {len(prose_docs):,} prose documents in the train shards" if prose_files else "")
           + (f"; {len(practice_docs):,} reading exercises in the train shards" if reading_practice else "") + ")")
    return output_dir

# -----------------------------------------------------------------------------
# CLI

def main():
    parser = ArgumentParser(description="Build the offline pretraining corpus from the standard library's docs "
                            "(train modules only) and, optionally, Python source.")
    parser.add_argument("--output", type=str, default=None, help="output directory (None: <repo>/data/builtin/corpus)")
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help="parquet shards to write, the last is validation (None: 10, or 40 with --with-source)")
    parser.add_argument("--with-source", action="store_true", help="add the .py source of the train stdlib modules "
                        "(about 10x more real text, still offline)")
    parser.add_argument("--site-packages", action="store_true", help="with --with-source: add the installed "
                        "packages' .py source too")
    parser.add_argument("--max-chars", type=float, default=None, help="with --with-source: cap on the source text added")
    parser.add_argument("--prose", type=str, action="append", default=None, metavar="FILE",
                        help="a prose parquet file (dev/build_prose.sh) to add to the train shards; repeatable")
    parser.add_argument("--reading-practice", action="store_true", help="add reading exercises made from train-module "
                        "records (tasks/reading_practice.py) to the train shards")
    parser.add_argument("--doc-chars", type=int, default=KB_DOC_CHARS, help="with --reading-practice: cap on each "
                        "exercise document's docstring (use the KB's, tasks.stdlib_qa --doc-chars)")
    parser.add_argument("--practice-chars", type=int, default=900, help="with --reading-practice: cap on each "
                        "exercise's length in characters (keep it inside one row of the base model's context)")
    args = parser.parse_args()
    extra = None
    if args.with_source:
        extra = python_source_documents(args.site_packages, int(args.max_chars) if args.max_chars else None)
        print0(f"python source: {len(extra):,} files, {sum(len(d) for d in extra):,} chars")
    build_builtin_corpus(args.output, num_shards=args.num_files or (10 if extra is None else 40), extra_docs=extra,
                         prose_files=args.prose, reading_practice=args.reading_practice, doc_chars=args.doc_chars,
                         practice_chars=args.practice_chars)


if __name__ == "__main__":
    run_main(main)
