"""The docs' walkthroughs run as written: every shell block in README.md and docs/**/*.md whose
fence follows a `<!-- runnable -->` line is executed here, command by command, in order (README
first, then the docs pages), in one fresh working directory holding the repository's configs/,
Makefile and envs, on the debug model. Each page's walkthrough starts from what it creates itself
(a page that uses runs/debug trains it first; run after the README's, that run resumes finished). A
command that needs an optional slow part (llama.cpp's 20-30 min build, vLLM's CPU environment) is
skipped with the reason when that part is not installed.

    .venv/bin/python -m pytest tests/test_docs_run.py -rs
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, REPO, env
from harness import extensions_dir

MARK = "<!-- runnable -->"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# What the working directory borrows from the repository: what the commands read (recipes, DeepSpeed
# JSON, test fixtures a recipe names) and the environments `make` would otherwise build again.
BORROWED = ("configs", "ds_configs", "tests", "Makefile", "pyproject.toml", ".venv", ".venv-compress", ".venv-vllm")


def _llama_cpp() -> bool:
    return subprocess.run([str(BIN / "python"), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def _vllm() -> bool:
    return (REPO / ".venv-vllm" / ".lmforge-vllm-setup").is_file()


# (what in a command needs the part, is it installed, why it is not built by `make test`)
OPTIONAL = (
    (re.compile(r"\bmake llama-cpp\b|--quant q4_k_m\b"), _llama_cpp,
     "needs llama.cpp (`make llama-cpp`: a 20-30 min compile, not part of `make test`)"),
    (re.compile(r"\bmake (vllm-env|test-serve)\b|\blmforge serve\b"), _vllm,
     "needs vLLM's CPU environment (`make vllm-env`: 3.4 GB, not part of `make test`)"),
)


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int       # of the command's first line in the doc
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def runnable_commands(doc: Path, text: str | None = None) -> list[Command]:
    """The commands of `doc`'s runnable blocks, in order: continuation lines joined, comment-only
    and blank lines dropped (a trailing comment stays: bash ignores it)."""
    lines = (doc.read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            j = i + 1
            if j >= len(lines) or not lines[j].startswith("```"):
                raise AssertionError(f"{doc}:{i + 1}: {MARK} must be followed by a fenced block")
            j += 1
            pending, start = "", 0
            while j < len(lines) and not lines[j].startswith("```"):
                line = lines[j]
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    j += 1
                    continue
                if not pending:
                    start = j + 1
                pending += line
                if line.rstrip().endswith("\\"):
                    pending = pending.rstrip()[:-1] + " "
                else:
                    out.append(Command(doc, start, pending.strip()))
                    pending = ""
                j += 1
            i = j
        i += 1
    return out


COMMANDS = [c for doc in DOCS for c in runnable_commands(doc)]


def test_the_docs_have_runnable_walkthroughs():
    """The marker is found (a renamed marker would otherwise leave nothing to run, silently): in the
    README's short tour (train, status, plan) and in the export/compress/prune/report walkthrough of
    docs/compression.md, each of which trains the run it then uses."""
    def commands(doc: str) -> list[str]:
        return [c.text for c in COMMANDS if c.doc == REPO / doc]

    readme = commands("README.md")
    assert readme and readme[0].startswith("lmforge train configs/debug.yaml"), readme
    assert any(c.startswith("lmforge status runs/debug") for c in readme), readme
    assert any(c.startswith("lmforge plan") for c in readme), readme
    walkthrough = commands("docs/compression.md")
    assert walkthrough and walkthrough[0].startswith("lmforge train configs/debug.yaml"), walkthrough
    assert any(c.startswith("lmforge export runs/debug") for c in walkthrough), walkthrough
    assert any(c.startswith("lmforge report") for c in walkthrough), walkthrough


def test_block_parsing_and_optional_parts():
    doc = """text
<!-- runnable -->
```bash
# a comment line
lmforge train configs/debug.yaml --nproc 2   # trailing comment
lmforge report a b \\
    --baseline c --gate 'ppl<=+5%'      # exit 1 if an artifact fails

make llama-cpp
```
```bash
not runnable
```
"""
    cmds = runnable_commands(REPO / "README.md", doc)
    assert [(c.line, c.text) for c in cmds] == [
        (5, "lmforge train configs/debug.yaml --nproc 2   # trailing comment"),
        (6, "lmforge report a b      --baseline c --gate 'ppl<=+5%'      # exit 1 if an artifact fails"),
        (9, "make llama-cpp")]
    assert _skip_reason("make llama-cpp") in (None, OPTIONAL[0][2])
    assert _skip_reason("lmforge train configs/debug.yaml") is None
    with pytest.raises(AssertionError, match="must be followed by a fenced block"):
        runnable_commands(REPO / "README.md", "<!-- runnable -->\ntext\n")


def _skip_reason(command: str) -> str | None:
    for pattern, installed, reason in OPTIONAL:
        if pattern.search(command) and not installed():
            return reason
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    for name in BORROWED:
        if (REPO / name).exists():
            (d / name).symlink_to(REPO / name)
    return d


@pytest.fixture(scope="module")
def failed() -> dict:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_runs_as_written(command: Command, workdir, failed, data_cache):
    if command.doc in failed:
        pytest.skip(f"an earlier command of {command.doc.name} failed: {failed[command.doc]}")
    reason = _skip_reason(command.text)
    if reason:
        print(f"{command.id}: skipped, {reason}: {command.text}")
        pytest.skip(f"{command.text.split('#')[0].strip()}: {reason}")
    # The session's data cache instead of ~/.cache/lmforge, but DeepSpeed's ops from the persistent cache
    # `make setup` built (under a fresh LMFORGE_CACHE the first rank would JIT-build them again: 25 s of
    # compiling on 2 cores); the venv first on PATH, as after activating it.
    e = {**env(), "LMFORGE_CACHE": str(data_cache), "TORCH_EXTENSIONS_DIR": extensions_dir(),
         "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=workdir, env=e, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        failed[command.doc] = command.id
        raise AssertionError(f"{command.id}: `{command.text}` exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    print(f"{command.id}: ok: {command.text}")
