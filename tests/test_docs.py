"""What README.md and docs/ promise a reader: a short README that opens with the two commands, links that lead
somewhere, every command it names answering --help, and no word of how the project was made."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
HISTORY = re.compile(
    r"this session|last session|earlier session|session's run|\bissue [0-9]+|\bengineers?\b|until issue", re.I
)
DATE = re.compile(r"\b20[0-9]{2}-[01][0-9]-[0-3][0-9]\b")  # a dated measurement
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_short_and_opens_with_make_run_and_make_test():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first = README.read_text().split("```")[1].split()  # the first code block, before any section
    assert first == ["make", "run", "make", "test"], first
    assert README.read_text().index("```") < README.read_text().index("\n## ")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_command_the_readme_names_answers_help():
    modules = sorted(set(re.findall(r"python -m hotdog_torch\.(\w+)", README.read_text())))
    assert {"train", "evaluate", "predict", "serve", "export", "lr_find", "tune", "search", "lessons"} <= set(modules)
    # one process for all: each command's main(["--help"]) must print its usage and exit 0
    script = (
        "import contextlib, importlib, io, sys\n"
        "for name in sys.argv[1:]:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            importlib.import_module('hotdog_torch.' + name).main(['--help'])\n"
        "        code = 0\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    except Exception as e:\n"
        "        code = repr(e)\n"
        "    print(name, code, 'usage:' in out.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *modules], cwd=REPO, capture_output=True, text=True)
    answers = {line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines() if line.strip()}
    wrong = {m: answers.get(m, done.stderr[-500:]) for m in modules if answers.get(m) != "0 True"}
    assert not wrong, f"commands README.md names that do not answer --help: {wrong}"


def test_no_word_of_how_the_project_was_made():
    files = PAGES + sorted((REPO / "hotdog_torch").rglob("*.py"))
    said = [
        f"{f.relative_to(REPO)}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if HISTORY.search(line) or (f.suffix == ".md" and DATE.search(line))
    ]
    assert not said, "\n".join(said)
