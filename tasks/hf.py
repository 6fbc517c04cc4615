"""
Hub data for the tasks: the files of one (subset, split) of a Hugging Face hub dataset as local paths, readers for
the parquet / jsonl / json files the tasks consume, and HubTask, the base of every task over hub rows (ARC, MMLU,
GSM8K, SmolTalk, SQuAD, HotpotQA).

    from tasks.hf import task_files, read_rows
    paths = task_files("openai/gsm8k", ["main/test-00000-of-00001.parquet"])  # from the HF cache (fetched once)
    rows = read_rows(paths)   # lazy ParquetRows for parquet, else a list of dicts

Where a task's files come from, first match wins: its local_path= (a file, a list of files or a directory), the
local mirror NANOCHAT_HF_LOCAL=DIR (DIR/<repo_id>/<file>; the scripts' --hf-local DIR sets it), else the Hugging
Face cache through nanochat.dataset.hub_file (huggingface_hub: HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE=1 apply;
a file it cannot get is a HubFileUnavailable that names the repo, the file and these ways out).
"""

import os
import json
from abc import abstractmethod

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import read_jsonl
from nanochat.dataset import hub_file
from tasks.common import Task, shuffled_order, check_choice

DATA_EXTENSIONS = (".parquet", ".jsonl", ".json")

# -----------------------------------------------------------------------------
# readers


class ParquetRows:
    """
    Rows of parquet files as dicts, converted one at a time on access: a 1 GB chat dataset stays an Arrow
    table (a few bytes per row of Python overhead) instead of millions of dicts.
    """

    def __init__(self, paths):
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


def read_json(path):
    """The value of a JSON file (errors name file:line, invalid UTF-8 included)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read_json_records(path):
    obj = read_json(path)
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
        return read_jsonl(path)
    if path.endswith(".json"):
        return _read_json_records(path)
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


def _hint(repo_id, filename):
    return (f"Put it at DIR/{repo_id}/{filename} and pass --hf-local DIR to the script (NANOCHAT_HF_LOCAL=DIR), pass "
            f"local_path= (the file, or a directory holding {filename}) to the task, or set HF_ENDPOINT to a "
            f"reachable mirror.")


def task_files(repo_id, filenames, local_path=None, revision="main"):
    """
    The data files of one (subset, split) of a hub dataset, as local paths.
      local_path=None       -> each file from the --hf-local mirror if all are there, else from the HF cache
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
        return [hub_file(repo_id, f, revision, hint=_hint(repo_id, f)) for f in filenames]
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


# -----------------------------------------------------------------------------
# the base of the tasks over hub rows


class HubTask(Task):
    """
    A task over the rows of hub data files: task_files finds them (local_path=, the --hf-local mirror, or the HF
    cache), read_rows reads them, and their order is shuffled once with `seed` (None: file order), so any prefix
    (eval with max_problems) is a random sample. A subclass sets eval_type, passes its repo and files to __init__,
    and writes make_example(row, where) and evaluate().
    """

    def __init__(self, repo_id, files, local_path=None, seed=42, **view):
        super().__init__(**view)
        self.paths = task_files(repo_id, files, local_path)
        self.rows = read_rows(self.paths)
        if len(self.rows) == 0:
            raise ValueError(f"{type(self).__name__}: no rows in {', '.join(self.paths)}")
        self.order = shuffled_order(len(self.rows), seed)

    @abstractmethod
    def make_example(self, row, where):
        """The example (a conversation dict) of one row; ValueError(f"{where}: ...") if the row is malformed."""

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row_idx = self.order[index]
        source = self.paths[0] if len(self.paths) == 1 else self.paths
        return self.make_example(self.rows[row_idx], f"{source}: row {row_idx}")


class SubsetSplitTask(HubTask):
    """A HubTask whose data is one parquet file per (subset, split), "{subset}/{split}-00000-of-00001.parquet" (the
    layout ARC, GSM8K and MMLU share): a subclass sets repo_id and splits = {subset: (split, ...)}."""
    repo_id, splits = None, {}

    def __init__(self, subset, split, local_path=None, seed=42, **view):
        name = type(self).__name__
        self.subset = check_choice(f"{name} subset", subset, list(self.splits))
        self.split = check_choice(f"{name} split (subset {subset})", split, self.splits[subset])
        super().__init__(self.repo_id, [f"{subset}/{split}-00000-of-00001.parquet"], local_path, seed, **view)
