"""
English prose for the offline pretraining corpus, extracted from Debian packages that the dev machine can install
(dictionaries, WordNet, Jane Austen's novels, Debian's books, kernel/PostgreSQL/Python docs, man pages), written as
one zstd parquet file small enough to carry to the GPU machine (which has no network).

    bash dev/build_prose.sh                                       # apt-get installs the packages, then runs:
    python -m tasks.prose --output .carry/prose/prose.parquet     # all sources (SOURCES, in priority order)
    python -m tasks.prose --sources wordnet,gcide --output /tmp/p.parquet
    python -m tasks.builtin_corpus --with-source --site-packages --max-chars 3e8 --prose .carry/prose/prose.parquet

Why: the model must read English (Wikipedia-like) passages for multi-hop RAG, and a corpus of Python docstrings
and source does not teach that; adding ~72M chars of Debian prose lifted dev RAG F1 from 5.9 to 9.5 in the
reference run of ../shared/data/README.md.

The file has columns "text" and "source"; its schema metadata (key b"prose_manifest") holds the manifest (per
source: package, version, licence, notice, documents, chars, ASCII letter/space share), also written beside it as
<file>.json. Documents are cleaned (markup, code blocks, tables, navigation and citations dropped, lines unwrapped),
deduplicated by paragraph across all sources in priority order, and capped in total by --max-chars.
"""

import os
import re
import glob
import gzip
import json
import time
import hashlib
import subprocess
import unicodedata
from html.parser import HTMLParser
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_path, atomic_write_json, print0, ArgumentParser, run_main
from tasks.stdlib_docs import module_split

# -----------------------------------------------------------------------------
# shared text helpers

def letter_share(text):
    """Share of characters that are ASCII letters or spaces: English prose scores ~0.95, code and tables less."""
    if not text:
        return 0.0
    return sum(1 for c in text if c == " " or ("a" <= c <= "z") or ("A" <= c <= "Z")) / len(text)


def unwrap(block):
    """A hard-wrapped block as one line: runs of whitespace (line breaks, indents, double spaces) as one space."""
    return " ".join(block.split())


def blocks(text):
    """Blank-line separated blocks of text, each unwrapped, empty ones dropped."""
    return [b for b in (unwrap(b) for b in re.split(r"\n[ \t]*\n", text)) if b]


def is_prose(paragraph, min_share=0.75):
    """True for a paragraph that reads as text: mostly letters and spaces (code, tables and ASCII art are not)."""
    return bool(paragraph.strip()) and letter_share(paragraph) >= min_share


def pack(items, max_chars=3000, sep="\n\n"):
    """Consecutive short items (dictionary entries, glosses) joined into documents of at most ~max_chars."""
    docs, cur, n = [], [], 0
    for item in items:
        if cur and n + len(sep) + len(item) > max_chars:
            docs.append(sep.join(cur))
            cur, n = [], 0
        cur.append(item)
        n += len(item) + (len(sep) if n else 0)
    if cur:
        docs.append(sep.join(cur))
    return docs


_SENTENCE_END = (".", "!", "?", '"', "'", "\u201d", "\u2019", ")")


def _norm(paragraph):
    return " ".join(paragraph.lower().split())


def dedupe(docs_by_source, min_paragraph_chars=60, min_doc_chars=200, boilerplate_docs=20):
    """
    Drop repeated paragraphs across all sources: one of at least min_paragraph_chars (compared after lower-casing
    and squashing spaces) after its first occurrence in the given (priority) order; a shorter one everywhere if
    boilerplate_docs or more documents hold it and it does not end like a sentence ("Download the ebook",
    "Description", "Author:"; not '"Yes."'). Then drop the documents left shorter than min_doc_chars. Licence
    blurbs, navigation text and headings repeat; real paragraphs rarely do. docs_by_source: {source: [doc, ...]}
    (dict order is priority). Returns the same shape.
    """
    short_counts = {}
    for docs in docs_by_source.values():
        for doc in docs:
            for key in {_norm(p) for p in doc.split("\n\n") if len(p) < min_paragraph_chars}:
                short_counts[key] = short_counts.get(key, 0) + 1
    seen, out = set(), {}
    for source, docs in docs_by_source.items():
        kept = []
        for doc in docs:
            paras = []
            for p in doc.split("\n\n"):
                if len(p) >= min_paragraph_chars:
                    key = hashlib.sha1(_norm(p).encode("utf-8")).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                elif short_counts.get(_norm(p), 0) >= boilerplate_docs and not p.endswith(_SENTENCE_END):
                    continue  # a label or heading, not a sentence ("Yes," said he. stays)
                paras.append(p)
            text = "\n\n".join(paras).strip()
            if len(text) >= min_doc_chars:
                kept.append(text)
        out[source] = kept
    return out

# -----------------------------------------------------------------------------
# HTML (Sphinx, DocBook) -> text

_SKIP_TAGS = {"script", "style", "head", "nav", "pre", "table", "footer", "svg", "math", "form", "button",
              "noscript", "select", "textarea"}
