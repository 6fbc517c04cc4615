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
vocabulary does not match what the caller asks for is refused with a message naming both values.
"""

import os
import re
import glob
import json
import hashlib

import torch

from nanochat.common import get_base_dir, atomic_torch_save, atomic_write_json, print0
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


def find_last_step(ckpt_dir):
    """The largest step with a complete checkpoint (meta file present) in ckpt_dir."""
    steps = []
    for f in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        m = re.match(r"meta_(\d+)\.json$", os.path.basename(f))
        if m and os.path.exists(os.path.join(ckpt_dir, f"model_{int(m.group(1)):06d}.pt")):
            steps.append(int(m.group(1)))
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model_*.pt + meta_*.json) in {ckpt_dir}")
    return max(steps)


def find_model_tag(root):
    """The default model tag under a <source>_checkpoints dir: the most recently written one."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoints at {root}; train that stage first")
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t)) and not t.startswith(".")]
    if not tags:
        raise FileNotFoundError(f"no model tags in {root}; train that stage first")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


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
    atomic_torch_save(clean_state_dict(model_state), os.path.join(ckpt_dir, f"model_{step:06d}.pt"))
    if optimizer_states is not None:
        atomic_torch_save(optimizer_states, os.path.join(ckpt_dir, f"optim_{step:06d}.pt"))
    atomic_write_json(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), meta)
    print0(f"saved checkpoint to {ckpt_dir} (step {step})")


def gather_loader_states(state):
    """Every process's data-loader state, as a list indexed by rank (all ranks must call this together): each
    rank reads its own share of the data, so resuming needs each one's position, not just rank 0's."""
    import torch.distributed as dist
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


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False):
    """-> (model_state, optimizer_states or None, meta)."""
    model_path = os.path.join(ckpt_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    for p in (model_path, meta_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"checkpoint file missing: {p}")
    model_state = torch.load(model_path, map_location=device, weights_only=True)
    optim_state = None
    if load_optimizer:
        optim_path = os.path.join(ckpt_dir, f"optim_{step:06d}.pt")
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"optimizer state missing for resume: {optim_path}")
        optim_state = torch.load(optim_path, map_location=device, weights_only=True)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
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
    if model_tag is None:
        model_tag = find_model_tag(root)
    ckpt_dir = os.path.join(root, model_tag)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints for source {source!r} and model tag {model_tag!r} at {ckpt_dir}")
    if step is None:
        step = find_last_step(ckpt_dir)
    print0(f"loading {source} model {model_tag} step {step} from {ckpt_dir}")
    model, tokenizer, meta = build_model(ckpt_dir, step, device, phase, block_pattern=block_pattern, tokenizer=tokenizer)
    meta["model_tag"], meta["source"] = model_tag, source  # where it was actually loaded from
    return model, tokenizer, meta
