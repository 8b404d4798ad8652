"""Write docs/flags.md from `chatenv serve`'s own parser: every flag, its variables, what it does.

    python tools/flags_doc.py > docs/flags.md

A test (tests/test_chatenv.py) keeps the page equal to what this prints, so a flag added
to the parser fails the suite until the page is written again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chatenv  # noqa: E402

_HEAD = """# Flags and variables

`chatenv serve --help` says the same; this page is written from its parser by
`python tools/flags_doc.py > docs/flags.md`, and a test keeps the two equal.

Each flag falls back to the variable(s) in brackets, the first one set winning, so
an image or an ASGI launcher configures chatenv without flags (`python -m uvicorn
chatenv:app` reads the same variables). OpenEnv's own `TOKENIZER_NAME` and
`SYSTEM_PROMPT` are honoured. Sizes and timeouts take 0 to lift a limit or turn a
timeout off, never a negative value. A bad flag or variable, a missing tokenizer, a
bad hook or task file, or a port in use stops the server before it starts, with exit
status 2 and one line:

    chatenv: error: <flag or variable>: <what is wrong>, not '<value>'

| flag | what it does [variables] (default) |
| --- | --- |
"""


def flags_page() -> str:
    """The page's text, from the parser of `chatenv serve`."""
    parser = chatenv._parser()
    serve = next(action for action in parser._actions
                 if isinstance(action, argparse._SubParsersAction)).choices["serve"]
    rows = []
    for action in serve._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = ", ".join(f"`{name}{'' if action.nargs == 0 else ' ' + (action.metavar or action.dest.upper())}`"
                         for name in action.option_strings)
        text = " ".join((action.help or "").split()).replace("|", "\\|")
        rows.append(f"| {flag} | {text} |")
    return _HEAD + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(flags_page())