# class names of navigation, tables of contents, code listings and index markers in Sphinx and DocBook output
_SKIP_CLASSES = {"navheader", "navfooter", "docnav", "toc", "sphinxsidebar", "sphinxsidebarwrapper", "related",
                 "footer", "headerlink", "highlight", "programlisting", "screen", "synopsis", "indexterm",
                 "refsynopsisdiv", "breadcrumbs", "mobile-nav", "navigation", "literallayout", "cmdsynopsis",
                 "funcsynopsis", "contents", "toctree-wrapper", "genindex-jumpbox", "admonition-title"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "aside", "header", "h1", "h2", "h3", "h4", "h5", "h6",
               "li", "ul", "ol", "dl", "dt", "dd", "br", "hr", "blockquote", "figure", "figcaption", "tr", "td",
               "th", "title", "body", "caption", "address"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source",
              "track", "wbr"}


class _HTMLText(HTMLParser):
    """Collects the visible paragraphs of a page (with the links each one holds), skipping navigation and code."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.skip_at = [], None  # open tags; index in stack where a skipped element starts
        self.paragraphs, self.words, self.links = [], [], []

    def flush(self):
        text = " ".join("".join(self.words).split())
        if text:
            self.paragraphs.append((text, self.links))
        self.words, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.skip_at is None and tag in _BLOCK_TAGS:
            self.flush()
        if tag in _VOID_TAGS:
            return
        self.stack.append(tag)
        classes = set((attrs.get("class") or "").split())
        if self.skip_at is None and (tag in _SKIP_TAGS or classes & _SKIP_CLASSES
                                     or attrs.get("role") in ("navigation", "search")):
            self.skip_at = len(self.stack) - 1
        if self.skip_at is None and tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag in self.stack:  # pop through unclosed children (<p>, <li> may be left open in HTML)
            while self.stack.pop() != tag:
                pass
            if self.skip_at is not None and len(self.stack) <= self.skip_at:
                self.skip_at = None
        if self.skip_at is None and tag in _BLOCK_TAGS:
            self.flush()

    def handle_data(self, data):
        if self.skip_at is None:
            self.words.append(data)


def html_to_text(html, drop_link=None, min_share=0.75):
    """
    The readable text of an HTML page: one paragraph per block element, joined by blank lines. Skipped: <head>,
    scripts, navigation, tables of contents, <pre> code listings, tables, and paragraphs that do not read as text
    (is_prose). drop_link(href) -> True drops every paragraph holding such a link (used to keep held-out stdlib
    modules' documentation out of the corpus).
    """
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    parser.flush()
    kept = []
    for text, links in parser.paragraphs:
        if drop_link is not None and any(drop_link(h) for h in links):
            continue
        if is_prose(text, min_share):
            kept.append(text)
    return "\n\n".join(kept)

# -----------------------------------------------------------------------------
# reStructuredText (kernel docs) -> text

_ADMONITIONS = {"note", "warning", "tip", "important", "hint", "caution", "attention", "danger", "error",
                "admonition", "seealso", "epigraph", "topic", "sidebar", "rubric"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")
_SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
_GRID_LINE = re.compile(r"^\s*(\+[-=+]+\+?|\|.*\|)\s*$")
_FIELD = re.compile(r"^\s*:[\w][\w .-]*:(\s|$)")
_BULLET = re.compile(r"^\s*([-*+\u2022]|#\.|\d+[.)]|\(\d+\)|[a-z][.)])\s+")
_RST_INLINE = [
    (re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),   # :ref:`Title <label>` -> Title
    (re.compile(r":[\w:.+-]+:`~?([^`]*)`"), r"\1"),              # :c:func:`foo` -> foo
    (re.compile(r"``([^`]+)``"), r"\1"),                         # ``literal``
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),          # `Title <url>`_
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),                     # `text`_ and `interpreted`
    (re.compile(r"\[(#\w*|\d+|\*)\]_"), ""),                      # footnote references
    (re.compile(r"\*\*(\S(?:.*?\S)?)\*\*"), r"\1"),              # **strong**
    (re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\|(\w[\w -]*)\|"), r"\1"),                      # |substitution|
]


def _indent(line):
    return len(line) - len(line.lstrip())


def rst_to_text(rst, min_share=0.75):
    """
    The prose of a reStructuredText document: section titles and paragraphs kept (unwrapped); comments, labels,
    directives with their bodies (code, tables, kernel-doc, toctree, images), literal blocks after "::", simple
    and grid tables, field lists and section adornments dropped; admonitions (note, warning, ...) kept as text;
    inline markup (roles, literals, links, emphasis) reduced to its text.
    """
    out, skip_indent, table_borders = [], None, 0
    lines = rst.expandtabs(8).splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if skip_indent is not None:  # inside a dropped directive or literal block: indented lines and blanks
            if not stripped or _indent(line) > skip_indent:
                continue
            skip_indent = None
        if table_borders:  # inside a simple table: until a border line followed by a blank line
            if _SIMPLE_TABLE_BORDER.match(line):
                table_borders += 1
                if table_borders >= 2 and (i + 1 == len(lines) or not lines[i + 1].strip()):
                    table_borders = 0
            continue
        if _SIMPLE_TABLE_BORDER.match(line):
            table_borders = 1
            continue
        m = _DIRECTIVE.match(line)
        if m:
            if m.group(2) in _ADMONITIONS:  # its body stays; its argument (a title) becomes a paragraph
                out += ["", m.group(3), ""] if m.group(3) else [""]
            else:
                skip_indent = len(m.group(1))
            continue
        if _COMMENT.match(line):  # comments, ".. _label:" targets, substitution definitions
            skip_indent = _indent(line)
            continue
        if _ADORNMENT.match(line) or _GRID_LINE.match(line) or _FIELD.match(line):
            out.append("")  # a title stays a paragraph of its own
            continue
        if stripped.endswith("::"):  # a literal block follows, indented under this line
            skip_indent = _indent(line)
            text = stripped[:-2].rstrip()
            if text:
                out.append(text + ":")
            out.append("")
            continue
        if _BULLET.match(line):
            out.append("")
            line = _BULLET.sub("", line, count=1)
        out.append(line)
    paragraphs = []
    for p in blocks("\n".join(out)):
        for pattern, repl in _RST_INLINE:
            p = pattern.sub(repl, p)
        p = p.replace("\\", "").strip()
        if is_prose(p, min_share):
            paragraphs.append(p)
    return "\n\n".join(paragraphs)

# -----------------------------------------------------------------------------
# man pages (rendered by man(1)) -> text

_MAN_DROP_SECTIONS = {"SYNOPSIS", "EXAMPLE", "EXAMPLES", "SEE ALSO", "COLOPHON", "AUTHOR", "AUTHORS",
                      "REPORTING BUGS", "COPYRIGHT", "ATTRIBUTES", "LIBRARY", "STANDARDS", "FILES", "VERSIONS"}


def man_to_text(rendered, min_share=0.75):
    """
    The prose of a man page as man(1) renders it (wrapped lines of a paragraph are joined again): overstrike
    bold/underline removed, the header and footer lines dropped, section headings kept in capitalised form and
    subsection headings as they are,
    SYNOPSIS, EXAMPLES, SEE ALSO, COLOPHON and similar sections dropped whole, then the prose filter.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", re.sub(r".\x08", "", rendered))
    lines = [l.rstrip() for l in text.splitlines()]
    nonblank = [i for i, l in enumerate(lines) if l.strip()]
    if len(nonblank) < 3:
        return ""
    lines = lines[nonblank[0] + 1:nonblank[-1]]  # header "name(7) ... name(7)" and footer lines
    out, dropping = [], False
    for line in lines:
        if line and not line[0].isspace():  # a section heading at column 0
            heading = line.strip()
            dropping = heading.upper() in _MAN_DROP_SECTIONS
            if not dropping and heading.upper() != "NAME":
                out += ["", heading.capitalize(), ""]
            continue
        if dropping:
            continue
        if line.strip() and _indent(line) <= 4:  # a subsection heading (3 spaces; the body is at 7)
            out += ["", line.strip(), ""]
        else:
            out.append(line if line.strip() else "")
    return "\n\n".join(p for p in blocks("\n".join(out)) if is_prose(p, min_share))

# -----------------------------------------------------------------------------
# dictionaries: WordNet, dictd databases (GCIDE, FOLDOC, Jargon File, The Devil's Dictionary)

_WORDNET_RELATIONS = {"@": "It is a kind of", "@i": "It is an instance of", "#p": "It is part of",
                      "#m": "It is a member of"}


def wordnet_synsets(data_text):
    """
    The synsets of a WordNet data.<pos> file (wndb(5)): (offset, lex_filenum, words, pointers, gloss), with
    pointers a list of (symbol, target offset, target pos). The licence header lines (two leading spaces) are skipped.
    """
    out = []
    for lineno, line in enumerate(data_text.splitlines(), 1):
        if not line.strip() or line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        try:
            w_cnt = int(f[3], 16)
            words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * w_cnt:2]]
            i = 4 + 2 * w_cnt
            p_cnt = int(f[i])
            pointers = [(f[j], f[j + 1], f[j + 2]) for j in range(i + 1, i + 1 + 4 * p_cnt, 4)]
        except (IndexError, ValueError):
            raise ValueError(f"WordNet data line {lineno}: cannot parse {line[:80]!r}") from None
        out.append((f[0], int(f[1]), words, pointers, gloss.strip()))
    return out


