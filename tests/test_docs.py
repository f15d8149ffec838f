"""Every Python block of the README and of docs/*.md runs as written (in a fresh folder, with a fresh namespace).

A block that needs what a machine may not have is marked by an HTML comment on the line above its fence,
``<!-- docs-test: needs cuda -->`` (or ``needs slow``, ``needs <module>``), and is skipped, with that reason,
where it is missing. A block that defines ``test_*`` functions has them called; passes it registers are removed.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

import fxreparam

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: needs (?P<needs>[\w ,.-]+) -->\n)?(?P<indent>[ \t]*)```python\n(?P<code>.*?)"
                   r"^(?P=indent)```", re.S | re.M)
LINKED = re.compile(r"\]\((?!https?:|#)(?P<target>[^)#\s]+)(?:#(?P<anchor>[\w-]+))?\)")


def python_blocks(path: Path) -> list[tuple[str, str, list[str]]]:
    """The Python blocks of a Markdown file: (file:line id, dedented code, what each needs)."""
    text = path.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        needs = [n.strip() for n in (match["needs"] or "").split(",") if n.strip()]
        blocks.append((f"{path.relative_to(ROOT)}:{line}", textwrap.dedent(match["code"]), needs))
    return blocks


BLOCKS = [block for path in DOCS for block in python_blocks(path)]


def _missing(need: str) -> str | None:
    """Why a requirement of a block is not met here, or None."""
    if need == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if need == "slow":
        return None  # marked slow instead: runs with -m slow
    return None if importlib.util.find_spec(need) else f"needs {need} (not importable here)"


def _params() -> list:
    """One pytest param per block, marked slow or skipped (with the reason) as its needs say."""
    params = []
    for name, code, needs in BLOCKS:
        marks = [pytest.mark.slow] if "slow" in needs else []
        reasons = [why for why in map(_missing, needs) if why]
        if reasons:
            marks.append(pytest.mark.skip(reason=f"{name}: {'; '.join(reasons)}"))
        params.append(pytest.param(code, id=name, marks=marks))
    return params


def test_the_docs_have_python_blocks_and_the_marker_is_read():
    """The collector sees the blocks (the README's example, the pass example) and reads a ``needs`` marker."""
    names = [name for name, _, _ in BLOCKS]
    assert any(n.startswith("README.md") for n in names) and any(n.startswith("docs/passes.md") for n in names)
    sample = "<!-- docs-test: needs cuda, slow -->\n  ```python\n  x = 1\n  ```\n"
    assert BLOCK.search(sample)["needs"] == "cuda, slow" and textwrap.dedent(BLOCK.search(sample)["code"]) == "x = 1\n"


@pytest.mark.parametrize("code", _params())
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    before = {p.name for p in fxreparam.list_passes()}
    namespace: dict = {"__name__": "docs_block"}
    try:
        exec(compile(code, "docs block", "exec"), namespace)
        for name, value in list(namespace.items()):
            if name.startswith("test_") and callable(value):
                value()
    finally:
        for p in fxreparam.list_passes():
            if p.name not in before:
                fxreparam.unregister_pass(p.name)


def test_writing_a_pass_example_registers_where_it_says():
    """The pass example of docs/passes.md lands right after conv_bn, as its ``after=`` asks."""
    (code,) = [code for name, code, _ in BLOCKS if name.startswith("docs/passes.md") and "register_pass" in code]
    namespace: dict = {}
    try:
        exec(compile(code, "docs/passes.md", "exec"), namespace)
        names = [p.name for p in fxreparam.list_passes()]
        assert names.index("neg_conv") == names.index("conv_bn") + 1
    finally:
        fxreparam.unregister_pass("neg_conv")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_and_anchors_resolve(path):
    """Every relative link of the README and docs points at a file that exists, and at an anchor it has
    ("REPARAM §N" once cited a file that did not exist; the identities page cited a missing seeds/ folder)."""
    text = path.read_text()
    assert "REPARAM §" not in text and "seeds/" not in text
    for match in LINKED.finditer(text):
        target = (path.parent / match["target"]).resolve()
        assert target.exists(), f"{path.name}: {match[0]} points at nothing"
        if match["anchor"] and target.suffix == ".md":
            assert f'<a id="{match["anchor"]}"></a>' in target.read_text(), f"{path.name}: {match[0]}: no anchor"
