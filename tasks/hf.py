"""
Hugging Face hub downloads without the `datasets` library: plain urllib into a cache, plus readers for the
parquet / jsonl / json files the tasks consume.

    from tasks.hf import hf_dataset_file, read_records, task_files
    path = hf_dataset_file("openai/gsm8k", "main/test-00000-of-00001.parquet")
    # -> $NANOCHAT_BASE_DIR/hf_cache/openai/gsm8k/main/test-00000-of-00001.parquet (downloaded once)
    rows = read_records(path)   # list of dicts

Environment: NANOCHAT_HF_ENDPOINT (default https://huggingface.co; tests point it at a local server),
HF_TOKEN (sent as a bearer token, for gated datasets), HF_HUB_OFFLINE=1 (never touch the network: only the
cache or a task's local_path= can serve the data), NANOCHAT_HF_LOCAL=DIR (a local mirror: DIR/<repo_id>/<file>
is used before the cache and the network; the scripts' --hf-local DIR sets it).
"""

import os
import json
import time
import socket
import http.client
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from nanochat.common import atomic_path, get_base_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json")


class HubFileUnavailable(FileNotFoundError):
    """A hub file is neither in the cache nor downloadable (offline, network down, 404, gated...)."""


def hf_endpoint():
    return os.environ.get("NANOCHAT_HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hf_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_path(repo_id, filename, revision="main", cache_dir=None):
    """Where hf_dataset_file keeps a file: <cache>/<repo_id>/<filename> (<repo_id>@<revision>/ off main)."""
    cache_dir = cache_dir or os.path.join(get_base_dir(), "hf_cache")
    repo_dir = repo_id if revision == "main" else f"{repo_id}@{revision}"
    return os.path.join(cache_dir, *repo_dir.split("/"), *filename.split("/"))


def _http_get(url, dest, timeout, headers):
    """One attempt: stream url into dest (a temp path). Raises urllib errors or ValueError on a short body."""
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total is not None and total.isdigit() else None
        got = 0
        name = os.path.basename(urllib.parse.urlparse(url).path)
        with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}",
                                         leave=False, disable=total is not None and total < (1 << 20)) as bar:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise ValueError(f"short read: got {got} of {total} bytes")


def download_url(url, dest, timeout=60.0, retries=3, backoff=2.0, headers=None, hint=""):
    """
    Download url to dest atomically (temp file renamed into place, so an interrupted download never leaves a
    partial file at dest). Retries network errors, 5xx and 429 with exponential backoff; 4xx fail at once.
    Raises HubFileUnavailable naming the url, dest and `hint` (what else the caller can do).
    """
    hint = f" {hint}" if hint else ""
    if hf_offline():
        raise HubFileUnavailable(f"HF_HUB_OFFLINE is set, so {url} was not fetched; it is expected in the cache "
                                 f"at {dest}.{hint}")
    last_err = None
    for attempt in range(retries):
        try:
            with atomic_path(dest) as tmp:
                _http_get(url, tmp, timeout, headers or {})
            return dest
        except urllib.error.HTTPError as e:
            last_err = f"HTTP {e.code} {e.reason}"
            if e.code in (401, 403):
                last_err += " (gated or private: set HF_TOKEN to a token with access)"
            if e.code < 500 and e.code != 429:
                break  # 404 and friends will not change on retry
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError,
                ValueError) as e:
            last_err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt + 1 < retries:
            time.sleep(backoff * (2 ** attempt))
    raise HubFileUnavailable(f"could not fetch {url} ({last_err}); it is expected in the cache at {dest}.{hint}")