def wordnet_lines(synsets, pos):
    """
    (lex_filenum, line) per synset, the line in English: 'word, synonym: gloss; "example". It is a kind of X.'
    The kind-of / instance-of / part-of / member-of targets are the first word of synsets of the same file (pos:
    its letter). Synsets without words or gloss are skipped.
    """
    first_word = {off: words[0] for off, _, words, _, _ in synsets if words}
    lines = []
    for off, lexfile, words, pointers, gloss in synsets:
        gloss = gloss.strip().rstrip(";").strip()
        if not words or not gloss:
            continue
        line = f"{', '.join(words)}: {gloss}"
        line += "" if line.endswith((".", "!", "?")) else "."
        rel = {}
        for sym, target, tpos in pointers:
            if sym in _WORDNET_RELATIONS and tpos == pos and target in first_word:
                rel.setdefault(_WORDNET_RELATIONS[sym], []).append(first_word[target])
        for phrase, targets in rel.items():
            line += f" {phrase} {', '.join(dict.fromkeys(targets))}."
        lines.append((lexfile, line))
    return lines


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s):
    """A dictd index offset/length: base 64 in the alphabet A-Z a-z 0-9 + /, most significant digit first."""
    n = 0
    for c in s:
        d = _DICTD_B64.find(c)
        if d < 0:
            raise ValueError(f"dictd index: bad base64 digit {c!r} in {s!r}")
        n = n * 64 + d
    return n


