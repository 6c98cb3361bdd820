"""Labelled fine-tuning data built from files every machine has: the Python standard library's
own sources (sysconfig.get_paths()["stdlib"]). Nothing is downloaded, so the classification, NER,
SFT and preference recipes and their tests run offline, and a given Python always yields the same
bytes.

    python -m lmforge.training.embedded classification /tmp/cls     # snippet → stdlib package
    python -m lmforge.training.embedded ner /tmp/ner                 # tokenize categories as BIO tags
    python -m lmforge.training.embedded sft /tmp/sft [--schema messages|alpaca|sharegpt]   # docstring summaries
    python -m lmforge.training.embedded preference /tmp/pref [--schema messages]   # real vs corrupted code

Each writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl and prints the counts and label
distribution. Every record carries `source` (the file it came from, relative to the stdlib): the
split is by file, so no file gives records to both sides and eval measures generalisation to code
the model has not seen. `source` is provenance, not a feature; recipes read only the task fields:
    classification  {"text": "<source lines>", "label": "json", "source": ..., "line": 120}
    ner             {"tokens": ["import", "os", ".", "path"], "tags": ["B-KEYWORD", "B-NAME", "I-NAME", "I-NAME"], ...}
    sft             {"prompt": "Summarise what `json.dumps(obj, ...)` does.", "response": "Serialize ...", ...}
                    --schema messages {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}
                    --schema alpaca {"instruction": ..., "input": "", "output": ...}
                    --schema sharegpt {"conversations": [{"from": "system", ...}, {"from": "human", ...}, {"from": "gpt", ...}]}
    preference      {"prompt": "Continue this function from `json/encoder.py`:\\n    def default(self, o):\\n...",
                     "chosen": "<the next 2-6 lines>", "rejected": "<them shuffled, or two names swapped>",
                     "corruption": "shuffled", ...}   (TRL's standard explicit-prompt format)
                    --schema messages {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                                       "rejected": [{"role": "assistant", ...}], ...}   (TRL's conversational)
Recipes name them {embedded:sft}, {embedded:sft-messages}, {embedded:sft-alpaca}, {embedded:sft-sharegpt},
{embedded:preference}, {embedded:preference-messages}.
The output depends only on the arguments and the Python version (the stdlib's text differs between
versions), never on the machine, the hash seed or the file system's listing order.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import hashlib
import io
import json
import keyword
import os
import random
import re
import sys
import sysconfig
import tokenize
from collections import Counter
from pathlib import Path
from typing import Callable

TASKS = ("classification", "ner", "sft", "preference")
# Packages present in every CPython since 3.8, each with ≥ 2 non-test files so that a class has files
# on both sides of the split. json and concurrent are small, so the classes are not all the same
# size: report macro F1 and the majority baseline beside accuracy.
DEFAULT_PACKAGES = ("asyncio", "concurrent", "email", "http", "json", "unittest", "xml")  # sft: all
# Sized for a CPU run of a few minutes; build(max_train=..., max_eval=...) overrides.
DEFAULT_MAX = {"classification": (3000, 350), "ner": (3000, 300), "sft": (2000, 250), "preference": (1200, 200)}
EVAL_FRACTION = 0.2          # of each package's source bytes, whole files only
SNIPPET_LINES = 12           # classification: lines per snippet ...
SNIPPET_CHARS = 400          # ... cut back at a line boundary to at most this many characters
NER_MIN_TOKENS, NER_MAX_TOKENS, NER_MAX_LINE_CHARS = 8, 64, 300
SFT_MAX_RESPONSE_CHARS = 300
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
# Not library code a user calls (tests, demos, the IDLE app, installers' data) or deprecated and gone
# in 3.12 (distutils): left out of the whole-stdlib default that SFT uses.
_NOT_LIBRARY = {"test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "distutils",
                "antigravity", "this"}


# --------------------------------------------------------------------------- sources and split

def version() -> str:
    """What the built data depends on besides the arguments: this builder's code and the Python
    version (whose stdlib it reads). Caches of built data are keyed by it."""
    h = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=6)
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}".encode())
    return h.hexdigest()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def available_packages(names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The stdlib packages (directories with an __init__.py) and top-level modules among `names`;
    by default all of them except private ones, tests, demos and bundled tools (SFT's default)."""
    root = stdlib_dir()
    if names is None:
        names = sorted({p.stem for p in root.glob("*.py")} | {p.parent.name for p in root.glob("*/__init__.py")})
        names = [n for n in names if not n.startswith("_") and n not in _NOT_LIBRARY]
    return [n for n in names
            if n.isidentifier() and ((root / n / "__init__.py").is_file() or (root / f"{n}.py").is_file())]


