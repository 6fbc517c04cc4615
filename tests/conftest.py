"""
Shared pytest fixtures: a tiny tokenizer trained on text every Python install has, a temporary
NANOCHAT_BASE_DIR, and the path to ../shared/data (tests that need it skip when it is absent).
"""

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

torch.set_num_threads(min(2, torch.get_num_threads()))


def stdlib_texts(limit_chars=400_000):
    """The language-reference topics shipped with every CPython (pydoc_data), up to limit_chars."""
    from pydoc_data.topics import topics
    out, n = [], 0
    for key in sorted(topics):
        out.append(topics[key])
        n += len(topics[key])
        if n >= limit_chars:
            break
    return out


def saved_bytes_and_grads(model, loss_fn):
    """(bytes autograd saves for backward outside checkpointed regions, the loss, {name: grad}) of one backward of
    loss_fn() (tests of activation checkpointing and of the Mamba scan's recompute)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return saved[0], loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(stdlib_texts()), vocab_size=512)


@pytest.fixture()
def base_dir(tmp_path, monkeypatch):
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# -----------------------------------------------------------------------------
# a tiny end-to-end environment for the script tests (base_train, chat_sft, rag_finetune, rag_eval)

PIPELINE_MODULES = ["json", "textwrap", "heapq", "bisect", "string", "shlex", "csv", "fnmatch", "glob", "difflib",
                    "base64", "colorsys", "statistics", "fractions", "calendar", "html", "queue", "sched"]


@pytest.fixture(scope="session")
def pipeline_data(tmp_path_factory):
    """Built-in data from a handful of stdlib modules (a few held out for eval, a few for the RAG questions) + a 512-token tokenizer."""
    from tasks.stdlib_docs import harvest, module_split
    from tasks.builtin_corpus import build_builtin_corpus
    from tasks.stdlib_qa import build_stdlib_data
    from nanochat.tokenizer import Tokenizer
    from nanochat.dataset import iter_texts
    root = tmp_path_factory.mktemp("pipeline")
    builtin = root / "builtin"
    records = harvest(modules=PIPELINE_MODULES, progress=False)
    assert {module_split(m) for m in PIPELINE_MODULES} == {"train", "rag", "eval"}
    build_builtin_corpus(builtin / "corpus", num_shards=4, records=records, progress=False)
    build_stdlib_data(builtin, max_docs=300, max_train=160, max_eval=20, max_sft=200, records=records, progress=False,
                      doc_chars=300)
    tok = Tokenizer.train_from_iterator(iter_texts(str(builtin / "corpus"), "train"), vocab_size=512)
    tok_dir = root / "tokenizer"
    tok.save(str(tok_dir))
    return dict(root=root, builtin=builtin, corpus=builtin / "corpus", tokenizer_dir=tok_dir)


@pytest.fixture()
def pipeline_env(pipeline_data, tmp_path):
    """Environment for a subprocess run: a fresh NANOCHAT_BASE_DIR holding the tokenizer, the built-in data dir."""
    import shutil
    base = tmp_path / "base"
    base.mkdir()
    shutil.copytree(pipeline_data["tokenizer_dir"], base / "tokenizer")
    env = dict(os.environ)
    env.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_BUILTIN_DIR=str(pipeline_data["builtin"]), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return dict(env=env, base=base, **pipeline_data)


def run_script(args, env, timeout=300, expect_ok=True):
    """python -m <args...> (or torchrun ...) in the repo root; returns CompletedProcess; asserts success by default."""
    import subprocess
    cmd = args if args[0] in ("torchrun",) else [sys.executable, "-m"] + args
    if cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run"] + cmd[1:]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


TINY_MODEL = ["--depth", "2", "--block-pattern", "TM", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "128",
              "--mamba-d-state", "16", "--mamba-headdim", "16", "--mamba-chunk-size", "32"]


@pytest.fixture(scope="session")
def trained_base(pipeline_data, tmp_path_factory):
    """A tiny TM base model trained for a few dozen steps, shared by the SFT / RAG script tests."""
    import shutil
    base = tmp_path_factory.mktemp("trained_base")
    shutil.copytree(pipeline_data["tokenizer_dir"], base / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_BUILTIN_DIR=str(pipeline_data["builtin"]),
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    run_script(["scripts.base_train", *TINY_MODEL, "--device-batch-size", "4", "--total-batch-size", "1024",
                "--data-dir", str(pipeline_data["corpus"]), "--num-iterations", "30", "--eval-every", "-1",
                "--sample-every", "-1", "--model-tag", "tiny"], env)
    return base / "base_checkpoints"


@pytest.fixture()
def sft_env(pipeline_env, trained_base):
    """pipeline_env plus the trained tiny base checkpoint."""
    import shutil
    shutil.copytree(trained_base, pipeline_env["base"] / "base_checkpoints")
    return pipeline_env
