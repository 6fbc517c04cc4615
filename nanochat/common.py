"""
Small utilities shared by every part of nanochat-rag: printing on rank 0, the base directory,
device detection, torch.distributed setup (NCCL on GPU, gloo on CPU) and atomic file writes.

Nothing here has a CLI; import what you need:
    from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir
"""

import os
import re
import sys
import json
import argparse
import shutil
import logging
import tempfile
import contextlib

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")

# -----------------------------------------------------------------------------
# printing and paths


def print0(*args, **kwargs):
    """print() on rank 0 only, so a torchrun of N processes logs once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def get_base_dir():
    """Where checkpoints, tokenizer, data shards and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    if not base_dir:
        base_dir = os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def repo_dir():
    """The root of this repository (one level above nanochat/)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def builtin_dir():
    """Where the built-in offline data lives (corpus/, kb_documents.jsonl, qa_*.jsonl, kb/):
    $NANOCHAT_BUILTIN_DIR, else <repo>/data/builtin."""
    return os.environ.get("NANOCHAT_BUILTIN_DIR") or os.path.join(repo_dir(), "data", "builtin")


# -----------------------------------------------------------------------------
# devices and distributed


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment; (False, 0, 0, 1) otherwise."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type=""):
    """
    Set seeds and precision, and (under torchrun) the process group: NCCL on CUDA, gloo on CPU.
    Returns (ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    assert device_type in ("cuda", "mps", "cpu"), f"unknown device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda was asked for but torch.cuda.is_available() is False")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)
        # a second stage in the same process (refrag_finetune's SFT then RL) keeps the group: tearing a gloo group
        # down and re-creating it on the same store raced under load (connection reset on the barrier)
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group(backend="nccl", device_id=device)
            else:
                dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def get_peak_flops(device_type):
    """bf16 dense peak of the current accelerator, for MFU. CPU: None (MFU is not reported)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    if "h100" in name or "h200" in name or "h800" in name or "gh200" in name:
        return 989e12
    if "a100" in name or "a800" in name:
        return 312e12
    if "b200" in name:
        return 2250e12
    if "4090" in name:
        return 165e12
    return 312e12  # conservative default; MFU may read high on faster chips


# -----------------------------------------------------------------------------
# atomic writes: a crash never leaves a half-written artefact


@contextlib.contextmanager
def atomic_path(final_path):
    """
    Yields a temporary path next to final_path; on success it is renamed onto final_path (os.replace is
    atomic on POSIX within one filesystem). On any exception the temp file is removed and final_path is
    untouched.
        with atomic_path("model.pt") as tmp: torch.save(obj, tmp)
    """
    final_path = os.fspath(final_path)
    d = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(d, exist_ok=True)
    # the pid in the name lets recover_files tell a killed writer's temp file from a live one's
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final_path)}.{os.getpid()}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the artefact the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _siblings(final_dir):
    """Our temp/aside dirs next to final_dir: (path, pid, kind) with kind "tmp" or "old"."""
    parent, base = os.path.dirname(final_dir), os.path.basename(final_dir)
    out = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        m = re.fullmatch(re.escape("." + base) + r"\.(\d+)\.[^.]*\.(tmp|old)", name)
        if m:
            out.append((os.path.join(parent, name), int(m.group(1)), m.group(2)))
    return out


def recover_dir(final_dir):
    """
    Clean up after a process that was killed inside atomic_dir (dirs of live processes are left alone). Its
    temp dir is deleted, except when it died in the instant between moving the old final_dir aside and renaming
    the new one in: then the temp dir is complete (the old one is only moved once it is) and is renamed into
    place, or, without one, the old dir is put back. Returns the paths removed or moved.
    """
    final_dir = os.path.abspath(os.fspath(final_dir))
    by_pid = {}
    for path, pid, kind in _siblings(final_dir):
        if pid != os.getpid() and not _pid_alive(pid):
            by_pid.setdefault(pid, {}).setdefault(kind, []).append(path)
    done = []
    for pid, kinds in sorted(by_pid.items()):
        olds, tmps = kinds.get("old", []), kinds.get("tmp", [])
        if olds and not os.path.exists(final_dir):
            os.rename(tmps[0] if tmps else olds[0], final_dir)
            done.append(tmps[0] if tmps else olds[0])
        for path in olds + tmps:
            if path not in done:
                shutil.rmtree(path, ignore_errors=True)
                done.append(path)
    return done


def recover_files(directory):
    """
    Remove what killed processes left in directory: atomic_path's temp files (".<name>.<pid>.<random>.tmp") and the
    ".<name>.<pid>.<random>.del" dirs atomic_rmtree moves aside, when that pid is no longer alive. atomic_dir's temp
    dirs are recover_dir's business (one of them may have to be renamed into place). Returns the paths removed.
    """
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        m = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.(tmp|del)", name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        if m.group(2) == "tmp" and os.path.isfile(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        elif m.group(2) == "del" and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path)
    return removed


def atomic_rmtree(path):
    """
    Delete a directory so that no reader ever sees it half-deleted: one rename moves it aside (atomic), then the aside
    copy is deleted; a kill during the delete leaves a ".<name>.<pid>.<random>.del" dir that no loader looks at and
    recover_files(parent) removes.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".del", dir=os.path.dirname(path))
    os.rmdir(aside)
    os.rename(path, aside)
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_dir(final_dir, keep_old=False, marker=None):
    """
    Yields a fresh temporary directory next to final_dir; on success it replaces final_dir (the old one,
    if any, is moved aside and then deleted, so there is never a half-written final_dir). On any exception
    the temp dir is deleted and final_dir is left as it was; leftovers of a killed earlier run are cleaned up
    first (recover_dir). marker: a file name that an existing non-empty final_dir must contain to be replaced
    (e.g. "kb.json"), so that pointing --output at some other directory never deletes it.
    """
    final_dir = os.path.abspath(os.fspath(final_dir))
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    recover_dir(final_dir)
    if os.path.exists(final_dir):
        if not os.path.isdir(final_dir):
            raise ValueError(f"{final_dir} exists and is not a directory; refusing to replace it")
        if marker is not None and os.listdir(final_dir) and not os.path.exists(os.path.join(final_dir, marker)):
            raise ValueError(f"{final_dir} is a non-empty directory without {marker}, so it is not one of ours; "
                             f"refusing to replace it (choose another path or empty it)")
    prefix = f".{os.path.basename(final_dir)}.{os.getpid()}."  # the pid lets recover_dir tell dead runs' dirs
    tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 dirs
    old = None
    if os.path.exists(final_dir):
        old = tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=parent)
        os.rmdir(old)
        os.rename(final_dir, old)
    os.rename(tmp, final_dir)
    if old is not None and not keep_old:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -----------------------------------------------------------------------------
