"""The code in the docs runs: every ```python block of docs/*.md, with its printed output.

A block that starts with an import starts a sample; the blocks after it that do not
continue it in the same namespace (a page may explain a sample in steps). Each sample is
one test, run in a fresh working directory. A block followed by a line ``prints`` and
then a ```text block must print exactly that text. A ```py block is a fragment (a line
or two out of a larger program): highlighted, not run. A sample that imports torch is marked
``torch``; one that trains with the Hugging Face Trainer or Lightning is also ``slow``.
A real output shown under a ``<!-- sample: NAME -->`` marker must be README.md's sample
of that name, which tests/test_readme_samples.py regenerates from a real run.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = DOCS.parent / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
FRAMEWORKS = ("transformers", "lightning")
HOW_TO_FIX = (
    "{where}: every ```python block in docs/ runs as a test (a block starting with an import "
    "starts a sample, the blocks after it continue it); make it run, or fence a fragment "
    "(lines out of a larger program) as ```py, which is highlighted but not run"
)


@dataclass(frozen=True)
class Block:
    code: str
    line: int  # of the opening fence, for the failure message
    prints: str | None  # the expected output, when the page gives it


def blocks(page: Path) -> list[Block]:
    """The page's python blocks, each with the output the page says it prints."""
    text = page.read_text()
    fences = list(FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        prints = None
        following = fences[index + 1] if index + 1 < len(fences) else None
        between = text[fence.end() : following.start()].strip() if following else ""
        if following is not None and following.group(1) == "text" and between == "prints":
            prints = following.group(2)
        found.append(Block(fence.group(2), text.count("\n", 0, fence.start()) + 1, prints))
    return found


def starts_a_sample(block: Block) -> bool:
    """True when the block's first line of code is an import."""
    code = [line for line in block.code.splitlines() if line.strip() and line[0] != "#"]
    return bool(code) and code[0].startswith(("import ", "from "))


def sample_params() -> list[object]:
    """One test per sample, named by page and line, marked by what its code imports."""
    params: list[object] = []
    for page in sorted(DOCS.glob("*.md")):
        sample: list[Block] = []
        for block in [*blocks(page), None]:
            if sample and (block is None or starts_a_sample(block)):
                code = "\n".join(b.code for b in sample)
                marks = []
                if re.search(r"^(import|from) (torch|gradwatch\.integrations)", code, re.M):
                    marks.append(pytest.mark.torch)
                if any(re.search(rf"^(import|from) {f}\b", code, re.M) for f in FRAMEWORKS):
                    marks.append(pytest.mark.slow)
                name = f"{page.name}:{sample[0].line}"
                params.append(pytest.param(page.name, sample, marks=marks, id=name))
                sample = []
            if block is not None:
                sample.append(block)
    return params


README_SAMPLE = re.compile(
    r"^<!-- sample: (?P<name>[\w-]+) -->\n```\w*\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL
)


def test_docs_copies_of_readme_samples_match_the_readme() -> None:
    """A real output the docs show under a README sample marker is the README's, kept true there."""
    readme = {m["name"]: m["body"] for m in README_SAMPLE.finditer(README.read_text())}
    copies = [
        (page.name, match["name"], match["body"])
        for page in sorted(DOCS.glob("*.md"))
        for match in README_SAMPLE.finditer(page.read_text())
    ]
    assert copies, "no docs page shows a README sample"
    for page, name, body in copies:
        assert body == readme.get(name), f"docs/{page}: sample {name!r} differs from README.md's"


def test_the_docs_have_code_to_run() -> None:
    """The docs hold python samples for this test to run (so the test cannot pass vacuously)."""
    assert len(sample_params()) >= 6


@pytest.mark.parametrize(("page", "sample"), sample_params())
def test_sample_runs_and_prints_what_the_page_says(
    page: str, sample: list[Block], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each block of the sample runs, and prints the text block the page shows after it."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_sample"}
    for block in sample:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
        except Exception as error:
            error.add_note(HOW_TO_FIX.format(where=f"docs/{page}:{block.line}"))
            raise
        if block.prints is not None:
            assert out.getvalue() == block.prints, f"{page}:{block.line}"
