"""
Saving and loading checkpoints: model weights, optimizer state and a JSON meta file (the full GPTConfig,
block_pattern included, the tokenizer's fingerprint, the training arguments and loop state).

Layout: $NANOCHAT_BASE_DIR/<source>_checkpoints/<model_tag>/{model,optim}_<step>.pt + meta_<step>.json
for source in base, mid, sft, rag, refrag.

    from nanochat.checkpoint_manager import load_model, save_checkpoint
    model, tokenizer, meta = load_model("rag", device, phase="eval")           # newest tag, last step
    model, tokenizer, meta = load_model("base", device, phase="train", model_tag="d12", step=2000)

Every file is written to a temp path and renamed (the meta file last, so its presence marks a complete
checkpoint); tensors are loaded with weights_only=True (no pickle). A checkpoint whose block pattern or
vocabulary does not match what the caller asks for is refused with a message naming both values; an empty or
cut-short file is a ValueError naming it.

One tag directory holds one training run: a training loop calls prepare_checkpoint_dir first, which refuses a
fresh run into a tag that already holds checkpoints (load_model takes the highest step, which could be the earlier
run's) unless --overwrite removes them, and gives the run id and start time that every meta of the run carries
(load_model prints them). Temp files of a save that was killed are removed by the next save or load there.
"""

import os
import re
import json
import uuid
import pickle
import hashlib
import datetime

import torch
import torch.distributed as dist

from nanochat.common import (get_base_dir, atomic_torch_save, atomic_write_json, atomic_rmtree, recover_files, print0,
                             get_dist_info)
from nanochat.gpt import GPT, GPTConfig, parse_block_pattern

SOURCES = ("base", "mid", "sft", "rag", "refrag")


# -----------------------------------------------------------------------------
# paths

def checkpoints_root(source):
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCES)}")
    return os.path.join(get_base_dir(), f"{source}_checkpoints")


def checkpoint_dir(source, model_tag):
    return os.path.join(checkpoints_root(source), model_tag)


CHECKPOINT_FILE = re.compile(r"(model|optim|meta)_(\d+)\.(pt|json)")
TEMP_FILE = re.compile(r"\..+\.\d+\.[^.]+\.(tmp|del)")  # what atomic_path / atomic_rmtree leave while working


def checkpoint_files(ckpt_dir):
    """{step: {"model", "optim", "meta"} present} for every checkpoint file in ckpt_dir (complete or not)."""
    steps = {}
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        m = CHECKPOINT_FILE.fullmatch(name)
        if m and m.group(3) == ("json" if m.group(1) == "meta" else "pt"):
            steps.setdefault(int(m.group(2)), set()).add(m.group(1))
    return steps


def complete_steps(ckpt_dir):
    """The steps with both model_<step>.pt and meta_<step>.json (the meta is written last), ascending."""
    return sorted(s for s, kinds in checkpoint_files(ckpt_dir).items() if {"model", "meta"} <= kinds)


def find_last_step(ckpt_dir):
    """The largest step with a complete checkpoint (meta file present) in ckpt_dir."""
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model_*.pt + meta_*.json) in {ckpt_dir}")
    return steps[-1]


