"""
Harvest the documentation of the Python standard library: the built-in, offline text every Python install has.
It feeds the built-in pretraining corpus (tasks/builtin_corpus.py) and the built-in KB / QA / SFT data
(tasks/stdlib_qa.py), so the whole pipeline runs on a machine with no internet.

    from tasks.stdlib_docs import harvest, module_split, is_eval_module, record_split
    records = harvest()                    # ~6.6k records in a few seconds; a list of dicts sorted by id
    records = harvest(modules=["json"])    # just one package (and its public submodules)
    python -m tasks.stdlib_docs         # print the counts and a few records (nothing is written)
    first_sentence(doc), first_paragraph(doc), prose(doc)   # reading a docstring (shared by corpus and QA)
    doc_sentences(doc), sentences(text)                      # every prose sentence (QA answers, baselines)
    signature_params("fill(text, width=70)")                # [("text", None), ("width", "70")]

A record is
    {"id": "textwrap.dedent", "module": "textwrap", "name": "dedent", "kind": "function",
     "signature": "dedent(text)", "doc": "Remove any common leading whitespace from every line in `text`. ..."}
kind is "module" (the module docstring), "function", "class" (the class docstring with its own __init__
docstring folded in), "method" (name "Class.method", signature without self) or "topic" (the language-reference
topics of pydoc_data.topics, the text behind help("for"); id "topic:for", module "").

What is walked: sys.stdlib_module_names minus private modules (_x), test packages, applications and toys (idlelib,
turtledemo, lib2to3, antigravity, this), platform implementation modules that are documented as part of another
(posix/nt are `os`, posixpath/ntpath/genericpath are `os.path`), distutils (setuptools replaces it on import,
so its docs would depend on what is installed), and anything that fails to import here (Windows-only modules).
Packages contribute their public submodules up to MAX_DEPTH dotted components (email.mime.text). The imports run
in a fresh `python -I -S` subprocess (so the caller's process is untouched and the result does not depend on what
it imported or on site-packages), each with stdout/stderr sent to /dev/null, warnings silenced and a timeout, so
nothing prints, pops up or hangs. tkinter and turtle are imported but nothing is ever instantiated.
An object belongs to the module whose name its __module__ carries; objects of private accelerator modules
(heapq.heappush lives in _heapq, os.getcwd in posix) belong to the public module that exports them.

The split (the point of the whole exercise) is by WHOLE top-level package, h = int(sha1(name).hexdigest(), 16):
    h % 5 == 0       "eval":  held out for evaluation (on 3.11: base64, contextlib, difflib, glob, html, http,
                              inspect, itertools, pathlib, urllib, xml, ...), ~20% of top-level modules
    h % 5 in (1, 2)  "rag":   the RAG fine-tuning questions (asyncio, collections, email, re, sys, ...), ~40%
    otherwise        "train": pretraining corpus and closed-book SFT chat (json, os, textwrap, ...), ~40%
Submodules follow their package (urllib.parse is eval because urllib is) and the rule is stable across machines
and Python versions; topics are always "train". Neither the pretraining corpus nor the SFT chat contains a record
of an eval or rag module, and the KB contains them all, so an answer about one can only come from a retrieved
document. The "rag" side makes the RAG training questions need their documents as much as the eval ones do:
when they were about pretraining modules, an H200 run's RAG train loss fell to 0.05 while the held-out val loss
stayed at 0.62, i.e. the model could answer them from memory. Measured since (benchmarks/RESULTS.md): the d8
GPU model reaches +34 EM with this split, while the 1.4M-parameter CPU model copies less than before.

Output is deterministic given the Python version: records sorted by id, records with empty docs dropped, exact
duplicate docs kept once (first by id), and signature defaults shown as literals or names only (a repr could hold
memory addresses, sys.executable, or the whole environment: cgi.parse(environ=os.environ)). Nothing is cached.
"""

import io
import os
import re
import sys
import json
import enum
import time
import signal
import inspect
import hashlib
import threading
import pkgutil
import warnings
import importlib
import tempfile
import contextlib
import subprocess
from collections import Counter

# -----------------------------------------------------------------------------
# what to walk

MAX_DEPTH = 3  # dotted components: email.mime.text is walked, deeper modules are not
IMPORT_TIMEOUT_S = 10.0

