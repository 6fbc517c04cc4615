"""
Bits per byte (bpb): the validation metric of base training. Unlike mean token loss it does not depend on
the tokenizer's vocabulary, so runs with different tokenizers compare.

    from nanochat.loss_eval import evaluate_bpb
    bpb = evaluate_bpb(model, val_loader, steps, token_bytes)

token_bytes[i] is the number of UTF-8 bytes of token i (0 for special tokens, which are then not counted).
Under DDP the sums are all-reduced, so every rank returns the same value.
"""

import math
import contextlib

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import get_dist_info


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, autocast_ctx=None):
    autocast_ctx = autocast_ctx or contextlib.nullcontext()
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    token_bytes = token_bytes.to(device)
    it = iter(batches)
    # a progress bar only when an evaluation takes more than 2 s (big GPU evals), on rank 0
    for _ in tqdm(range(steps), desc="val bpb", delay=2.0, mininterval=2.0, leave=False, disable=get_dist_info()[1] != 0):
        x, y = next(it)[:2]
        with autocast_ctx:
            loss2d = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss2d.double() * counted).sum()
        total_bytes += nbytes.sum().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
