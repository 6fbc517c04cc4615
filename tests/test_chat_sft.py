"""
scripts/chat_sft.py: packing puts -1 on every non-assistant target, SFT on the shipped conversations lowers
the val loss, --resume continues exactly, a 2-process torchrun (gloo) completes, and --keep-best saves the
weights of the lowest val loss.
"""

import os
import json

import pytest
import torch

from test_base_train import check_resume
from conftest import run_script
from nanochat.sft import sft_batches


class ListTask(list):
    pass


def test_packing_masks_everything_but_the_assistant(tiny_tokenizer):
    convs = [{"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                           {"role": "assistant", "content": f"answer {i}"}]} for i in range(30)]
    T = 64
    batches = list(sft_batches(ListTask(convs), tiny_tokenizer, B=4, T=T, device=torch.device("cpu"), max_epochs=1))
    seen_answers = 0
    for x, y, state in batches:
        assert x.shape[1] == T and y.shape == x.shape
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_x[0] == tiny_tokenizer.get_bos_token_id()  # every row starts a conversation
            kept = [t for t in row_y if t != -1]
            text = tiny_tokenizer.decode(kept)
            seen_answers += text.count("<|assistant_end|>")
            assert "question" not in text and "<|user_start|>" not in text
            # inputs and targets are the same sequence shifted by one wherever a target is kept
            for j in range(T - 1):
                if row_y[j] != -1:
                    assert row_x[j + 1] == row_y[j]
    assert seen_answers == 30  # every conversation packed exactly once


def test_packing_resume_state(tiny_tokenizer):
    convs = ListTask([{"messages": [{"role": "user", "content": "q" * (i % 7 + 1)}, {"role": "assistant", "content": "a" * (i % 3 + 1)}]}
                      for i in range(50)])
    it = sft_batches(convs, tiny_tokenizer, B=2, T=32, device=torch.device("cpu"), seed=3)
    batches = [next(it) for _ in range(8)]
    state = json.loads(json.dumps(batches[3][2]))
    it2 = sft_batches(convs, tiny_tokenizer, B=2, T=32, device=torch.device("cpu"), seed=3, resume_state=state)
    for k in range(4, 8):
        x, y, _ = next(it2)
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])


def read_log(base, stage):
    with open(os.path.join(base, "report", "logs", f"{stage}.jsonl")) as f:
        return [json.loads(line) for line in f]


SFT = ["scripts.chat_sft", "--source", "base", "--model-tag", "tiny", "--data", "builtin", "--device-batch-size", "4",
       "--log-every", "5"]


@pytest.mark.slow
def test_chat_sft_lowers_val_loss(sft_env):
    env, base = sft_env["env"], sft_env["base"]
    run_script(SFT + ["--num-iterations", "30", "--eval-every", "15", "--eval-steps", "5", "--init-lr-frac", "0.5"], env)
    vals = [r["val"] for r in read_log(base, "sft") if "val" in r]
    assert len(vals) == 3 and vals[-1] < vals[0], vals
    assert os.path.exists(os.path.join(base, "sft_checkpoints", "tiny", "model_000030.pt"))


@pytest.mark.slow
def test_chat_sft_resume_continues_exactly(sft_env):
    env, base = sft_env["env"], sft_env["base"]
    args = SFT + ["--num-iterations", "10", "--eval-every", "100", "--save-every", "5"]
    meta = check_resume(env, base, args, 10, 5, stage="sft", ckpt_sub="sft_checkpoints")
    assert len(meta["dataloader_states"]) == 1


@pytest.mark.slow
def test_chat_sft_torchrun_two_processes_and_resume(sft_env):
    env, base = sft_env["env"], sft_env["base"]
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", *SFT, "--num-iterations", "4", "--eval-every", "4",
           "--eval-steps", "2", "--save-every", "2"]
    meta = check_resume(env, base, cmd, 4, 2, stage="sft", ckpt_sub="sft_checkpoints")
    assert len(meta["dataloader_states"]) == 2
    p = run_script(cmd + ["--resume"], env)
    assert p.stdout.count("saved checkpoint") == 1 and "2 processes" in p.stdout


@pytest.mark.slow
def test_chat_sft_keep_best_saves_the_lowest_val_loss_weights(sft_env):
    # a learning rate far too high makes the val loss rise after the first evaluations; --keep-best must then
    # write the weights of the best evaluation (equal to the intermediate checkpoint saved at that step)
    from nanochat.checkpoint_manager import load_checkpoint
    env, base = sft_env["env"], sft_env["base"]
    run_script(SFT + ["--num-iterations", "12", "--eval-every", "4", "--eval-steps", "3", "--save-every", "4",
                      "--init-lr-frac", "40", "--warmdown-ratio", "0", "--keep-best", "--output-tag", "best"], env)
    vals = {r["step"]: r["val"] for r in read_log(base, "sft") if "val" in r}
    best_step = min(vals, key=vals.get)
    assert best_step < 12, f"the val loss did not rise, nothing to test: {vals}"
    ckpt = os.path.join(base, "sft_checkpoints", "best")
    final_state, _, meta = load_checkpoint(ckpt, 12, "cpu")
    assert meta["best_step"] == best_step and meta["val_loss"] == pytest.approx(vals[best_step])
    assert meta["last_val_loss"] == pytest.approx(vals[12])
    if best_step > 0:
        ref_state, _, _ = load_checkpoint(ckpt, best_step, "cpu")
    else:  # step 0: the weights the run started from
        ref_state, _, _ = load_checkpoint(os.path.join(base, "base_checkpoints", "tiny"), 30, "cpu")
    assert final_state.keys() == ref_state.keys()
    assert all(torch.equal(final_state[k], ref_state[k]) for k in ref_state)
    last_state, _, _ = load_checkpoint(ckpt, 8, "cpu")
    assert best_step == 8 or not all(torch.equal(final_state[k], last_state[k]) for k in ref_state)
