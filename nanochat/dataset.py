"""
Pretraining text: download FineWeb-Edu-style parquet shards and iterate documents of a local data directory
(rank-strided, for DDP). The built-in offline corpus is built by tasks/builtin_corpus.py.

    python -m nanochat.dataset -n 8 -w 4                 # download shards 0..7 into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.dataset -n 8 --url 'https://host/path/shard_{index:05d}.parquet' --output /data/fw

    from nanochat.dataset import iter_texts, default_data_dir
    for text in iter_texts(default_data_dir(), "train", start=rank, step=world_size): ...

A data directory holds .parquet / .jsonl / .txt files (hidden files and anything else are ignored), sorted by
name. The LAST file is the validation split, all the others are train (nanochat's convention); a directory with a
single file is an error (split it in two yourself: we do not guess how). Documents:
    .parquet  one document per row of the column "text" (nulls skipped)
    .jsonl    one document per non-blank line: {"text": ...} or {"content": ...}
    .txt      one document per block of lines separated by one or more blank lines
Documents that are empty after stripping are skipped.

Rank striding. The documents of a split form a sequence of chunks: a parquet row group is one chunk, a JSONL line or
a txt block is one chunk of one document; chunks are numbered across the split's files in order. When the split has
at least `step` chunks, rank `start` reads chunks start, start+step, ... (whole row groups: each rank decodes only
its own, which is what makes parquet fast). With fewer chunks than ranks (a one-row-group validation shard on 8
GPUs) it falls back to documents: rank `start` reads the documents whose global index i has i % step == start.
Either way the ranks partition the split: every document goes to exactly one rank.

A document's position is (chunk, row within the chunk); iter_documents yields positions and read_documents reads
documents back by position, which is what lets the dataloader resume exactly from a small state.
"""

import os
import json
import time
import shutil
import http.client
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import builtin_dir, get_base_dir, atomic_path, print0, ArgumentParser

# -----------------------------------------------------------------------------
# where data lives

# karpathy's pre-shuffled FineWeb-Edu 100B: 1823 shards of ~250M characters (shard_00000 .. shard_01822)
DEFAULT_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
MAX_SHARD = 1822
URL_ENV = "NANOCHAT_DATA_URL"  # overrides DEFAULT_URL (a pattern with {index})
DATA_DIR_ENV = "NANOCHAT_DATA_DIR"
DATA_EXTS = (".parquet", ".jsonl", ".txt")
OFFLINE_HINT = "to run offline build the built-in corpus (python -m tasks.builtin_corpus) or pass --data-dir DIR"


def download_dir():
    return os.path.join(get_base_dir(), "base_data")


def builtin_corpus_dir():
    return os.path.join(builtin_dir(), "corpus")


def list_data_files(data_dir):
    """Sorted paths of the .parquet/.jsonl/.txt files directly in data_dir (hidden files ignored)."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist; {OFFLINE_HINT}")
    names = sorted(n for n in os.listdir(data_dir)
                   if n.endswith(DATA_EXTS) and not n.startswith(".") and os.path.isfile(os.path.join(data_dir, n)))
    return [os.path.join(data_dir, n) for n in names]


def default_data_dir():
    """$NANOCHAT_DATA_DIR, else downloaded shards in base_data, else the built-in corpus, else a clear error."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"${DATA_DIR_ENV}={env} is not a directory")
        return env
    for d in (download_dir(), builtin_corpus_dir()):
        if os.path.isdir(d) and list_data_files(d):
            return d
    raise FileNotFoundError(
        f"no pretraining data: {download_dir()} and {builtin_corpus_dir()} hold no data files. Get some with "
        f"`python -m tasks.builtin_corpus` (offline, the stdlib docs) or `python -m nanochat.dataset -n 8` "
        f"(download), or point ${DATA_DIR_ENV} at a directory of .parquet/.jsonl/.txt files")


def split_files(data_dir, split):
    """The files of a split: all but the last for "train", the last for "val"."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_data_files(data_dir)
    if len(files) < 2:
        raise ValueError(f"{data_dir} holds {len(files)} data file(s) but at least 2 are needed: the last file is "
                         f"the validation split, the others are train. Split your data into two or more files.")
    return files[:-1] if split == "train" else files[-1:]

# -----------------------------------------------------------------------------
# reading one file


def _txt_blocks(path):
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def _jsonl_lines(path):
    """(lineno, raw line) of the non-blank lines."""
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _jsonl_text(path, lineno, line):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected an object with a 'text' (or 'content') key")
    text = obj.get("text", obj.get("content"))
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: expected a string under 'text' (or 'content'), got {text!r:.80}")
    return text


def _parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


_chunk_cache = {}


def _chunk_rows(path):
    """Rows per chunk of one file (cached on path, size and mtime)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _chunk_cache:
        if path.endswith(".parquet"):
            md = _parquet(path).metadata
            rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        elif path.endswith(".jsonl"):
            rows = [1 for _ in _jsonl_lines(path)]
        else:
            rows = [1 for _ in _txt_blocks(path)]
        _chunk_cache[key] = rows
    return _chunk_cache[key]