def _resolve_packages(packages: list[str] | None, default: tuple[str, ...] | None = DEFAULT_PACKAGES) -> list[str]:
    if packages is None:
        return available_packages(default)  # a default missing from this Python is skipped
    missing = sorted(set(packages) - set(available_packages(packages)))
    if missing:
        raise ValueError(f"not stdlib packages or modules in this Python: {missing} "
                         f"(available: {', '.join(available_packages())})")
    if len(set(packages)) != len(packages):
        raise ValueError(f"packages repeats a name: {packages}")
    return list(packages)


def package_files(name: str) -> list[str]:
    """A package's non-test .py files (or a top-level module's one file) as stdlib-relative POSIX
    paths, sorted: never in the file system's listing order, which differs between machines."""
    root = stdlib_dir()
    if not (root / name / "__init__.py").is_file():
        return [f"{name}.py"]
    files = []
    for p in (root / name).rglob("*.py"):
        rel = p.relative_to(root)
        if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and not rel.name.startswith("test_"):
            files.append(rel.as_posix())
    return sorted(files)


def _stable_key(seed: int, text: str) -> str:
    # hashlib, not hash(): str hashes change with PYTHONHASHSEED, and the split must not.
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_files(files: list[str], seed: int, eval_fraction: float = EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """Whole files to (train, eval), eval holding about `eval_fraction` of the bytes: in a seeded
    order, a file goes to eval if it still fits under the target (with 25% slack); if that leaves
    eval under half the target (large files only), the file closest to the shortfall is added. The
    tasks call this per package, so every class has files on both sides: a global per-file coin
    flip leaves a 4-file package with no eval files about 40% of the time."""
    if len(files) < 2:
        return list(files), []
    root = stdlib_dir()
    sizes = {f: (root / f).stat().st_size for f in files}
    target = eval_fraction * sum(sizes.values())
    order = sorted(files, key=lambda f: _stable_key(seed, f))
    eval_files: list[str] = []
    held = 0
    for f in order:
        if held + sizes[f] <= 1.25 * target and len(eval_files) < len(files) - 1:
            eval_files.append(f)
            held += sizes[f]
    if held < 0.5 * target and len(eval_files) < len(files) - 1:
        rest = [f for f in order if f not in eval_files]
        eval_files.append(min(rest, key=lambda f: abs(target - held - sizes[f])))
    return sorted(set(files) - set(eval_files)), sorted(eval_files)


def split_packages(packages: list[str], seed: int) -> tuple[list[str], list[str]]:
    """All files of `packages` to (train, eval), split per package; top-level modules (one file
    each) are pooled into one group first, since a one-file group cannot be split."""
    modules = [f"{n}.py" for n in packages if not (stdlib_dir() / n / "__init__.py").is_file()]
    groups = [package_files(n) for n in packages if (stdlib_dir() / n / "__init__.py").is_file()]
    train: list[str] = []
    evals: list[str] = []
    for files in groups + ([modules] if modules else []):
        tr, ev = split_files(files, seed)
        train += tr
        evals += ev
    return train, evals


def _read(rel: str) -> str | None:
    try:
        with tokenize.open(stdlib_dir() / rel) as fh:  # honours a coding cookie
            return fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _module_name(rel: str) -> str:
    parts = rel[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _take(records: list[dict], n: int, rng: random.Random) -> list[dict]:
    records = list(records)
    rng.shuffle(records)
    return records[:n]


# --------------------------------------------------------------------------- classification

def _snippets(rel: str, mask: re.Pattern, stride: int) -> list[dict]:
    """SNIPPET_LINES-line windows, starting every `stride` lines from the file's first top-level
    def/class onwards.

    Why the prologue is skipped and package names masked: the module docstring, the imports and
    `__all__` say outright which package a file belongs to ("from email import utils", "JSON
    decoder"), and so does the literal package name anywhere in the body. With those, a model reads
    the label off a single word; without them it has to recognise the package's vocabulary and
    style (scanners and decoders, loops and futures, headers and status codes), which is learnable
    but not trivial. Names of every package in the task are masked, in every class alike, so the
    mask itself says nothing about the label."""
    text = _read(rel)
    if text is None:
        return []
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    starts = [min([n.lineno] + [d.lineno for d in n.decorator_list]) for n in tree.body
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if not starts:
        return []  # only imports/constants (e.g. an __init__ that re-exports): nothing but clues
    # split("\n"), not splitlines(): that also breaks at \f and \x1c, and ast counts only newlines
    lines = [mask.sub("pkg", ln.rstrip()) for ln in text.split("\n")]
    out = []
    for i in range(starts[0] - 1, len(lines), stride):
        window = lines[i:i + SNIPPET_LINES]
        while window and not window[-1].strip():
            window.pop()
        if sum(1 for ln in window if ln.strip()) < 4:
            continue  # mostly blank: no signal
        kept, size = [], 0
        for ln in window:
            if size + len(ln) + 1 > SNIPPET_CHARS and kept:
                break
            kept.append(ln[:SNIPPET_CHARS])
            size += len(ln) + 1
        out.append({"text": "\n".join(kept), "source": rel, "line": i + 1})
    return out


def classification(packages: list[str] | None = None, *, max_train: int = DEFAULT_MAX["classification"][0],
                   max_eval: int = DEFAULT_MAX["classification"][1], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records {"text", "label", "source", "line"}: which package a snippet is from.

    Classes are capped at max/len(packages) records per split, so a large package (asyncio) cannot
    drown a small one; a small one (json, concurrent) simply has fewer. Train windows overlap by
    half, which doubles what the small packages give (the cap cannot); eval windows do not, so
    every eval line is scored once."""
    pkgs = _resolve_packages(packages)
    if len(pkgs) < 2:
        raise ValueError(f"classification needs at least 2 packages, got {pkgs}")
    single = [p for p in pkgs if len(package_files(p)) < 2]
    if single:
        raise ValueError(f"classification needs packages of >= 2 files (one file cannot be split): {single}")
    mask = re.compile(r"\b(" + "|".join(map(re.escape, pkgs)) + r")\b", re.IGNORECASE)
    rng = random.Random(seed)
    train: list[dict] = []
    evals: list[dict] = []
    for pkg in pkgs:
        tr_files, ev_files = split_files(package_files(pkg), seed)
        for files, out, cap, stride in ((tr_files, train, max_train // len(pkgs), SNIPPET_LINES // 2),
                                        (ev_files, evals, max_eval // len(pkgs), SNIPPET_LINES)):
            recs = [{"text": s["text"], "label": pkg, "source": s["source"], "line": s["line"]}
                    for f in files for s in _snippets(f, mask, stride)]
            out += _take(recs, cap, rng)
    return _take(train, len(train), rng), _take(evals, len(evals), rng)  # mix the classes


# --------------------------------------------------------------------------- NER

NER_TYPES = ("KEYWORD", "NAME", "STRING", "NUMBER")
_DROP = {"NL", "NEWLINE", "COMMENT", "INDENT", "DEDENT", "ENDMARKER", "ENCODING"}


def bio_tags(toks: list[tuple[str, str]]) -> list[str]:
    """BIO tags for one logical line's (token type name, string) pairs.

    Entities: KEYWORD (keyword.iskeyword; soft keywords such as `match` stay NAME, they are names
    outside a match statement), NAME (a dotted name `os.path.join` is ONE entity, B I I I I over
    `os . path . join`, since it names one thing), STRING (adjacent literals, which Python
    concatenates into one, are one entity), NUMBER. Operators and punctuation are O: tagging them
    as an entity too would leave no O at all."""
    tags: list[str] = []
    i, n = 0, len(toks)

    def is_name(j: int) -> bool:
        return j < n and toks[j][0] == "NAME" and not keyword.iskeyword(toks[j][1])

    while i < n:
        kind, text = toks[i]
        j = i + 1
        if kind == "STRING":
            while j < n and toks[j][0] == "STRING":
                j += 1
            tags += ["B-STRING"] + ["I-STRING"] * (j - i - 1)
        elif kind == "NAME" and keyword.iskeyword(text):
            tags.append("B-KEYWORD")
        elif is_name(i):
            while j + 1 < n and toks[j] == ("OP", ".") and is_name(j + 1):
                j += 2
            tags += ["B-NAME"] + ["I-NAME"] * (j - i - 1)
        elif kind == "NUMBER":
            tags.append("B-NUMBER")
        else:
            tags.append("O")
        i = j
    return tags


def _logical_lines(text: str) -> list[tuple[int, list[tuple[str, str]]]]:
    """(first line number, [(token type name, string)]) per logical line, without the layout tokens
    (NL, NEWLINE, INDENT, DEDENT) and comments. On 3.12+ an f-string is tokenized into
    FSTRING_START, its pieces and FSTRING_END (with empty-string pieces a word-level tokenizer
    cannot align): it is put back together into the one STRING token that 3.8-3.11 give, so the
    words are the same on every Python."""
    src = text.split("\n")

    def source(start: tuple[int, int], end: tuple[int, int]) -> str:
        (r1, c1), (r2, c2) = start, end
        if r1 == r2:
            return src[r1 - 1][c1:c2]
        return "\n".join([src[r1 - 1][c1:]] + src[r1:r2 - 1] + [src[r2 - 1][:c2]])

    lines: list[tuple[int, list[tuple[str, str]]]] = []
    cur: list[tuple[str, str]] = []
    start, depth, f_start = 0, 0, (0, 0)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        name = tokenize.tok_name[tok.type]  # by name: FSTRING_* exist only on 3.12+
        if name == "FSTRING_START":
            depth += 1
            if depth == 1:
                f_start = tok.start
            continue
        if depth:
            if name == "FSTRING_END":
                depth -= 1
                if depth == 0:
                    name, tok = "STRING", tok._replace(string=source(f_start, tok.end), start=f_start)
            if depth:
                continue
        if name == "NEWLINE":
            if cur:
                lines.append((start, cur))
            cur = []
        elif name not in _DROP:
            if not cur:
                start = tok.start[0]
            cur.append((name, tok.string))
    return lines


def _ner_records(rel: str) -> list[dict]:
    """Runs of consecutive logical lines with ≥ NER_MIN_TOKENS tokens in all: single lines are often
    one or two tokens (`else:`, `return`), which teach little. A logical line longer than
    NER_MAX_TOKENS tokens or NER_MAX_LINE_CHARS characters (a big literal table, a docstring) is
    left out so records fit a short sequence length without truncation, which would cut entities."""
    text = _read(rel)
    if text is None:
        return []
    try:
        lines = _logical_lines(text)
    except (tokenize.TokenError, SyntaxError):
        return []
    out: list[dict] = []
    group_tokens: list[str] = []
    group_tags: list[str] = []
    group_line = 0
    for line_no, toks in lines:
        if len(toks) > NER_MAX_TOKENS or sum(len(s) for _, s in toks) > NER_MAX_LINE_CHARS:
            group_tokens, group_tags = [], []  # a group is a contiguous run: restart after a gap
            continue
        if not group_tokens:
            group_line = line_no
        group_tokens += [s for _, s in toks]
        group_tags += bio_tags(toks)
        if len(group_tokens) >= NER_MIN_TOKENS:
            if len(group_tokens) <= NER_MAX_TOKENS:
                out.append({"tokens": group_tokens, "tags": group_tags, "source": rel, "line": group_line})
            group_tokens, group_tags = [], []
    return out


def ner(packages: list[str] | None = None, *, max_train: int = DEFAULT_MAX["ner"][0],
        max_eval: int = DEFAULT_MAX["ner"][1], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records {"tokens", "tags", "source", "line"}; tags are BIO over NER_TYPES."""
    tr_files, ev_files = split_packages(_resolve_packages(packages), seed)
    train = [r for f in tr_files for r in _ner_records(f)]
    evals = [r for f in ev_files for r in _ner_records(f)]
    rng = random.Random(seed)
    return _take(train, max_train, rng), _take(evals, max_eval, rng)


# --------------------------------------------------------------------------- SFT

_TEMPLATES = (
    "Summarise what `{name}` does.",
    "What does the {kind} `{name}` do? Answer in one sentence.",
    "Describe the purpose of the {kind} `{name}` from the Python standard library.",
    "In one line, explain what `{name}` is for.",
)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> str:
    args = node.args
    if is_method and args.args and args.args[0].arg in ("self", "cls") and not args.posonlyargs:
        args = ast.arguments(posonlyargs=[], args=args.args[1:], vararg=args.vararg, kwonlyargs=args.kwonlyargs,
                             kw_defaults=args.kw_defaults, kwarg=args.kwarg, defaults=args.defaults)
        # defaults align with the last positional args, so dropping the first arg keeps them right
        if len(args.defaults) > len(args.args):
            return "(...)"
    sig = f"({ast.unparse(args)})"
    return sig if len(sig) <= 60 else "(...)"  # a long signature would dominate the prompt


def _summary(node: ast.AST) -> str | None:
    """The docstring's first paragraph on one line. Not just its first line: summaries are often
    wrapped ("Return a ...\\n   when ..."), and the first line alone would be a fragment."""
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())  # one line, single spaces
    if not 12 <= len(para) <= SFT_MAX_RESPONSE_CHARS:
        return None  # "XXX" stubs, or a page of prose that would be cut mid-sentence
    return para


SFT_SCHEMAS = ("prompt", "messages", "alpaca", "sharegpt")  # prompt: {"prompt", "response"}
SHAREGPT_SYSTEM = "You answer questions about the Python standard library."


def _sft_record(prompt: str, answer: str, schema: str) -> dict:
    """One pair in the record shape `schema` (the shapes data.format reads, tasks/sft.py)."""
    if schema == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if schema == "alpaca":
        return {"instruction": prompt, "input": "", "output": answer}
    if schema == "sharegpt":
        return {"conversations": [{"from": "system", "value": SHAREGPT_SYSTEM}, {"from": "human", "value": prompt},
                                  {"from": "gpt", "value": answer}]}
    return {"prompt": prompt, "response": answer}


def _sft_records(rel: str, seed: int, schema: str) -> list[dict]:
    text = _read(rel)
    try:
        tree = ast.parse(text) if text is not None else None
    except SyntaxError:
        tree = None
    if tree is None:
        return []
    module = _module_name(rel)
    found: list[tuple[str, str, str]] = []  # (name as shown in the prompt, kind, summary)

    def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue  # private helpers: often undocumented, and not what anyone asks about
            qual = f"{prefix}.{node.name}"
            summary = _summary(node)
            if isinstance(node, ast.ClassDef):
                if summary:
                    found.append((qual, "class", summary))
                visit(node.body, qual, True)
            elif summary:
                kind = ("method" if in_class else "function") if isinstance(node, ast.FunctionDef) else \
                       ("coroutine method" if in_class else "coroutine function")
                found.append((qual + _signature(node, in_class), kind, summary))

    visit(tree.body, module, False)
    out = []
    for shown, kind, summary in found:
        template = _TEMPLATES[int(_stable_key(seed, shown), 16) % len(_TEMPLATES)]
        prompt = template.format(name=shown, kind=kind)
        out.append({**_sft_record(prompt, summary, schema), "kind": kind, "source": rel})
    return out


def sft(packages: list[str] | None = None, *, max_train: int = DEFAULT_MAX["sft"][0],
        max_eval: int = DEFAULT_MAX["sft"][1], seed: int = 0, schema: str = "prompt") -> tuple[list[dict], list[dict]]:
    """(train, eval) instruction pairs from public functions', classes' and methods' docstrings,
    read with `ast` (modules are never imported: importing runs code and may need a display,
    a network or a platform module), written in the record shape `schema` (SFT_SCHEMAS; the
    same pairs in every shape). By default the whole library (available_packages()): the default
    packages alone give ~900."""
    if schema not in SFT_SCHEMAS:
        raise ValueError(f"sft schema must be one of {', '.join(SFT_SCHEMAS)}, got {schema!r}")
    tr_files, ev_files = split_packages(_resolve_packages(packages, default=None), seed)
    train = [r for f in tr_files for r in _sft_records(f, seed, schema)]
    evals = [r for f in ev_files for r in _sft_records(f, seed, schema)]
    rng = random.Random(seed)
    return _take(train, max_train, rng), _take(evals, max_eval, rng)


# --------------------------------------------------------------------------- preference

PREFERENCE_SCHEMAS = ("prompt", "messages")  # TRL's standard explicit-prompt and conversational shapes
CORRUPTIONS = ("shuffled", "swapped")
# Of each split's pairs, the share with a swapped identifier (the rest are shuffled). A swap is the
# subtler signal (a local read before it is bound, which a model sees only by matching two names);
# shuffled lines break the indentation itself (a ':' line not followed by a deeper one, a line after
# `return`), which a tiny model reads locally. With llama-debug and DPO on CPU, held-out accuracy on
# swapped pairs trails shuffled ones by ~0.1-0.2, so swaps stay a minority.
SWAP_FRACTION = 0.3
# Characters: prompt, chosen, the two together, one line. The recipes' data.seq_len is 192 tokens; the
# smallest tokenizer they meet, the tests' debug base's 512-token BPE, gives ~1.5 characters per token
# in prompts and ~1.7 overall (the recipes' demo model, 4096 tokens, more): the prompt must leave room
# for the answer (preference.py refuses a pair otherwise) and a pair should fit whole, or a shuffled
# answer cut at the end may lose its break.
PREF_PROMPT_CHARS, PREF_CHOSEN_CHARS, PREF_PAIR_CHARS, PREF_LINE_CHARS = 200, 150, 310, 100
PREF_PROMPT_LINES = (1, 3)   # body lines shown after the def line
PREF_CHOSEN_LINES = (2, 6)   # the continuation's lines
SHUFFLE_TRIES = 20
PREF_PER_FUNCTION = 2        # pairs with different prompt lengths: the default packages give ~1500 so
_ENDS_BLOCK = re.compile(r"(return|raise|continue|break|pass)\b")


def _logical_rows(text: str) -> dict[int, int]:
    """First physical line → last physical line of each logical line (1-based). Blank lines,
    comment-only lines and lines inside a multi-line string start none."""
    rows: dict[int, int] = {}
    first = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NEWLINE:
            if first:
                rows[first] = tok.start[0]
            first = 0
        elif not first and tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                                             tokenize.ENCODING, tokenize.ENDMARKER):
            first = tok.start[0]
    return rows


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _code(line: str) -> str:
    """The line without a trailing comment (a '#' inside a string is rare enough not to matter here)."""
    return line.split("#", 1)[0].rstrip() if "#" in line else line.rstrip()


def _breaks(prev: str, lines: list[str]) -> int:
    """How many of the steps from `prev` through `lines` (one logical line each) no function body
    takes: a block header (ending in ':') followed by a line no deeper, another line followed by a
    deeper one, or one at the same depth after return/raise/continue/break/pass (dead code).
    Real code has none."""
    seq = [prev] + lines
    bad = 0
    for a, b in zip(seq, seq[1:]):
        ia, ib = _indent(a), _indent(b)
        if _code(a).endswith(":"):
            bad += ib <= ia
        else:
            bad += ib > ia or bool(_ENDS_BLOCK.match(a.lstrip()) and ib == ia)
    return bad


def _read_unbound(occurrences: list[tuple[str, bool]], local: set[str]) -> tuple[str, bool] | None:
    """occurrences: (name, is_store) in text order. The first name of `local` whose first occurrence
    reads it (read before it is bound), and whether it is assigned further on."""
    seen: set[str] = set()
    for i, (name, store) in enumerate(occurrences):
        if name in local and name not in seen and not store:
            return name, any(st and n == name for n, st in occurrences[i:])
        seen.add(name)
    return None


def _shuffle(prev: str, chosen: list[str], rng: random.Random) -> list[str] | None:
    """chosen's lines in another order, the one of SHUFFLE_TRIES random orders that breaks the block
    structure most (_breaks); None if none breaks it (lines all at one depth, say): such an order
    may be as good code as the original, and no model could prefer either."""
    best, most = None, 0
    for _ in range(SHUFFLE_TRIES):
        order = list(chosen)
        rng.shuffle(order)
        bad = _breaks(prev, order)
        if order != chosen and bad > most:
            best, most = order, bad
    return best


def _swap(chosen: list[str], names: list[tuple[int, int, int, str, bool]], known: set[str],
          rng: random.Random) -> list[str] | None:
    """chosen with two of its identifiers exchanged everywhere (at ast.Name positions: attributes
    and strings are untouched), two that occur equally often, picked so that afterwards a local
    name (one that chosen assigns and the prompt never mentions) is read before it is bound, which
    chosen never does. Preferred: pairs after which that name is also assigned further on (read,
    then assigned: the contradiction lies within the completion). names: (line index, start, end,
    id, is_store), in text order."""
    local = {n[3] for n in names if n[4]} - known
    if not local or _read_unbound([(n[3], n[4]) for n in names], local):
        return None  # the original reads a local before binding it (a loop's carry): no contrast
    counts = Counter(n[3] for n in names)
    ids = sorted(counts)
    # Only names that occur equally often: then the rejected answer holds the same names as the chosen
    # one, so is as long. Otherwise summed log-probs prefer whichever is shorter, right or not (the
    # SFT model got 1 of 11 such held-out pairs right).
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if counts[a] == counts[b]]
    rng.shuffle(pairs)
    ranked = []
    for a, b in pairs:
        swapped = [(line, s, e, {a: b, b: a}.get(name, name), store) for line, s, e, name, store in names]
        found = _read_unbound([(n[3], n[4]) for n in swapped], local)
        if found:
            ranked.append((not found[1], len(ranked), swapped))
    for *_, swapped in sorted(ranked, key=lambda r: r[:2]):
        out = list(chosen)
        for line, s, e, name, _ in sorted(swapped, key=lambda n: (n[0], -n[1])):  # right to left per line
            out[line] = out[line][:s] + name + out[line][e:]
        if out != chosen:
            return out
    return None


def _pref_record(prompt: str, chosen: str, rejected: str, schema: str) -> dict:
    if schema == "messages":
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _pref_records(rel: str, seed: int) -> list[dict]:
    """Up to PREF_PER_FUNCTION pairs (prompts of different lengths) per function or method of file
    `rel`, as {"prompt", "chosen", "rejected", "source", "line", "corruption"} with plain-text
    fields (_pref_record reshapes them)."""
    text = _read(rel)
    try:
        tree = ast.parse(text) if text is not None else None
        rows = _logical_rows(text) if text is not None else {}
    except (SyntaxError, tokenize.TokenError):
        tree = None
    if tree is None:
        return []
    lines = text.split("\n")
    # ast columns are UTF-8 byte offsets; lines are str
    names_by_row: dict[int, list[tuple[int, int, str, bool]]] = {}
    functions = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.lineno == node.end_lineno:
            raw = lines[node.lineno - 1].encode()
            s = len(raw[:node.col_offset].decode(errors="replace"))
            names_by_row.setdefault(node.lineno, []).append(
                (s, s + len(node.id), node.id, isinstance(node.ctx, ast.Store)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(node)
    all_starts = sorted(rows)
    out = []
    for fn in functions:
        body = fn.body
        if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0].value, "value", None), str):
            body = body[1:]  # the docstring: prose, and often longer than the whole budget
        if not body or fn.lineno not in rows or body[0].lineno <= rows[fn.lineno]:
            continue  # a one-line def, or nothing after the docstring
        header = lines[fn.lineno - 1:rows[fn.lineno]]
        starts = all_starts[bisect.bisect_left(all_starts, body[0].lineno):
                            bisect.bisect_right(all_starts, fn.end_lineno)]  # the body's statements
        key = _stable_key(seed, f"{rel}:{fn.lineno}")
        rng = random.Random(key)
        lo, hi = PREF_PROMPT_LINES
        first = int(key[:8], 16) % (hi - lo + 1)
        made = 0
        for k in range(hi - lo + 1):  # prompt lengths in a per-function order
            n_prompt = lo + (first + k) % (hi - lo + 1)
            n_chosen = PREF_CHOSEN_LINES[0] + int(key[8 + 8 * k:16 + 8 * k], 16) % (
                PREF_CHOSEN_LINES[1] - PREF_CHOSEN_LINES[0] + 1)
            pair = _pref_window(rel, lines, rows, header, starts, n_prompt, n_chosen, names_by_row, rng)
            if pair:
                out.append({**pair, "line": fn.lineno})
                made += 1
                if made == PREF_PER_FUNCTION:
                    break
    return out


