"""
The policy-gradient pieces of REFRAG's stage 2 (scripts/refrag_finetune.py --stage rl): group-relative advantages
and the loss on the model's own tokens. Pure functions over token lists, so a toy task can check the sign.

    from nanochat.rl import group_advantages, rollout_batch, policy_gradient_loss
    adv = group_advantages([0.0, 1.25, 0.5, 0.5])                  # reward minus the group mean (GRPO-style)
    inputs, targets, weights = rollout_batch(traces, adv, pad_id, device)
    loss = policy_gradient_loss(model, inputs, targets, weights)   # minimise: raises log p of above-mean rollouts

As in nanochat's chat_rl (GSM8K) and DeepSeekMath's GRPO, the baseline is the mean reward of the N samples of the
same question; we do not divide by the group's standard deviation (Dr. GRPO, Liu et al. 2025: that division
up-weights questions whose samples barely differ). Only sampled tokens carry loss: prompt tokens and every token
the Engine forced (retrieved documents, calculator output) have target -1, as Search-R1 (Jin et al. 2025) masks
retrieved tokens (without the mask it reports EM 0.343 vs 0.431).
"""

import torch


def group_advantages(rewards):
    """Rewards of one question's samples -> advantages (reward minus the group mean)."""
    rewards = [float(r) for r in rewards]
    if not rewards:
        raise ValueError("group_advantages: no rewards")
    m = sum(rewards) / len(rewards)
    return [r - m for r in rewards]


def rollout_batch(traces, advantages, pad_id, device, max_len=None, pad_to=None):
    """
    Engine trajectories -> (inputs (B, T), targets (B, T), weights (B,)) for policy_gradient_loss.
    trace: {"tokens": prompt + generated ids, "mask": per generated token 1 (sampled) / 0 (forced),
    "prompt_len": int}. Targets are -1 on the prompt, on forced tokens and on padding. max_len: cut rows longer
    than this (the tail's tokens lose their loss; the model's context is the limit). pad_to: make T exactly this
    (a fixed shape lets torch.compile reuse one graph; rows must fit).
    """
    if len(traces) != len(advantages):
        raise ValueError(f"rollout_batch: {len(traces)} traces but {len(advantages)} advantages")
    rows = []
    for tr in traces:
        tokens, mask, p = list(tr["tokens"]), list(tr["mask"]), int(tr["prompt_len"])
        if len(tokens) != p + len(mask):
            raise ValueError(f"rollout_batch: {len(tokens)} tokens != prompt {p} + {len(mask)} generated")
        target_ok = [0] * p + [int(m) for m in mask]
        if max_len is not None and len(tokens) > max_len + 1:
            tokens, target_ok = tokens[:max_len + 1], target_ok[:max_len + 1]
        rows.append((tokens, target_ok))
    T = max(len(t) for t, _ in rows) - 1
    if pad_to is not None:
        if T > pad_to:
            raise ValueError(f"rollout_batch: a row of {T} tokens does not fit pad_to={pad_to}")
        T = pad_to
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (tokens, ok) in enumerate(rows):
        ids = torch.tensor(tokens, dtype=torch.long)
        n = len(tokens) - 1
        inputs[i, :n] = ids[:-1]
        tgt = ids[1:].clone()
        tgt[torch.tensor(ok[1:], dtype=torch.bool).logical_not()] = -1
        targets[i, :n] = tgt
    weights = torch.tensor(advantages, dtype=torch.float32)
    return inputs.to(device), targets.to(device), weights.to(device)


def policy_gradient_loss(model, inputs, targets, weights, normalizer=None):
    """
    -sum_i w_i * sum_t log p(target_it) / normalizer, over the sampled tokens (targets >= 0). normalizer: the number
    of loss tokens in this batch by default; pass a shared count when several batches make one step, so every
    token weighs the same. Returns a scalar to call backward() on.
    """
    B, T = inputs.shape
    nll = model(inputs, targets, loss_reduction="none").view(B, T)  # 0 where target == -1
    logp = -nll
    valid = (targets >= 0).float()
    n = valid.sum().clamp(min=1.0) if normalizer is None else normalizer
    return -(logp * valid * weights.unsqueeze(1)).sum() / n