def find_model_tag(root):
    """The default model tag under a <source>_checkpoints dir: the most recently written one."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoints at {root}; train that stage first")
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t)) and not t.startswith(".")]
    if not tags:
        raise FileNotFoundError(f"no model tags in {root}; train that stage first")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


# -----------------------------------------------------------------------------
# one run per tag directory

def _new_run():
    return dict(run_id=uuid.uuid4().hex[:12], run_started=datetime.datetime.now().isoformat(timespec="seconds"))


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_checkpoint_dir(ckpt_dir, resume, overwrite, rank=0):
    """
    Every training loop calls this (on every rank) before it trains; -> {"run_id", "run_started"} for make_meta.
    A fresh run into a directory that already holds checkpoints is refused: its steps would sit next to the earlier
    run's and load_model, taking the highest step, could load the earlier (longer) run's model. overwrite=True
    removes them first: rank 0 renames the directory aside (one atomic rename, so no reader ever sees a mix of the
    two runs) and deletes it. resume=True keeps them and carries on the last checkpoint's run id. Every rank reads
    the directory before rank 0 changes anything (a barrier), so all ranks decide alike. Leftovers of killed saves
    and deletions are removed.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output tag and --overwrite replaces it: pass one of them")
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    files = checkpoint_files(ckpt_dir)
    if resume:
        step = find_last_step(ckpt_dir)
        meta = read_meta(os.path.join(ckpt_dir, f"meta_{step:06d}.json"))
        run = dict(run_id=meta.get("run_id"), run_started=meta.get("run_started"))
        if rank == 0:
            recover_files(ckpt_dir)
        return run if run["run_id"] else _new_run()  # checkpoints from before run ids: a new id from here on
    if files:
        complete = complete_steps(ckpt_dir)
        partial = sorted(set(files) - set(complete))
        found = (f"steps {', '.join(map(str, complete))}" if complete else "no complete step") + \
                (f" (and incomplete files of steps {', '.join(map(str, partial))})" if partial else "")
        if not overwrite:
            raise ValueError(f"{ckpt_dir} already holds checkpoints of an earlier run ({found}); a fresh run would save "
                             f"next to them and load_model, taking the highest step, could load the earlier run's model: "
                             f"pass --resume to continue that run or --overwrite to replace it")
        foreign = sorted(n for n in os.listdir(ckpt_dir) if not CHECKPOINT_FILE.fullmatch(n) and not TEMP_FILE.fullmatch(n))
        if foreign:
            raise ValueError(f"--overwrite: {ckpt_dir} also holds files that are not checkpoints ({', '.join(foreign[:5])}); "
                             f"move them away first, only checkpoints are replaced")
    _barrier()  # every rank has looked (and the ranks done loading a source in this same directory) before it changes
    if rank == 0:
        if files:
            print0(f"--overwrite: removing the earlier run's checkpoints in {ckpt_dir} ({found})")
            atomic_rmtree(ckpt_dir)
        recover_files(ckpt_dir)
        recover_files(parent)  # ".<tag>.<pid>.<random>.del" of a deletion that was killed
    _barrier()
    return _new_run()


# -----------------------------------------------------------------------------
# tokenizer fingerprint: a different tokenizer with the same vocab size would silently produce garbage

def tokenizer_fingerprint(tokenizer):
    h = hashlib.sha256()
    for i in range(tokenizer.get_vocab_size()):
        h.update(tokenizer.id_to_token_bytes(i))
        h.update(b"\x00")
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# save / load

def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (_orig_mod.) and DDP (module.) add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def save_checkpoint(ckpt_dir, step, model_state, optimizer_states, meta, rank=0):
    """Rank 0 writes model_<step>.pt, optim_<step>.pt (if optimizer_states) and meta_<step>.json, atomically."""
    if rank != 0:
        return
    os.makedirs(ckpt_dir, exist_ok=True)
    recover_files(ckpt_dir)  # temp files of a save that was killed
    atomic_torch_save(clean_state_dict(model_state), os.path.join(ckpt_dir, f"model_{step:06d}.pt"))
    if optimizer_states is not None:
        atomic_torch_save(optimizer_states, os.path.join(ckpt_dir, f"optim_{step:06d}.pt"))
    atomic_write_json(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), meta)
    print0(f"saved checkpoint to {ckpt_dir} (step {step})")


