"""
scripts/base_train.py end to end on a tiny hybrid model (CPU): val bpb goes down, --resume continues with
exactly the losses of an uninterrupted run, a 2-process torchrun (gloo) completes, and a fresh run into a tag that
holds checkpoints is refused in one line unless --overwrite.
"""

import os
import json

import pytest

from conftest import run_script, TINY_MODEL


def read_log(base, stage):
    with open(os.path.join(base, "report", "logs", f"{stage}.jsonl")) as f:
        return [json.loads(line) for line in f]


def base_args(corpus, *extra):
    return ["scripts.base_train", *TINY_MODEL, "--device-batch-size", "4", "--total-batch-size", "1024",
            "--data-dir", str(corpus), "--eval-tokens", "2048", "--sample-every", "-1", "--log-every", "5",
            "--model-tag", "tiny", *extra]


@pytest.mark.slow
def test_base_train_lowers_val_bpb(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    run_script(base_args(pipeline_env["corpus"], "--num-iterations", "40", "--eval-every", "20"), env)
    vals = [r["val"] for r in read_log(base, "base_train") if "val" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5, vals
    with open(os.path.join(base, "report", "base_train.json")) as f:
        figures = json.load(f)["figures"]
    assert figures["block_pattern"] == "TM" and figures["steps"] == 40 and figures["tokens_per_s"] > 0
    assert os.path.exists(os.path.join(base, "base_checkpoints", "tiny", "model_000040.pt"))


def check_resume(env, base, cmd, n, every, stage="base_train", ckpt_sub="base_checkpoints"):
    """Run cmd to step n saving every `every` steps, delete the last checkpoint, --resume: the resumed steps must
    have exactly the losses of the uninterrupted run, and the step log must read as one run."""
    run_script(cmd, env)
    uninterrupted = {r["step"]: r["loss"] for r in read_log(base, stage) if "loss" in r}
    assert sorted(uninterrupted) == list(range(1, n + 1))
    ckpt = os.path.join(base, ckpt_sub, "tiny")
    for name in (f"model_{n:06d}.pt", f"optim_{n:06d}.pt", f"meta_{n:06d}.json"):
        os.remove(os.path.join(ckpt, name))
    p = run_script(cmd + ["--resume"], env)
    assert f"from step {n - every}" in p.stdout
    log = [r for r in read_log(base, stage) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, n + 1))  # the crashed run's steps past the checkpoint are dropped
    for r in log[n - every:]:
        assert abs(r["loss"] - uninterrupted[r["step"]]) < 1e-5, (r, uninterrupted[r["step"]])
    with open(os.path.join(ckpt, f"meta_{n:06d}.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_base_train_resume_continues_exactly(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    args = base_args(pipeline_env["corpus"], "--num-iterations", "12", "--eval-every", "-1", "--save-every", "6")
    meta = check_resume(env, base, args, 12, 6)
    assert len(meta["dataloader_states"]) == 1 and meta["dataloader_states"][0]["rank"] == 0


@pytest.mark.slow
def test_base_train_torchrun_two_processes_and_resume(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", *base_args(pipeline_env["corpus"],
           "--num-iterations", "4", "--eval-every", "4", "--total-batch-size", "2048", "--save-every", "2")]
    meta = check_resume(env, base, cmd, 4, 2)
    states = meta["dataloader_states"]  # each rank's own position: different documents, so a resume on 2 works
    assert [s["rank"] for s in states] == [0, 1] and states[0]["buffer"] != states[1]["buffer"]
    p = run_script(cmd + ["--resume"], env)
    assert "2 processes" in p.stdout and p.stdout.count("saved checkpoint") == 1  # rank 0 alone saves (at step 4)
    sums = [line for line in p.stdout.splitlines() if "first-batch checksums per rank" in line]
    assert len(sums) == 1 and len(set(sums[0].split("[")[1].rstrip("]").split(", "))) == 2
    # a checkpoint of 2 processes cannot be resumed by 1: each rank's data position is its own
    os.remove(os.path.join(base, "base_checkpoints", "tiny", "meta_000004.json"))
    one = base_args(pipeline_env["corpus"], "--num-iterations", "4", "--eval-every", "4", "--total-batch-size", "2048",
                    "--save-every", "2", "--resume")
    p = run_script(one, env, expect_ok=False)
    assert p.returncode != 0 and "saved by 2 process(es) but this run has 1" in p.stderr


@pytest.mark.slow
def test_base_train_refuses_an_occupied_tag_in_one_line_and_overwrite_replaces_it(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    ckpt = os.path.join(base, "base_checkpoints", "tiny")
    os.makedirs(ckpt)
    earlier = ["meta_000006.json", "model_000006.pt", "optim_000006.pt"]  # an earlier run's step 6 (only names are read)
    for name in earlier:
        open(os.path.join(ckpt, name), "w").close()
    args = base_args(pipeline_env["corpus"], "--num-iterations", "2", "--eval-every", "-1")
    p = run_script(args, env, expect_ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {ckpt} already holds checkpoints of an earlier run "
                                                        f"(steps 6); "), p.stderr
    assert "--resume" in p.stderr and "--overwrite" in p.stderr and sorted(os.listdir(ckpt)) == earlier
    run_script(args + ["--overwrite"], env)
    assert sorted(os.listdir(ckpt)) == ["meta_000002.json", "model_000002.pt", "optim_000002.pt"]
    with open(os.path.join(ckpt, "meta_000002.json")) as f:
        meta = json.load(f)
    assert len(meta["run_id"]) == 12 and meta["run_started"]


def test_base_train_help():
    import subprocess, sys
    from conftest import REPO
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and "--block-pattern" in p.stdout and "--block_pattern" in p.stdout
