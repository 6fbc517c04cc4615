"""
nanochat/rl.py: group advantages, the rollout batch (loss only on sampled tokens) and the policy-gradient sign on a
toy task: a tiny GPT samples one "query token" after a fixed prompt and earns reward 1 when it is one of a few right
tokens. A few REINFORCE steps with group-mean baselines must raise the mean reward; the same steps with the sign
flipped must lower it (so the test can fail).
"""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.rl import group_advantages, rollout_batch, policy_gradient_loss


def test_group_advantages():
    assert group_advantages([1.0, 0.0, 0.5, 0.5]) == [0.5, -0.5, 0.0, 0.0]
    assert group_advantages([2.0, 2.0]) == [0.0, 0.0]  # no signal when every sample scores the same
    with pytest.raises(ValueError):
        group_advantages([])


def test_rollout_batch_masks_prompt_forced_and_padding():
    traces = [dict(tokens=[1, 2, 3, 10, 11, 12], mask=[1, 0, 1], prompt_len=3),   # 11 was forced (a document token)
              dict(tokens=[1, 2, 3, 20], mask=[1], prompt_len=3)]
    inputs, targets, weights = rollout_batch(traces, [0.5, -0.5], pad_id=0, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 0, 0]]
    # targets: prompt positions -1, the sampled 10 and 12 kept, the forced 11 masked, padding -1
    assert targets.tolist() == [[-1, -1, 10, -1, 12], [-1, -1, 20, -1, -1]]
    assert weights.tolist() == [0.5, -0.5]
    assert rollout_batch(traces, [0.0, 0.0], 0, "cpu", pad_to=8)[0].shape == (2, 8)
    with pytest.raises(ValueError, match="generated"):
        rollout_batch([dict(tokens=[1, 2], mask=[1, 1], prompt_len=1)], [0.0], 0, "cpu")
    with pytest.raises(ValueError, match="advantages"):
        rollout_batch(traces, [0.0], 0, "cpu")


def test_policy_gradient_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, block_pattern="T"))
    model.init_weights()
    traces = [dict(tokens=[1, 2, 5, 6], mask=[1, 0], prompt_len=2), dict(tokens=[1, 2, 7, 8], mask=[1, 1], prompt_len=2)]
    inputs, targets, weights = rollout_batch(traces, [1.0, -2.0], 0, "cpu")
    loss = policy_gradient_loss(model, inputs, targets, weights)
    logp = torch.log_softmax(model(inputs), dim=-1)
    # loss tokens: row 0 target 5 at position 1; row 1 targets 7 (pos 1) and 8 (pos 2); 3 tokens in all
    expected = -(1.0 * logp[0, 1, 5] - 2.0 * (logp[1, 1, 7] + logp[1, 2, 8])) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _toy_run(sign, steps=25, samples=16, seed=0):
    """Mean reward before and after `steps` policy-gradient steps (sign -1 flips the advantage)."""
    torch.manual_seed(seed)
    V = 24
    model = GPT(GPTConfig(sequence_len=8, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, block_pattern="T"))
    model.init_weights()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompt = [1, 2, 3]
    right = {5, 9, 17}  # "one query token is always right": a few tokens of the vocabulary earn the reward
    g = torch.Generator().manual_seed(seed)

    def p_right():
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
        return probs[list(right)].sum().item()

    before = p_right()
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
        toks = torch.multinomial(probs, samples, replacement=True, generator=g).tolist()
        rewards = [float(t in right) for t in toks]
        adv = [sign * a for a in group_advantages(rewards)]
        traces = [dict(tokens=prompt + [t], mask=[1], prompt_len=len(prompt)) for t in toks]
        inputs, targets, weights = rollout_batch(traces, adv, 0, "cpu")
        opt.zero_grad()
        policy_gradient_loss(model, inputs, targets, weights).backward()
        opt.step()
    return before, p_right()


def test_policy_gradient_sign_on_toy_task():
    before, after = _toy_run(+1)
    assert after > before + 0.2, (before, after)          # the right tokens became much more likely
    before_f, after_f = _toy_run(-1)
    assert after_f < before_f, (before_f, after_f)        # with the sign flipped they become less likely
