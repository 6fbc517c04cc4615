"""
Compare the compression (UTF-8 bytes per token, higher is better) of our tokenizer with GPT-2's and GPT-4's
(tiktoken "gpt2", "cl100k_base") on a few kinds of text: the val split of the training data, Python source code
and a fixed multilingual/unicode sample. Prints a table and writes $NANOCHAT_BASE_DIR/report/tok_eval.md.

    python -m scripts.tok_eval [--tokenizer-dir DIR] [--data-dir DIR]

The tiktoken encodings download their files on first use; offline they are reported as "unavailable offline".
"""

import os
import heapq
import inspect
import textwrap
import json.decoder

from nanochat.common import ArgumentParser, get_base_dir, print0, atomic_write_text
from nanochat.dataset import default_data_dir, sample_texts
from nanochat.report import write_stage
from nanochat.tokenizer import Tokenizer, get_tokenizer

parser = ArgumentParser(description="Tokenizer compression vs GPT-2 / GPT-4 (bytes per token)")
parser.add_argument("--tokenizer-dir", type=str, default=None,
                    help="directory with tokenizer.json (default: $NANOCHAT_BASE_DIR/tokenizer)")
parser.add_argument("--data-dir", type=str, default=None,
                    help="training data directory for the val split (default: nanochat.dataset.default_data_dir())")
parser.add_argument("--val-chars", type=lambda s: int(float(s)), default=1_000_000, help="characters of val text to measure (1e6)")
parser.add_argument("--output", type=str, default=None,
                    help="markdown report path (default: $NANOCHAT_BASE_DIR/report/tok_eval.md)")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# the texts

# Written for this script: a few sentences each in several scripts, plus numbers, symbols and emoji.
MULTILINGUAL = """\
English: The library opens at nine and closes at half past five, except on public holidays.
Français : La bibliothèque ouvre à neuf heures et ferme à dix-sept heures trente, sauf les jours fériés.
Deutsch: Die Bibliothek öffnet um neun Uhr und schließt um halb sechs, außer an Feiertagen.
Español: La biblioteca abre a las nueve y cierra a las cinco y media, excepto los días festivos.
Русский: Библиотека открывается в девять и закрывается в половине шестого, кроме праздничных дней.
Ελληνικά: Η βιβλιοθήκη ανοίγει στις εννέα και κλείνει στις πεντέμισι, εκτός από τις αργίες.
中文：图书馆早上九点开门，下午五点半关门，法定节假日除外。
日本語：図書館は九時に開館し、五時半に閉館します。祝日は休館です。
한국어: 도서관은 아홉 시에 문을 열고 다섯 시 반에 문을 닫습니다. 공휴일은 제외입니다.
العربية: تفتح المكتبة في الساعة التاسعة وتغلق في الخامسة والنصف، باستثناء العطل الرسمية.
हिन्दी: पुस्तकालय नौ बजे खुलता है और साढ़े पाँच बजे बंद होता है, सार्वजनिक छुट्टियों को छोड़कर।
Numbers: 3.14159 2.71828 1,234,567.89 2024-03-15 17:30 +44 20 7946 0958 0x1F 1e-9
Symbols: ∀x∈ℝ: x² ≥ 0 → √(x²) = |x|; ∑ₖ 1/k² = π²/6; α β γ δ ε; € £ ¥ ₹ © ® ™ ° ± ×
Emoji: 🙂 🚀 🌍 👩‍💻 🇫🇷 ❤️ 🎉 👍🏽
Whitespace:    four spaces,\ttab,\t\ttwo tabs, trailing   \n\n\nthree newlines.
"""


def code_sample():
    # Python source that every install has (stdlib modules), not training-specific
    return "\n".join(inspect.getsource(m) for m in (json.decoder, textwrap, heapq))


def val_sample():
    data_dir = args.data_dir or default_data_dir()
    texts = sample_texts(data_dir, "val", args.val_chars)
    if not texts:
        raise ValueError(f"no val documents in {data_dir}")
    return "\n".join(texts)


texts = {}
try:
    texts["val"] = val_sample()
except Exception as e:  # missing data dir / dataset module: measure the other texts anyway
    print0(f"val split unavailable ({type(e).__name__}: {e}); skipping it")
texts["code"] = code_sample()
texts["multilingual"] = MULTILINGUAL

# -----------------------------------------------------------------------------
# the tokenizers

tokenizers = {"ours": get_tokenizer(args.tokenizer_dir)}
unavailable = []
for name in ("gpt2", "cl100k_base"):
    try:
        tokenizers[name] = Tokenizer.from_pretrained(name)
    except Exception:
        unavailable.append(name)
        print0(f"{name}: unavailable offline")

# -----------------------------------------------------------------------------
# measure

vocab = {name: tok.get_vocab_size() for name, tok in tokenizers.items()}
rows = []
for kind, text in texts.items():
    n_bytes = len(text.encode("utf-8"))
    row = {"text": kind, "bytes": n_bytes}
    for name, tok in tokenizers.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{name}: decode(encode(text)) != text on {kind}"
        row[name] = (len(ids), n_bytes / len(ids))
    rows.append(row)

names = list(tokenizers)
header = "| text | bytes | " + " | ".join(f"{n} tokens | {n} bytes/token" for n in names) + " |"
sep = "|" + "---|" * (2 + 2 * len(names))
lines = [header, sep]
for row in rows:
    cells = [row["text"], f"{row['bytes']:,}"]
    for n in names:
        cells += [f"{row[n][0]:,}", f"{row[n][1]:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
table = "\n".join(lines)

print0("vocab sizes: " + ", ".join(f"{n} {v:,}" for n, v in vocab.items()))
print0(table)
if len(names) > 1:
    for row in rows:
        for n in names[1:]:
            rel = (row["ours"][0] - row[n][0]) / row[n][0] * 100
            print0(f"{row['text']}: ours uses {rel:+.1f}% tokens vs {n}")

# -----------------------------------------------------------------------------
# report

report = ["## Tokenizer evaluation", "",
          "Compression in UTF-8 bytes per token (higher is better).", "",
          "Vocab sizes: " + ", ".join(f"{n} {v:,}" for n, v in vocab.items()) + ".", "", table, ""]
if unavailable:
    report += [f"Unavailable offline: {', '.join(unavailable)}.", ""]
out_path = args.output or os.path.join(get_base_dir(), "report", "tok_eval.md")
atomic_write_text(out_path, "\n".join(report))
print0(f"wrote {out_path}")
write_stage("tok_eval", {f"{row['text']} bytes/token (ours)": round(row["ours"][1], 3) for row in rows},
            markdown=table + (f"\n\nUnavailable offline: {', '.join(unavailable)}." if unavailable else ""))
