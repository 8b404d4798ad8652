"""Shared by the test modules: the wall-clock slack, helpers, fixtures and the client drivers.

pytest loads this file first (it sits at the repo root), so the test modules import its
helpers by name, ``from conftest import ...``, and get this same module. What the tests
share with the soak and the benchmark (raw sockets, server subprocesses) lives in
support_chatenv instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

import chatenv
import support_chatenv
from chatenv import AsyncChatEnv, ChatEnv, ChatEnvironment, Session, handle_frame, serve_in_thread

HERE = Path(__file__).resolve().parent
# How much slack a wall-clock bound gets over the budget it checks: a shared 2-core machine
# runs the suite beside other work, so a bound is "within its configured time", never a speed
SLACK = 5
SHUTDOWN_S = 1.0 + 0.5  # the README's bound: a server exits within a second, plus the close handshake (<= 0.5 s)
# "At once", where no configured wait applies (an interpreter's exit, a call asked not to
# wait): work that waits on nothing, on a loaded 2-core machine; any configured wait it
# must beat is larger (a 0.6 s capacity wait, a 60 s message timeout, a 30 s stall)
AT_ONCE_S = 1.0
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_MASKS = random.Random(0)  # frame masks drawn inside hypothesis strategies: never the global random


# ------------------------------------------------------------------------------
# Wire helpers: raw frames, a raw websockets client, HTTP without a proxy
# ------------------------------------------------------------------------------


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """A raw client frame (support_chatenv.frame) whose mask never touches the global random."""
    return support_chatenv.frame(payload, opcode, fin, rsv, mask, rng=_MASKS)


def ws_text(message) -> bytes:
    return ws_frame(json.dumps(message).encode())


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/ws"


def raw(url: str, query: str = "", **kwargs):
    """A raw websockets client on a server's /ws: the server proven without chatenv's client."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("proxy", None)
    if chatenv._websockets_version() >= (17, 1):  # the legacy flag exists since 17.1
        kwargs.setdefault("legacy", True)
    return connect(ws_url(url) + (f"?{query}" if query else ""), **kwargs)


def ask(ws, message, timeout: float = 5):
    ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return json.loads(ws.recv(timeout=timeout))


def http_get(url: str, timeout: float = 5):
    """GET without any proxy; returns (status, JSON body, or text when not JSON)."""
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode()


def http_post(url: str, body, timeout: float = 5):
    """POST a JSON body (or raw bytes) without any proxy; returns (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return status, json.loads(payload or b"null")


def server_frame(payload: bytes | str, opcode: int = 1, fin: bool = True) -> bytes:
    """One unmasked frame, as a server sends it (RFC 6455 section 5.2)."""
    if isinstance(payload, str):
        payload = payload.encode()
    first, size = (0x80 if fin else 0) | opcode, len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """support_chatenv.wait_until with the tighter defaults of a test."""
    return support_chatenv.wait_until(predicate, timeout, interval)


def new_session(**env_options) -> Session:
    return Session(lambda history: ChatEnvironment(history=history, **env_options))


def reply(session: Session, message):
    frame = message if isinstance(message, (str, bytes)) else json.dumps(message)
    return handle_frame(session, frame).json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------
# Tokenizers: one without a chat template, and a real one made here, offline
# ------------------------------------------------------------------------------


class EncodeOnlyTokenizer:
    """A tokenizer without a chat template, like gpt2."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode()


# The chat template of the test tokenizer that has one: "role: content" a line, the
# same text the encode fallback tokenizes, so the two paths are easy to compare
CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
# The words the test tokenizer knows whole; any other word is spelled in pieces
_CORPUS = """Hello World! Hi there. Be brief. You are brief. You are terse. From OpenEnv.
user: hello world. system: be brief. assistant: hi there, goodbye.
The quick brown fox jumps over the lazy dog; a chat is a conversation of messages."""
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_hf_tokenizer(folder: Path, chat_template: str | None = None) -> Path:
    """A real Hugging Face tokenizer folder, made with ``tokenizers`` from _CORPUS, offline.

    BERT-like, as many real ones are: lower-cased, WordPiece (the corpus's words whole,
    any other word in one-character pieces), ``[CLS] ... [SEP]`` around an encoding, and
    a ``tokenizer.json`` that pads and cuts every encoding to 128 ids, as
    sentence-transformers' do. The vocabulary is derived, not trained: the trainers of
    ``tokenizers`` break ties in hash-map order, so their ids change from run to run;
    this one is the same byte for byte on every run. ``tokenizer_config.json`` names
    the special tokens for ``transformers``, and the chat template when one is given.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(_CORPUS))}
    printable = [chr(c) for c in range(33, 127)]
    pieces = [*_SPECIAL_TOKENS, *printable, *(f"##{c}" for c in printable), *sorted(words - set(printable))]
    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))  # already in the vocabulary: marks them special
    cls, sep = pieces.index("[CLS]"), pieces.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.enable_padding(pad_id=pieces.index("[PAD]"), pad_token="[PAD]", length=128)
    tokenizer.enable_truncation(128)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "unk_token": "[UNK]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


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


class SyncClient:
    """ChatEnv as the tests drive it (``pause`` is user code running between calls)."""

    kind = "sync"

    def __init__(self, *args, **kwargs) -> None:
        self.client = ChatEnv(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)

    def pause(self, seconds: float, busy: bool = False) -> None:
        if not busy:
            time.sleep(seconds)
            return
        deadline, spins = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:  # pure Python: holds the GIL but for the switch interval
            spins += 1

    def __enter__(self):
        self.client.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.client.close()


class AsyncClient:
    """AsyncChatEnv on one event loop for its life; each call runs to completion on it.
    ``pause`` awaits (an async client reads its socket only while its loop runs)."""

    kind = "async"

    def __init__(self, *args, **kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncChatEnv(*args, **kwargs)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @property
    def base_url(self):
        return self.client.base_url

    def reset(self, **kwargs):
        return self.run(self.client.reset(**kwargs))

    def step(self, action):
        return self.run(self.client.step(action))

    def state(self):
        return self.run(self.client.state())

    def close(self):
        if not self.loop.is_closed():
            try:
                self.run(self.client.close())
            finally:
                self.loop.close()

    def pause(self, seconds: float, busy: bool = False) -> None:
        assert not busy, "a busy loop blocks an async client's event loop: nothing can run"
        self.run(asyncio.sleep(seconds))

    def __enter__(self):
        self.run(self.client.__aenter__())
        return self

    def __exit__(self, *exc_info):
        self.close()


CLIENTS = {"sync": SyncClient, "async": AsyncClient}


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
    missing = [release for release in support_chatenv.RELEASES if not support_chatenv.venv_ready(release)]
    if not missing:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print

    def build(release):
        try:
            support_chatenv.create_venv(release, log=lambda line: say(f"OpenEnv venvs: {line}"))
        except Exception as exc:  # no network, no pip: the tests that need it say so
            say(f"OpenEnv venvs: {release}: could not build {support_chatenv.venv_dir(release)}: {exc}")

    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        say(f"OpenEnv venvs: building {', '.join(missing)} under {support_chatenv.venv_dir(missing[0]).parent}"
            " (first run only: a few minutes)")
        with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:
            list(pool.map(build, missing))