def hf_dataset_file(repo_id, filename, revision="main", cache_dir=None, timeout=60.0, retries=3, backoff=2.0):
    """
    Local path of `filename` from the hub dataset `repo_id`: the cached copy if present, else downloaded from
    {endpoint}/datasets/{repo_id}/resolve/{revision}/{filename} into the cache first.
    """
    dest = hf_cache_path(repo_id, filename, revision, cache_dir)
    if os.path.isfile(dest):
        return dest
    url = f"{hf_endpoint()}/datasets/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/" \
          f"{urllib.parse.quote(filename)}"
    headers = {"User-Agent": "nanochat-rag"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    hint = (f"Download it there by hand, or put it at DIR/{repo_id}/{filename} and pass --hf-local DIR to the script "
            f"(NANOCHAT_HF_LOCAL=DIR), or pass local_path= (the file, or a directory holding {filename}) to the task.")
    return download_url(url, dest, timeout=timeout, retries=retries, backoff=backoff, headers=headers, hint=hint)


# -----------------------------------------------------------------------------
# readers


class ParquetRows:
    """
    Rows of parquet files as dicts, converted one at a time on access: a 1 GB chat dataset stays an Arrow
    table (a few bytes per row of Python overhead) instead of millions of dicts.
    """

    def __init__(self, paths):
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = []
        for path in paths:
            try:
                tables.append(pq.read_table(path))
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: could not read parquet: {e}") from e
        try:
            self.table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        except pa.ArrowException as e:
            raise ValueError(f"{', '.join(paths)}: parquet files have incompatible columns: {e}") from e
        self.paths = list(paths)

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        if not 0 <= i < self.table.num_rows:
            raise IndexError(f"row {i} out of range ({self.table.num_rows} rows)")
        return self.table.slice(i, 1).to_pylist()[0]


def _read_jsonl(path):
    records = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


def _read_json(path):
    with open(path, "r", encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        if obj and all(isinstance(v, dict) for v in obj.values()):
            # records keyed by id (e.g. PubMedQA's ori_pqal.json): keep the key as "_key"
            return [{"_key": k, **v} for k, v in obj.items()]
        raise ValueError(f"{path}: a top-level JSON object must map keys to record objects")
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} must be a JSON object, got {type(rec).__name__}")
    return obj


def read_records(path):
    """All records of a .parquet / .jsonl / .json file as a list of dicts (errors name file:line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    if path.endswith(".parquet"):
        rows = ParquetRows([path])
        return rows.table.to_pylist()
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        return _read_json(path)
    raise ValueError(f"{path}: unsupported data file type (expected one of {list(DATA_EXTENSIONS)})")


def read_rows(paths):
    """Rows of several files of one kind, concatenated: lazy ParquetRows for parquet, else a list of dicts."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("read_rows: no data files given")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no such data file: {p}")
    if all(p.endswith(".parquet") for p in paths):
        return ParquetRows(paths)
    rows = []
    for p in paths:
        rows.extend(read_records(p))
    return rows


def use_hf_local(path):
    """What the scripts' --hf-local DIR does: make DIR/<repo_id>/<file> the first place task_files looks
    (through the environment, so torchrun's other processes and every task see it). None: no change."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--hf-local: {path} is not a directory (expected DIR/<repo_id>/<file>)")
        os.environ["NANOCHAT_HF_LOCAL"] = os.path.abspath(path)


def task_files(repo_id, filenames, local_path=None, revision="main"):
    """
    The data files of one (subset, split) of a hub dataset, as local paths.
      local_path=None       -> each hub file, downloaded into the cache on first use
      local_path=file       -> [that file]
      local_path=list       -> those files
      local_path=directory  -> the hub files under it if it mirrors the repo layout, else every
                               .parquet/.jsonl/.json file directly inside it (sorted)
    """
    if local_path is None:
        root = os.environ.get("NANOCHAT_HF_LOCAL")
        if root:  # a local mirror of the hub: DIR/<repo_id>/<filename>
            mirrored = [os.path.join(root, *repo_id.split("/"), *f.split("/")) for f in filenames]
            if all(os.path.isfile(p) for p in mirrored):
                return mirrored
        return [hf_dataset_file(repo_id, f, revision=revision) for f in filenames]
    if isinstance(local_path, (list, tuple)):
        paths = [os.fspath(p) for p in local_path]
    else:
        local_path = os.fspath(local_path)
        if os.path.isdir(local_path):
            mirrored = [os.path.join(local_path, *f.split("/")) for f in filenames]
            if all(os.path.isfile(p) for p in mirrored):
                return mirrored
            paths = sorted(os.path.join(local_path, f) for f in os.listdir(local_path) if f.endswith(DATA_EXTENSIONS))
            if not paths:
                raise FileNotFoundError(f"local_path {local_path} holds neither {filenames} nor any "
                                        f"{'/'.join(DATA_EXTENSIONS)} files")
            return paths
        paths = [local_path]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"local_path: no such file {p}")
        if not p.endswith(DATA_EXTENSIONS):
            raise ValueError(f"local_path: {p} is not a {'/'.join(DATA_EXTENSIONS)} file")
    return paths
