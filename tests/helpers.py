"""Shared by the test modules, which import it by name (``from helpers import ...``): the
wall-clock slack, raw WebSocket and HTTP helpers, the test tokenizer and the client drivers.
The fixtures are conftest.py's; what the tests share with the tools (raw sockets, server
subprocesses, OpenEnv's venvs) is support.py's.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

import chatenv
import support
from chatenv import AsyncChatEnv, ChatEnv, ChatEnvironment, Session, handle_frame

HERE = Path(__file__).resolve().parents[1]  # the repository's root
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
    """A raw client frame (support.frame) whose mask never touches the global random."""
    return support.frame(payload, opcode, fin, rsv, mask, rng=_MASKS)


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
    """support.wait_until with the tighter defaults of a test."""
    return support.wait_until(predicate, timeout, interval)


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


# ------------------------------------------------------------------------------
# Servers and clients: a server in this process, both clients behind one interface
# ------------------------------------------------------------------------------


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