def _iter_file_chunks(path, wanted):
    """Yields (local chunk id, list of row texts (None for a null parquet row)) for the wanted chunks of one
    file, in order, streaming (one row group or one line at a time)."""
    wanted = set(wanted)
    if not wanted:
        return
    if path.endswith(".parquet"):
        pf = _parquet(path)
        for i in sorted(wanted):
            try:
                rows = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path}: row group {i} is unreadable ({e})") from None
            yield i, rows
    elif path.endswith(".jsonl"):
        last = max(wanted)
        for i, (lineno, line) in enumerate(_jsonl_lines(path)):
            if i in wanted:
                yield i, [_jsonl_text(path, lineno, line)]
            if i >= last:
                break
    else:
        for i, block in enumerate(_txt_blocks(path)):
            if i in wanted:
                yield i, [block]

# -----------------------------------------------------------------------------
# iterating a split


def _split_plan(data_dir, split):
    """[(path, first global chunk, first global row, rows per chunk)] for the split's files."""
    plan, chunk0, row0 = [], 0, 0
    for path in split_files(data_dir, split):
        rows = _chunk_rows(path)
        plan.append((path, chunk0, row0, rows))
        chunk0 += len(rows)
        row0 += sum(rows)
    return plan


def _check_rank(start, step):
    if not (isinstance(step, int) and step >= 1 and isinstance(start, int) and 0 <= start < step):
        raise ValueError(f"need 0 <= start < step (rank < world size), got start={start!r} step={step!r}")


def iter_documents(data_dir, split="train", start=0, step=1, after=None):
    """
    Yields (chunk, row, text) for this rank's documents of the split, in order, one pass. after=(chunk, row):
    only positions strictly after it (resume). Empty documents are skipped (they still count for striding).
    """
    _check_rank(start, step)
    plan = _split_plan(data_dir, split)
    n_chunks = sum(len(rows) for _, _, _, rows in plan)
    by_chunk = n_chunks >= step
    after = (-1, -1) if after is None else (int(after[0]), int(after[1]))
    for path, chunk0, row0, rows in plan:
        if chunk0 + len(rows) - 1 < after[0]:
            continue  # the whole file is before the resume point
        first_row, wanted = [], []  # global index of each chunk's first row; this rank's chunks
        g = row0
        for i, n in enumerate(rows):
            first_row.append(g)
            c = chunk0 + i
            if c >= after[0] and n > 0:
                if by_chunk and c % step == start:
                    wanted.append(i)
                elif not by_chunk and any((g + r) % step == start for r in range(min(n, step))):
                    wanted.append(i)
            g += n
        for i, texts in _iter_file_chunks(path, wanted):
            c = chunk0 + i
            for r, text in enumerate(texts):
                if (c, r) <= after:
                    continue
                if not by_chunk and (first_row[i] + r) % step != start:
                    continue
                if text is None or not text.strip():
                    continue
                yield c, r, text


def read_documents(data_dir, split, positions):
    """The texts at positions [(chunk, row), ...] of a split, in the order given (for resuming a loader)."""
    plan = _split_plan(data_dir, split)
    by_file = {}
    for c, r in positions:
        for fi, (path, chunk0, row0, rows) in enumerate(plan):
            if chunk0 <= c < chunk0 + len(rows):
                if not 0 <= r < rows[c - chunk0]:
                    raise ValueError(f"position ({c}, {r}) is out of range: chunk {c} of {split} has "
                                     f"{rows[c - chunk0]} rows ({path})")
                by_file.setdefault(fi, set()).add(c - chunk0)
                break
        else:
            raise ValueError(f"position ({c}, {r}) is out of range: the {split} split of {data_dir} has "
                             f"{sum(len(p[3]) for p in plan)} chunks (did the data change?)")
    texts = {}
    for fi, chunk_ids in by_file.items():
        path, chunk0 = plan[fi][0], plan[fi][1]
        for i, rows in _iter_file_chunks(path, chunk_ids):
            for r, text in enumerate(rows):
                texts[(chunk0 + i, r)] = text
    out = []
    for c, r in positions:
        text = texts[(c, r)]
        if text is None:
            raise ValueError(f"position ({c}, {r}) of {split} is a null document (did the data change?)")
        out.append(text)
    return out


def iter_texts(data_dir, split="train", start=0, step=1):
    """One pass over this rank's documents of the split (document strings)."""
    for _, _, text in iter_documents(data_dir, split, start, step):
        yield text


