"""
examples/quickstart.ipynb runs clean top to bottom (nbclient) on the tests' tiny trained model and built-in
documents: KB built with the CLI, checkpoint loaded, an answer through Engine.generate_from_conversation with a
retriever, its sources listed, the retrieval scores plotted. So the notebook cannot rot.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(sft_env, tmp_path, monkeypatch):
    env = sft_env["env"]
    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_BUILTIN_DIR", "PYTHONPATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("QUICKSTART_DOCS", os.path.join(str(sft_env["builtin"]), "kb_documents.jsonl"))
    monkeypatch.setenv("QUICKSTART_KB", str(tmp_path / "kb"))
    monkeypatch.setenv("QUICKSTART_SOURCE", "base")
    nb = nbformat.read(os.path.join(REPO, "examples", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "documents in" in outputs and "A:" in outputs and "documents shown:" in outputs
    assert os.path.exists(tmp_path / "kb" / "kb.json")
