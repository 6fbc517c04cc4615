#!/usr/bin/env bash
# Build the English prose file for the offline pretraining corpus: apt-get install the Debian packages that hold
# the text (dictionaries, WordNet, Jane Austen, Debian's books, kernel/Python/PostgreSQL docs, man pages), then
# tasks/prose.py extracts, cleans, dedupes and compresses it into one zstd parquet file (+ <file>.json manifest
# with per-source documents, chars and licences) for the GPU machine, which has no network. The output folder
# .carry/ is git-ignored: never commit it; carry it with the device tool (carry: [".carry/prose"]).
#   bash dev/build_prose.sh                                     # -> .carry/prose/prose.parquet
#   OUT=/tmp/p.parquet SOURCES=wordnet,gcide MAX_CHARS=2e7 bash dev/build_prose.sh
#   python -m tasks.builtin_corpus --with-source --site-packages --max-chars 3e8 --prose .carry/prose/prose.parquet
# Needs root and Debian. Measured on bookworm, 2 shared cores, 2026-12-04: 18 sources, 22,774 documents, 82.4M
# chars -> 21.2 MB (zstd 19), ~8 min (about 1 min to install the first time, 4 min to extract, 3 min to compress).
# Installing python3-doc pulls the python3.X-doc of the system python and may upgrade that python to the same
# Debian revision.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.carry/prose/prose.parquet}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
t0=$SECONDS

[ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial -e auxfiles)" ] || apt-get update
newest() { apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -1; }  # e.g. linux-doc-6.12
LINUX_DOC=$(newest '^linux-doc-[0-9.]+$')
PG_DOC=$(newest '^postgresql-doc-[0-9]+$')
PACKAGES="wordnet-base dict-gcide dict-foldoc dict-jargon dict-devil r-cran-janeaustenr fortunes debian-handbook
          debian-reference-en debian-faq debian-policy developers-reference maint-guide $LINUX_DOC python3-doc $PG_DOC
          manpages manpages-dev man-db"
echo "installing: $(echo $PACKAGES)"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES > /tmp/build_prose_apt.log 2>&1 \
    || { tail -20 /tmp/build_prose_apt.log; exit 1; }
echo "installed in $((SECONDS - t0)) s"

"$PY" -m tasks.prose --output "$OUT" ${SOURCES:+--sources "$SOURCES"} ${MAX_CHARS:+--max-chars "$MAX_CHARS"}
echo "done in $((SECONDS - t0)) s: $OUT ($(du -h "$OUT" | cut -f1)), manifest $OUT.json"
if git status --short -- "$(dirname "$OUT")" 2>/dev/null | grep -q .; then echo "warning: $OUT is not git-ignored"; fi