def dictd_entries(index_text, dict_bytes):
    """
    The entries of a dictd database (index "headword<TAB>offset<TAB>length" per line, offsets into the uncompressed
    .dict), each distinct byte range once, in file order; the "00-database-*" info entries are skipped.
    """
    spans = set()
    for lineno, line in enumerate(index_text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"dictd index line {lineno}: expected 3 tab-separated fields, got {line[:80]!r}")
        if parts[0].startswith("00") and parts[0].lstrip("0-").startswith("database"):
            continue
        spans.add((dictd_number(parts[1]), dictd_number(parts[2])))
    return [dict_bytes[o:o + n].decode("utf-8", "replace") for o, n in sorted(spans)]


_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", "=": "\u0304",
                ",": "\u0327"}
_GCIDE_NAMED = {"ae": "\u00e6", "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "eth": "\u00f0", "th": "\u00fe",
                "imac": "\u012b", "aum": "\u00e4", "udd": "\u00fc", "root": "\u221a", "deg": "\u00b0",
                "sect": "\u00a7", "yogh": "\u021d", "nbsp": " ", "ldqo": "\u201c", "rdqo": "\u201d",
                "flat": "\u266d", "rarr": "\u2192", "sec": "\u2033", "min": "\u2032", "ng": "ng", "asl": "a",
                "add": "a"}
# usage labels and editors' source tags in brackets; other one-word brackets are words a quotation's editor
# inserted ("[He] was ...") and stay
_GCIDE_LABELS = {"Cant", "Low", "Rare", "Law", "Obs", "Local", "Slang", "Poetic", "Archaic", "Colloq", "Vulgar",
                 "Prov", "Scot", "Dial", "Humorous", "Eng", "Fig", "Hand"}


def _gcide_code(m):
    """One GCIDE bracket code as text: ['e] -> e-acute, [ae] -> ae ligature, [beta] -> beta, [He] -> He, else ''."""
    code = m.group(1)
    if code in _GCIDE_NAMED:
        return _GCIDE_NAMED[code]
    if len(code) >= 2 and code[0] in _GCIDE_MARKS and code[1:].isalpha():  # ['e] [`a] ["u] [^o] [~n] [=a] [,c]
        return unicodedata.normalize("NFC", code[1] + _GCIDE_MARKS[code[0]]) + code[2:]
    if len(code) >= 2 and (code[0] in ".-*" and code[1:].isalpha() or code[-1] == "^" and code[:-1].isalpha()):
        return code.strip(".-*^")  # breve, dot below and other pronunciation marks: the plain letter
    try:
        return unicodedata.lookup("GREEK SMALL LETTER " + code.upper())
    except KeyError:
        pass
    if code.isalpha() and not code.isupper() and code not in _GCIDE_LABELS:
        return code
    return ""


def gcide_entry(text):
    """
    A GCIDE (Webster 1913 + additions) entry as plain text: character codes (['e], [ae]) as Unicode,
    pronunciations (\\...\\), bracketed etymologies, usage labels and source tags ([1913 Webster], [Obs.]),
    author citations (--Shak.) and {cross-reference} braces dropped, lines unwrapped; the first line becomes
    "Headword, part of speech. Definition ..."
    """
    text = re.sub(r"\[([^\[\]\s]{1,5})\]", _gcide_code, text)
    text = re.sub(r"\\[^\\\n]{0,100}\\", "", text)
    for _ in range(3):  # nested brackets, innermost first
        text = re.sub(r"\[[^\[\]]{0,1500}\]", "", text)
    text = re.sub(r"[ \t]*--[A-Z][^\n]{0,80}$", "", text, flags=re.M)
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)
    paragraphs = []
    for p in blocks(text):
        p = re.sub(r"\s+([,.;:])", r"\1", p).strip(" ,;")
        if len(p) > 1 and any(c.isalpha() for c in p):
            paragraphs.append(p)
    return "\n\n".join(paragraphs)


