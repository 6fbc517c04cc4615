"""
Train the BPE tokenizer on the pretraining text and save it to $NANOCHAT_BASE_DIR/tokenizer (tokenizer.json).

    python -m scripts.tok_train                          # 32768 tokens on up to 2B chars of the train split
    python -m scripts.tok_train --vocab-size 8192 --max-chars 50000000 --data-dir DIR --output DIR

Texts stream from nanochat.dataset.iter_texts(data_dir, split="train"); each document is capped at --doc-cap
chars (very long documents would otherwise dominate the pair counts) and the total at --max-chars. Afterwards it
prints the training time and the compression (UTF-8 bytes per token) on the val split as a sanity check.
"""

import os
import time

from tqdm import tqdm

from nanochat.common import ArgumentParser, get_base_dir, print0
from nanochat.dataset import iter_texts, default_data_dir, sample_texts
from nanochat.report import write_stage
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS

parser = ArgumentParser(description="Train the nanochat-rag BPE tokenizer (rustbpe -> tiktoken)")
parser.add_argument("--vocab-size", type=int, default=32768,
                    help="total vocabulary size, special tokens included (default: 32768 = 2^15)")
parser.add_argument("--max-chars", type=lambda s: int(float(s)), default=2_000_000_000,
                    help="stop after this many characters of training text (default: 2e9)")
parser.add_argument("--doc-cap", type=int, default=10_000, help="keep at most this many chars of each document")
parser.add_argument("--data-dir", type=str, default=None,
                    help="directory of .parquet/.jsonl/.txt shards (default: nanochat.dataset.default_data_dir())")
parser.add_argument("--output", type=str, default=None,
                    help="where to save tokenizer.json (default: $NANOCHAT_BASE_DIR/tokenizer)")
parser.add_argument("--val-chars", type=lambda s: int(float(s)), default=2_000_000,
                    help="characters of val text for the compression check (default: 2e6)")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# checks

if args.vocab_size < 256 + len(SPECIAL_TOKENS):
    parser.error(f"--vocab-size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special "
                 f"tokens), got {args.vocab_size}")
for name in ("max_chars", "doc_cap", "val_chars"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

data_dir = args.data_dir or default_data_dir()
output_dir = args.output or os.path.join(get_base_dir(), "tokenizer")
print0(f"data: {data_dir}")
print0(f"output: {output_dir}")
print0(f"vocab size {args.vocab_size:,}, max chars {args.max_chars:,}, doc cap {args.doc_cap:,}")

# -----------------------------------------------------------------------------
# stream the training text

stats = {"docs": 0, "chars": 0}


def text_iterator():
    pbar = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="training text", mininterval=2.0)
    for doc in iter_texts(data_dir, split="train"):
        doc = doc[:args.doc_cap]
        doc = doc[:args.max_chars - stats["chars"]]
        stats["docs"] += 1
        stats["chars"] += len(doc)
        pbar.update(len(doc))
        yield doc
        if stats["chars"] >= args.max_chars:
            break
    pbar.close()


# -----------------------------------------------------------------------------
# train and save

t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
train_time = time.time() - t0
if stats["chars"] == 0:
    raise SystemExit(f"no training text found in {data_dir} (split 'train'): nothing to train on")
print0(f"trained on {stats['docs']:,} documents, {stats['chars']:,} chars in {train_time:.1f}s; "
      f"vocab size {tokenizer.get_vocab_size():,}")
path = tokenizer.save(output_dir)
print0(f"saved {path}")

# -----------------------------------------------------------------------------
# sanity check: compression on the val split, and an exact round trip

val_texts = sample_texts(data_dir, "val", args.val_chars)
if val_texts:
    encoded = tokenizer.encode(val_texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    n_tokens = sum(len(ids) for ids in encoded)
    assert all(tokenizer.decode(ids) == t for ids, t in zip(encoded, val_texts)), "decode(encode(text)) != text"
    print0(f"val compression: {n_bytes:,} bytes / {n_tokens:,} tokens = {n_bytes / max(n_tokens, 1):.3f} "
          f"bytes per token ({len(val_texts)} documents)")
else:
    print0("no val text found: compression check skipped")

figures = dict(vocab_size=tokenizer.get_vocab_size(), train_documents=stats["docs"], train_chars=stats["chars"],
               train_seconds=round(train_time, 2), data_dir=data_dir)
if val_texts:
    figures["val_bytes_per_token"] = round(n_bytes / max(n_tokens, 1), 3)
write_stage("tok_train", figures, time_s=time.time() - t0)
