"""The docs site (mkdocs.yml, docs/): the generated references are current, every config key and
command is in them with a description, the site builds with `mkdocs build --strict` (a broken link,
a missing anchor or a page left out of the nav fails), and README.md stays a one-or-two-screen
front page. Seconds, so `make test-fast` runs it too.

    python docs/gen_reference.py      # after changing training/config.py or the CLI
    mkdocs serve                      # preview the site on 127.0.0.1:8000
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from pydantic import BaseModel

from conftest import REPO

README_MAX_LINES = 150


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_are_current(gen):
    for path, text in gen.outputs().items():
        rel = path.relative_to(REPO)
        assert path.is_file(), f"{rel} is missing: run `python docs/gen_reference.py`"
        assert path.read_text() == text, f"{rel} is stale: run `python docs/gen_reference.py`"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, key + ".")


def test_every_config_key_is_documented_once_on_its_field(gen):
    """The config reference lists every key (checkpoint.async under its alias) and data.mixture's entry
    keys, and each one's description is the `description=` on its field: none is missing."""
    from lmforge.training.config import Config, MixtureSource, _all_keys

    undescribed = [k for k, f in [*_fields(Config), *_fields(MixtureSource, "data.mixture[].")] if not f.description]
    assert not undescribed, f"fields without description= in training/config.py: {undescribed}"
    page = gen.config_reference()
    documented = gen.documented_keys(page)
    expected = set(_all_keys(Config)) | {f"data.mixture[].{k}" for k in _all_keys(MixtureSource)}
    assert "checkpoint.async" in documented and "checkpoint.async_" not in documented
    assert sorted(expected - documented) == [], "keys missing from docs/reference/config.md"
    assert sorted(documented - expected) == [], "docs/reference/config.md lists keys the schema does not have"
    assert Config.model_fields["train"].description in page.replace("\\", "")


def test_every_command_is_in_the_cli_reference(gen):
    from lmforge.launcher.cli import build_parser

    page = gen.cli_reference()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f"\n## {name}\n" in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in page, f"lmforge {name} {flag}"


def test_mkdocs_build_strict(tmp_path):
    """Broken links, missing anchors, pages outside the nav, a snippet (BENCHMARKS.md) that is not there:
    each is a warning, and --strict makes it an error."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "Checkpoints off the critical path" in bench  # BENCHMARKS.md itself, included
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_readme_fits_on_a_screen_or_two():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the detail into a page under docs/ and link it")