def dict_entry(text):
    """
    A FOLDOC / Jargon File / Devil's Dictionary entry as plain text: {cross-reference} braces dropped, FOLDOC
    <topic> tags as (topic), trailing (YYYY-MM-DD) edit dates dropped, paragraphs unwrapped.
    """
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"<([a-z][\w ,.-]{0,40})>", r"(\1)", text)
    text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text.rstrip())
    return "\n\n".join(blocks(text))

# -----------------------------------------------------------------------------
# books (Jane Austen, as the R package janeaustenr ships them: one line of text per element)

_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([0-9IVXLC]+)\.?\s*$")


def book_chapters(text, author="Jane Austen"):
    """
    A Gutenberg-style novel (title first, "Chapter N" / "CHAPTER N" headings, hard-wrapped paragraphs) as one
    document per chapter: "Title, by Author. Chapter N." then the unwrapped paragraphs (_emphasis_ marks dropped).
    Volume headings and the front matter before the first chapter are dropped.
    """
    lines = text.splitlines()
    title = next((l.strip() for l in lines if l.strip()), "")
    title = " ".join(w if w.lower() not in ("and", "of", "the") or i == 0 else w.lower()
                     for i, w in enumerate(title.title().split()))
    chapters, cur, number = [], None, None
    for line in lines + ["CHAPTER 0"]:  # a sentinel closes the last chapter
        m = _CHAPTER.match(line)
        if m:
            if cur is not None:
                paras = [re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", p) for p in blocks("\n".join(cur))
                         if not re.match(r"^(VOLUME|Volume)\s+[IVX0-9]+\.?$", p)]
                if paras:
                    chapters.append(f"{title}, by {author}. Chapter {number}.\n\n" + "\n\n".join(paras))
            cur, number = [], m.group(2)
        elif cur is not None:
            cur.append(line)
    return chapters

# -----------------------------------------------------------------------------
# the sources: each extractor reads one package's files under root ("/" on the dev machine) and returns documents

def _read(path):
    with (gzip.open(path, "rb") if path.endswith((".gz", ".dz")) else open(path, "rb")) as f:
        return f.read()


def _newest(pattern):
    """The path matching a glob whose version numbers sort highest (linux-doc-6.12 > linux-doc-6.1), or None."""
    paths = glob.glob(pattern)
    key = lambda p: [int(x) for x in re.findall(r"\d+", os.path.basename(os.path.dirname(p)) + os.path.basename(p))]
    return max(paths, key=key) if paths else None


def extract_wordnet(root):
    docs = []
    for pos, letter in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        path = os.path.join(root, "usr/share/wordnet", f"data.{pos}")
        by_lexfile = {}  # one lexicographer file (noun.person, noun.location, ...) per group of documents
        for lexfile, line in wordnet_lines(wordnet_synsets(_read(path).decode("utf-8", "replace")), letter):
            by_lexfile.setdefault(lexfile, []).append(line)
        for lexfile in sorted(by_lexfile):
            docs += pack(by_lexfile[lexfile], sep="\n")
    return docs


def _extract_dictd(root, name, clean, pack_chars=3000):
    base = os.path.join(root, "usr/share/dictd", name)
    entries = dictd_entries(_read(base + ".index").decode("utf-8", "replace"), _read(base + ".dict.dz"))
    return pack([e for e in (clean(t) for t in entries) if e], max_chars=pack_chars)


def extract_gcide(root):
    return _extract_dictd(root, "gcide", gcide_entry)


def extract_foldoc(root):
    return _extract_dictd(root, "foldoc", dict_entry)


def extract_jargon(root):
    return _extract_dictd(root, "jargon", dict_entry)


def extract_devil(root):
    return _extract_dictd(root, "devil", dict_entry)


AUSTEN_BOOKS = ["prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion"]


def extract_austen(root):
    # the novels are R objects in the package's lazy-load database: R itself (r-base-core, a dependency of the
    # package) prints them, one element per line
    lib = os.path.join(root, "usr/lib/R/site-library")
    docs = []
    for book in AUSTEN_BOOKS:
        script = f'.libPaths("{lib}"); writeLines(janeaustenr::{book}, useBytes = TRUE)'
        r = subprocess.run(["Rscript", "--vanilla", "-e", script], capture_output=True)
        if r.returncode != 0:
            raise ValueError(f"Rscript could not print janeaustenr::{book}: {r.stderr.decode(errors='replace')[-300:]}")
        docs += book_chapters(r.stdout.decode("utf-8", "replace"))
    return docs


def _extract_html(paths, drop_link=None):
    docs = []
    for path in sorted(p for p in paths if os.path.isfile(p)):
        text = html_to_text(_read(path).decode("utf-8", "replace"), drop_link=drop_link)
        if text:
            docs.append(text)
    return docs


def extract_debian_handbook(root):
    return _extract_html(glob.glob(os.path.join(root, "usr/share/doc/debian-handbook/html/en-US/*.html")))