# misc


def iter_jsonl(path, on_error=None, allow_lists=False):
    """
    Yield (where, obj) for every non-blank line of a JSONL file, where = "path:line". Each line is decoded on its
    own, so a bad line (invalid UTF-8, invalid JSON, not a JSON object) is a ValueError naming path:line and the
    reason; with on_error=f it calls f(where, reason) instead and goes on (a loader's --skip-bad).
    allow_lists=True also yields JSON arrays (nanochat's bare-list conversation lines).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, expected a JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 (byte {e.start} of the line)"
            else:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    reason = f"invalid JSON ({e.msg} at column {e.colno})"
                else:
                    if isinstance(obj, dict) or (allow_lists and isinstance(obj, list)):
                        yield where, obj
                        continue
                    reason = f"expected a JSON object, got {type(obj).__name__}"
            if on_error is None:
                raise ValueError(f"{where}: {reason}")
            on_error(where, reason)


def read_jsonl(path):
    """Every JSON object of a JSONL file, in order (errors name path:line: see iter_jsonl)."""
    return [obj for _, obj in iter_jsonl(path)]


def append_jsonl(path, record):
    """Append one JSON record (used for per-step training logs that report.py turns into plots)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# training helpers shared by base_train / chat_sft / rag_finetune


def get_autocast_ctx(device_type):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 matmuls are slow and the tests want fp32)."""
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_optimizers(optimizers, model, lr_multiplier):
    """One optimizer step of every training loop: each param group's lr = its initial_lr * lr_multiplier, step,
    then the gradients are cleared."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        opt.step()
    model.zero_grad(set_to_none=True)


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, flat, then linear warmdown to final_lr_frac (the trapezoid nanochat uses)."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step >= num_steps - warmdown:
        progress = (num_steps - step) / warmdown
        return progress * 1.0 + (1 - progress) * final_lr_frac
    return 1.0


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: x)" to a flag's help unless the help already says its default."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """
    argparse with the seed's underscore spellings: every flag is declared once, dashed ("--model-tag"), and
    "--model_tag" (or "--model_tag=x") is read as it; --help lists each flag once and ends with one line naming
    the underscore spellings it also takes. A bare "--" (as in `torchrun ... -m scripts.x -- --flag`) is dropped
    when the parser has no positional arguments. Defaults are shown in --help.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def _underscored(self):
        """{"--model_tag": "--model-tag", ...} for every dashed long flag."""
        out = {}
        for action in self._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and "-" in opt[2:]:
                    out["--" + opt[2:].replace("-", "_")] = opt
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        positionals = any(not a.option_strings for a in self._actions)
        if not positionals:
            args = [a for a in args if a != "--"]
        aliases = self._underscored()
        for i, a in enumerate(args):
            flag, eq, value = a.partition("=")
            if flag in aliases:
                args[i] = aliases[flag] + eq + value
        return super().parse_known_args(args, namespace)

    def format_help(self):
        aliases = sorted(self._underscored())
        text = super().format_help()
        if aliases:
            text += "\nunderscore spellings also accepted: " + " ".join(aliases) + "\n"
        return text


def run_main(main):
    """
    Run a script's main(); a user error (ValueError or FileNotFoundError: a bad flag value, a missing checkpoint or
    KB, a malformed file) ends the process with one line "error: ..." on stderr and exit status 2 instead of a
    traceback. NANOCHAT_TRACEBACK=1 shows the traceback too.
    """
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("NANOCHAT_TRACEBACK"):
            raise
        rank = int(os.environ.get("RANK", 0))
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        compute_cleanup()
        sys.exit(2)


def add_checkpoint_args(parser, default_source):
    """--source / --model-tag / --step: how every script that loads a checkpoint names it."""
    parser.add_argument("--source", type=str, default=default_source, choices=["base", "mid", "sft", "rag", "refrag"],
                        help="which checkpoints to load ($NANOCHAT_BASE_DIR/<source>_checkpoints); this stack has no "
                             "mid-training stage, so mid is accepted only where such checkpoints exist")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag, e.g. d20 (None: the newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (None: the last)")


def compile_and_wrap(model, compile_flag, ddp, local_rank, device_type):
    """
    The training scripts' model setup: torch.compile (compile_flag 1/0, -1 = on for CUDA), then DDP when under
    torchrun. Returns (model to train, model to evaluate): the eval model is compiled but never DDP-wrapped, so
    an evaluation forward never issues collectives.
    """
    if (compile_flag if compile_flag != -1 else int(device_type == "cuda")):
        model = torch.compile(model, dynamic=False)
    eval_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # no buffer broadcast: the only buffers are the rotary tables, identical on every rank; a broadcast per
        # forward would also turn every eval forward into a collective that all ranks must match
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)
    return model, eval_model
