"""
speedrun_rag.sh: its stage function (sourced, with stand-in commands: a stage is done only when its completion
record matches, never because an artefact exists), and the whole script end to end in its smallest CPU setting
(SIZE=tiny): every stage runs, report.md is written with a section per stage, a second run skips every stage
(resumable), and a failing stage is named.
"""

import os
import sys
import subprocess

import pytest

from conftest import REPO


def speedrun(tmp_path, **extra):
    env = dict(os.environ)
    env.update(SIZE="tiny", NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_BUILTIN_DIR=str(tmp_path / "builtin"),
               VIRTUAL_ENV=sys.prefix, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
               OMP_NUM_THREADS="1")
    env.update(extra)
    return subprocess.run(["bash", os.path.join(REPO, "speedrun_rag.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


# two stand-in stages run through speedrun_rag.sh's own stage function: "base_train" replaces its checkpoint (as
# --overwrite does) and leaves a half-written temp file first (the file a killed save leaves), then, unless DIE is
# set, completes; DIE kills the whole speedrun (kill -9) in the middle of it
FAKE_STAGES = r"""
source "$REPO/speedrun_rag.sh"
export SPEEDRUN_PID=$$
CKPT="$NANOCHAT_BASE_DIR/base_checkpoints/d4"
stage base_train bash -c 'rm -rf "$0" && mkdir -p "$0" && touch "$0/.model_000010.pt.999.x1.tmp" &&
    echo base_train >> "$1/ran" && if [ -n "${DIE:-}" ]; then kill -9 $SPEEDRUN_PID $$; fi
    rm "$0/.model_000010.pt.999.x1.tmp" && touch "$0/model_000010.pt" "$0/meta_000010.json"' \
    "$CKPT" "$NANOCHAT_BASE_DIR" ${BASE_FLAGS:-}
stage chat_sft bash -c 'echo chat_sft >> "$0/ran"' "$NANOCHAT_BASE_DIR"
"""


def fake_stages(base, **extra):
    env = dict(os.environ, REPO=REPO, NANOCHAT_BASE_DIR=str(base), FORCE="0")
    env.update(extra)
    p = subprocess.run(["bash", "-c", FAKE_STAGES], env=env, capture_output=True, text=True, timeout=60)
    ran = (base / "ran").read_text().split() if (base / "ran").exists() else []
    if (base / "ran").exists():
        (base / "ran").unlink()
    return p, ran


def test_stage_is_done_only_when_its_completion_record_matches(tmp_path):
    base = tmp_path / "base"
    p, ran = fake_stages(base)
    assert p.returncode == 0 and ran == ["base_train", "chat_sft"], p.stdout + p.stderr
    record = (base / "report" / "stages" / "base_train.done").read_text().splitlines()
    assert record[0].startswith("id: base_train ") and record[2] == "after: none" and record[3].startswith("command: bash -c")
    p, ran = fake_stages(base)  # nothing changed: both skipped
    assert p.returncode == 0 and ran == [] and "[base_train] skipped" in p.stdout and "[chat_sft] skipped" in p.stdout
    # the case: the speedrun is killed while base_train saves; its checkpoint dir exists, holding only a
    # temp file. The next run must redo base_train, and chat_sft after it (it was trained from the older base)
    p, ran = fake_stages(base, FORCE="1", DIE="1")
    assert p.returncode == -9 and ran == ["base_train"]
    assert not (base / "report" / "stages" / "base_train.done").exists()
    assert os.listdir(base / "base_checkpoints" / "d4") == [".model_000010.pt.999.x1.tmp"]
    p, ran = fake_stages(base)
    assert p.returncode == 0 and ran == ["base_train", "chat_sft"], p.stdout + p.stderr
    # a changed command redoes its stage and every later one; the record of the skipped one is kept
    p, ran = fake_stages(base, BASE_FLAGS="--depth 5")
    assert ran == ["base_train", "chat_sft"]
    p, ran = fake_stages(base, BASE_FLAGS="--depth 5")
    assert ran == []
    p, ran = fake_stages(base, BASE_FLAGS="--depth 5", FORCE="1")
    assert ran == ["base_train", "chat_sft"]


@pytest.mark.slow
def test_speedrun_tiny_end_to_end(tmp_path):
    p = speedrun(tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report_dir = tmp_path / "base" / "report"
    report = (report_dir / "report.md").read_text()
    for title in ("Tokenizer training", "Base model pretraining", "Supervised fine-tuning", "RAG fine-tuning",
                  "RAG evaluation", "Final one-shot question", "Time per stage", "## System"):
        assert title in report, title
    assert "rag_em" in report and "closed_book_em" in report
    assert (report_dir / "rag_eval_bars.png").exists() and (report_dir / "base_train_loss.png").exists()
    assert "Report:" in p.stdout and "Sources:" in p.stdout  # the final answer lists its sources
    # resumable: a second run skips every stage
    p2 = speedrun(tmp_path)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    for stage in ("corpus", "stdlib-qa", "tok_train", "base_train", "chat_sft", "kb_build", "rag_finetune", "rag_eval"):
        assert f"[{stage}] skipped" in p2.stdout, stage
    # a failing stage stops the run and is named
    p3 = speedrun(tmp_path, DEPTH="3", BLOCK_PATTERN="TXT")
    assert p3.returncode != 0
    assert "failed at stage [base_train]" in p3.stderr
    assert "'X'" in p3.stdout + p3.stderr  # the bad block letter is named


# dev/gpu_single.sh and dev/gpu_multi.sh with a stand-in python3 that records each command instead of running it
FAKE_PYTHON = """#!/bin/sh
case "$*" in
    *device_count*) echo 0 ;;
    *get_device_name*) echo cpu ;;
    *) echo "$*" >> "$CALLS" ;;
esac
"""


def training_commands(tmp_path, script, **extra):
    """[(flags dict, argv)] of every scripts.{base_train,chat_sft,rag_finetune,rag_eval} command the script runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CALLS=str(tmp_path / "calls"), SMALL="1",
               OUT=str(tmp_path / "out"), NANOCHAT_BASE_DIR=str(tmp_path / "base"), **extra)
    p = subprocess.run(["bash", os.path.join(REPO, "dev", script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out = []
    for line in (tmp_path / "calls").read_text().splitlines():
        argv = line.split()
        mods = [a for a in argv if a.startswith("scripts.")]
        if mods and mods[0] in ("scripts.base_train", "scripts.chat_sft", "scripts.rag_finetune", "scripts.rag_eval"):
            flags = {a: (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True)
                     for i, a in enumerate(argv) if a.startswith("--")}
            out.append((mods[0], flags))
    return out


@pytest.mark.parametrize("script, extra", [("gpu_single.sh", dict(STAGES="base_hybrid sft rag sft_same_tokens rag_eval")),
                                           ("gpu_multi.sh", {})])
def test_gpu_scripts_give_each_stage_its_own_tag_and_replace_it(tmp_path, script, extra):
    # issue 13: gpu_single's rag stage reused the model tag, so an older, higher step of an earlier call was loaded
    out_source = {"scripts.base_train": "base", "scripts.chat_sft": "sft", "scripts.rag_finetune": "rag"}
    written = {}
    for mod, flags in training_commands(tmp_path, script, **extra):
        if mod == "scripts.rag_eval":  # evaluates what this call's rag stage wrote
            assert ("rag", flags["--model-tag"]) in written, (flags, written)
            continue
        if mod != "scripts.base_train":  # loads what an earlier stage of this call wrote
            assert (flags["--source"], flags["--model-tag"]) in written, (mod, flags, written)
        tag = flags.get("--output-tag") or flags["--model-tag"]
        assert flags.get("--overwrite") is True, (mod, flags)
        assert tag not in {t for _, t in written}, f"{mod} writes under tag {tag!r}, already used by another stage"
        written[(out_source[mod], tag)] = mod