def extract_debian_reference(root):
    return _extract_html(glob.glob(os.path.join(root, "usr/share/debian-reference/*.en.html")))


def extract_debian_faq(root):
    return _extract_html(glob.glob(os.path.join(root, "usr/share/doc/debian/FAQ/*.en.html")))


# the kernel's Documentation/ minus translations, devicetree bindings (YAML/tables), ABI (sysfs attribute
# stanzas), the feature matrix and the Sphinx build files
_LINUX_SKIP_DIRS = {"translations", "devicetree", "ABI", "features", "sphinx", "sphinx-static", "output"}


def extract_linux_doc(root):
    top = _newest(os.path.join(root, "usr/share/doc/linux-doc-*/Documentation"))
    if top is None:
        raise FileNotFoundError(f"no usr/share/doc/linux-doc-*/Documentation under {root} "
                                "(apt-get install linux-doc-X.Y)")
    docs = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _LINUX_SKIP_DIRS)
        for name in sorted(filenames):
            if not re.search(r"\.(rst|txt)(\.gz)?$", name):
                continue
            text = rst_to_text(_read(os.path.join(dirpath, name)).decode("utf-8", "replace"))
            if text:
                docs.append(text)
    return docs


# pages of python3.X-doc: library pages only of TRAIN modules (tasks/stdlib_docs.py: the others' docs are eval
# and RAG questions), plus the tutorial, language reference, HOWTOs, FAQ and glossary with every paragraph that
# links to a held-out module's page dropped; library/functions, stdtypes, exceptions, constants document builtins
_PYDOC_BUILTIN_PAGES = {"functions", "stdtypes", "exceptions", "constants"}
_PYDOC_DIRS = ("tutorial", "reference", "howto", "faq")


def python_doc_link_held_out(href):
    """True if href points into the library page of a non-train stdlib module (or a builtins page)."""
    m = re.search(r"(?:^|/)library/([\w.]+)\.html", href)
    if not m:
        return False
    name = m.group(1)
    return name in _PYDOC_BUILTIN_PAGES or module_split(name) != "train"


def python_doc_page_ok(relpath, html):
    """Whether a python docs page may enter the corpus at all (see above), relpath like "library/json.html"."""
    parts = relpath.split("/")
    if parts[0] == "library":
        modules = re.findall(r'id="module-([\w.]+)"', html)
        return bool(modules) and all(module_split(m) == "train" for m in modules)
    return parts[0] in _PYDOC_DIRS or relpath == "glossary.html"


def extract_python_doc(root):
    top = _newest(os.path.join(root, "usr/share/doc/python3.*/html"))
    if top is None:
        raise FileNotFoundError(f"no usr/share/doc/python3.*/html under {root} (apt-get install python3-doc)")
    docs = []
    for path in sorted(glob.glob(os.path.join(top, "**/*.html"), recursive=True)):
        rel = os.path.relpath(path, top)
        html = _read(path).decode("utf-8", "replace")
        if python_doc_page_ok(rel, html):
            text = html_to_text(html, drop_link=python_doc_link_held_out)
            if text:
                docs.append(text)
    return docs


def extract_postgresql_doc(root):
    top = _newest(os.path.join(root, "usr/share/doc/postgresql-doc-*/html"))
    if top is None:
        raise FileNotFoundError(f"no usr/share/doc/postgresql-doc-*/html under {root}")
    # release notes are change lists, the index is a list of links
    paths = [p for p in glob.glob(os.path.join(top, "*.html"))
             if not re.match(r"(release|bookindex|biblio)", os.path.basename(p))]
    return _extract_html(paths)


def extract_debian_policy(root):
    return _extract_html(glob.glob(os.path.join(root, "usr/share/doc/debian-policy/**/*.html"), recursive=True))


def extract_developers_reference(root):
    paths = glob.glob(os.path.join(root, "usr/share/developers-reference/*.html"))
    return _extract_html([p for p in paths if os.path.basename(p) not in ("search.html", "developers-reference.html")])


def extract_maint_guide(root):
    return _extract_html(glob.glob(os.path.join(root, "usr/share/doc/maint-guide/html/*.en.html")))


# fortune files of quotations and anecdotes; left out: ASCII art, Debian/Linux/Perl/IRC in-jokes, ethnic and
# drug jokes, the Zippy and "translate-me" files
FORTUNE_FILES = ["art", "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel",
                 "humorists", "kids", "law", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
                 "news", "paradoxum", "people", "pets", "platitudes", "politics", "pratchett", "science",
                 "songs-poems", "sports", "startrek", "wisdom", "work"]


def fortune_entries(text):
    """The entries of a fortune(6) file ("%" lines between them), each unwrapped per paragraph, prose only."""
    out = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        paras = [p for p in blocks(entry) if is_prose(p)]
        if paras:
            out.append("\n".join(paras))
    return out