def _pref_window(rel: str, lines: list[str], rows: dict[int, int], header: list[str], starts: list[int],
                 n_prompt: int, n_chosen: int, names_by_row: dict, rng: random.Random) -> dict | None:
    """One pair from a function: the header and its first n_prompt statements (starts: the first
    lines of the body's statements) shown, up to n_chosen one-line statements continuing it. The
    rejected answer swaps two names where it can (swaps are the scarcer kind; preference() picks the
    mix), else shuffles the lines."""
    shown_starts = starts[:n_prompt]
    if len(shown_starts) < n_prompt:
        return None
    shown = [lines[r - 1] for r in shown_starts for r in range(r, rows[r] + 1)]
    cont_rows = []
    for r in starts[n_prompt:n_prompt + n_chosen]:
        if rows[r] != r:
            break  # a statement over several lines: shuffling its pieces is another kind of damage
        cont_rows.append(r)
    chosen = [lines[r - 1].rstrip() for r in cont_rows]
    while chosen and sum(len(c) + 1 for c in chosen) - 1 > PREF_CHOSEN_CHARS:
        chosen.pop()
    cont_rows = cont_rows[:len(chosen)]
    prompt = f"Continue this function from `{rel}`:\n" + "\n".join(ln.rstrip() for ln in header + shown) + "\n"
    while chosen and len(prompt) + sum(len(c) + 1 for c in chosen) - 1 > PREF_PAIR_CHARS:
        chosen.pop()
    cont_rows = cont_rows[:len(chosen)]
    if (len(chosen) < PREF_CHOSEN_LINES[0] or len(prompt) > PREF_PROMPT_CHARS
            or any(len(ln) > PREF_LINE_CHARS for ln in header + shown + chosen)
            or "\t" in "".join(header + shown + chosen)):  # tabs: a depth the model cannot compare with spaces'
        return None
    last = shown_starts[-1]  # the last shown statement as one line: its depth, its ':'
    prev = lines[last - 1][:_indent(lines[last - 1])] + lines[rows[last] - 1].strip()
    if _breaks(prev, chosen):
        return None  # e.g. a class-level 'if' whose body is a def: not a plain body
    known = set(re.findall(r"[A-Za-z_]\w*", prompt))
    names = [(i, s, e, name, store) for i, r in enumerate(cont_rows) for s, e, name, store in
             sorted(names_by_row.get(r, []))]
    for kind in ("swapped", "shuffled"):
        rejected = _swap(chosen, names, known, rng) if kind == "swapped" else _shuffle(prev, chosen, rng)
        if rejected is not None and rejected != chosen:
            return {"prompt": prompt, "chosen": "\n".join(chosen), "rejected": "\n".join(rejected),
                    "source": rel, "corruption": kind}
    return None