# never imported: side effects on import (this prints, antigravity opens a browser, idlelib.idle starts IDLE,
# lib2to3 writes grammar pickles next to itself), toys/test extensions (xx*), or docs that depend on the
# environment (setuptools swaps in its own distutils)
SKIP_TOP = {"antigravity", "this", "idlelib", "turtledemo", "lib2to3", "distutils", "test",
            "xxsubtype", "xxlimited", "xxlimited_35", "pydoc_data"}
# implementation modules documented as part of a public one: their objects are claimed by that module
IMPL_HOME = {"posix": "os", "nt": "os", "posixpath": "os.path", "ntpath": "os.path", "genericpath": "os.path"}
IMPL_MODULES = set(IMPL_HOME)
# submodule name components that are never walked (tests, entry points, codec tables)
SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
SKIP_SUBMODULES_OF = {"encodings"}  # ~120 generated codec tables: noise, one package doc is enough

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def module_split(name):
    """'eval', 'rag' or 'train' for module `name` (e.g. "urllib.parse"), from sha1 of its top-level name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"module_split: expected a module name, got {name!r}")
    h = int(hashlib.sha1(name.split(".")[0].encode("utf-8")).hexdigest(), 16) % 5
    return "eval" if h == 0 else "rag" if h in (1, 2) else "train"


def is_eval_module(name):
    """True if module `name` is held out for evaluation: sha1(top-level name) % 5 == 0."""
    return module_split(name) == "eval"


def record_split(record):
    """'train', 'rag' or 'eval' for a harvested record: topics are always train, the rest follow their module."""
    if record["kind"] == "topic":
        return "train"
    return module_split(record["module"])


def top_level_modules():
    """The public top-level stdlib modules we walk, sorted."""
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_TOP or name in IMPL_MODULES:
            continue
        names.append(name)
    return names

# -----------------------------------------------------------------------------
# quiet, bounded imports


@contextlib.contextmanager
def _silenced():
    """Send stdout/stderr (Python-level and fd-level: C extensions write to fd 1/2 directly) to /dev/null."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:  # no real fds (e.g. some notebook kernels): Python-level redirection still applies
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


class _ImportTimeout(Exception):
    pass


def _quiet_import(name):
    """Import a module silently with a timeout; returns (module, None) or (None, "reason")."""
    use_alarm = hasattr(signal, "setitimer") and _in_main_thread()
    if use_alarm:
        def on_alarm(signum, frame):
            raise _ImportTimeout(f"import took longer than {IMPORT_TIMEOUT_S}s")
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, IMPORT_TIMEOUT_S)
    try:
        with _silenced():
            module = importlib.import_module(name)
        return module, None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a SystemExit from a module's top level is a failure too, not our exit
        return None, f"{type(e).__name__}: {e}"[:200]
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _submodule_names(package):
    """Public submodules of a package (listed from its __path__ without importing them), sorted."""
    path = getattr(package, "__path__", None)
    if not path or package.__name__ in SKIP_SUBMODULES_OF or package.__name__.count(".") + 1 >= MAX_DEPTH:
        return []
    names = []
    for info in pkgutil.iter_modules(path):
        if info.name.startswith("_") or info.name in SKIP_PARTS:
            continue
        names.append(package.__name__ + "." + info.name)
    return sorted(names)

# -----------------------------------------------------------------------------
# records


def _clean_doc(doc):
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    lines = [line.rstrip() for line in doc.splitlines()]
    return "\n".join(lines).strip()


def _own_doc(obj):
    """The object's own docstring (not one inherited from a base class, which inspect.getdoc would return)."""
    if isinstance(obj, type):
        return _clean_doc(obj.__dict__.get("__doc__"))
    return _clean_doc(getattr(obj, "__doc__", None))


def _signature(obj, name, drop_first=False):
    """"name(params)" from inspect.signature, "" when it has none; drop_first drops self/cls of a method."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return ""
    params = list(sig.parameters.values())
    if drop_first and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    params = [p if p.default is p.empty else p.replace(default=_Shown(_default_text(p.default))) for p in params]
    try:
        sig = sig.replace(parameters=params)
    except ValueError:
        return ""
    return _ADDRESS.sub("", f"{name}{sig}")


class _Shown:
    """Stands in for a default value in a signature; its repr is the text we chose to show."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _machine_strings():
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.executable, os.path.expanduser("~"), os.getcwd()}
    return [p for p in paths if p and len(p) > 1]


