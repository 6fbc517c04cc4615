"""
Pretraining text: fetch FineWeb-Edu parquet shards from the Hugging Face hub and iterate documents of a local data
directory (rank-strided, for DDP). The built-in offline corpus is built by tasks/builtin_corpus.py.

    python -m nanochat.dataset -n 8 -w 4                 # shards 0..7 into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.dataset -n 8 --output /data/fw

Hub files. hub_file() is the one way the repo fetches a file of a hub dataset (the shards here, the task files of
tasks/hf.py): huggingface_hub's hf_hub_download into the shared HF cache (HF_HOME / HF_HUB_CACHE), with its
resumable downloads and retries, HF_TOKEN for gated sets, HF_ENDPOINT for a mirror and HF_HUB_OFFLINE=1 for cache
only; anything it cannot get is a HubFileUnavailable (a FileNotFoundError) naming the repo, the file and what to do.
The shards are then hard-linked from the cache into the data directory (copied where the two are on different
filesystems), each under its final name only once complete.

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
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from huggingface_hub import constants as hf_constants, hf_hub_download, is_offline_mode
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from nanochat.common import builtin_dir, get_base_dir, atomic_path, iter_jsonl, print0, ArgumentParser, run_main

# -----------------------------------------------------------------------------
# where data lives

# karpathy's pre-shuffled FineWeb-Edu 100B, a hub dataset: 1823 shards of ~250M characters (shard_00000 .. 01822)
FINEWEB_REPO = "karpathy/fineweb-edu-100b-shuffle"
MAX_SHARD = 1822
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


def _jsonl_text(where, obj):
    text = obj.get("text", obj.get("content"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string under 'text' (or 'content'), got {text!r:.80}")
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
            rows = [1 for _ in iter_jsonl(path)]  # one chunk per non-blank line, as _iter_file_chunks reads them
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
        for i, (where, obj) in enumerate(iter_jsonl(path)):
            if i in wanted:
                yield i, [_jsonl_text(where, obj)]
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


def sample_texts(data_dir, split, max_chars):
    """The first documents of a split, up to about max_chars characters (a tokenizer's compression check)."""
    texts, n = [], 0
    for doc in iter_texts(data_dir, split):
        texts.append(doc)
        n += len(doc)
        if n >= max_chars:
            break
    return texts


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
# hub files


class HubFileUnavailable(FileNotFoundError):
    """A hub file is neither in the Hugging Face cache nor downloadable (offline, unreachable, missing, gated)."""


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub_failure(e, endpoint):
    """Why hf_hub_download failed, in a few words."""
    if isinstance(e, RemoteEntryNotFoundError):
        return "the hub has no such file"
    if isinstance(e, RevisionNotFoundError):
        return "the hub has no such revision"
    if isinstance(e, (GatedRepoError, RepositoryNotFoundError)):
        return "the hub refused the repo (no such repo, or a gated/private one: set HF_TOKEN to a token with access)"
    if isinstance(e, LocalEntryNotFoundError):
        return f"the hub at {endpoint} could not be reached ({_first_line(e.__cause__ or e)})"
    return f"the download failed ({_first_line(e)})"


def use_hf_local(path):
    """What the scripts' --hf-local DIR does: make DIR/<repo_id>/<file> the first place task_files looks
    (through the environment, so torchrun's other processes and every task see it). None: no change."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--hf-local: {path} is not a directory (expected DIR/<repo_id>/<file>)")
        os.environ["NANOCHAT_HF_LOCAL"] = os.path.abspath(path)


def hub_file(repo_id, filename, revision="main", hint=""):
    """
    Local path of `filename` of the hub dataset `repo_id`, downloaded into the Hugging Face cache on first use
    (hf_hub_download). Raises HubFileUnavailable naming the repo, the file, the cache, why, and `hint` (what else
    the caller can do).
    """
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE once, when it is imported; reading them again
    # here obeys a notebook or a test that sets them later (None: the library's own default)
    endpoint, cache_dir = os.environ.get("HF_ENDPOINT"), os.environ.get("HF_HUB_CACHE")
    offline = is_offline_mode() or _env_flag("HF_HUB_OFFLINE")
    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision, endpoint=endpoint,
                               cache_dir=cache_dir, local_files_only=offline)
    except OSError as e:  # every hub error: HfHubHTTPError and LocalEntryNotFoundError are OSErrors
        reason = ("HF_HUB_OFFLINE is set, so the hub was not asked" if offline
                  else _hub_failure(e, endpoint or hf_constants.ENDPOINT))
    hint = f" {hint}" if hint else ""
    raise HubFileUnavailable(f"{repo_id}: {filename} (revision {revision}) is not in the Hugging Face cache "
                             f"({cache_dir or hf_constants.HF_HUB_CACHE}) and {reason}.{hint}")


# -----------------------------------------------------------------------------
# FineWeb-Edu shards


def _link_or_copy(src, dst):
    """dst gets src's bytes under its final name only once complete: a hard link to the cache's blob (no second copy
    on disk, and it outlives a cache clean-up), or a copy where the cache is on another filesystem."""
    src = os.path.realpath(src)  # the cache's snapshot entry is a symlink to the blob
    with atomic_path(dst) as tmp:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _fetch_shard(name, output_dir):
    _link_or_copy(hub_file(FINEWEB_REPO, name, hint=OFFLINE_HINT), os.path.join(output_dir, name))


def download_shards(num_shards, output_dir=None, workers=4):
    """Shards 0..num_shards-1 of FineWeb-Edu into output_dir (default base_data), skipping those already there (a
    shard appears there only complete), `workers` at a time. Returns their paths."""
    if not 1 <= num_shards <= MAX_SHARD + 1:
        raise ValueError(f"num_shards must be in 1..{MAX_SHARD + 1} ({FINEWEB_REPO} has {MAX_SHARD + 1}), "
                         f"got {num_shards}")
    output_dir = output_dir or download_dir()
    os.makedirs(output_dir, exist_ok=True)
    names = [f"shard_{i:05d}.parquet" for i in range(num_shards)]
    todo = [n for n in names if not os.path.exists(os.path.join(output_dir, n))]
    print0(f"{len(names) - len(todo)} of {len(names)} shards already in {output_dir}; fetching {len(todo)} from "
           f"{FINEWEB_REPO} with {workers} workers")
    errors = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_fetch_shard, n, output_dir) for n in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="shards", unit="shard", disable=not todo):
            try:
                fut.result()
            except HubFileUnavailable as e:  # keep fetching the others; report all failures at the end
                errors.append(e)
    if errors:
        raise errors[0] if len(errors) == 1 else HubFileUnavailable(
            f"{len(errors)} of {len(todo)} shards failed; first: {errors[0]}")
    return [os.path.join(output_dir, n) for n in names]

# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = ArgumentParser(description=f"Fetch N FineWeb-Edu parquet shards of the HF hub dataset {FINEWEB_REPO} "
                            "(through the HF cache; the offline built-in corpus is python -m tasks.builtin_corpus).")
    parser.add_argument("-n", "--num-files", type=int, required=True, help="number of shards to fetch "
                        f"(0..{MAX_SHARD} exist; the last one you get is the val split)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--output", type=str, default=None, help="data directory (default: "
                        "$NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args(argv)
    download_shards(args.num_files, args.output, args.num_workers)


if __name__ == "__main__":
    run_main(main)