def preference(packages: list[str] | None = None, *, max_train: int = DEFAULT_MAX["preference"][0],
               max_eval: int = DEFAULT_MAX["preference"][1], seed: int = 0,
               schema: str = "prompt") -> tuple[list[dict], list[dict]]:
    """(train, eval) preference pairs: a prompt of a function's def line and first 1-3 body lines,
    chosen = the body's next 2-6 lines, rejected = a corruption of them (CORRUPTIONS, recorded in
    `corruption`): its lines `shuffled` into an order that breaks the block structure, or two of
    its identifiers that occur equally often `swapped` so that a name is read before it is assigned
    (both kinds keep the answer's characters, so its length). Each split holds
    SWAP_FRACTION swapped pairs (as far as there are), the rest shuffled."""
    if schema not in PREFERENCE_SCHEMAS:
        raise ValueError(f"preference schema must be one of {', '.join(PREFERENCE_SCHEMAS)}, got {schema!r}")
    tr_files, ev_files = split_packages(_resolve_packages(packages), seed)
    rng = random.Random(seed)
    splits = []
    for files, cap in ((tr_files, max_train), (ev_files, max_eval)):
        pairs, seen = [], set()
        for r in (r for f in files for r in _pref_records(f, seed)):
            if (r["prompt"], r["chosen"]) not in seen:  # a method copied between classes counts once
                seen.add((r["prompt"], r["chosen"]))
                pairs.append(r)
        swapped = _take([r for r in pairs if r["corruption"] == "swapped"], round(SWAP_FRACTION * cap), rng)
        shuffled = _take([r for r in pairs if r["corruption"] == "shuffled"], cap - len(swapped), rng)
        taken = _take(swapped + shuffled, cap, rng)
        splits.append([{**_pref_record(r["prompt"], r["chosen"], r["rejected"], schema),
                        "source": r["source"], "line": r["line"], "corruption": r["corruption"]} for r in taken])
    return splits[0], splits[1]


