"""The front door: the README's examples run as written, against servers started with the
README's own commands, and print what the README says; the reference pages stay true to
the code (flags, links, the floor plan)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HERE
from support import ServerProcess

README = HERE / "README.md"
_PRINTED = re.compile(r"print\(.*\)\s+#\s(.*)$")  # a print line, and what its comment says it prints


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _expected_output(code: str) -> list[str]:
    return [match.group(1).rstrip() for line in code.splitlines() if (match := _PRINTED.search(line))]


def _run_example(code: str, url: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8000", url)],
                         capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_readme_fits_two_minutes_and_its_examples_are_the_files_in_examples():
    """At most 150 lines; every Python block is an examples/ file, word for word, and names it."""
    text = README.read_text()
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    blocks = _readme_blocks("python")
    files = {path.name: path.read_text() for path in (HERE / "examples").glob("*.py")}
    assert len(blocks) == len(files) == 3, (len(blocks), sorted(files))
    for block in blocks:
        name = next((name for name, source in files.items() if source == block), None)
        assert name is not None, f"a README example that no examples/ file holds:\n{block}"
        assert f"(examples/{name})" in text  # the README links the file it shows
        assert _expected_output(block), f"examples/{name} shows nothing it prints"


@pytest.mark.parametrize("name", ["client.py", "client_async.py"])
def test_client_examples_print_what_the_readme_shows(name, tmp_path):
    """The set-up command's server (`chatenv serve`, embedded tokenizer); each print as commented."""
    command = shlex.split(_readme_blocks("sh")[0].split("&&")[-1])
    assert command == ["chatenv", "serve"], command
    code = (HERE / "examples" / name).read_text()
    with ServerProcess(tmp_path, "readme-client", cli=[*command[2:], "--port", "0"]) as server:
        assert _run_example(code, server.url) == _expected_output(code)


def test_rewards_and_tasks_example_prints_the_mean_reward_the_readme_shows(tmp_path):
    """The section's command serves the shipped task file; the rollout loop prints what it says."""
    section = README.read_text().split("\n## Rewards and tasks\n", 1)[1].split("\n## ", 1)[0]
    command = shlex.split(re.search(r"```\n(chatenv serve [^\n]*)\n```", section).group(1))
    code = (HERE / "examples" / "rewards_and_tasks.py").read_text()
    assert code in section
    with ServerProcess(tmp_path, "rewards-example", cli=[*command[2:], "--port", "0"]) as server:
        assert _run_example(code, server.url) == _expected_output(code) == ["mean reward 0.375"]


def test_flags_page_is_what_the_parser_says():
    """docs/flags.md is tools/flags_doc.py's output: a flag added to the parser fails here
    until the page is written again (`python tools/flags_doc.py > docs/flags.md`)."""
    import flags_doc

    assert (HERE / "docs" / "flags.md").read_text() == flags_doc.flags_page()


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [README, *(HERE / "docs").glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(HERE)} links {target}, which is not there"


def test_the_root_holds_the_module_and_the_project_files_only():
    """The floor plan: the one file users vendor, beside the project's own files."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=HERE)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    top = {Path(name).parts[0] for name in tracked.stdout.splitlines()}
    assert top == {"chatenv.py", "pyproject.toml", "README.md", "Dockerfile", "openenv.yaml", ".dockerignore",
                   ".gitignore", ".ci", "deploy", "docs", "examples", "tests", "tools"}, top
