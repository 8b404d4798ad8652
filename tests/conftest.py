"""The suite's fixtures and hooks; the helpers they use are helpers.py's, which the test
modules import by name. pytest finds this file in tests/ (pyproject's testpaths), and
pyproject's pythonpath puts the repository's root and tests/ on sys.path."""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path

import pytest

import support
from chatenv import serve_in_thread
from helpers import CHAT_TEMPLATE, CLIENTS, build_hf_tokenizer


# The fast tier, `python -m pytest -m fast`: test_chatenv.py, pure and in-process (about half a minute)
_FAST_FILES = {"test_chatenv.py"}


def pytest_itemcollected(item):
    if item.path.name in _FAST_FILES:
        item.add_marker(pytest.mark.fast)


# ------------------------------------------------------------------------------
# The test tokenizer: a real Hugging Face tokenizer, made offline as the run starts
# ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _hf_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """The test tokenizer's two folders, made once a run: without and with a chat template."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("tokenizers")
    return {"plain": build_hf_tokenizer(root / "wordpiece"),
            "chat": build_hf_tokenizer(root / "wordpiece-chat", CHAT_TEMPLATE)}


@pytest.fixture
def hf_tokenizer(monkeypatch, _hf_tokenizers) -> Path:
    """A real tokenizer's folder without a chat template, the Hugging Face libraries forced offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return _hf_tokenizers["plain"]


@pytest.fixture
def hf_chat_tokenizer(hf_tokenizer, _hf_tokenizers) -> Path:
    """The same tokenizer's folder with CHAT_TEMPLATE in its tokenizer_config.json, offline."""
    return _hf_tokenizers["chat"]


# ------------------------------------------------------------------------------
# Servers and clients: a server in this process, both clients behind one interface
# ------------------------------------------------------------------------------


@pytest.fixture
def server():
    with serve_in_thread() as url:
        yield url


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request):
    """A factory for ChatEnv or AsyncChatEnv (the test runs once with each); closes them all."""
    made = []

    def make(url, **options):
        client = CLIENTS[request.param](url, **options)
        made.append(client)
        return client

    make.kind = request.param
    yield make
    for client in made:
        client.close()


# ------------------------------------------------------------------------------
# OpenEnv's releases: their venvs built on first use, before the tests that need them
# ------------------------------------------------------------------------------

# The tests that run OpenEnv in its venvs: a file of them, and a fixture elsewhere
_OPENENV_FILES, _OPENENV_FIXTURES = {"test_openenv.py"}, {"openenv_pinging"}


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """Build each OpenEnv release's venv that is missing, when a collected test needs one.

    The first run takes a few minutes (pip installs both releases, in parallel); later
    runs find them ready. Where they go is printed (CHATENV_VENVS moves them). A build
    that fails is reported and left to the tests, which then fail saying what is missing.
    """
    if not any(item.path.name in _OPENENV_FILES or _OPENENV_FIXTURES & set(getattr(item, "fixturenames", ()))
               for item in items):
        return
    missing = [release for release in support.RELEASES if not support.venv_ready(release)]
    if not missing:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print

    def build(release):
        try:
            support.create_venv(release, log=lambda line: say(f"OpenEnv venvs: {line}"))
        except Exception as exc:  # no network, no pip: the tests that need it say so
            say(f"OpenEnv venvs: {release}: could not build {support.venv_dir(release)}: {exc}")

    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        say(f"OpenEnv venvs: building {', '.join(missing)} under {support.venv_dir(missing[0]).parent}"
            " (first run only: a few minutes)")
        with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:
            list(pool.map(build, missing))