def extract_fortunes(root):
    entries = []
    for name in FORTUNE_FILES:
        path = os.path.join(root, "usr/share/games/fortunes", name)
        if os.path.isfile(path):
            entries += fortune_entries(_read(path).decode("utf-8", "replace"))
    return pack(entries)


def _package_files(package, pattern, root):
    """The regular files (no links, no ".so" redirect stubs) dpkg lists for a package that match a regex, sorted."""
    out = subprocess.run(["dpkg-query", "-L", package], check=True, capture_output=True, text=True).stdout
    paths = []
    for p in sorted(out.splitlines()):
        p = os.path.join(root, p.lstrip("/"))
        if re.search(pattern, p) and os.path.isfile(p) and not os.path.islink(p) and not _read(p).startswith(b".so "):
            paths.append(p)
    return paths


def _man_document(path):
    env = dict(os.environ, MANWIDTH="1000", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    r = subprocess.run(["man", "--nh", "--nj", "-l", path], capture_output=True, env=env)
    text = man_to_text(r.stdout.decode("utf-8", "replace")) if r.returncode == 0 else ""
    name = os.path.basename(path).removesuffix(".gz")
    return f"Manual page {name.rsplit('.', 1)[0]}({name.rsplit('.', 1)[-1]})\n\n{text}" if len(text) >= 200 else ""


def _extract_man(root, package, sections):
    paths = _package_files(package, rf"/man/man[{sections}]/[^/]+\.gz$", root)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each page is a man(1) process
        return [d for d in pool.map(_man_document, paths) if d]


def extract_manpages(root):
    return _extract_man(root, "manpages", "1-9")


def extract_manpages_dev(root):
    return _extract_man(root, "manpages-dev", "23")


# name -> Debian package, licence, notice (kept with the data), extractor; the order is the priority order for
# dedupe and --max-chars: definitions and narrative (closest to encyclopedia English) first, technical docs last
SOURCES = {
    "wordnet": ("wordnet-base", "WordNet 3.0 licence (permissive)",
                "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE "
                "IS PROVIDED \"AS IS\" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR "
                "IMPLIED.", extract_wordnet),
    "gcide": ("dict-gcide", "GPL-2+", "GCIDE, the Collaborative International Dictionary of English (Webster's "
              "Revised Unabridged 1913 + WordNet + additions), GNU GPL version 2 or later.", extract_gcide),
    "foldoc": ("dict-foldoc", "GFDL-1.1+", "The Free On-line Dictionary of Computing, Copyright 1993 by Denis "
               "Howe, GNU Free Documentation License 1.1 or later, no invariant sections.", extract_foldoc),
    "jargon": ("dict-jargon", "public domain", "The Jargon File 4.4.7 (public domain).", extract_jargon),
    "devil": ("dict-devil", "public domain", "Ambrose Bierce, The Devil's Dictionary (1911, public domain).",
              extract_devil),
    "austen": ("r-cran-janeaustenr", "public domain (novels); MIT (R package)",
               "Jane Austen's six novels from Project Gutenberg, via the janeaustenr R package.", extract_austen),
    "fortunes": ("fortunes", "BSD (fortune-mod); quotations from many authors",
                 "Data files of fortune-mod (BSD fortune), quotations selected by file (FORTUNE_FILES).",
                 extract_fortunes),
    "debian-handbook": ("debian-handbook", "GPL-2+ or CC-BY-SA-3.0",
                        "The Debian Administrator's Handbook, Raphael Hertzog and Roland Mas.",
                        extract_debian_handbook),
    "debian-reference": ("debian-reference-en", "GPL-2+", "Debian Reference, Osamu Aoki.", extract_debian_reference),
    "debian-faq": ("debian-faq", "permissive (copy, modify and distribute with the notice)",
                   "The Debian GNU/Linux FAQ, Copyright 1996-2003 Software in the Public Interest.",
                   extract_debian_faq),
    "linux-doc": ("linux-doc-*", "GPL-2", "The Linux kernel documentation (Documentation/*.rst).", extract_linux_doc),
    "python-doc": ("python3.*-doc", "PSF-2.0", "The Python documentation, Copyright Python Software Foundation.",
                   extract_python_doc),
    "postgresql-doc": ("postgresql-doc-*", "PostgreSQL licence (permissive)",
                       "PostgreSQL documentation, Copyright The PostgreSQL Global Development Group.",
                       extract_postgresql_doc),
    "debian-policy": ("debian-policy", "GPL-2+", "The Debian Policy Manual and its sub-policies.",
                      extract_debian_policy),
    "developers-reference": ("developers-reference", "GPL-2", "The Debian Developer's Reference.",
                             extract_developers_reference),
    "maint-guide": ("maint-guide", "GPL-2+ or MIT", "The Debian New Maintainers' Guide, Josip Rodin, Osamu Aoki.",
                    extract_maint_guide),
    "manpages": ("manpages", "various free (Linux-man-pages-copyleft, GPL-2+, BSD, Expat)",
                 "The Linux man-pages project.", extract_manpages),
    "manpages-dev": ("manpages-dev", "various free (Linux-man-pages-copyleft, GPL-2+, BSD, Expat)",
                     "The Linux man-pages project, sections 2 and 3.", extract_manpages_dev),
}


def _package_version(package):
    """The installed version of a Debian package (a glob like linux-doc-* matches the newest), or None."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version} ${Status}\\n", package],
                             capture_output=True, text=True).stdout
    except OSError:
        return None
    rows = [l.split(" ", 2) for l in out.splitlines() if l.endswith("installed") and "not-installed" not in l]
    if not rows:
        return None
    name, version, _ = max(rows, key=lambda r: [int(x) for x in re.findall(r"\d+", r[0])])
    return f"{name} {version}"


def build_prose(output, sources=None, root="/", max_chars=None, compression_level=19, progress=True):
    """
    Extract every source (names from SOURCES, in priority order), dedupe, cap the total at max_chars (in priority
    order), write output (parquet: text, source; zstd) atomically with the manifest in its schema metadata and
    beside it as <output>.json. Returns the manifest.
    """
    names = list(SOURCES) if sources is None else list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown prose source(s) {unknown}; known: {', '.join(SOURCES)}")
    names = [n for n in SOURCES if n in names]  # priority order whatever order they were given in
    raw, seconds = {}, {}
    for name in names:
        t0 = time.time()
        raw[name] = SOURCES[name][3](root)
        seconds[name] = round(time.time() - t0, 1)
        if progress:
            print0(f"{name}: {len(raw[name]):,} documents, {sum(map(len, raw[name])):,} chars ({seconds[name]} s)")
    docs = dedupe(raw)
    texts, srcs, total, per_source = [], [], 0, {}
    for name in names:
        kept = []
        for d in docs[name]:
            if max_chars is not None and total + len(d) > max_chars:
                break
            kept.append(d)
            total += len(d)
        texts += kept
        srcs += [name] * len(kept)
        package, licence, notice, _ = SOURCES[name]
        chars = sum(map(len, kept))
        per_source[name] = {
            "package": _package_version(package) or package, "licence": licence, "notice": notice,
            "documents": len(kept), "chars": chars, "chars_before_dedupe": sum(map(len, raw[name])),
            "mean_chars_per_document": round(chars / max(len(kept), 1)),
            "ascii_letter_space_share": round(letter_share("".join(kept)), 4), "extract_seconds": seconds[name]}
    if not texts:
        raise ValueError("no prose documents extracted")
    manifest = {
        "what": "English prose from Debian packages for the offline pretraining corpus (tasks/prose.py)",
        "documents": len(texts), "chars": total, "max_chars": max_chars,
        "ascii_letter_space_share": round(letter_share("".join(texts)), 4),
        "sources": per_source,
    }
    table = pa.table({"text": texts, "source": srcs})
    table = table.replace_schema_metadata({b"prose_manifest": json.dumps(manifest).encode("utf-8")})
    # large pages let zstd see more context (4.0x on English at level 19 with 8 MB pages vs 3.8x with 1 MB)
    with atomic_path(output) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=compression_level,
                       use_dictionary=["source"], data_page_size=8 << 20, row_group_size=20000)
    manifest["bytes"] = os.path.getsize(output)
    atomic_write_json(os.fspath(output) + ".json", manifest)
    if progress:
        print0(f"prose: {len(texts):,} documents, {total:,} chars -> {output} ({manifest['bytes'] / 1e6:.1f} MB)")
    return manifest


def read_prose(path):
    """(texts, manifest) of a prose parquet file written by build_prose (manifest {} if the file has none)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prose file not found: {path} (build it with: bash dev/build_prose.sh)")
    try:
        schema = pq.read_schema(path)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a parquet file ({e})") from None
    if "text" not in schema.names:
        raise ValueError(f"{path}: no 'text' column (columns: {schema.names})")
    meta = (schema.metadata or {}).get(b"prose_manifest")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in texts if t], (json.loads(meta) if meta else {})

# -----------------------------------------------------------------------------
# CLI

def main():
    parser = ArgumentParser(description="Extract English prose from installed Debian packages into one zstd parquet "
                            "file for the offline pretraining corpus (bash dev/build_prose.sh installs them).")
    parser.add_argument("--output", type=str, required=True, help="the parquet file to write (+ <output>.json)")
    parser.add_argument("--sources", type=str, default=None,
                        help="comma-separated sources (None: all, in priority order): " + ", ".join(SOURCES))
    parser.add_argument("--root", type=str, default="/", help="where the packages' files are installed")
    parser.add_argument("--max-chars", type=float, default=None, help="cap on the total (sources in priority order)")
    parser.add_argument("--compression-level", type=int, default=19, help="zstd level")
    args = parser.parse_args()
    sources = None if args.sources is None else [s.strip() for s in args.sources.split(",") if s.strip()]
    build_prose(args.output, sources, args.root,
                int(args.max_chars) if args.max_chars else None, args.compression_level)


if __name__ == "__main__":
    run_main(main)
