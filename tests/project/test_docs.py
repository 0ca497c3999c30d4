"""The README and docs/: every relative link resolves, every `rrhf-lite` command shown parses.

Fast: reads markdown files and builds the argument parser; no model, no recipe is loaded.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

from rrhf_lite.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12 * 1024

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, [(language, lines) of each fenced block])."""
    prose, blocks, block, lang = [], [], None, ""
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if block is None:
                block, lang = [], line.strip()[3:].strip().lower()
            else:
                blocks.append((lang, block))
                block = None
            continue
        (prose if block is None else block).append(line)
    assert block is None, "an unclosed code fence"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links_in(text: str) -> list[str]:
    """The targets of the markdown links in text, leaving out inline code."""
    return LINK.findall(INLINE_CODE.sub("", text))


def links(path: Path) -> list[str]:
    """The targets of the markdown links in the page's prose (not in code blocks)."""
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    return links_in("\n".join(prose))


def link_problem(page: Path, target: str) -> str | None:
    """Why a link does not resolve, or None when it does (or is not relative)."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
        return None
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / unquote(file_part)).resolve() if file_part else page
    if not dest.exists():
        return f"{target}: no such file {dest}"
    if ROOT not in dest.parents and dest != ROOT:
        return f"{target}: outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading #{anchor} in {_rel(dest)}"
    return None


def commands(path: Path) -> list[str]:
    """Every `rrhf-lite ...` command line in the page's shell code blocks (continuations joined)."""
    _, blocks = _split_fences(path.read_text(encoding="utf-8"))
    found = []
    for lang, block in blocks:
        if lang not in SHELL_LANGS:
            continue
        joined, pending = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined.append(pending + line)
            pending = ""
        if pending:
            joined.append(pending)
        for line in joined:
            line = re.sub(r"^\s*\$\s+", "", line).strip()
            if line.startswith("rrhf-lite ") or line == "rrhf-lite" or "rrhf_lite.cli" in line:
                found.append(line)
    return found


def cli_argv(command: str) -> list[str] | None:
    """The arguments after `rrhf-lite` (or `-m rrhf_lite.cli`); None if the line runs neither."""
    tokens = shlex.split(command, comments=True)
    if tokens and tokens[0] == "rrhf-lite":
        return tokens[1:]
    if "rrhf_lite.cli" in tokens:
        return tokens[tokens.index("rrhf_lite.cli") + 1:]
    return None


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about argv, or None when it parses (`--help` parses if it exits 0)."""
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0 and ("-h" in argv or "--help" in argv):
            return None
        return stderr.getvalue().strip() or f"exit {exit_.code}"
    return None


def command_problem(command: str) -> str | None:
    argv = cli_argv(command)
    if argv is None:
        return f"{command!r}: not an rrhf-lite command line"
    error = parse_error(argv)
    if error:
        return f"{command!r}: {error}"
    missing = [a for a in argv if re.match(r"(recipes|benchmarks|notebooks)/", a)
               and not (ROOT / a).exists()]
    return f"{command!r}: no such file {missing}" if missing else None


# ---------------------------------------------------------------------------- the checks


def test_there_are_pages_links_and_commands():
    assert DOCS, "docs/ holds no pages"
    assert any(links(p) for p in PAGES)
    assert any(commands(p) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page):
    problems = [p for t in links(page) if (p := link_problem(page, t))]
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_shown_parses(page):
    problems = [p for c in commands(page) if (p := command_problem(c))]
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/"


def test_every_docs_page_is_in_the_readme_index():
    prose, _ = _split_fences(README.read_text(encoding="utf-8"))
    index = "\n".join(prose).split("## Documentation", 1)
    assert len(index) == 2, "the README has no '## Documentation' section"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links_in(index[1])}
    unlinked = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"not in the README's documentation index: {unlinked}"


# ---------------------------------------------------------------------------- the checks can fail


def test_the_helpers_reject_what_they_should():
    assert command_problem("rrhf-lite nosuchcommand") is not None
    assert command_problem("rrhf-lite run") is not None  # the recipe is required
    assert command_problem("rrhf-lite merge --base B --out O") is not None  # --adapter missing
    assert command_problem("rrhf-lite generate --model M --top-p 2") is not None
    assert command_problem("rrhf-lite run recipes/no_such_recipe.yaml") is not None
    assert command_problem("rrhf-lite run RECIPE.yaml --set a=1  # a comment") is None
    assert command_problem("torchrun --nproc_per_node 2 -m rrhf_lite.cli run RECIPE.yaml") is None
    assert command_problem("python -m rrhf_lite.cli plan --help") is None
    assert link_problem(README, "docs/no_such_page.md") is not None
    assert link_problem(README, "docs/errors.md#no-such-heading") is not None
    assert link_problem(README, "docs/errors.md#troubleshooting") is None
    assert link_problem(README, "https://example.org/anything") is None


def test_the_helpers_read_markdown_as_github_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Will it fit? (`rrhf-lite plan`)\n\n## Notes\n\n## Notes\n\n"
        "See [here](#will-it-fit-rrhf-lite-plan) and `[not](a-link.md)`.\n\n"
        "```bash\nrrhf-lite validate R.yaml \\\n    --plan   # size\npip install x\n```\n\n"
        "```python\nrrhf-lite = 1\n```\n",
        encoding="utf-8",
    )
    assert anchors(page) == {"will-it-fit-rrhf-lite-plan", "notes", "notes-1"}
    assert links(page) == ["#will-it-fit-rrhf-lite-plan"]
    assert commands(page) == ["rrhf-lite validate R.yaml      --plan   # size"]
    assert slug("Each prompt once for its k candidates (`train.share_prompt`)") == (
        "each-prompt-once-for-its-k-candidates-trainshare_prompt")
    assert slug("4-bit on a CPU: bitsandbytes' two paths") == "4-bit-on-a-cpu-bitsandbytes-two-paths"


def test_the_recipe_key_table_lists_every_key_of_every_section():
    """docs/recipes.md's table of recipe keys is what a reader scans for a key's name: a key
    added to the schema without a row there (it happened to four) fails here."""
    from rrhf_lite.config.ablations import AblationSection
    from rrhf_lite.config.recipe import Recipe

    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| ?(.*?) ?\|$", text, re.M))
    for name, field in Recipe.model_fields.items():
        assert name in rows, f"docs/recipes.md: no row for the recipe key {name}"
        section = AblationSection if name == "ablations" else field.annotation
        keys = list(getattr(section, "model_fields", {}))
        assert re.findall(r"`(\w+)`", rows[name]) == keys, f"docs/recipes.md: the keys of {name}"