def percentiles(values: list[int]) -> tuple[int, int, int]:
    """(median, 95th percentile, max) by nearest rank."""
    v = sorted(values) or [0]
    return v[(len(v) - 1) // 2], v[round(0.95 * (len(v) - 1))], v[-1]


def _text(field: str | list[dict]) -> str:
    return field if isinstance(field, str) else "".join(m["content"] for m in field)


# --------------------------------------------------------------------------- writing

def distribution(task: str, records: list[dict]) -> dict[str, int]:
    """What the printed summary counts: labels (classification), entities by type (ner), kinds (sft),
    corruptions (preference)."""
    if task == "classification":
        c = Counter(r["label"] for r in records)
    elif task == "ner":
        c = Counter(t[2:] for r in records for t in r["tags"] if t.startswith("B-"))
    elif task == "preference":
        c = Counter(r["corruption"] for r in records)
    else:
        c = Counter(r["kind"] for r in records)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def write_jsonl(records: list[dict], path: Path) -> None:
    """Atomically: a reader (or a crashed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build(task: str, out_dir: Path | str, *, max_train: int | None = None, max_eval: int | None = None,
          seed: int = 0, packages: list[str] | None = None, schema: str = "prompt") -> dict:
    """Write OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl for `task`; returns their paths, counts and
    distributions: {"train": Path, "eval": Path, "counts": {"train", "eval"}, "distribution": {...}}.
    max_* default to DEFAULT_MAX[task]; `schema` applies to sft (SFT_SCHEMAS) and preference
    (PREFERENCE_SCHEMAS). preference adds "lengths": {field: (median, p95, max) characters}."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    d_train, d_eval = DEFAULT_MAX[task]
    max_train = d_train if max_train is None else max_train
    max_eval = d_eval if max_eval is None else max_eval
    if max_train < 1 or max_eval < 1:
        raise ValueError(f"max_train and max_eval must be >= 1, got {max_train}, {max_eval}")
    builder: Callable[..., tuple[list[dict], list[dict]]] = {"classification": classification, "ner": ner,
                                                             "sft": sft, "preference": preference}[task]
    if task not in ("sft", "preference") and schema != "prompt":
        raise ValueError(f"a record schema ({schema!r}) applies to sft and preference only")
    extra = {"schema": schema} if task in ("sft", "preference") else {}
    train, evals = builder(packages, max_train=max_train, max_eval=max_eval, seed=seed, **extra)
    out = Path(out_dir)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(evals, out / "eval.jsonl")
    res = {"train": out / "train.jsonl", "eval": out / "eval.jsonl",
           "counts": {"train": len(train), "eval": len(evals)},
           "distribution": {"train": distribution(task, train), "eval": distribution(task, evals)}}
    if task == "preference":  # characters, to check against data.seq_len (a 512-token BPE: ~3 chars/token)
        res["lengths"] = {f: percentiles([len(_text(r[f])) for r in train + evals])
                          for f in ("prompt", "chosen", "rejected")}
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmforge.training.embedded", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-train", type=int, default=None, help="records at most (default: per task %s)" % DEFAULT_MAX)
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packages", default=None,
                    help="comma-separated stdlib packages (default: %s)" % ",".join(DEFAULT_PACKAGES))
    ap.add_argument("--schema", choices=SFT_SCHEMAS, default="prompt",
                    help="sft, preference: the record shape (default prompt/response, prompt/chosen/rejected; "
                         "preference takes prompt or messages)")
    a = ap.parse_args(argv)
    packages = a.packages.split(",") if a.packages else None
    try:
        res = build(a.task, a.out_dir, max_train=a.max_train, max_eval=a.max_eval, seed=a.seed,
                    packages=packages, schema=a.schema)
    except ValueError as e:
        ap.error(str(e))
    for split in ("train", "eval"):
        dist = ", ".join(f"{k}={v}" for k, v in res["distribution"][split].items())
        print(f"{split:5} {res['counts'][split]:6d} records → {res[split]}\n      {dist}")
    for f, (p50, p95, top) in res.get("lengths", {}).items():
        print(f"{f:8} chars: p50 {p50}, p95 {p95}, max {top}")


if __name__ == "__main__":
    main()
