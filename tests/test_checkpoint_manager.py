"""
Tests for nanochat/checkpoint_manager.py: round trip, atomic writes, refusals with clear messages, one run per tag
(a fresh run into an occupied tag is refused or replaces it, also through chat_sft), kill -9 during a save, damaged
files named.
"""

import os
import pickle

import pytest
import torch

from conftest import run_script
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat import checkpoint_manager as cm


def make(tokenizer, pattern="TM"):
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=tokenizer.get_vocab_size(), n_layer=len(pattern), n_head=2, n_kv_head=1,
                    n_embd=32, block_pattern=pattern, mamba_d_state=8, mamba_headdim=16, mamba_chunk_size=8)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def save(model, tokenizer, source="base", tag="t1", step=5, opts=None):
    d = cm.checkpoint_dir(source, tag)
    meta = cm.make_meta(model, tokenizer, step, user_config={"x": 1})
    cm.save_checkpoint(d, step, model.state_dict(), [o.state_dict() for o in opts] if opts else None, meta)
    return d


def test_round_trip_model_optimizer_meta(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer, "TMMT")
    opts = model.setup_optimizers()
    idx = torch.randint(0, 100, (2, 12))
    model(idx, idx).backward()
    for o in opts:
        o.step()
    d = save(model, tiny_tokenizer, opts=opts)
    loaded, tok, meta = cm.load_model("base", "cpu", phase="eval", tokenizer=tiny_tokenizer)
    assert meta["model_config"]["block_pattern"] == ["T", "M", "M", "T"]
    assert meta["model_tag"] == "t1" and meta["step"] == 5
    model.eval()
    assert torch.equal(model(idx), loaded(idx))
    _, optim_state, _ = cm.load_checkpoint(d, 5, "cpu", load_optimizer=True)
    fresh = loaded.setup_optimizers()
    for o, st in zip(fresh, optim_state):
        o.load_state_dict(st)
    assert fresh[1].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()


def test_last_step_and_tag_discovery(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer)
    for step in (3, 10, 7):
        save(model, tiny_tokenizer, step=step)
    assert cm.find_last_step(cm.checkpoint_dir("base", "t1")) == 10
    # a model file without its meta is an incomplete checkpoint and is ignored
    torch.save(model.state_dict(), os.path.join(cm.checkpoint_dir("base", "t1"), "model_000099.pt"))
    assert cm.find_last_step(cm.checkpoint_dir("base", "t1")) == 10


def test_block_pattern_mismatch_names_both(base_dir, tiny_tokenizer):
    save(make(tiny_tokenizer, "TM"), tiny_tokenizer)
    with pytest.raises(ValueError, match="TM.*MT"):
        cm.load_model("base", "cpu", "eval", block_pattern="MT", tokenizer=tiny_tokenizer)
    cm.load_model("base", "cpu", "eval", block_pattern="T,M", tokenizer=tiny_tokenizer)  # same pattern, other spelling
    # another length (or a bad letter): still names what the checkpoint has
    with pytest.raises(ValueError, match=r"has TM \(2 layers\) but 'TMTM' was requested .*4 blocks but n_layer is 2"):
        cm.load_model("base", "cpu", "eval", block_pattern="TMTM", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"has TM \(2 layers\) but 'TX' was requested .*unknown block letter 'X'"):
        cm.load_model("base", "cpu", "eval", block_pattern="TX", tokenizer=tiny_tokenizer)


def test_tokenizer_mismatch_names_both(base_dir, tiny_tokenizer):
    from nanochat.tokenizer import Tokenizer
    from conftest import stdlib_texts
    save(make(tiny_tokenizer), tiny_tokenizer)
    other = Tokenizer.train_from_iterator(iter(stdlib_texts(100_000)), vocab_size=600)
    with pytest.raises(ValueError, match="512.*600|vocab_size 512"):
        cm.load_model("base", "cpu", "eval", tokenizer=other)
    same_size = Tokenizer.train_from_iterator(iter(stdlib_texts(50_000)), vocab_size=512)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        cm.load_model("base", "cpu", "eval", tokenizer=same_size)


def test_failed_save_leaves_previous_checkpoint_intact(base_dir, tiny_tokenizer, monkeypatch):
    model = make(tiny_tokenizer)
    d = save(model, tiny_tokenizer, step=1)
    before = sorted(os.listdir(d))
    real_save = torch.save

    def exploding_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save(model, tiny_tokenizer, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(d)) == before  # no model_000002.pt, no temp file left behind
    assert cm.find_last_step(d) == 1