def parquets_iter_batched(split, start=0, step=1, data_dir=None, batch_size=1024):
    """
    One pass over this rank's documents in batches (lists of str): a batch is one parquet row group, or up to
    batch_size consecutive documents of a JSONL/txt file. data_dir defaults to default_data_dir().
    """
    data_dir = default_data_dir() if data_dir is None else data_dir
    plan = _split_plan(data_dir, split)
    parquet_chunks = set()
    for path, chunk0, _, rows in plan:
        if path.endswith(".parquet"):
            parquet_chunks.update(range(chunk0, chunk0 + len(rows)))
    batch, batch_key = [], None
    for c, _, text in iter_documents(data_dir, split, start, step):
        key = ("rg", c) if c in parquet_chunks else ("file", _file_of(plan, c))
        if batch and (key != batch_key or len(batch) >= batch_size):
            yield batch
            batch = []
        batch_key = key
        batch.append(text)
    if batch:
        yield batch


def _file_of(plan, c):
    for fi, (_, chunk0, _, rows) in enumerate(plan):
        if chunk0 <= c < chunk0 + len(rows):
            return fi
    raise ValueError(f"chunk {c} is out of range")

# -----------------------------------------------------------------------------
# downloading shards


def shard_url(index, url_pattern=None):
    pattern = url_pattern or os.environ.get(URL_ENV) or DEFAULT_URL
    if "{index" not in pattern:
        raise ValueError(f"url pattern must contain {{index}} (e.g. .../shard_{{index:05d}}.parquet), got {pattern!r}")
    return pattern.format(index=index)


def _check_parquet_file(path):
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ValueError(f"downloaded file is not a complete parquet file ({size} bytes)")
    _parquet(path)


def download_file(url, path, retries=5, backoff=2.0, timeout=60):
    """
    Download url to path unless path exists: streamed to a temp file next to it, checked (size against
    Content-Length, parquet magic when path ends in .parquet), then renamed into place. Network errors, 5xx, 408
    and 429 are retried with exponential backoff (backoff, 2*backoff, 4*backoff, ... seconds); other 4xx are not.
    """
    if os.path.exists(path):
        return path
    last = None
    for attempt in range(retries):
        try:
            with atomic_path(path) as tmp:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                    expected = resp.headers.get("Content-Length")
                    shutil.copyfileobj(resp, f, 1 << 20)
                    written = f.tell()
                if expected is not None and int(expected) != written:
                    raise ValueError(f"truncated download: {written} of {expected} bytes")
                if path.endswith(".parquet"):
                    _check_parquet_file(tmp)
            return path
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise RuntimeError(f"{url}: HTTP {e.code} {e.reason} (not retried)") from None
            last = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            # URLError: DNS / refused; HTTPException: a cut connection (IncompleteRead); ValueError: a bad file
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt + 1 < retries:
            time.sleep(backoff * 2 ** attempt)
    raise ConnectionError(f"could not reach {url} after {retries} attempts (last error: {last}); {OFFLINE_HINT}")


def download_shards(num_shards, output_dir=None, workers=4, url_pattern=None, retries=5, backoff=2.0):
    """Download shards 0..num_shards-1 (skipping existing ones) in parallel; returns their paths."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if url_pattern is None and URL_ENV not in os.environ and num_shards > MAX_SHARD + 1:
        raise ValueError(f"the default dataset has {MAX_SHARD + 1} shards, asked for {num_shards}")
    output_dir = output_dir or download_dir()
    os.makedirs(output_dir, exist_ok=True)
    jobs = [(shard_url(i, url_pattern), os.path.join(output_dir, f"shard_{i:05d}.parquet")) for i in range(num_shards)]
    todo = [(u, p) for u, p in jobs if not os.path.exists(p)]
    print0(f"{len(jobs) - len(todo)} of {len(jobs)} shards already in {output_dir}; downloading {len(todo)} "
           f"with {workers} workers")
    errors = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_file, u, p, retries, backoff): u for u, p in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="shards", unit="shard", disable=not todo):
            try:
                fut.result()
            except Exception as e:  # keep downloading the others; report all failures at the end
                errors.append(e)
    if errors:
        raise errors[0] if len(errors) == 1 else ConnectionError(
            f"{len(errors)} of {len(todo)} shards failed; first: {errors[0]}")
    return [p for _, p in jobs]

# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = ArgumentParser(description="Download N FineWeb-Edu parquet shards from the HF hub (the offline "
                            "built-in corpus is python -m tasks.builtin_corpus).")
    parser.add_argument("-n", "--num-files", type=int, required=True, help="number of shards to download "
                        f"(0..{MAX_SHARD} exist; the last one you get is the val split)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--output", type=str, default=None, help="output directory (download default: "
                        "$NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--url", type=str, default=None, help=f"shard URL pattern with {{index}} (or ${URL_ENV}); "
                        f"default {DEFAULT_URL}")
    parser.add_argument("--retries", type=int, default=5, help="attempts per shard (exponential backoff)")
    args = parser.parse_args(argv)
    download_shards(args.num_files, args.output, args.num_workers, args.url, args.retries)


if __name__ == "__main__":
    main()
