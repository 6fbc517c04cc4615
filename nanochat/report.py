"""
The run report: every stage of a run writes its key figures here, and `generate` assembles report.md with
system info, a table per stage, time per stage and PNG plots (loss curves; closed-book vs RAG bars).

    python -m nanochat.report reset       # start a new report (speedrun_rag.sh does this first)
    python -m nanochat.report generate    # write $NANOCHAT_BASE_DIR/report/report.md and print its path

From code (rank 0 only; other ranks are no-ops):
    from nanochat.report import log_step, write_stage
    log_step("base_train", {"step": 10, "loss": 3.2})          # appended to report/logs/base_train.jsonl
    write_stage("base_train", {"val_bpb": 1.23, "tokens_per_s": 5e4}, time_s=123.4)

speedrun_rag.sh writes a completion record per stage, report/stages/<stage>.done, after the stage's command
succeeded: lines "id: ...", "seconds: ...", "after: <id of the stage before>", "command: ..." (the shell compares
the last two to decide whether the stage is done; see speedrun_rag.sh). `generate` takes the time per stage from
them; `reset` removes them, so the next speedrun redoes every stage.
"""

import os
import sys
import json
import time
import glob
import shutil
import socket
import platform
import datetime
import subprocess

from nanochat.common import get_base_dir, atomic_write_json, atomic_write_text, get_dist_info, append_jsonl, ArgumentParser

# the order stages appear in the report, with their titles
STAGES = [
    ("tok_train", "Tokenizer training"),
    ("tok_eval", "Tokenizer evaluation"),
    ("base_train", "Base model pretraining"),
    ("sft", "Supervised fine-tuning (chat_sft)"),
    ("chat_eval", "Chat evaluation"),
    ("kb_build", "Knowledge base build"),
    ("retrieval_eval", "Retrieval quality on the KB's evaluation questions"),
    ("rag_finetune", "RAG fine-tuning"),
    ("rag_eval", "RAG evaluation: closed-book vs with retrieval, beside model-free baselines"),
    ("refrag_sft", "REFRAG stage 1: supervised warm start on gold trajectories"),
    ("refrag_rl", "REFRAG stage 2: RL with Engine rollouts"),
    ("refrag_eval", "Multi-hop evaluation: single-shot vs fixed-rule vs REFRAG"),
    ("final", "Final one-shot question"),
]


def report_dir():
    d = os.path.join(get_base_dir(), "report")
    os.makedirs(d, exist_ok=True)
    return d


def _is_master():
    return get_dist_info()[1] == 0


def log_step(stage, record):
    """Append one per-step record (loss, lr, tokens/s...) to report/logs/<stage>.jsonl."""
    if not _is_master():
        return
    append_jsonl(os.path.join(report_dir(), "logs", f"{stage}.jsonl"), record)


def reset_log(stage, keep_until=None):
    """Start a stage's step log afresh (a stage that is re-run does not append to its old curve). keep_until: a
    resumed run keeps the records up to that step (and drops those a crashed run wrote past its checkpoint)."""
    if not _is_master():
        return
    p = os.path.join(report_dir(), "logs", f"{stage}.jsonl")
    if not os.path.exists(p):
        return
    if keep_until is None:
        os.remove(p)
        return
    keep = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            # the eval at the resume step is recomputed by the resumed run, train steps before it are kept
            if rec.get("step", 0) < keep_until or (rec.get("step") == keep_until and "val" not in rec):
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(p, "".join(keep))