def test_pickled_objects_are_refused(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer)
    d = save(model, tiny_tokenizer, step=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(d, "model_000001.pt"), "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(Exception) as e:
        cm.load_model("base", "cpu", "eval", tokenizer=tiny_tokenizer)
    assert "weights_only" in str(e.value) or "Unpickl" in type(e.value).__name__ + str(e.value)


def test_missing_checkpoints_are_clear_errors(base_dir, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="rag_checkpoints"):
        cm.load_model("rag", "cpu", "eval", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        cm.load_model("nope", "cpu", "eval", tokenizer=tiny_tokenizer)


# -----------------------------------------------------------------------------
# one run per tag directory (issue 15 item 3)

def train_run(model, tokenizer, tag, steps, save_every, source="sft", resume=False, overwrite=False, start=0):
    """What a training loop does with checkpoints: prepare the tag, then save every `save_every` steps (the weights of
    step s are the model's plus s/1000, so a loaded checkpoint tells which step it is)."""
    d = cm.checkpoint_dir(source, tag)
    run = cm.prepare_checkpoint_dir(d, resume, overwrite)
    for step in range(start + save_every, steps + 1, save_every):
        state = {k: v + step / 1000 for k, v in model.state_dict().items()}
        cm.save_checkpoint(d, step, state, None, cm.make_meta(model, tokenizer, step, **run))
    return run


def test_fresh_run_into_an_occupied_tag_is_refused_or_replaced(base_dir, tiny_tokenizer, capsys):
    # the case: chat_sft --num-iterations 6 --output-tag X, then --num-iterations 3 --output-tag X, then a
    # later stage loads X: it used to get step 6 of the first run
    model = make(tiny_tokenizer)
    first = train_run(model, tiny_tokenizer, "X", steps=6, save_every=3)
    d = cm.checkpoint_dir("sft", "X")
    with pytest.raises(ValueError, match=r"sft_checkpoints/X already holds checkpoints of an earlier run \(steps 3, 6\)"
                                         r".*--resume.*--overwrite"):
        train_run(model, tiny_tokenizer, "X", steps=3, save_every=3)
    assert cm.complete_steps(d) == [3, 6]  # refused before touching anything
    second = train_run(model, tiny_tokenizer, "X", steps=3, save_every=3, overwrite=True)
    assert second["run_id"] != first["run_id"] and sorted(os.listdir(d)) == ["meta_000003.json", "model_000003.pt"]
    capsys.readouterr()
    loaded, _, meta = cm.load_model("sft", "cpu", "eval", model_tag="X", tokenizer=tiny_tokenizer)
    assert meta["step"] == 3 and meta["run_id"] == second["run_id"] and meta["run_started"] == second["run_started"]
    assert f"loaded sft model X step 3 (run {second['run_id']} started {second['run_started']})" in capsys.readouterr().out
    name, p = next(iter(loaded.state_dict().items()))
    assert torch.allclose(p, model.state_dict()[name] + 0.003)
    # --resume continues the run in the tag and keeps its id; it cannot be combined with --overwrite
    assert train_run(model, tiny_tokenizer, "X", steps=6, save_every=3, resume=True, start=3) == second
    assert cm.load_model("sft", "cpu", "eval", model_tag="X", tokenizer=tiny_tokenizer)[2]["run_id"] == second["run_id"]
    with pytest.raises(ValueError, match="--resume .* --overwrite"):
        cm.prepare_checkpoint_dir(d, resume=True, overwrite=True)
    # incomplete files (a model without its meta) also occupy a tag
    os.remove(os.path.join(d, "meta_000006.json"))
    with pytest.raises(ValueError, match=r"steps 3 \(and incomplete files of steps 6\)"):
        cm.prepare_checkpoint_dir(d, resume=False, overwrite=False)
    # --overwrite replaces checkpoints only, never a file of the user's
    open(os.path.join(d, "notes.txt"), "w").close()
    with pytest.raises(ValueError, match=r"not checkpoints \(notes.txt\)"):
        cm.prepare_checkpoint_dir(d, resume=False, overwrite=True)
    assert "notes.txt" in os.listdir(d) and cm.complete_steps(d) == [3]


def test_killed_overwrite_leaves_no_mix_and_is_cleaned_up(base_dir, tiny_tokenizer, monkeypatch):
    import shutil
    import subprocess
    model = make(tiny_tokenizer)
    train_run(model, tiny_tokenizer, "X", steps=6, save_every=3)
    d = cm.checkpoint_dir("sft", "X")
    # a process killed while deleting the moved-aside directory: the tag is gone as a whole, what is left is a
    # ".X.<pid>.<random>.del" dir that no loader looks at
    dead = subprocess.Popen(["true"])
    dead.wait()
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: dead.pid)
        m.setattr(shutil, "rmtree", lambda path, **k: None)
        cm.prepare_checkpoint_dir(d, resume=False, overwrite=True)
    root = os.path.dirname(d)
    aside = [n for n in os.listdir(root) if n.endswith(".del")]
    assert not os.path.exists(d) and len(aside) == 1 and aside[0].startswith(f".X.{dead.pid}.")
    with pytest.raises(FileNotFoundError, match="no model tags"):
        cm.load_model("sft", "cpu", "eval", tokenizer=tiny_tokenizer)
    train_run(model, tiny_tokenizer, "X", steps=3, save_every=3)  # the next run into the tag removes it
    assert os.listdir(root) == ["X"] and cm.complete_steps(d) == [3]


# -----------------------------------------------------------------------------
# kill -9 in the middle of a save (issue 15 item 5)

def _die_during_save(point):
    """In a forked child: SIGKILL this process at `point` of save_checkpoint: half way through writing the model or
    optimizer file, or with the meta file complete but not yet renamed into place."""
    import io
    import signal
    if point in ("model", "optim"):
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if os.path.basename(f).startswith(f".{point}_"):
                buf = io.BytesIO()
                real_save(obj, buf)
                with open(f, "wb") as fh:
                    fh.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = half_save
    else:
        real_replace = os.replace

        def replace(src, dst):
            if os.path.basename(dst).startswith("meta_"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace


def test_kill_during_save_keeps_the_last_checkpoint_and_the_next_save_or_load_cleans_up(base_dir, tiny_tokenizer):
    import signal
    model = make(tiny_tokenizer)
    opts = model.setup_optimizers()
    states = {s: {k: v + s / 1000 for k, v in model.state_dict().items()} for s in range(1, 20)}
    d = cm.checkpoint_dir("base", "t1")
    run = cm.prepare_checkpoint_dir(d, resume=False, overwrite=False)

    def save(step):
        meta = cm.make_meta(model, tiny_tokenizer, step, **run)
        cm.save_checkpoint(d, step, states[step], [o.state_dict() for o in opts], meta)

    def temp_files():
        return [n for n in os.listdir(d) if n.endswith(".tmp")]

    save(1)
    last, step = 1, 1
    for i, point in enumerate(["model", "optim", "meta"] * 2):
        step += 1
        pid = os.fork()
        if pid == 0:  # the saver: dies with kill -9 part way through
            try:
                _die_during_save(point)
                save(step)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
        left = temp_files()
        assert left and all(f".{pid}." in n for n in left), (point, left)
        if i % 2 == 0:  # the next load removes the dead saver's temp files and gets the last complete checkpoint
            loaded, _, meta = cm.load_model("base", "cpu", "eval", model_tag="t1", tokenizer=tiny_tokenizer)
            assert temp_files() == []
        else:  # ... and so does the next save
            step += 1
            save(step)
            last = step
            assert temp_files() == []
            loaded, _, meta = cm.load_model("base", "cpu", "eval", model_tag="t1", tokenizer=tiny_tokenizer)
        assert meta["step"] == last and cm.find_last_step(d) == last
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in states[last].items())


# -----------------------------------------------------------------------------
# damaged files and the seed's --source mid (issue 15 item 6, issue 13 item 3)

def test_empty_model_file_and_truncated_meta_are_named(base_dir, tiny_tokenizer):
    d = save(make(tiny_tokenizer), tiny_tokenizer, step=5)
    model_path, meta_path = os.path.join(d, "model_000005.pt"), os.path.join(d, "meta_000005.json")
    good = open(model_path, "rb").read()
    open(model_path, "wb").close()
    with pytest.raises(ValueError, match=f"cannot read checkpoint file {model_path} \\(0 bytes"):
        cm.load_model("base", "cpu", "eval", tokenizer=tiny_tokenizer)
    with open(model_path, "wb") as f:
        f.write(good[:len(good) // 2])
    with pytest.raises(ValueError, match=f"cannot read checkpoint file {model_path}.*PytorchStreamReader"):
        cm.load_checkpoint(d, 5, "cpu")
    with open(model_path, "wb") as f:
        f.write(good)
    text = open(meta_path).read()
    with open(meta_path, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f"cannot read checkpoint meta {meta_path}: invalid JSON"):
        cm.load_model("base", "cpu", "eval", tokenizer=tiny_tokenizer)


def test_source_mid_says_there_is_no_mid_stage(base_dir, tiny_tokenizer):
    save(make(tiny_tokenizer), tiny_tokenizer, source="base")
    for tag in (None, "d20"):
        with pytest.raises(FileNotFoundError) as e:
            cm.load_model("mid", "cpu", "eval", model_tag=tag, tokenizer=tiny_tokenizer)
        msg = str(e.value)
        assert "\n" not in msg and "this stack has no mid-training stage" in msg and "--source base or --source sft" in msg


@pytest.mark.slow
def test_chat_sft_into_an_occupied_tag_is_refused_and_overwrite_gives_the_new_run(sft_env, monkeypatch, capsys):
    # the commands: chat_sft 6 steps into X, then 3 steps into X, then a later stage loads X
    env, base = sft_env["env"], sft_env["base"]
    sft = ["scripts.chat_sft", "--source", "base", "--model-tag", "tiny", "--data", "builtin", "--device-batch-size", "2",
           "--max-seq-len", "128", "--eval-every", "100", "--eval-steps", "1", "--output-tag", "X"]
    run_script(sft + ["--num-iterations", "6"], env)
    p = run_script(sft + ["--num-iterations", "3"], env, expect_ok=False)
    assert p.returncode != 0 and "already holds checkpoints of an earlier run (steps 6)" in p.stderr, p.stderr[-2000:]
    run_script(sft + ["--num-iterations", "3", "--overwrite"], env)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    capsys.readouterr()
    _, _, meta = cm.load_model("sft", "cpu", "eval", model_tag="X", tokenizer=get_tokenizer())
    assert meta["step"] == 3 and f"loaded sft model X step 3 (run {meta['run_id']} started" in capsys.readouterr().out