def gather_loader_states(state):
    """Every process's data-loader state, as a list indexed by rank (all ranks must call this together): each
    rank reads its own share of the data, so resuming needs each one's position, not just rank 0's."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def loader_state_for_rank(meta, rank, world_size, where):
    """This rank's loader state from a checkpoint's meta (None when it has none); the world size must match."""
    states = meta.get("dataloader_states")
    if states is None:
        return None
    if not isinstance(states, list) or len(states) != world_size:
        n = len(states) if isinstance(states, list) else states
        raise ValueError(f"{where}: the checkpoint was saved by {n} process(es) but this run has {world_size}; "
                         f"each process's data position is saved separately, so resume with the same number")
    return states[rank]


def read_tensors(path, device):
    """torch.load(weights_only=True); a file that is empty, cut short or not a torch checkpoint is a ValueError naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint file {path} ({os.path.getsize(path)} bytes; empty, cut short or not "
                         f"a weights-only torch file): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def read_meta(path):
    """A checkpoint's meta JSON; a damaged one is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read checkpoint meta {path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read checkpoint meta {path}: not valid UTF-8 (byte {e.start})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"cannot read checkpoint meta {path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False):
    """-> (model_state, optimizer_states or None, meta)."""
    if get_dist_info()[1] == 0:
        recover_files(ckpt_dir)  # temp files of a save that was killed
    model_path = os.path.join(ckpt_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    for p in (model_path, meta_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"checkpoint file missing: {p}")
    meta = read_meta(meta_path)
    model_state = read_tensors(model_path, device)
    optim_state = None
    if load_optimizer:
        optim_path = os.path.join(ckpt_dir, f"optim_{step:06d}.pt")
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"optimizer state missing for resume: {optim_path}")
        optim_state = read_tensors(optim_path, device)
    return model_state, optim_state, meta


def make_meta(model, tokenizer, step, **extra):
    """The meta dict every training script saves: config, tokenizer identity, plus whatever it passes."""
    meta = dict(step=step, model_config=model.config.to_dict(),
                tokenizer=dict(vocab_size=tokenizer.get_vocab_size(), fingerprint=tokenizer_fingerprint(tokenizer)))
    meta.update(extra)
    return meta


def build_model(ckpt_dir, step, device, phase, block_pattern=None, tokenizer=None):
    """Rebuild a GPT from a checkpoint; checks the block pattern and the tokenizer. -> (model, tokenizer, meta)."""
    assert phase in ("train", "eval"), f"phase must be train or eval, got {phase!r}"
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    config = GPTConfig(**meta["model_config"])
    if block_pattern is not None:
        try:
            wanted = parse_block_pattern(block_pattern, config.n_layer)
        except ValueError as e:  # e.g. a 4-letter pattern for a 2-layer checkpoint: say what the checkpoint has
            raise ValueError(f"block pattern mismatch: the checkpoint {ckpt_dir} (step {step}) has "
                             f"{''.join(config.block_pattern)} ({config.n_layer} layers) but {block_pattern!r} was "
                             f"requested ({e})") from None
        if wanted != config.block_pattern:
            raise ValueError(f"block pattern mismatch: the checkpoint {ckpt_dir} (step {step}) has "
                             f"{''.join(config.block_pattern)} but {''.join(wanted)} was requested")
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    if config.vocab_size != tokenizer.get_vocab_size():
        raise ValueError(f"tokenizer mismatch: the checkpoint {ckpt_dir} has vocab_size {config.vocab_size} but the "
                         f"tokenizer has {tokenizer.get_vocab_size()}; use the tokenizer the model was trained with")
    saved_fp = meta.get("tokenizer", {}).get("fingerprint")
    if saved_fp is not None and saved_fp != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"tokenizer mismatch: the checkpoint {ckpt_dir} was trained with tokenizer {saved_fp} but the "
                         f"current tokenizer is {tokenizer_fingerprint(tokenizer)} (same vocab size, different merges)")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # sets the rotary buffers; the weights are overwritten next
    missing, unexpected = model.load_state_dict(clean_state_dict(model_state), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir} step {step} does not fit its own config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None, block_pattern=None, tokenizer=None):
    """Load the model of a pipeline stage (base, mid, sft, rag, refrag). -> (model, tokenizer, meta)."""
    root = checkpoints_root(source)
    if source == "mid" and not any(complete_steps(os.path.join(root, t)) for t in
                                   (os.listdir(root) if os.path.isdir(root) else []) if not t.startswith(".")):
        # the seed's pipeline was base -> mid -> sft; its commands (--source mid) still parse
        raise FileNotFoundError(f"no mid-training checkpoints at {root}: this stack has no mid-training stage "
                                f"(base -> sft -> rag); use --source base or --source sft")
    if model_tag is None:
        model_tag = find_model_tag(root)
    ckpt_dir = os.path.join(root, model_tag)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints for source {source!r} and model tag {model_tag!r} at {ckpt_dir}")
    if step is None:
        step = find_last_step(ckpt_dir)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase, block_pattern=block_pattern, tokenizer=tokenizer)
    run = (f"run {meta['run_id']} started {meta.get('run_started')}" if meta.get("run_id")
           else "a run from before run ids")
    print0(f"loaded {source} model {model_tag} step {step} ({run}) from {ckpt_dir}")
    meta["model_tag"], meta["source"] = model_tag, source  # where it was actually loaded from
    return model, tokenizer, meta