def _default_text(value, depth=0):
    """
    How a default value is shown. Plain literals keep their repr; anything else is named, not repr'd: a repr can
    hold the machine's state (cgi.parse(environ=os.environ) would print the whole environment, platform defaults
    hold sys.executable's path, sentinels print memory addresses), which would make the docs differ per machine.
    """
    if isinstance(value, enum.Enum):  # before int: an IntEnum is an int whose repr is "<AddressFamily.AF_X: 0>"
        return f"{type(value).__name__}.{value.name}"
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, complex)):
        return repr(value)
    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value.decode("latin-1")
        if len(value) > 40 or any(p in text for p in _machine_strings()):
            return "..."
        return repr(value)
    if isinstance(value, (tuple, list, frozenset, set)) and depth < 2 and len(value) <= 8:
        if isinstance(value, (frozenset, set)):
            items = sorted((_default_text(v, depth + 1) for v in value))
            return ("frozenset({%s})" if isinstance(value, frozenset) else "{%s}") % ", ".join(items) if items \
                else f"{type(value).__name__}()"
        items = [_default_text(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, type) or inspect.isroutine(value):
        return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__name__
    return f"<{type(value).__name__} object>"


def _doc_signature(doc, name):
    """Old-style C docstrings start with their signature: "gethostbyname(host) -> address". Use it when
    inspect.signature has none (the text is the documentation's own, so it is deterministic)."""
    first = doc.split("\n", 1)[0].strip()
    if not first.startswith(name + "(") or len(first) > 160:
        return ""
    sig = first.split(" -> ")[0].strip()
    return sig if sig.endswith(")") else ""


def _owned(obj, name, module, real_name, exported):
    """Does `module` (public name) own `obj`? Defined there, or re-exported from a private/impl module."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    if owner == real_name:
        return True
    private = any(part.startswith("_") for part in owner.split(".")) or owner in IMPL_MODULES
    return private and (exported is None or name in exported)


def _class_records(cls, module, qualname):
    """The class record (own doc + own __init__ doc) and its methods (defined on the class itself)."""
    doc = _own_doc(cls)
    init = cls.__dict__.get("__init__")
    init_doc = _clean_doc(getattr(init, "__doc__", None)) if init is not None else ""
    # slot wrappers of C types carry a generic "Initialize self.  See help(type(self))..." text: not documentation
    if init_doc and not init_doc.startswith("Initialize self.") and init_doc != doc:
        doc = (doc + "\n\n" + init_doc).strip()
    records = [{"id": f"{module}.{qualname}", "module": module, "name": qualname, "kind": "class",
                "signature": _signature(cls, qualname) or _doc_signature(doc, qualname), "doc": doc}]
    for attr in sorted(cls.__dict__):
        if attr.startswith("_"):
            continue
        raw = cls.__dict__[attr]
        is_static = isinstance(raw, staticmethod)
        func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if not (inspect.isroutine(func) or inspect.ismethoddescriptor(func)):
            continue
        mdoc = _clean_doc(getattr(func, "__doc__", None))
        msig = _signature(func, attr, drop_first=not is_static) or _doc_signature(mdoc, attr)
        records.append({"id": f"{module}.{qualname}.{attr}", "module": module, "name": f"{qualname}.{attr}",
                        "kind": "method", "signature": msig, "doc": mdoc})
    return records


def module_records(mod, public_name):
    """(records, objects) for one imported module: its docstring, functions, classes and their methods.
    objects[i] is (the Python object behind records[i], "" or the method name) or None for the module record;
    it identifies re-exports of one object under several modules."""
    real_name = mod.__name__
    exported = getattr(mod, "__all__", None)
    exported = set(exported) if isinstance(exported, (list, tuple)) else None
    records = [{"id": public_name, "module": public_name, "name": public_name, "kind": "module",
                "signature": "", "doc": _clean_doc(mod.__doc__)}]
    objects = [None]
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if inspect.isclass(obj):
            if _owned(obj, name, public_name, real_name, exported):
                recs = _class_records(obj, public_name, name)
                records.extend(recs)
                objects.extend([(obj, "")] + [(obj, r["name"]) for r in recs[1:]])
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if _owned(obj, name, public_name, real_name, exported):
                doc = _clean_doc(obj.__doc__)
                records.append({"id": f"{public_name}.{name}", "module": public_name, "name": name,
                                "kind": "function", "signature": _signature(obj, name) or _doc_signature(doc, name),
                                "doc": doc})
                objects.append((obj, ""))
    return records, objects


def topic_records():
    """The language reference topics behind help("for"), help("with"), ...: kind 'topic', always train."""
    mod, err = _quiet_import("pydoc_data.topics")
    if mod is None:
        return []
    return [{"id": f"topic:{key}", "module": "", "name": key, "kind": "topic", "signature": "",
             "doc": _clean_doc(text)} for key, text in sorted(mod.topics.items())]

# -----------------------------------------------------------------------------
# reading docstrings (the corpus' recap lines and the built-in QA both take a docstring's first sentence)


def squash(text):
    return " ".join(text.split())


SIG_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$")
UNDERLINE = re.compile(r"^[=\-~*^#+]{3,}$")
_ABBREV = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "no.")


def paragraphs(doc):
    """Blank-line separated paragraphs (lists of lines, original indentation kept)."""
    out, cur = [], []
    for line in doc.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def prose(doc, max_chars=700):
    """The leading prose of a long text (a language-reference topic): its prose paragraphs in order, up to
    max_chars, skipping headings, indented grammar/code blocks, signature lines, and the sentences that lead into a
    block ("... is equivalent to"), except the first one, whose colon becomes a full stop."""
    pars, out = paragraphs(doc), []
    for k, par in enumerate(pars):
        if len(par) >= 2 and UNDERLINE.match(par[1].strip()) or UNDERLINE.match(par[0].strip()):
            continue
        if par[0].startswith((" ", "\t")) or par[0].lstrip().startswith((">>>", "-", "*")):
            continue
        if re.match(r"[\w.]+\(", par[0].strip()):  # a signature header: "object.__add__(self, other)"
            continue
        text = squash(" ".join(par))
        if text.lower().startswith(("new in version", "changed in version", "see also")):
            continue
        leads_into_block = text.endswith(":") or (k + 1 < len(pars) and pars[k + 1][0].startswith((" ", "\t")))
        if leads_into_block:
            if out or not text.endswith(":"):
                continue
            text = text[:-1] + "."
        if out and len("\n\n".join(out)) + 2 + len(text) > max_chars:
            break
        text = text if len(text) <= max_chars else first_paragraph(text, max_chars)
        if text:
            out.append(text)
    return "\n\n".join(out)


def first_paragraph(doc, max_chars=600):
    """The first prose paragraph, whitespace-squashed: leading signature lines ("len(obj) -> int"), headings
    ("ast\\n~~~"), indented blocks (grammar, code) and version notes are skipped; long ones are cut at a sentence
    end within max_chars (or "" if there is none)."""
    for par in paragraphs(doc):
        lines = list(par)
        while lines and (SIG_LINE.match(lines[0].strip()) or UNDERLINE.match(lines[0].strip())):
            lines.pop(0)
        if len(lines) >= 2 and UNDERLINE.match(lines[1].strip()):  # a heading
            continue
        if not lines or lines[0].startswith((" ", "\t")) or lines[0].lstrip().startswith((">>>", "..", "-", "*")):
            continue
        text = squash(" ".join(lines))
        if text.lower().startswith(("new in version", "changed in version", "deprecated since")):
            continue
        if len(text) <= max_chars:
            return text
        cut = ""
        for sentence_end in _sentence_ends(text):
            if sentence_end > max_chars:
                break
            cut = text[:sentence_end]
        return cut
    return ""


def _sentence_ends(text):
    """Offsets just past each sentence end: [.!?] followed by whitespace and an uppercase/quote/paren/digit, or the
    end of the text, not after an abbreviation like e.g."""
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        end = m.end()
        word = text[:end].split()[-1].lower().lstrip("(`'\"")
        if word in _ABBREV:
            continue
        rest = text[end:].lstrip()
        if rest and not (rest[0].isupper() or rest[0] in "`'\"(*0123456789"):
            continue
        yield end
    yield len(text)


def first_sentence(doc):
    par = first_paragraph(doc, max_chars=10 ** 9)
    return par[:next(_sentence_ends(par))] if par else ""


def sentences(text):
    """The sentences of a one-line (squashed) text, by the rule of _sentence_ends: stripped, empty ones dropped."""
    out, start = [], 0
    for end in _sentence_ends(text):
        if end > start and text[start:end].strip():
            out.append(text[start:end].strip())
        start = end
    return out


def signature_params(sig):
    """[(name, default or None)] of a signature line "fill(text, width=70, *, sep: str = ' ', **kwargs)": the
    parameters split at top-level commas, "*"/"/" markers dropped, stars kept on *args/**kwargs, annotations
    dropped; default is the text after "=" as written. [] if there are no parentheses."""
    if "(" not in sig or ")" not in sig:
        return []
    inner = sig[sig.index("(") + 1:sig.rindex(")")]
    parts, depth, quote, cur = [], 0, "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        m = re.match(r"\s*(\*{0,2}[A-Za-z_]\w*)\s*(?::[^=]*)?(?:=\s*(.*?))?\s*$", part, re.S)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def doc_sentences(doc):
    """
    Every prose sentence of a docstring in order, whitespace-squashed (each one a verbatim span of the docstring up
    to whitespace): paragraph by paragraph, a paragraph cut at its first doctest line (">>>"), headings and indented
    blocks (code, grammar) skipped. Signature lines count as sentences here (first_paragraph skips them).
    """
    out = []
    for par in paragraphs(doc):
        lines = []
        for line in par:
            if line.lstrip().startswith(">>>"):
                break
            lines.append(line)
        if not lines or lines[0].startswith((" ", "\t")) or any(UNDERLINE.match(x.strip()) for x in lines):
            continue
        out.extend(sentences(squash(" ".join(lines))))
    return out


# -----------------------------------------------------------------------------
# spans of a docstring that answer a question (the built-in QA asks about them, tasks/baselines.py reads them back)

EXCEPTION = (r"(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*(?:Error|Exception|Warning)|StopIteration|KeyboardInterrupt|"
             r"SystemExit|GeneratorExit)")
_RAISES = [re.compile(rf"\b(?:[Rr]aises?|[Rr]aising|[Tt]hrows?)\s+(?:an?\s+|the\s+)?[`'*]?({EXCEPTION})\b[`'*]?"),
           re.compile(rf"[`'*]?\b({EXCEPTION})[`'*]?\s+(?:exception\s+)?(?:is|will be|may be|can be|might be|gets|"
                      rf"is also)\s+(?:then\s+)?raised\b")]
_CONDITION = re.compile(r"^(If|When|Unless) ([^,;:]{4,120}), (?:then )?(.{6,220}?)\.?$")
_AFTER_CONDITION = re.compile(r"\b(if|when|unless)\s+(.{4,160}?)\.?$")
_RETURNS = re.compile(r"^(?:Returns?|Create and return|Creates and returns)\s+(.+?)\.?$")
_PARAM_LINE = re.compile(r"^\s*(?::param\s+(?:[\w\[\], .]+\s+)?|[*`']{0,2})([A-Za-z_]\w*)[*`']{0,2}\s*(?:--|:)\s+"
                         r"(\S.*)$")
_PARAM_SENTENCE = re.compile(r"^(?:The (?:optional )?)?[*`']{0,2}([A-Za-z_]\w*)[*`']{0,2}(?: (?:argument|parameter|"
                             r"keyword argument|arg))?,? (is|are|must be|should be|specifies|determines|controls|"
                             r"gives|indicates) (.{4,200}?)\.?$")
_NAME = r"[`']?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)(\(\))?[`']?"
XREF_RELATIONS = ("instead", "see", "like", "called")
_XREF = [("instead", re.compile(rf"\b[Uu]se\s+{_NAME}\s+instead\b")),
         ("instead", re.compile(rf"\b{_NAME}\s+should be used instead\b")),
         ("see", re.compile(rf"\b[Ss]ee(?: also)?(?: the)?(?: method| function| class)?\s+{_NAME}")),
         ("like", re.compile(rf"\b(?:[Ss]ame as|[Ee]quivalent to|[Aa]lias (?:for|of)|[Ss]ynonym for|[Ss]imilar to|"
                             rf"[Ll]ike)\s+{_NAME}")),
         ("called", re.compile(rf"\b[Cc]alled (?:by|from)\s+{_NAME}"))]
_NOT_NAMES = {"the", "a", "an", "this", "that", "it", "self", "cls", "below", "above", "help", "note", "notes", "also",
              "method", "function", "class", "module", "type", "object", "example", "section", "docs", "these"}


def returns_statement(sents):
    """(what, sentence) of the first "Return(s) <what>." sentence, or None."""
    for s in sents:
        m = _RETURNS.match(s)
        if m and not s.endswith(":"):
            return m.group(1), s
    return None


def raise_statements(sents):
    """[(exception, condition, sentence)] of every "raises X" / "X is raised" in the sentences; condition is the
    "if/when/unless ..." span of that sentence as written ("If x is empty" when it leads the sentence), or ""."""
    out = []
    for s in sents:
        for pattern in _RAISES:
            for m in pattern.finditer(s):
                cond = ""
                after, before = _AFTER_CONDITION.search(s, m.end()), _CONDITION.match(s)
                if after:
                    cond = s[after.start():after.end()].rstrip(".")
                elif before and before.end(2) < m.start():
                    cond = s[:before.end(2)]
                out.append((m.group(1), cond, s))
    return out


def condition_statements(sents):
    """[(keyword, condition, consequence, sentence)] of the sentences "If <condition>, <consequence>." (also When,
    Unless) that raise nothing."""
    out = []
    for s in sents:
        m = _CONDITION.match(s)
        if m and not any(p.search(s) for p in _RAISES):
            out.append((m.group(1), m.group(2), m.group(3), s))
    return out


def param_statement(doc, sents, param):
    """How a docstring describes parameter `param`: (form, verb, description, evidence) or None. A line
    "param -- text" / ":param param: text" / "*param*: text" gives form "is" and the line's first sentence; else a
    sentence "*param* is/must be/specifies ... text." gives form "is", "be" or "verb" (verb: "specifies", ...)."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        m = _PARAM_LINE.match(line)
        if m and m.group(1) == param:
            indent = len(line) - len(line.lstrip())
            block = [line]
            for more in lines[i + 1:]:  # continuation lines are indented deeper than the parameter's line
                if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                    break
                block.append(more)
            text = sentences(squash(m.group(2) + " " + " ".join(block[1:])))
            if text:
                return "is", "", _one_param(text[0]), squash(" ".join(block))
    for s in sents:
        m = _PARAM_SENTENCE.match(s)
        if m and m.group(1) == param:
            verb = m.group(2)
            form = "is" if verb in ("is", "are") else "be" if verb.endswith(" be") else "verb"
            return form, verb, _one_param(m.group(3)), s
    return None


def _one_param(text):
    """A description cut where the next *param* starts ("an optional root node, *file* is ..."), no final stop."""
    return re.split(r"[,;]\s+(?=[*`']\w+[*`']\s)", text)[0].rstrip(".")


def xref_statements(sents, relations=XREF_RELATIONS):
    """[(relation, name, marked, sentence)]: the names a docstring points to ("Use X instead", "See X", "Same as
    X", "Called by X"); marked says the name is written as code (`x`, x(), a dotted name), not as a plain word."""
    out = []
    for s in sents:
        for relation, pattern in _XREF:
            if relation not in relations:
                continue
            for m in pattern.finditer(s):
                name = m.group(1)
                if name.lower() in _NOT_NAMES or name.startswith(("self.", "cls.")) or len(name) < 3:
                    continue
                marked = bool(m.group(2)) or "." in name or s[max(0, m.start(1) - 1):m.start(1)] in ("`", "'")
                out.append((relation, name, marked, s))
    return out


# -----------------------------------------------------------------------------
# the harvest


def harvest(max_modules=None, progress=True, modules=None, include_topics=True, timeout=600):
    """
    All records, sorted by id. max_modules: only the first N top-level modules (sorted). modules: an explicit
    list of top-level names instead (for tests). Prints counts of modules ok/failed and records per kind.

    The imports run in a fresh interpreter (python -I -S this_file --worker): the caller's process does not get
    ~370 modules imported into it (readline, tkinter, signal handlers...), and the result does not depend on
    what the caller imported before (torch, for one, replaces inspect.getfile) or on site-packages.
    """
    opts = {"max_modules": max_modules, "modules": None if modules is None else list(modules),
            "include_topics": include_topics, "progress": progress}
    if modules is not None:
        for name in modules:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"harvest: modules= takes top-level module names, got {name!r}")
    with tempfile.TemporaryDirectory(prefix="stdlib_docs.") as tmp:
        out = os.path.join(tmp, "records.json")
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--worker", json.dumps(opts), out]
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"harvesting the stdlib docs took longer than {timeout}s") from None
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the stdlib docs worker failed (exit code {proc.returncode}): {' '.join(cmd)}")
        with open(out, "r", encoding="utf-8") as f:
            result = json.load(f)
    records = result["records"]
    if progress:
        kinds = Counter(r["kind"] for r in records)
        print(f"stdlib docs: {len(result['ok'])} modules ok, {len(result['failed'])} failed to import, "
              f"{len(records)} records ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) "
              f"in {result['seconds']:.1f}s", flush=True)
        if result["failed"]:
            print(f"stdlib docs: not imported here: {', '.join(sorted(result['failed']))}", flush=True)
    return records


def _priority(owner, real_name, public_name):
    """Which module gets the record of an object several modules expose: 0 = its home (where it is defined, or
    the public face of its accelerator: _heapq -> heapq, posix -> os), 1 = a re-export (the smallest id wins)."""
    if owner == real_name or IMPL_HOME.get(owner) == public_name:
        return 0
    if isinstance(owner, str) and owner.startswith("_") and owner.lstrip("_") == public_name:
        return 0
    return 1


def _harvest_here(max_modules=None, modules=None, include_topics=True, progress=True):
    """The harvest itself, in this process (the --worker of harvest())."""
    t0 = time.time()
    tops = top_level_modules() if modules is None else sorted(modules)
    if max_modules is not None:
        tops = tops[:max_modules]
    candidates = []  # (record, object key, priority): priority 0 if defined there, 1 if re-exported
    ok, failed = [], {}
    for k, top in enumerate(tops):
        if progress and (k % 25 == 0 or k + 1 == len(tops)):  # a one-line progress print, ~10 updates
            print(f"\rstdlib docs: {k + 1}/{len(tops)} {top:<30}", end="", file=sys.stderr, flush=True)
        queue = [top]
        while queue:
            name = queue.pop(0)
            mod, err = _quiet_import(name)
            if mod is None:
                failed[name] = err
                continue
            ok.append(name)
            try:
                recs, objs = module_records(mod, name)
            except Exception as e:  # an odd object whose attributes raise: skip the module, say so
                failed[name] = f"records: {type(e).__name__}: {e}"[:200]
                continue
            for rec, obj in zip(recs, objs):
                prio = 0 if obj is None else _priority(getattr(obj[0], "__module__", None), mod.__name__, name)
                candidates.append((rec, None if obj is None else (id(obj[0]), obj[1]), prio))
            queue.extend(_submodule_names(mod))
            if name == "os":
                queue.append("os.path")  # a module, not a package: posixpath/ntpath, documented as os.path
    if progress:
        print(file=sys.stderr, flush=True)

    # one record per Python object (a class's methods go with it): re-exports lose to the defining module,
    # then the smallest id wins. Keys are id()s: every module stays imported, so no id is reused meanwhile.
    best = {}
    for i, (rec, key, prio) in enumerate(candidates):
        if key is None:
            continue
        j = best.get(key)
        if j is None or (prio, rec["id"]) < (candidates[j][2], candidates[j][0]["id"]):
            best[key] = i
    keep = [rec for i, (rec, key, prio) in enumerate(candidates) if key is None or best[key] == i]
    if include_topics:
        keep.extend(topic_records())

    keep.sort(key=lambda r: r["id"])
    records, seen_ids, seen_docs = [], set(), set()
    for rec in keep:
        if not rec["doc"].strip() or rec["id"] in seen_ids or rec["doc"] in seen_docs:
            continue
        seen_ids.add(rec["id"])
        seen_docs.add(rec["doc"])
        records.append(rec)
    return {"records": records, "ok": ok, "failed": failed, "seconds": time.time() - t0}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        result = _harvest_here(**json.loads(sys.argv[2]))
        with open(sys.argv[3] + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(sys.argv[3] + ".tmp", sys.argv[3])
    else:
        records = harvest()
        splits = Counter(record_split(r) for r in records)
        print(f"split: {dict(splits)}")
        for split in ("eval", "rag"):
            tops = sorted({r["module"].split(".")[0] for r in records if record_split(r) == split})
            print(f"{split} top-level modules (not in the corpus or SFT chat): {tops}")
        for rec in records[:: max(1, len(records) // 5)]:
            print("-" * 80)
            print({k: (v[:200] if isinstance(v, str) else v) for k, v in rec.items()})
