"""The documentation: the site builds (strict), the API reference covers the public names,
README's links into docs/ resolve and the guides' Python examples compile."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import adaptive_moe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
# The public packages whose ``__all__`` the reference documents name by name.
PUBLIC = ("adaptive_moe", "adaptive_moe.calc", "adaptive_moe.planning")

DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _resolve(identifier: str) -> object:
    """The object a ``::: a.b.c`` directive names: the longest importable module
    prefix, then attributes (``adaptive_moe.MoELayer`` goes through the lazy import)."""
    parts = identifier.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(identifier)


def _directives() -> list[str]:
    return [m for page in API_PAGES for m in DIRECTIVE.findall(page.read_text())]


def _public_names() -> list[tuple[str, str]]:
    names = []
    for package in PUBLIC:
        module = importlib.import_module(package)
        names += [(package, name) for name in module.__all__]
    return names


def test_every_directive_names_an_existing_object() -> None:
    directives = _directives()
    assert len(directives) > 20, f"too few ::: directives in {[p.name for p in API_PAGES]}"
    missing = []
    for identifier in directives:
        try:
            _resolve(identifier)
        except (AttributeError, ModuleNotFoundError) as err:
            missing.append(f"{identifier}: {err}")
    assert missing == [], "API pages name objects that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(("package", "name"), _public_names())
def test_public_name_is_in_the_api_reference(package: str, name: str) -> None:
    """A directive whose last part is the name and which resolves to the very object
    the package exports (not a namesake elsewhere)."""
    expected = getattr(importlib.import_module(package), name)
    found = [d for d in _directives() if d.rsplit(".", 1)[-1] == name]
    assert found, f"{package}.{name} is in __all__ but on no page of {DOCS / 'api'}"
    assert any(_resolve(d) is expected for d in found), (
        f"{package}.{name}: the directives {found} document another object"
    )


def test_readme_links_into_docs_resolve() -> None:
    links = [t for t in LINK.findall((ROOT / "README.md").read_text()) if t.startswith("docs/")]
    assert links, "README.md links to no page under docs/"
    broken = [t for t in links if not (ROOT / t.split("#", 1)[0]).is_file()]
    assert broken == [], f"README.md links to missing files: {broken}"


def _python_blocks() -> list[tuple[str, int, str]]:
    """(file, line, source) of every ```python block of the guides, the index and README."""
    pages = [*sorted((DOCS / "guides").glob("*.md")), DOCS / "index.md", ROOT / "README.md"]
    blocks = []
    for page in pages:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == "python":
                line = text.count("\n", 0, m.start()) + 2  # the block's first code line
                blocks.append((str(page.relative_to(ROOT)), line, m.group(2)))
    return blocks


def test_guides_have_python_examples() -> None:
    guides = {f for f, _, _ in _python_blocks() if f.startswith("docs/guides/")}
    assert len(guides) >= 3, f"Python examples in only {sorted(guides)}"


@pytest.mark.parametrize(
    ("page", "line", "source"), [pytest.param(*b, id=f"{b[0]}:{b[1]}") for b in _python_blocks()]
)
def test_python_block_compiles(page: str, line: int, source: str) -> None:
    # Leading newlines keep the reported line numbers those of the Markdown file.
    compile("\n" * (line - 1) + source, page, "exec")


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs / mkdocstrings-python not installed (pip install -e '.[docs]')",
)
def test_docs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The rendered reference holds a heading for every top-level public name.
    html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    absent = [n for n in adaptive_moe.__all__ if f'id="adaptive_moe.{n}"' not in html]
    assert absent == [], f"no heading in the built API reference for {absent}"
    for page in ("index.html", "guides/layer/index.html", "api/configs/index.html"):
        assert (site / page).is_file(), page
