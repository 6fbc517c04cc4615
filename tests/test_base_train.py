"""
scripts/base_train.py end to end on a tiny hybrid model (CPU): val bpb goes down, --resume continues with
exactly the losses of an uninterrupted run, and a 2-process torchrun (gloo) completes.
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


@pytest.mark.slow
def test_base_train_resume_continues_exactly(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    args = base_args(pipeline_env["corpus"], "--num-iterations", "12", "--eval-every", "-1", "--save-every", "6")
    run_script(args, env)
    ckpt = os.path.join(base, "base_checkpoints", "tiny")
    for name in ("model_000012.pt", "optim_000012.pt", "meta_000012.json"):
        os.remove(os.path.join(ckpt, name))
    run_script(args + ["--resume"], env)
    log = [r for r in read_log(base, "base_train") if "loss" in r]
    uninterrupted = {r["step"]: r["loss"] for r in log[:12]}
    resumed = log[12:]
    assert [r["step"] for r in resumed] == list(range(7, 13))
    for r in resumed:
        assert abs(r["loss"] - uninterrupted[r["step"]]) < 1e-5, (r, uninterrupted[r["step"]])


@pytest.mark.slow
def test_base_train_torchrun_two_processes(pipeline_env):
    env, base = pipeline_env["env"], pipeline_env["base"]
    p = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "-m", *base_args(pipeline_env["corpus"],
                    "--num-iterations", "4", "--eval-every", "4", "--total-batch-size", "2048")], env)
    out = p.stdout
    assert "2 processes" in out
    assert out.count("saved checkpoint") == 1  # rank 0 alone saves and logs
    assert os.path.exists(os.path.join(base, "base_checkpoints", "tiny", "model_000004.pt"))


def test_base_train_help():
    import subprocess, sys
    from conftest import REPO
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and "--block-pattern" in p.stdout and "--block_pattern" in p.stdout
