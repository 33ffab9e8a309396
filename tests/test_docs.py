"""Every example in README.md and docs/*.md runs, and prints what the page says it prints.

The conventions a page follows (docs/design.md, "Writing docs", says the same for authors):

- Every ```python block runs, in page order, in one namespace per page, on CPU, from the
  repository root, with torch seeded 0 at the start of the page.
- A ```text output block right after a ```python block is what that block prints. It must
  match, line for line (trailing spaces ignored); `...` stands for any text, as in doctest.
- A block fenced ```python no-run is not run. Only for what cannot run on CPU (a multi-GPU
  launch): the fence says why (```python no-run: needs two GPUs), or the block's first line is a
  comment that does. There are at most MAX_NO_RUN of them over all pages.
- Measured figures are never retyped: a page quotes them between
  `<!-- generated: EXPRESSION -->` and `<!-- /generated -->`, and the text in between must be
  what the Python expression gives (evaluated from the repository root with `padfree` imported),
  e.g. `padfree.benchmark.report.markdown("bench/results/....json")` for a committed result.

Pages are found when the tests are collected, so a page added under docs/ is tested with no
change here. Docstring examples (`>>>`) of every padfree module are run by doctest as well.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import io
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import padfree
import padfree.benchmark.report

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NO_RUN = 6
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
GENERATED = re.compile(r"<!-- generated: (.+?) -->\n(.*?)\n?<!-- /generated -->", re.DOTALL)
_CHECKER = doctest.OutputChecker()


@dataclass
class Block:
    language: str
    info: str       # the fence's words after the language: "output", "no-run: why", ...
    line: int       # 1-based line of the opening fence
    code: str
    output: Block | None = None  # the ```text output block that follows a python block

    @property
    def runs(self) -> bool:
        return self.language == "python" and not self.info.startswith("no-run")


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, each python block paired with the output block after it."""
    found: list[Block] = []
    lines = text.splitlines()
    index = previous_end = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"line {index + 1}: code fence never closed")
        block = Block(match[1], match[2].strip(), index + 1, "\n".join(lines[index + 1:end]) + "\n")
        previous = found[-1] if found else None
        between = lines[previous_end + 1:index] if previous else []
        if (block.language == "text" and block.info == "output" and previous is not None
                and previous.language == "python" and previous.output is None
                and not any(line.strip() for line in between)):
            previous.output = block
        else:
            found.append(block)
        previous_end = end
        index = end + 1
    return found


def output_matches(expected: str, printed: str) -> bool:
    """`printed` is `expected` line for line, trailing spaces aside; `...` matches any text."""
    def tidy(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"

    return _CHECKER.check_output(tidy(expected), tidy(printed), doctest.ELLIPSIS)


def run_page(path: Path) -> int:
    """Run a page's python blocks and check their printed output; the number of blocks run."""
    text = path.read_text()
    namespace = {"__name__": f"docs_{path.stem}"}
    torch.manual_seed(0)
    ran = 0
    for block in blocks(text):
        if block.language == "text" and block.info == "output":
            raise AssertionError(f"{path.name}:{block.line}: a ```text output block must follow a ```python block "
                                 f"directly (only blank lines between)")
        if not block.runs:
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block.code, f"{path.name}:{block.line}", "exec"), namespace)
        ran += 1
        if block.output is not None and not output_matches(block.output.code, printed.getvalue()):
            raise AssertionError(f"{path.name}:{block.line}: the block printed\n{printed.getvalue()}\n"
                                 f"but the page shows (line {block.output.line})\n{block.output.code}")
    return ran


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("path", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_page_examples_run_and_print_what_the_page_shows(path, at_root):
    run_page(path)


@pytest.mark.parametrize("path", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_generated_sections_are_what_their_expression_gives(path, at_root):
    for expression, shown in GENERATED.findall(path.read_text()):
        value = eval(expression, {"padfree": padfree})
        assert shown.strip() == str(value).strip(), (
            f"{path.name}: the section generated by {expression} is out of date; it should read\n{value}")


def test_no_run_blocks_are_few_and_say_why():
    skipped = [(path.name, block) for path in PAGES for block in blocks(path.read_text())
               if block.language == "python" and not block.runs]
    assert len(skipped) <= MAX_NO_RUN, [f"{name}:{block.line}" for name, block in skipped]
    for name, block in skipped:
        reason = block.info.removeprefix("no-run").strip(" :")
        first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
        assert reason or first.startswith("#"), f"{name}:{block.line}: say why this block cannot run on CPU"


def test_the_readme_and_the_design_page_exist_and_the_readme_stays_short():
    assert (ROOT / "docs" / "design.md").exists()
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


def test_a_page_whose_output_differs_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\nprint(x + 1)\n```\n\n```text output\n3\n```\n\n"
                    "```python no-run: never runs\nraise SystemExit\n```\n\n"
                    "```python\nprint([x] * 3, 'and more')\n```\n```text output\n[2, 2, 2] ...\n```\n")
    assert run_page(page) == 2
    page.write_text("```python\nprint(1 + 1)\n```\n```text output\n3\n```\n")
    with pytest.raises(AssertionError, match="the block printed"):
        run_page(page)
    page.write_text("Text.\n\n```text output\n3\n```\n")
    with pytest.raises(AssertionError, match="must follow a ```python block"):
        run_page(page)


def _modules_with_examples() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(padfree.__path__, "padfree.")]
    return [name for name in names
            if ">>>" in (Path(importlib.util.find_spec(name).origin).read_text())]


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_packing_exports():
    import padfree.packing

    assert sorted(padfree.packing.__all__) == sorted(
        ["MultipackBatchSampler", "PackResult", "PaddingFreeCollator", "Piece", "count_loss_sequences",
         "count_loss_tokens", "pack_lengths", "packed_cross_entropy"])
    assert all(hasattr(padfree.packing, name) for name in padfree.packing.__all__)