def write_stage(stage, figures, time_s=None, notes=None, markdown=None):
    """Record a stage's key figures (a flat dict), its wall time and optional notes / a markdown block."""
    if not _is_master():
        return
    data = dict(stage=stage, figures=figures, time_s=time_s, notes=notes or [], markdown=markdown,
                written=datetime.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(os.path.join(report_dir(), f"{stage}.json"), data)


def read_stage_records():
    """speedrun_rag.sh's completion records, oldest first: [{"stage", "id", "seconds", "after", "command"}]."""
    records = []
    for path in glob.glob(os.path.join(report_dir(), "stages", "*.done")):
        rec = dict(stage=os.path.basename(path)[:-len(".done")])
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition(": ")
                if sep:
                    rec[key] = value
        try:
            rec["seconds"] = float(rec["seconds"])
        except (KeyError, ValueError):
            rec["seconds"] = None
        records.append((os.path.getmtime(path), rec))
    return [rec for _, rec in sorted(records, key=lambda r: r[0])]


def system_info():
    import torch
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), host=socket.gethostname(),
        platform=platform.platform(), python=sys.version.split()[0], torch=torch.__version__,
        cpu_count=os.cpu_count(), cuda=torch.cuda.is_available(),
    )
    if torch.cuda.is_available():
        info["gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    return info


def reset():
    """Clear the previous report (stage files, logs, plots) and record system info + start time."""
    d = report_dir()
    for f in glob.glob(os.path.join(d, "*.json")) + glob.glob(os.path.join(d, "*.png")) + glob.glob(os.path.join(d, "*.jsonl")):
        os.remove(f)
    shutil.rmtree(os.path.join(d, "logs"), ignore_errors=True)
    shutil.rmtree(os.path.join(d, "stages"), ignore_errors=True)  # speedrun_rag.sh's completion records
    info = system_info()
    info["start_time"] = time.time()
    atomic_write_json(os.path.join(d, "system.json"), info)


# -----------------------------------------------------------------------------
# plots

def _read_log(stage):
    p = os.path.join(report_dir(), "logs", f"{stage}.jsonl")
    if not os.path.exists(p):
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_losses(d):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for stage, title in STAGES:
        recs = _read_log(stage)
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val"]) for r in recs if "val" in r]
        if not train and not val:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label=next(r.get("val_name", "val") for r in recs if "val" in r))
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{stage}_loss.png"
        fig.savefig(os.path.join(d, name), dpi=110)
        plt.close(fig)
        made.append((title, name))
    return made


def _plot_rag_bars(d, figures, stage):
    """EM and F1 of every system of a rag_eval stage (model rows and baselines), as grouped bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    systems = [k[:-3] for k in figures if k.endswith("_em") and f"{k[:-3]}_f1" in figures]
    if not systems:
        return None
    x = np.arange(len(systems))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(systems)), 3.5))
    ax.bar(x - 0.2, [figures[f"{s}_em"] for s in systems], 0.4, label="EM")
    ax.bar(x + 0.2, [figures[f"{s}_f1"] for s in systems], 0.4, label="F1")
    ax.set_xticks(x, [s.replace("_", " ") for s in systems], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("Same questions, same documents: model rows and model-free baselines")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    name = f"{stage}_bars.png"
    fig.savefig(os.path.join(d, name), dpi=110)
    plt.close(fig)
    return name


# -----------------------------------------------------------------------------
# assemble

def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def generate():
    d = report_dir()
    lines = ["# nanochat-rag report", ""]
    sys_path = os.path.join(d, "system.json")
    start = None
    if os.path.exists(sys_path):
        with open(sys_path, encoding="utf-8") as f:
            info = json.load(f)
        start = info.pop("start_time", None)
        lines += ["## System", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    plots = dict((stage_title, name) for stage_title, name in _plot_losses(d))
    timing = []
    for stage, title in STAGES:
        p = os.path.join(d, f"{stage}.json")
        if not os.path.exists(p):
            continue
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        lines += [f"## {title}", ""]
        figs = data.get("figures") or {}
        if figs:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in figs.items()] + [""]
        if data.get("time_s") is not None:
            lines += [f"Time: {data['time_s']:.1f} s", ""]
            timing.append((title, data["time_s"]))
        for n in data.get("notes") or []:
            lines.append(f"- {n}")
        if data.get("notes"):
            lines.append("")
        if data.get("markdown"):
            lines += [data["markdown"], ""]
        if title in plots:
            lines += [f"![{title}]({plots[title]})", ""]
        if stage in ("rag_eval", "refrag_eval"):
            bars = _plot_rag_bars(d, figs, stage)
            if bars:
                lines += [f"![EM and F1 per system]({bars})", ""]
    # wall time per speedrun stage (its completion records: a re-run stage has its latest time), else the stages' own
    records = [(r["stage"], r["seconds"]) for r in read_stage_records() if r["seconds"] is not None]
    if records:
        timing = records
    if timing:
        lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {t} | {s:.1f} |" for t, s in timing]
        if start is not None:
            lines += [f"| total wall clock since reset | {time.time() - start:.1f} |"]
        lines.append("")
    out = os.path.join(d, "report.md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    parser = ArgumentParser(description="Reset or generate the run report under $NANOCHAT_BASE_DIR/report.")
    parser.add_argument("command", choices=["reset", "generate"],
                        help="reset: start a new report (and make speedrun_rag.sh redo every stage); generate: write report.md")
    args = parser.parse_args()
    if args.command == "reset":
        reset()
        print(f"report reset in {report_dir()}")
    else:
        print(generate())
