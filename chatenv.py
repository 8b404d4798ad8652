"""chatenv: OpenEnv's chat environment as one module.

A chat environment for reinforcement learning with language models: an episode
is a conversation, each step appends one message given as token ids. chatenv
speaks OpenEnv's ``chat_env`` wire protocol (a JSON WebSocket at ``/ws``), so
OpenEnv clients work against a chatenv server and chatenv's client works against
an OpenEnv server, with no flag on either side. Its one runtime dependency is
``websockets``; it ships a byte-level tokenizer so it runs with nothing
downloaded.

    $ chatenv serve --port 8000            # or: python chatenv.py serve

    >>> from chatenv import ChatEnv, ChatAction
    >>> with ChatEnv("http://127.0.0.1:8000") as env:
    ...     env.reset()
    ...     result = env.step(ChatAction(tokens=[72, 105]))   # "Hi"
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imports: the standard library modules that `import dataclasses, json, logging` loads
# anyway are imported here; every other one (asyncio, socket, select, signal, uuid, ...)
# inside the function that needs it, so `import chatenv` costs little more than those
# three and a client that never serves never loads the server's modules. Optional
# third-party packages (transformers, tokenizers, uvloop, uvicorn) are only ever
# imported inside the function that was asked to use them.
import atexit
import collections
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

__all__ = [
    # Models
    "ChatAction",
    "ChatObservation",
    "ChatState",
    "StepResult",
    # Tokenizers
    "ByteTokenizer",
    "load_tokenizer",
    "tokens_to_list",
    "message_to_action",
    # Environment, its rewards and tasks
    "ChatEnvironment",
    "Tasks",
    "exact_match",
    "boxed_match",
    "format_match",
    "overlong_penalty",
    # Protocol: pure, frame in and reply out
    "Session",
    "Reply",
    "handle_frame",
    "http_reply",
    # ... its error codes: the server's, then those a client detects itself
    "INVALID_JSON",
    "UNKNOWN_TYPE",
    "VALIDATION_ERROR",
    "EXECUTION_ERROR",
    "CAPACITY_REACHED",
    "SESSION_ERROR",
    "PROTOCOL_ERROR",
    "DELTA_DESYNC",
    # ... and the reset key that asks a chatenv server for delta observations
    "DELTA_KEY",
    # Server
    "ChatServer",
    "serve",
    "serve_in_thread",
    "ServerURL",
    "ASGIApp",
    # Clients
    "ChatEnv",
    "AsyncChatEnv",
    "ChatEnvError",
    "EpisodeLostError",
    # Docker
    "DockerError",
    # Command line
    "main",
]

logger = logging.getLogger("chatenv")


# ------------------------------------------------------------------------------
# Models: the wire's dataclasses, each converting to and from its JSON dict
# ------------------------------------------------------------------------------

_MAX_NESTING = 32  # deepest token nesting accepted: [[..]] batches, never trees
_TOKEN_TYPES = frozenset((int,))  # the one type of a token id (bool is not one), as set(map(type, ids)) has it


def _preview(value: Any, limit: int = 64) -> str:
    """Return a bounded repr of client input, so errors never echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokens_to_list(value: Any, what: str = "tokens") -> list[int]:
    """Flatten token ids (list, tuple, nested, tensor-like, dict with input_ids) to ints.

    Strict where OpenEnv coerces: bools, floats, strings and negative numbers
    are rejected with a ValueError (TypeError for a wrong container type).
    """
    if type(value) is list and value and set(map(type, value)) == _TOKEN_TYPES and min(value) >= 0:
        return value[:]  # the common case (a tokenizer's ids), checked in C
    value = _unwrap_tokens(value)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a sequence of token ids, not {type(value).__name__}")
    flat: list[int] = []
    stack = [iter(value)]  # iterative, so deep nesting cannot overflow the stack
    while stack:
        for item in stack[-1]:
            if type(item) is not int and hasattr(item, "tolist"):
                item = item.tolist()  # a numpy/torch scalar or array inside a list
            if type(item) is int:  # not bool, which is an int subclass
                if item < 0:
                    raise ValueError(f"{what} must be non-negative, got {item}")
                flat.append(item)
            elif isinstance(item, (list, tuple)):
                if len(stack) >= _MAX_NESTING:
                    raise ValueError(f"{what} are nested deeper than {_MAX_NESTING} levels")
                stack.append(iter(item))
                break
            else:
                raise ValueError(f"{what} must be integers, got {type(item).__name__} {_preview(item)}")
        else:
            stack.pop()
    if not flat:
        raise ValueError(f"{what} must have at least 1 item (a token id)")
    return flat


def _unwrap_tokens(value: Any) -> Any:
    """Reduce tokenizer results (BatchEncoding, Encoding, tensors) to lists."""
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        if "input_ids" not in value:
            raise TypeError("a mapping of token ids must hold 'input_ids'")
        value = value["input_ids"]
    if hasattr(value, "ids") and not isinstance(value, (list, tuple)):
        value = value.ids  # tokenizers.Encoding
    if hasattr(value, "tolist"):
        value = value.tolist()  # torch, numpy
    return value


@dataclass
class ChatAction:
    """One message for the environment, as token ids."""

    tokens: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = tokens_to_list(self.tokens)
        if not isinstance(self.metadata, dict):
            raise TypeError("metadata must be a dict")

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatAction:
        return cls(tokens=data["tokens"], metadata=data.get("metadata") or {})


@dataclass
class ChatObservation:
    """The whole conversation so far: chat messages and their flattened tokens."""

    messages: list[dict[str, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    reward: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Not on the wire: the episode's task (its answer too) while an environment's hooks
    # run, so a reward function can read it; None on a client's observations
    task: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def _sharing(
        cls, messages: list[Any], tokens: list[int], done: bool, reward: float | None,
        metadata: dict[str, Any] | None = None,
    ) -> ChatObservation:
        """An observation of the current prefix of an episode's append-only lists.

        A client's observations share their episode's history and copy their own
        prefix on first read, so a step costs O(new), not O(history).
        """
        obs = cls.__new__(cls)
        obs.__dict__.update(
            done=done, reward=reward, metadata=metadata or {},
            _shared={"messages": (messages, len(messages)), "tokens": (tokens, len(tokens))},
        )
        return obs

    def __getattr__(self, name: str) -> Any:  # only for fields not read yet
        fields = self.__dict__
        shared = fields.get("_shared")
        if shared is None or name not in shared:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        source, length = shared[name]
        value = fields[name] = source() if length is None else source[:length]  # None: a history's reader
        if "messages" in fields and "tokens" in fields:
            del fields["_shared"]  # both read: the episode's lists are no longer needed
        return value

    @classmethod
    def _of_history(cls, history: Any, metadata: dict[str, Any], task: dict[str, Any] | None,
                    reply: str | None = None) -> ChatObservation:
        """What an environment's hooks see: its history's messages and tokens, read only if asked.

        ``reply``: the step's assistant message, the last one, which the built-in
        rewards read without parsing the history.
        """
        obs = cls.__new__(cls)
        if reply is not None:
            obs.__dict__["_reply"] = reply
        messages, tokens = history.message_count, history.token_count  # a snapshot: the episode goes on, and
        obs.__dict__.update(done=False, reward=None, metadata=metadata, task=task,  # a rubric may keep obs
                            _shared={"messages": (lambda: history.messages()[:messages], None),
                                     "tokens": (lambda: history.tokens()[:tokens], None)})
        return obs

    def __getstate__(self) -> dict[str, Any]:  # pickle and copy see plain fields
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The wire's ``data`` of an observation frame (OpenEnv sends no metadata)."""
        return {
            "observation": {"messages": self.messages, "tokens": self.tokens},
            "reward": self.reward,
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ChatObservation:
        obs = payload.get("observation") or {}
        tokens = obs.get("tokens", [])
        return cls(
            messages=list(obs.get("messages", [])),
            tokens=tokens if isinstance(tokens, list) else [],
            done=bool(payload.get("done", False)),
            reward=payload.get("reward"),
            metadata=dict(obs.get("metadata") or {}),
        )


@dataclass
class ChatState:
    """A session's episode: its id, steps taken, and per-message history."""

    episode_id: str | None = None
    step_count: int = 0
    history_messages: list[dict[str, str]] = field(default_factory=list)
    history_tokens: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ChatState:
        return cls(
            episode_id=payload.get("episode_id"),
            step_count=payload.get("step_count", 0) or 0,
            history_messages=list(payload.get("history_messages", [])),
            history_tokens=[
                t if isinstance(t, list) else [] for t in payload.get("history_tokens", [])
            ],
        )


@dataclass
class StepResult:
    """What reset() and step() return: the observation, with reward and done beside it."""

    observation: ChatObservation
    reward: float | None = None
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.observation.to_dict()

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> StepResult:
        observation = ChatObservation.from_dict(payload)
        return cls(observation, observation.reward, observation.done)



# The models' JSON schemas, as GET /schema serves them (OpenEnv's validator reads them)
_ACTION_SCHEMA = {  # title and description: verifiers pastes the schema into a model's prompt, as OpenEnv's are
    "title": "ChatAction",
    "description": "One message for the chat environment, as token ids: it decodes them with its tokenizer "
                   "and appends the text to the conversation as the assistant's message.",
    "type": "object",
    "properties": {
        "tokens": {"title": "Tokens", "description": "The message's token ids (at least one)",
                   "type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "metadata": {"title": "Metadata", "description": "Anything the client attaches; not scored",
                     "type": "object"},
    },
    "required": ["tokens"],
    "additionalProperties": False,
}
_MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
    "required": ["role", "content"],
}
_OBSERVATION_SCHEMA = {
    "title": "ChatObservation",
    "description": "The conversation so far, as chat messages (role, content) and the token ids of all of "
                   "them, with what the environment made of the last step: its reward, whether the episode "
                   "is done, and metadata.",
    "type": "object",
    "properties": {
        "messages": {"title": "Messages", "description": "Every message of the episode, oldest first",
                     "type": "array", "items": _MESSAGE_SCHEMA},
        "tokens": {"title": "Tokens", "description": "The token ids of every message, in order",
                   "type": "array", "items": {"type": "integer"}},
        "done": {"title": "Done", "description": "Whether the episode is over: a further step is refused "
                 "until a reset", "type": "boolean"},
        "reward": {"title": "Reward", "description": "The last step's reward from the server's rubric or "
                   "transform; null when none scores it", "type": ["number", "boolean", "null"]},
        "metadata": {"title": "Metadata", "description": "What the environment adds: the task picked at "
                     "reset ('task': split, index, id; never its answer), each rubric's own score "
                     "('rewards') and why the episode ended ('done_reason')", "type": "object"},
    },
}
_STATE_SCHEMA = {
    "type": "object",
    "properties": {
        "episode_id": {"type": ["string", "null"]},
        "step_count": {"type": "integer"},
        "history_messages": {"type": "array", "items": _MESSAGE_SCHEMA},
        "history_tokens": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    },
}

# ------------------------------------------------------------------------------
# Tokenizers: an embedded byte-level default, duck typing, optional HF loaders
# ------------------------------------------------------------------------------

if TYPE_CHECKING:  # for type checkers only: at run time a tokenizer is duck-typed
    from typing import Protocol

    class Tokenizer(Protocol):
        """What chatenv calls on a tokenizer (``_check_tokenizer`` checks it at run time):
        ``decode``, and ``apply_chat_template`` (preferred) or ``encode``. ByteTokenizer,
        Hugging Face's tokenizers and ``tokenizers.Tokenizer`` all qualify."""

        def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

        def encode(self, text: str) -> Any: ...


class ByteTokenizer:
    """The embedded default: UTF-8 bytes are ids 0-255, then a few special tokens.

    Its chat template is ChatML-like: ``<|im_start|>role\\ncontent<|im_end|>\\n``.
    """

    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    eos_token_id = 256
    im_start_id = 257
    im_end_id = 258
    vocab_size = 256 + len(special_tokens)
    name = "chatenv/bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = tokens_to_list(ids) if not isinstance(ids, list) else ids
        try:
            return bytes(ids).decode("utf-8", errors="replace")  # the common case, in C
        except ValueError:  # special tokens, or ids out of range: the slow path says which
            pass
        out = bytearray()
        for token in ids:
            if 0 <= token < 256:
                out.append(token)
            elif 256 <= token < self.vocab_size:
                if not skip_special_tokens:
                    out += self.special_tokens[token - 256].encode()
            else:
                raise ValueError(
                    f"token id {_preview(token)} is out of range for the embedded "
                    f"tokenizer (vocabulary size {self.vocab_size})"
                )
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        conversation: list[Mapping[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> list[int] | str:
        ids: list[int] = []
        for message in conversation:
            ids.append(self.im_start_id)
            ids += f"{message['role']}\n{message['content']}".encode("utf-8")
            ids.append(self.im_end_id)
            ids.append(10)
        if add_generation_prompt:
            ids.append(self.im_start_id)
            ids += b"assistant\n"
        return ids if tokenize else self.decode(ids)


_DEFAULT_TOKENIZER_NAMES = {"", "default", "embedded", "bytes", ByteTokenizer.name}


def load_tokenizer(spec: Any = None) -> Tokenizer:
    """Return a tokenizer: the embedded default, a tokenizer object, or one loaded by name.

    ``spec`` is None or "default" (embedded), a path to a ``tokenizer.json``
    (via ``tokenizers``), or a local directory or model name (via
    ``transformers.AutoTokenizer``). Those libraries are imported only here. A model
    name is looked for in the local Hugging Face cache first; only when it is not
    there, and the Hub answers within _HUB_PROBE_S, is it downloaded. Each error
    raised has a ``reason``: what is wrong, without the spec (``chatenv serve`` adds it).
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in _DEFAULT_TOKENIZER_NAMES):
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        _check_tokenizer(spec)
        return spec
    path = os.fspath(spec)
    if path.endswith(".json") or os.path.isfile(path):
        return _load_tokenizer_json(path)
    if _is_path(path) and not os.path.exists(path):  # else transformers reports a bad model name
        raise _load_error(FileNotFoundError, f"tokenizer path not found: {path}", "no such file or directory")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FOLDER_FILES):
        missing = " or ".join(_TOKENIZER_FOLDER_FILES)
        raise _load_error(ValueError, f"{path} is not a tokenizer folder: it has no {missing}",
                          f"not a tokenizer folder (no {missing} in it)")
    needs = _load_error(ImportError, f"loading tokenizer {path!r} needs the 'transformers' package: pip install "
                        "transformers", "needs the 'transformers' package: pip install transformers")
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise needs
    cached = os.path.isdir(path) or _in_hub_cache(path)
    if not cached and (why := _no_download()):  # fail before transformers' import and retries
        raise _load_error(ValueError, f"cannot load tokenizer {path!r}: not in the local Hugging Face cache, and "
                          f"{why}", f"not in the local Hugging Face cache, and {why}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise needs from None
    if cached:
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many types: a bad folder, a broken file
            if os.path.isdir(path) or not isinstance(exc, OSError):  # OSError: files missing from the cache
                what = "not a tokenizer folder" if os.path.isdir(path) else "cannot load it"
                raise _load_error(ValueError, f"cannot load tokenizer {path!r}: {exc}",
                                  f"{what} ({_one_line(exc)})") from exc
            if why := _no_download():
                raise _load_error(ValueError, f"cannot load tokenizer {path!r}: {exc}",
                                  f"not all in the local Hugging Face cache, and {why}") from exc
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise _load_error(ValueError, f"cannot load tokenizer {path!r}: {exc}",
                          f"cannot load it ({_one_line(exc)})") from exc


def _load_tokenizer_json(path: str) -> Tokenizer:
    """A ``tokenizer.json`` through ``tokenizers``, padding and truncation off."""
    try:
        with open(path, "rb") as file:
            start = file.read(4096).lstrip()
    except FileNotFoundError:
        raise _load_error(FileNotFoundError, f"tokenizer path not found: {path}", "no such file or directory") from None
    except IsADirectoryError:
        raise _load_error(ValueError, f"{path} is a directory: a tokenizer.json was expected",
                          "is a directory, where a tokenizer.json was expected") from None
    except OSError as exc:
        raise _load_error(ValueError, f"cannot read {path}: {exc}", f"cannot be read ({exc.strerror})") from None
    if not start.startswith(b"{"):  # not JSON: say so whether or not tokenizers is installed
        raise _load_error(ValueError, f"{path} is not a tokenizer.json: not a JSON object",
                          "not a tokenizer.json (not a JSON object)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise _load_error(ImportError, f"loading {path} needs the 'tokenizers' package: pip install tokenizers",
                          "needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own types, with the parser's reason
        raise _load_error(ValueError, f"{path} is not a tokenizer.json: {exc}",
                          f"not a tokenizer.json ({_one_line(exc)})") from None
    tokenizer.no_padding()  # a tokenizer.json may pad or cut every encoding to a
    tokenizer.no_truncation()  # fixed length; a chat message is its own length
    try:
        tokenizer.name_or_path = path  # what /metadata names it by (_tokenizer_name), as transformers' have
    except AttributeError:  # a tokenizers release whose objects take no attributes
        pass
    return tokenizer


def _load_error(kind: type, message: str, reason: str) -> Exception:
    """An error of load_tokenizer: ``message`` for Python callers, ``.reason`` (what is
    wrong, without the spec) for ``chatenv serve``'s one line, which adds the value."""
    error = kind(message)
    error.reason = reason
    return error


# How long load_tokenizer waits to learn whether the Hugging Face Hub answers, before
# downloading a model that is not in the local cache (offline, its client retries ~45 s)
_HUB_PROBE_S = 3.0
_TRUE = {"1", "true", "yes", "on"}  # how the Hugging Face libraries spell a set flag
# A folder transformers can load a tokenizer from holds at least one of these
_TOKENIZER_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")


def _in_hub_cache(name: str) -> bool:
    """Whether a model name has a folder in the local Hugging Face cache (downloaded once)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    return os.path.isdir(os.path.join(HF_HUB_CACHE, "models--" + name.replace("/", "--")))


def _no_download() -> str | None:
    """Why a model cannot be downloaded now ("HF_HUB_OFFLINE is set", "huggingface.co
    cannot be reached"), or None to try."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return f"{variable} is set"
    host = _hub_unreachable()
    return f"{host} cannot be reached" if host else None


def _hub_unreachable(timeout: float = _HUB_PROBE_S) -> str | None:
    """None when a TCP connection to the Hub (HF_ENDPOINT), or to the HTTPS proxy that
    reaches it, opens within ``timeout``; else the host that did not answer."""
    import socket
    import urllib.parse
    import urllib.request

    hub = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = hub
    proxy = urllib.request.getproxies().get(hub.scheme)
    if proxy and not urllib.request.proxy_bypass(hub.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, name="chatenv-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return None if opened else address[0]


def _is_path(spec: str) -> bool:
    """Whether a tokenizer spec names a path, not a model ("name" or "org/name")."""
    return (os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec))


def _check_tokenizer(tokenizer: Any) -> None:
    """Raise TypeError unless the object quacks like a tokenizer."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no decode()")
    if not (
        callable(getattr(tokenizer, "apply_chat_template", None))
        or callable(getattr(tokenizer, "encode", None))
    ):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has neither apply_chat_template() nor encode()"
        )


def _tokenize_message(tokenizer: Tokenizer, message: Mapping[str, Any]) -> list[int]:
    """Tokenize one chat message: the chat template, else ``encode("role: content\\n")``."""
    if type(message) is not dict and not isinstance(message, Mapping):
        raise ValueError("message must be a dict with 'role' and 'content'")
    if "role" not in message:
        raise ValueError("message must contain a 'role' key")
    if "content" not in message:
        raise ValueError("message must contain a 'content' key")
    if message["content"] is None:
        raise ValueError("message content cannot be None")
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template) and getattr(tokenizer, "chat_template", True) is not None:
        try:
            result = template(conversation=[dict(message)], tokenize=True)
        except ValueError as exc:
            # transformers raises ValueError when the tokenizer has no chat template
            if "chat_template" not in str(exc) and "chat template" not in str(exc):
                raise
        else:
            return tokens_to_list(result)
    return tokens_to_list(tokenizer.encode(f"{message['role']}: {message['content']}\n"))


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Decode ids with special tokens skipped, as OpenEnv does."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.decode returned {type(text).__name__}, not str")
    return text


# ------------------------------------------------------------------------------
# Environment: the conversation, written into a history it is given
# ------------------------------------------------------------------------------


class _History:
    """One episode's history as Python objects: an environment's own, by default.

    A history is what an environment writes its episode into and reads it back
    from: ``reset(first)`` starts one (``first``: an opening message, as
    ``(role, content, ids)``, or None), ``append(role, content, ids)`` adds a
    message or raises with nothing changed, ``message_count`` and
    ``token_count`` are its totals, and ``messages()``, ``tokens()``,
    ``token_lists()`` return fresh copies. A server's sessions keep theirs as
    the JSON they send instead (``_WireHistory``, in the protocol).

    This one keeps every token id in one array, with where each message ends:
    by tracemalloc 70 bytes a 1-token step and 7.3 a token in 4096-token ones
    (random bytes), where a tuple of ids and a (role, content) pair per
    message took 158 and 11.
    """

    __slots__ = ("_roles", "_contents", "_tokens", "_ends")

    def __init__(self) -> None:
        self.reset()

    @property
    def message_count(self) -> int:
        return len(self._roles)

    @property
    def token_count(self) -> int:
        return len(self._tokens)

    def reset(self, first: tuple[str, str, tuple[int, ...]] | None = None) -> None:
        from array import array

        self._roles: list[str] = []
        self._contents: list[str] = []
        self._tokens: Any = array("I")  # a list once an id passes 2**32 - 1 (no real vocabulary's does)
        self._ends = array("Q")  # where each message's ids end in _tokens
        if first is not None:
            self.append(*first)

    def append(self, role: str, content: str, ids: Any) -> None:
        from array import array

        try:
            self._tokens += array("I", ids) if type(self._tokens) is array else ids
        except OverflowError:
            self._tokens = self._tokens.tolist() + list(ids)
        self._ends.append(len(self._tokens))
        self._roles.append(role)
        self._contents.append(content)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in zip(self._roles, self._contents)]

    def tokens(self) -> list[int]:
        return list(self._tokens)

    def token_lists(self) -> list[list[int]]:
        tokens, ends = self._tokens, self._ends
        return [list(tokens[start:end]) for start, end in zip((0, *ends), ends)]


# Rewards and tasks: OpenEnv's hooks, duck-typed (chatenv never imports openenv), the
# built-in rewards, and task files indexed rather than parsed

_TASK_BLOCK_BYTES = 2**20  # a task file is checked this many bytes of lines at a time (one json.loads each)
_SPLIT_TYPES = ("train", "validation", "test")  # split names OpenEnv gives their own type; others are "validation"

_INF = float("inf")  # a reward is finite: below it and above its negative
_hook_thread = threading.local()  # .loop: the server loop a step thread runs async hooks on; .own: its private one


def _settle(value: Any) -> Any:
    """A hook's result, awaited when it is awaitable (an ``async def`` rubric's call).

    In a server's step thread it is awaited on the server's loop (other sessions go
    on meanwhile); elsewhere on a private loop of this thread, kept for its next call.
    """
    if not hasattr(value, "__await__"):
        return value
    import asyncio

    async def awaited() -> Any:
        return await value

    loop = getattr(_hook_thread, "loop", None)
    if loop is not None:
        return asyncio.run_coroutine_threadsafe(awaited(), loop).result()
    if asyncio._get_running_loop() is not None:
        raise RuntimeError("an async hook cannot be awaited on a running event loop's thread: "
                           "call step() off it (await asyncio.to_thread(env.step, action))")
    own = getattr(_hook_thread, "own", None)
    if own is None:
        own = _hook_thread.own = asyncio.new_event_loop()
    return own.run_until_complete(awaited())


def _reward_value(value: Any, what: str) -> float | bool | None:
    """A reward as the wire carries it: a finite number, a bool (as OpenEnv sends it) or None."""
    if value is None or type(value) is bool or (type(value) is float and -_INF < value < _INF):
        return value  # (the common cases; a NaN fails both comparisons)
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # a numpy or torch scalar
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
        return value
    raise ValueError(f"{what} returned {_preview(value)}: a reward is a finite number, a bool or None")


def _collapsed(text: Any) -> str:
    """Text stripped, whitespace runs one space: what the built-in rewards compare."""
    return " ".join(str(text).split())


def _answers(observation: Any) -> set[str] | None:
    """The task's answers as compared text, or None when the episode has no task answer.

    A number is compared as its JSON text: 42 is "42", 42.0 is "42.0", and
    "42.0" does not equal "42" (exact means exact; list both to accept both).
    """
    task = getattr(observation, "task", None)
    if not task or task.get("answer") is None:
        return None
    answer = task["answer"]
    return {_collapsed(item if isinstance(item, str) else _dumps(item))
            for item in (answer if isinstance(answer, list) else [answer])}


def _last_reply(observation: Any) -> str:
    """The last assistant message's content ("" when there is none)."""
    fields = getattr(observation, "__dict__", {})
    if "_reply" in fields and "messages" not in fields:  # the step's, as the environment gave it
        return fields["_reply"]
    for message in reversed(observation.messages):
        if message.get("role") == "assistant":
            return message.get("content", "")
    return ""


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), else the text after the last ``####``."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"):i - 1]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: an earlier one may be whole
    marker = text.rfind("####")
    return text[marker + 4:] if marker >= 0 else None


def exact_match(action: Any, observation: Any) -> float | None:
    """1.0 when the last assistant message (whitespace collapsed) is the task's answer, or one of them; else 0.0.

    None when the episode has no task answer.
    """
    answers = _answers(observation)
    if answers is None:
        return None
    return 1.0 if _collapsed(_last_reply(observation)) in answers else 0.0


def boxed_match(action: Any, observation: Any) -> float | None:
    """exact_match on the last ``\\boxed{...}`` of the last assistant message, else on what follows its last ``####``.

    0.0 when it has neither; None when the episode has no task answer.
    """
    answers = _answers(observation)
    if answers is None:
        return None
    found = _boxed(_last_reply(observation))
    return 1.0 if found is not None and _collapsed(found) in answers else 0.0


def format_match(action: Any, observation: Any) -> float | None:
    """1.0 when the last assistant message matches the task's ``format`` regular expression as a whole; else 0.0.

    (``re.fullmatch``, with ``.`` matching newlines.) None when the task has no ``format``.
    """
    import re

    task = getattr(observation, "task", None)
    if not task or not isinstance(task.get("format"), str):
        return None
    return 1.0 if re.fullmatch(task["format"], _last_reply(observation), re.DOTALL) else 0.0


def overlong_penalty(action: Any, observation: Any) -> float | None:
    """-1.0 when the step's action has more tokens than the task's ``max_tokens``; else 0.0.

    The count is exact: the action's token ids. None when the task has no ``max_tokens``.
    """
    task = getattr(observation, "task", None)
    limit = task.get("max_tokens") if task else None
    if type(limit) is not int:
        return None
    return -1.0 if len(action.tokens) > limit else 0.0


# The built-in rewards, by the name a SPEC gives (--rubric exact_match)
_BUILTIN_REWARDS = {f.__name__: f for f in (exact_match, boxed_match, format_match, overlong_penalty)}


class _WeightedRubrics:
    """Several rubrics as one: the sum of weight x score over the scores that are not None.

    None when every score is. Each one's unweighted score goes into the
    observation's ``metadata["rewards"]`` under its name. What ``--rubric``
    repeated builds; a rubric itself (call, ``reset()``).
    """

    def __init__(self, rubrics: list[tuple[str, Any, float]]) -> None:
        self.rubrics = rubrics  # (name, rubric, weight)

    def __call__(self, action: Any, observation: Any) -> float | None:
        scores: dict[str, Any] = {}
        total = None
        for name, rubric, weight in self.rubrics:
            score = scores[name] = _reward_value(_settle(rubric(action, observation)), f"rubric {name!r}")
            if score is not None:
                total = (total or 0.0) + weight * score
        observation.metadata["rewards"] = scores
        return total

    def reset(self) -> None:
        for _, rubric, _ in self.rubrics:
            if callable(getattr(rubric, "reset", None)):
                _settle(rubric.reset())


def _task_problem(task: Any) -> str | None:
    """What is wrong with one parsed line of a task file, or None."""
    if not isinstance(task, dict):
        return f"a task is a JSON object, not {type(task).__name__}"
    prompt = task.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(_is_message(m) for m in prompt):
            return "'prompt' must be a string or a non-empty list of {\"role\", \"content\"} messages"
    elif not isinstance(prompt, str):
        return "'prompt' is required: a string or a list of messages"
    if "id" in task and not isinstance(task["id"], str):
        return f"'id' must be a string, not {type(task['id']).__name__}"
    turns = task.get("turns")
    if turns is not None and (not isinstance(turns, list)
                              or not all(isinstance(t, str) or _is_message(t) for t in turns)):
        return "'turns' must be a list of user messages (strings or {\"role\", \"content\"} objects)"
    return None


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


class _TaskFile:
    """One split's JSONL task file, indexed: where each task's line starts, and its ids hashed.

    The file is mapped, not read: every line is checked at load (a bad one
    raises ValueError naming the file and line), then the pages are given back
    (they are the page cache's, shared by forked workers), and a task is parsed
    from its line when asked. What stays is 4 bytes a task (8 past 4 GiB) for
    where its line starts and 8 a slot of an open-addressing table of id hashes
    (at most half full): a million tasks cost ~20 MB whatever their size.
    """

    def __init__(self, path: str) -> None:
        import mmap
        from array import array

        self.path = path
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data: Any = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._data, self._size = data, size
        starts = array("I" if size < 2**32 else "Q")  # where each task's line starts
        hashes = array("q")  # each task's id hash (0: no id); freed once the table is built
        line, pos = 0, 0  # lines read so far; where the next block starts
        while pos < size:
            end = pos + _TASK_BLOCK_BYTES
            newline = data.find(b"\n", end) if end < size else -1
            end = size if newline < 0 else newline + 1
            block = data[pos:end]
            pieces = block.split(b"\n")
            if block.endswith(b"\n"):
                pieces.pop()  # (what follows the last newline is no line)
            lines, offsets, numbers, offset = [], [], [], pos
            for text in pieces:
                line += 1
                if text.strip():  # blank lines are skipped
                    lines.append(text)
                    offsets.append(offset)
                    numbers.append(line)
                offset += len(text) + 1
            for task, number in zip(self._parse(lines, numbers), numbers):
                problem = _task_problem(task)
                if problem is not None:
                    raise ValueError(f"{path}:{number}: {problem}")
                hashes.append((hash(task["id"]) or 1) if "id" in task else 0)
            starts.extend(offsets)
            pos = end
        if not starts:
            raise ValueError(f"{path}: has no tasks")
        self._starts = starts
        self._build_ids(hashes)
        if size and hasattr(data, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            data.madvise(mmap.MADV_DONTNEED)  # read again from the page cache when a task is asked for

    def _parse(self, lines: list[bytes], numbers: list[int]) -> list[Any]:
        """A block's lines parsed by one json.loads; line by line (naming the bad one) if that fails."""
        try:
            tasks = json.loads(b"[" + b",".join(lines) + b"]")
            if len(tasks) == len(lines):
                return tasks
        except (ValueError, RecursionError):
            pass
        tasks = []
        for text, number in zip(lines, numbers):
            try:
                tasks.append(json.loads(text))
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{self.path}:{number}: not a JSON object: "
                                 f"{str(exc).partition(':')[0][:120]}") from None
        return tasks

    def _build_ids(self, hashes: Any) -> None:
        from array import array

        count = len(hashes) - hashes.count(0)
        capacity = 1 << max(1, (2 * count).bit_length())  # at most half full: short probes
        mask = self._mask = capacity - 1
        slots = self._slots = array("I", bytes(4 * capacity))  # a task's index + 1; 0: empty
        prints = self._prints = array("I", bytes(4 * capacity))  # its hash's high half, compared before a parse
        for index, h in enumerate(hashes):
            if not h:
                continue
            fingerprint, i = (h >> 32) & 0xFFFFFFFF, h & mask
            while slots[i]:
                if prints[i] == fingerprint and self.task(slots[i] - 1)["id"] == self.task(index)["id"]:
                    raise ValueError(f"{self.path}: the id {self.task(index)['id']!r} is given twice "
                                     f"(tasks {slots[i] - 1} and {index}, counting from 0)")
                i = (i + 1) & mask
            slots[i], prints[i] = index + 1, fingerprint

    def find(self, task_id: str) -> int | None:
        """The index of the task whose ``id`` is ``task_id``, or None."""
        h = hash(task_id) or 1
        mask, slots, prints = self._mask, self._slots, self._prints
        fingerprint, i = (h >> 32) & 0xFFFFFFFF, h & mask
        while slots[i]:
            if prints[i] == fingerprint and self.task(slots[i] - 1).get("id") == task_id:
                return slots[i] - 1
            i = (i + 1) & mask
        return None

    def __len__(self) -> int:
        return len(self._starts)

    def task(self, index: int) -> dict[str, Any]:
        """Task ``index``, parsed from its line (IndexError when there is none)."""
        if index < 0:
            raise IndexError(index)
        start = self._starts[index]
        end = self._data.find(b"\n", start)
        return json.loads(self._data[start:end if end >= 0 else self._size])



class _NoSuchTask(LookupError):
    """A split or task id that no task file has: the client's VALIDATION_ERROR, a task route's 400."""


class Tasks:
    """Task files by split, loaded once: ``Tasks("math.jsonl")`` (split ``train``) or ``Tasks({"train": .., "test": ..})``.

    A task file is JSONL, a task a line: ``{"id": optional string, "prompt": a
    string or a list of messages, "answer": optional, "turns": optional
    follow-up user messages, other keys}``. Every line is checked here (a bad
    one is a ValueError naming the file and line); tasks are parsed when asked
    for (see ``_TaskFile``). The methods are OpenEnv's task API; a task's spec
    leaves ``answer`` out unless ``show_answers``.
    """

    def __init__(self, files: Any, show_answers: bool = False) -> None:
        if isinstance(files, (str, os.PathLike)):
            files = {"train": files}
        self.files = {split: path if isinstance(path, _TaskFile) else _TaskFile(os.fspath(path))
                      for split, path in dict(files).items()}
        if not self.files:
            raise ValueError("no task files given")
        self.show_answers = show_answers

    def _file(self, split: Any) -> _TaskFile:
        if not isinstance(split, str) or split not in self.files:
            raise _NoSuchTask(f"unknown split {_preview(split)}: the splits are {', '.join(map(repr, self.files))}")
        return self.files[split]

    def _spec(self, task: dict[str, Any]) -> dict[str, Any]:
        if not self.show_answers:
            task.pop("answer", None)
        return task

    def list_splits(self) -> list[str]:
        return list(self.files)

    def num_tasks(self, split: str) -> int:
        return len(self._file(split))

    def get_task(self, split: str, index: int) -> dict[str, Any]:
        """The task's spec (IndexError when ``index`` is out of range)."""
        return self._spec(self._file(split).task(index))

    def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[dict[str, Any]]:
        """Specs in ``[start, stop)``, Python slice bounds."""
        file = self._file(split)
        return [self._spec(file.task(i)) for i in range(*slice(start, stop).indices(len(file)))]

    def list_tasks(self, split: str) -> list[dict[str, Any]]:
        return self.get_task_range(split)

    def pick(self, split: str | None = None, index: int | None = None, task_id: str | None = None,
             seed: int | None = None, rng: Any = None) -> tuple[str, int, dict[str, Any]]:
        """(split, index, task) a reset asks for: by ``task_id``; by ``split`` and ``index``; by ``seed``
        (the same seed, the same task); else drawn from ``rng``. A bad split, index or id: _NoSuchTask."""
        import random

        if task_id is not None:
            for name, file in self.files.items() if split is None else [(split, self._file(split))]:
                index = file.find(task_id)
                if index is not None:
                    return name, index, file.task(index)
            raise _NoSuchTask(f"no task has the id {_preview(task_id)}")
        name = split if split is not None else "train" if "train" in self.files else next(iter(self.files))
        file = self._file(name)
        if index is not None:
            if not 0 <= index < len(file):
                raise _NoSuchTask(f"index {index} is out of range: split {name!r} has {len(file)} tasks")
        elif seed is not None:
            index = random.Random(seed).randrange(len(file))  # (seeded by an int: the same on every run)
        else:
            index = (rng or random).randrange(len(file))
        return name, index, file.task(index)


class ChatEnvironment:
    """One episode of chat: reset() starts it, step() appends a message.

    The episode is written into a history (``history``, see ``_History``): the
    environment's own Python lists by default; a server gives each session's
    environment one kept as the JSON its replies send (``_WireHistory``), so
    nothing is held twice. ``history_messages``, ``history_tokens``,
    ``observation()`` and ``state`` are fresh copies.

    Rewards and episode ends, OpenEnv's hooks duck-typed: ``transform``
    (observation in, observation out; it may set reward, done and metadata) runs
    on reset and every step; ``rubric(action, observation)`` (a number, a bool or
    None; a plain function, an ``async def`` one or OpenEnv's Rubric objects)
    scores every step, and its ``reset()``, when it has one, runs on reset.
    While they run, the observation's ``task`` holds the episode's task, its
    answer included (never sent); only reward, done and metadata of what they
    return are kept: the messages are the episode's. ``tasks`` (a ``Tasks``, a
    path or {split: path}) poses a task at each reset. An episode is done once
    ``max_turns`` assistant steps are taken, an assistant message holds a
    ``stop`` text, a task's prompt and each of its ``turns`` are answered, or a
    hook sets ``done``; a step after that raises, naming why. With none of
    these, episodes never end and observations say reward None, done False.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | str | None = None,
        system_prompt: str | None = None,
        system_role: str = "system",
        max_episode_tokens: int | None = None,
        *,
        # Rewards, tasks and episode ends (see above)
        transform: Any = None,
        rubric: Any = None,
        tasks: Any = None,
        max_turns: int | None = None,
        stop: Any = (),
        # Given by a server that makes one per session: the system message's token ids
        # (a tuple, tokenized once for all sessions) and an empty history to keep the
        # episode in (default: the environment's own Python lists, a _History)
        system_tokens: tuple[int, ...] | None = None,
        history: Any = None,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer)
        self.system_prompt = system_prompt
        self.system_role = system_role
        self.max_episode_tokens = max_episode_tokens  # None: episodes grow without bound
        self._first: tuple[str, str, tuple[int, ...]] | None = None  # the system message every episode opens with
        if system_prompt:
            if system_tokens is None:
                system_tokens = _tokenize_message(self.tokenizer, {"role": system_role, "content": system_prompt})
            self._first = (system_role, system_prompt, tuple(system_tokens))
        self.episode_id: str | None = None
        self.transform, self.rubric, self.max_turns = transform, rubric, max_turns
        self.tasks = tasks if tasks is None or hasattr(tasks, "pick") else Tasks(tasks)
        self.stop = (stop,) if isinstance(stop, str) else tuple(stop)
        # Whether anything can set a reward or end an episode: if not, steps take the plain path
        self._hooked = (transform is not None or rubric is not None or self.tasks is not None
                        or max_turns is not None or bool(self.stop))
        self.task: dict[str, Any] | None = None  # the episode's task, its answer included
        self.done_reason: str | None = None  # why the episode is over; None while it goes on
        self._task_metadata: dict[str, Any] = {}  # what every observation's metadata says of the task
        self._next_turn = 0  # the task's next scripted turn
        self._rng: Any = None  # draws tasks for resets that name none
        self.use_history(_History() if history is None else history)

    def use_history(self, history: Any) -> None:
        """Keep the episode in ``history`` (see ``_History``) from now on; it starts anew there.

        What the ``history`` argument does, for an environment made without it: a
        server's session calls it when its factory takes no ``history``.
        """
        self._history = history
        self._history.reset(self._first)
        self.step_count = 0

    def reset(self, seed: int | None = None, episode_id: str | None = None, split: str | None = None,
              index: int | None = None, task_id: str | None = None, **kwargs: Any) -> ChatObservation:
        """Start a new episode: the system prompt, if any, then its task's prompt, if tasks are given.

        A task is picked by ``split`` and ``index``, by ``task_id``, by ``seed``
        (the same seed, the same task) or at random; a bad one raises
        LookupError with nothing changed. Other keyword arguments are ignored, as OpenEnv's are.
        """
        return self._observation(self.reset_outcome(seed, episode_id, split=split, index=index, task_id=task_id))

    def step(self, action: ChatAction | Any) -> ChatObservation:
        """Append the action's tokens, decoded, as an assistant message; score it, maybe end the episode."""
        ids = tokens_to_list(action.tokens if isinstance(action, ChatAction) else action)
        return self._observation(self.step_outcome(ids, action if isinstance(action, ChatAction) else None))

    def _observation(self, outcome: tuple[Any, bool, dict[str, Any], int] | None) -> ChatObservation:
        obs = self.observation()
        if outcome is not None:
            obs.reward, obs.done, obs.metadata = outcome[0], outcome[1], outcome[2]
        return obs

    # What the protocol calls: the episode moves on, and its outcome is returned for
    # the wire, as (reward, done, metadata, messages added); None for no hook's (null,
    # false, {}), whose bytes the protocol has ready

    def reset_outcome(self, seed: int | None = None, episode_id: str | None = None, *, split: str | None = None,
                      index: int | None = None, task_id: str | None = None) -> tuple[Any, bool, dict, int] | None:
        """reset(), returning its outcome rather than an observation (see above)."""
        import uuid

        picked = None
        if self.tasks is not None:
            if self._rng is None:
                import random

                self._rng = random.Random()
            picked = self.tasks.pick(split, index, task_id, seed, self._rng)  # may raise: nothing changed yet
        elif split is not None or index is not None or task_id is not None:
            named = "split" if split is not None else "index" if index is not None else "task_id"
            raise _NoSuchTask(f"{named!r} picks a task, and this environment has no tasks")
        self._history.reset(self._first)
        self.episode_id = episode_id if episode_id is not None else str(uuid.uuid4())
        self.step_count = 0
        if not self._hooked:
            return None
        self.task, self._task_metadata, self._next_turn, self.done_reason = None, {}, 0, None
        if picked is not None:
            name, number, task = picked
            self.task = task
            self._task_metadata = {"task": {"split": name, "index": number, "id": task.get("id")}}
            prompt = task["prompt"]
            for message in [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt:
                self._append_message(message)
        if self.rubric is not None and callable(getattr(self.rubric, "reset", None)):
            _settle(self.rubric.reset())
        obs = ChatObservation._of_history(self._history, dict(self._task_metadata), self.task)
        return self._run_transform(obs, None, self._history.message_count)

    def step_outcome(self, ids: list[int], action: ChatAction | None = None) -> tuple[Any, bool, dict, int] | None:
        """A step of ids already checked (see ``append_ids``), returning its outcome (see above).

        A step after the episode is done raises ValueError naming why, with
        nothing changed. A hook that raises leaves the step taken and the episode done.
        """
        if not self._hooked:
            self.append_ids(ids)
            return None
        if self.done_reason is not None:
            raise ValueError(f"the episode is done ({self.done_reason}): reset to start a new one")
        content = self.append_ids(ids)["content"]
        count = self._history.message_count
        turns = (self.task.get("turns") or ()) if self.task is not None else ()
        reason = None
        if self.max_turns is not None and self.step_count >= self.max_turns:
            reason = f"max_turns: {self.step_count} assistant steps taken"
        elif self.stop and any(text in content for text in self.stop):
            reason = f"stop: the assistant wrote {next(t for t in self.stop if t in content)!r}"
        elif self.task is not None and self._next_turn >= len(turns):
            reason = "task: its prompt and each of its turns are answered"
        obs = ChatObservation._of_history(self._history, dict(self._task_metadata), self.task, content)
        obs.done = reason is not None
        if action is None:
            action = ChatAction.__new__(ChatAction)  # the ids are checked: no second pass
            action.tokens, action.metadata = ids, {}
        try:
            if self.rubric is not None:
                obs.reward = _reward_value(_settle(self.rubric(action, obs)), "the rubric")
        except Exception as exc:
            self.done_reason = "a hook failed on its last step"
            raise RuntimeError(f"the step was taken, and then the rubric failed: {type(exc).__name__}: {exc}") from exc
        outcome = self._run_transform(obs, reason, count)
        if self.done_reason is None and self.task is not None and self._next_turn < len(turns):
            turn = turns[self._next_turn]
            self._next_turn += 1
            self._append_message(turn if isinstance(turn, dict) else {"role": "user", "content": turn})
            outcome = (*outcome[:3], 2)
        return outcome

    def _run_transform(self, obs: ChatObservation, reason: str | None, count: int) -> tuple[Any, bool, dict, int]:
        """The transform, then the outcome; the episode is done if it or ``reason`` says so."""
        if self.transform is not None:
            try:
                obs = _settle(self.transform(obs))
                obs.reward = _reward_value(obs.reward, "the transform")
                if not isinstance(obs.metadata, dict):
                    raise TypeError(f"metadata must be a dict, not {type(obs.metadata).__name__}")
            except Exception as exc:
                self.done_reason = "a hook failed on its last step"
                raise RuntimeError(f"the transform failed: {type(exc).__name__}: {exc}") from exc
        if reason is None and obs.done:
            reason = "a hook ended it"
        self.done_reason = reason
        metadata = obs.metadata
        if reason is not None:
            metadata["done_reason"] = reason
        return obs.reward, reason is not None, metadata, 1

    def _append_message(self, message: Mapping[str, Any]) -> None:
        """Append a message the environment poses (a task's prompt, a scripted turn), tokenized."""
        role, content = message["role"], message["content"]
        self._history.append(role, content, _tokenize_message(self.tokenizer, {"role": role, "content": content}))

    # OpenEnv's task API (its HTTP routes and clients call these): NotImplementedError without tasks

    def _task_set(self) -> Any:
        if self.tasks is None:
            raise NotImplementedError("this environment has no tasks")
        return self.tasks

    def list_splits(self) -> list[str]:
        return self._task_set().list_splits()

    def list_tasks(self, split: str) -> list[dict[str, Any]]:
        return self._task_set().list_tasks(split)

    def num_tasks(self, split: str) -> int:
        return self._task_set().num_tasks(split)

    def get_task(self, split: str, index: int) -> dict[str, Any]:
        return self._task_set().get_task(split, index)

    def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[dict[str, Any]]:
        return self._task_set().get_task_range(split, start, stop)

    def append_tokens(self, tokens: Any) -> dict[str, str]:
        """Decode and append one message; on failure the history is unchanged."""
        return self.append_ids(tokens_to_list(tokens))

    def append_ids(self, ids: list[int]) -> dict[str, str]:
        """append_tokens() for ids already flat: what ``tokens_to_list`` returns, not checked again.

        The protocol checks a step's tokens as it parses the frame (a bad one is
        the client's VALIDATION_ERROR, a failure here its EXECUTION_ERROR).
        """
        history, limit = self._history, self.max_episode_tokens
        if limit is not None and history.token_count + len(ids) > limit:
            raise ValueError(
                f"the episode would hold {history.token_count + len(ids)} tokens, over this "
                f"environment's limit of {limit}: reset() to start a new one"
            )
        content = _decode(self.tokenizer, ids)
        history.append("assistant", content, ids)  # a server's history may refuse it (its memory bound)
        self.step_count += 1
        return {"role": "assistant", "content": content}

    # The history's totals: O(1)

    @property
    def message_count(self) -> int:
        return self._history.message_count

    @property
    def token_count(self) -> int:
        return self._history.token_count

    # The history as Python objects: fresh copies, O(history)

    @property
    def history_messages(self) -> list[dict[str, str]]:
        return self._history.messages()

    @property
    def history_tokens(self) -> list[tuple[int, ...]]:
        return list(map(tuple, self._history.token_lists()))

    def observation(self) -> ChatObservation:
        return ChatObservation(messages=self._history.messages(), tokens=self._history.tokens())

    @property
    def state(self) -> ChatState:
        return ChatState(
            episode_id=self.episode_id,
            step_count=self.step_count,
            history_messages=self._history.messages(),
            history_tokens=self._history.token_lists(),
        )

    def message_to_action(self, message: Mapping[str, Any]) -> ChatAction:
        """Tokenize a chat message into an action with this environment's tokenizer."""
        return message_to_action(message, self.tokenizer)


def message_to_action(message: Mapping[str, Any], tokenizer: Tokenizer) -> ChatAction:
    """Tokenize a chat message (``role``, ``content``) into a ChatAction.

    The one implementation: ``ChatEnvironment.message_to_action(message)`` and the
    clients' static ``message_to_action(message, tokenizer)`` are OpenEnv's two
    spellings of it, kept so code written for OpenEnv runs unchanged.
    """
    return ChatAction(tokens=_tokenize_message(tokenizer, message))


# ------------------------------------------------------------------------------
# Protocol: one frame in, one reply out; pure, no sockets
# ------------------------------------------------------------------------------

# The error codes of the wire protocol (docs/protocol.md)
INVALID_JSON = "INVALID_JSON"
UNKNOWN_TYPE = "UNKNOWN_TYPE"
VALIDATION_ERROR = "VALIDATION_ERROR"
EXECUTION_ERROR = "EXECUTION_ERROR"
CAPACITY_REACHED = "CAPACITY_REACHED"
SESSION_ERROR = "SESSION_ERROR"
# ... and the codes a chatenv client gives a ChatEnvError it detects itself
PROTOCOL_ERROR = "PROTOCOL_ERROR"  # a reply the client cannot read (not JSON, a field of the wrong type)
DELTA_DESYNC = "DELTA_DESYNC"  # a delta observation that does not extend the history the client holds

_MESSAGE_TYPES = ("reset", "step", "state", "close", "mcp")
_STEP_KEYS = frozenset(("tokens", "metadata"))
_TOP_KEYS = frozenset(("type", "data"))
DELTA_KEY = "chatenv_delta"  # reset data key asking a chatenv server for delta observations

_OBS_START = b'{"type":"observation","data":{"observation":{"metadata":'
_OBS_MID = b'],"tokens":['
_DELTA_MID = b'],"delta":{"messages":'


def _observation_parts(outcome: tuple[Any, bool, dict[str, Any], int]) -> tuple[bytes, bytes, bytes]:
    """The head, full tail and delta tail of an observation frame for an environment's outcome.

    As OpenEnv 0.10 places them: metadata inside the observation always, and
    beside reward and done as well when it is not empty.
    """
    reward, done, metadata = outcome[0], outcome[1], outcome[2]
    meta = _json_bytes(metadata)
    after = b'"reward":%s,"done":%s%s}}' % (
        b"null" if reward is None else repr(reward).encode() if type(reward) is float else _json_bytes(reward),
        b"true" if done else b"false", b',"metadata":' + meta if metadata else b"")
    return _OBS_START + meta + b',"messages":[', b"]}," + after, b"}}," + after


_NO_OUTCOME = (None, False, {}, 1)  # an environment without hooks: reward null, done false, no metadata

# The episode as JSON: written once, as each message is appended, so a reply is a
# join of what is kept, never a re-dump of the history

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # compact, raw UTF-8: as OpenEnv
_dumps_ascii = json.JSONEncoder(separators=(",", ":")).encode
_json_string = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses for a str


def _json_bytes(value: Any) -> bytes:
    """Compact JSON in UTF-8, as OpenEnv (pydantic) writes it.

    A lone surrogate (which only a ``\\udXXX`` escape in a client's JSON can make)
    has no UTF-8 form: such text keeps its escapes, still the same JSON.
    """
    text = _dumps(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _dumps_ascii(value).encode()


_NO_OUTCOME_PARTS = _observation_parts(_NO_OUTCOME)  # its frames' bytes, ready: the hot path's
_OBS_HEAD, _OBS_TAIL, _DELTA_TAIL = _NO_OUTCOME_PARTS


def _json_string_bytes(text: str) -> bytes:
    """One JSON string in UTF-8 (escaped as ``_json_bytes`` does)."""
    try:
        return _json_string(text).encode()
    except UnicodeEncodeError:
        return json.encoder.encode_basestring_ascii(text).encode()


def _message_json(message: Mapping[str, str]) -> bytes:
    """``{"role":..,"content":..}`` exactly as json.dumps would write it, faster."""
    return b'{"role":%s,"content":%s}' % (_json_string_bytes(message["role"]), _json_string_bytes(message["content"]))


def _ids_json(ids: Any) -> bytes:
    """Token ids comma-joined, without brackets (json's C encoder is twice as fast on long lists, slower on short)."""
    return _dumps(ids).encode()[1:-1] if len(ids) > 64 else ",".join(map(str, ids)).encode()


_LAST_KEPT_BYTES = 2**12  # a last step up to this size is kept beside the history for delta replies


class _WireHistory:
    """One session's episode, kept as the JSON its replies send: the text, once, and offsets into it.

    It is a history as ``_History`` describes (the session's environment writes
    its episode into it), kept compact: ``messages_json`` holds the messages'
    JSON and ``tokens_json`` every token id, each comma-joined without brackets,
    the two halves of a full observation; ``message_ends`` and ``token_ends``
    say where each message ends in them. Python views are parsed from that text
    on demand. By RSS a 1-token step takes 57 bytes and a 4096-token one 7.3 a
    token (random bytes), where Python lists, tuples and dicts beside the JSON
    took 353 and 31. ``account`` (a server's _MemoryAccount) is charged its
    exact growth before each append, and may refuse it.
    """

    __slots__ = ("messages_json", "tokens_json", "message_ends", "token_ends", "token_count", "_last", "_account")

    # The last opening message reset() was given and its JSON: a server's sessions all
    # open with the same one (the same ids object), so it is written once, not per session
    _opening: tuple[Any, bytes, bytes] = ((None, None, None), b"", b"")

    def __init__(self, account: Any = None) -> None:
        self._account = account  # its episode_bytes: what it holds for this episode (admission: an empty one)
        self._clear()

    def _clear(self) -> None:
        from array import array

        self.messages_json = bytearray()  # new buffers: a reply not yet written may hold the old ones
        self.tokens_json = bytearray()
        self.message_ends = array("Q")
        self.token_ends = array("Q")
        self.token_count = 0
        self._last: tuple[bytes, bytes] | None = None  # a small last step's pieces, kept: see last()

    @property
    def nbytes(self) -> int:
        """The bytes this history holds: its text and its offsets (what a memory bound counts)."""
        return len(self.messages_json) + len(self.tokens_json) + 8 * (len(self.message_ends) + len(self.token_ends))

    @property
    def message_count(self) -> int:
        return len(self.message_ends)

    def reset(self, first: tuple[str, str, Any] | None = None) -> None:
        """A new episode, holding only ``first`` (role, content, ids) if given; never refused."""
        if self.message_ends:  # (a new history's empty buffers are no reply's yet: kept)
            self._clear()
        if first is not None:
            opening = _WireHistory._opening
            role, content, ids = opening[0]
            if ids is not first[2] or role != first[0] or content != first[1]:
                opening = _WireHistory._opening = (first, _message_json({"role": first[0], "content": first[1]}),
                                                   _ids_json(first[2]))
            self._add(opening[1], opening[2], len(first[2]))
        account = self._account
        if account is not None and self.nbytes != account.episode_bytes:
            account.charge(self.nbytes - account.episode_bytes)  # never more: a history only grows

    def append(self, role: str, content: str, ids: Any) -> None:
        """Append one message; the account is charged first and may refuse (nothing changed)."""
        if role == "assistant":  # every step's
            message_json = b'{"role":"assistant","content":%s}' % _json_string_bytes(content)
        else:
            message_json = _message_json({"role": role, "content": content})
        token_text = _ids_json(ids)
        if self._account is not None:  # the exact growth of nbytes
            growth = (len(message_json) + (1 if self.message_ends else 0) + len(token_text)
                      + (1 if token_text and self.tokens_json else 0) + 16)
            self._account.charge(growth, refuse=True)  # raises past a memory bound
        self._add(message_json, token_text, len(ids))

    def _add(self, message_json: bytes, token_text: bytes, count: int) -> None:
        if self.message_ends:
            self.messages_json += b","
        self.messages_json += message_json
        if token_text and self.tokens_json:
            self.tokens_json += b","
        self.tokens_json += token_text
        self.message_ends.append(len(self.messages_json))
        self.token_ends.append(len(self.tokens_json))
        self.token_count += count
        self._last = (message_json, token_text) if len(message_json) + len(token_text) <= _LAST_KEPT_BYTES else None

    def last(self) -> tuple[bytes, bytes]:
        """The last message's JSON and token text, what a delta reply sends.

        A small step's are kept; a large one's are sliced when asked, so the
        history never holds a large step twice.
        """
        if self._last is not None:
            return self._last
        ends = self.message_ends
        if not ends:
            return b"", b""
        start = ends[-2] + 1 if len(ends) > 1 else 0
        token_ends = self.token_ends
        end = token_ends[-1]
        token_start = token_ends[-2] if len(token_ends) > 1 else 0
        if token_start and end > token_start:
            token_start += 1
        return self.messages_json[start:ends[-1]], self.tokens_json[token_start:end]

    def since(self, count: int) -> tuple[bytes, bytes]:
        """The JSON of the messages after the first ``count`` and their token text (a delta of several)."""
        messages, tokens = self.messages_json, self.tokens_json
        start = self.message_ends[count - 1] + 1 if count else 0
        token_start = self.token_ends[count - 1] if count else 0
        if tokens[token_start:token_start + 1] == b",":
            token_start += 1
        return bytes(messages[start:]), bytes(tokens[token_start:])

    def history_tokens_json(self) -> bytes:
        """``[ids],[ids],...``: one list per message (for ``state``; O(history), only there)."""
        text, pieces, start = self.tokens_json, [], 0
        for end in self.token_ends:
            if end > start and start:
                start += 1  # the comma before this message's first id
            pieces.append(text[start:end])
            start = end
        return b"[" + b"],[".join(pieces) + b"]" if pieces else b""

    def messages(self) -> list[dict[str, str]]:
        return json.loads(b"[" + self.messages_json + b"]")

    def tokens(self) -> list[int]:
        return json.loads(b"[" + self.tokens_json + b"]")

    def token_lists(self) -> list[list[int]]:
        return json.loads(b"[" + self.history_tokens_json() + b"]")


class Reply:
    """A reply frame as byte pieces (joined once, by the socket writer) and whether to close."""

    __slots__ = ("parts", "close")

    def __init__(self, parts: list[bytes] | None, close: bool = False) -> None:
        self.parts = parts
        self.close = close

    @property
    def data(self) -> bytes | None:
        return None if self.parts is None else b"".join(self.parts)

    def json(self) -> Any:
        return None if self.parts is None else json.loads(self.data)

    def __repr__(self) -> str:
        return f"Reply({self.data!r}, close={self.close})"


class Session:
    """One session's state: its environment (made on first use), its episode's JSON, delta mode.

    ``make_env(history=...)`` makes the environment, over the session's
    ``_WireHistory`` (``ChatEnvironment`` itself, or a ``functools.partial`` of
    it, will do), so the episode is kept once, as the JSON the replies send; a
    factory that takes no ``history`` is called bare, and its environment then
    moved onto the session's history (``use_history``).
    ``server`` is what the protocol asks about the rest of the server (its MCP
    sessions, see ``_mcp_reply``); None for a session on its own. ``account``:
    the server's memory account for this session (``_MemoryAccount``), or None.
    """

    __slots__ = ("_make_env", "_env", "history", "account", "delta", "server", "id")

    def __init__(self, make_env: Any, server: Any = None, session_id: str | None = None,
                 account: Any = None) -> None:
        self._make_env = make_env
        self._env: ChatEnvironment | None = None
        self.history: _WireHistory | None = None  # made with the environment, which writes into it
        self.account = account
        self.delta = False
        self.server = server
        self.id = session_id  # set when the session is named (OpenEnv's MCP sessions) or asked for

    @property
    def env(self) -> ChatEnvironment:
        if self._env is None:
            history = _WireHistory(self.account)
            try:
                env = self._make_env(history=history)
            except TypeError as exc:
                if "history" not in str(exc):
                    raise
                env = self._make_env()  # a factory written before history= (lambda: ChatEnvironment(...))
                env.use_history(history)
            self.history, self._env = history, env
        return self._env


class _RequestError(Exception):
    """A request the protocol refuses: becomes an error frame, session kept."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error_reply(code: str, message: str, close: bool = False, **extra: Any) -> Reply:
    """An error frame, as OpenEnv shapes it: {"type":"error","data":{message, code}}."""
    data = {"message": message, "code": code, **extra}
    return Reply([_json_bytes({"type": "error", "data": data})], close)


def handle_frame(session: Session, frame: str | bytes | bytearray) -> Reply:
    """Handle one incoming frame for a session and return the reply.

    A text frame arrives as ``str``, a binary frame as ``bytes``. Every
    malformed frame gets an error reply and leaves the session usable; only an
    internal fault (never the client's input) ends it with SESSION_ERROR.
    """
    try:
        message = _parse_request(frame, session.server)
        kind = message.get("type")
        if kind == "step":
            return _step_reply(session, _step_tokens(message))
        if kind == "reset":
            return _reset_reply(session, _reset_args(message))
        if kind == "state":
            _check_no_data(message)
            return _state_reply(session)
        if kind == "close":
            _check_no_data(message)
            return Reply(None, close=True)
        if kind == "mcp":
            data = message.get("data")
            reply = _mcp_reply(session.server, data, session)
            return Reply([_json_bytes({"type": "mcp", "data": reply})] if reply is not None else None)
        raise _RequestError(UNKNOWN_TYPE, f"Unknown message type: {_type_text(kind)}")
    except _RequestError as exc:
        return _error_reply(exc.code, exc.message)
    except Exception:
        logger.exception("internal error while handling a frame; closing the session")
        return _error_reply(SESSION_ERROR, "Internal server error; the session is closed", close=True)


def _capacity_reply(active: int, limit: int) -> Reply:
    """The frame a newcomer gets when the server is full, before the socket closes."""
    return _error_reply(CAPACITY_REACHED, _capacity_text(active, limit), close=True,
                       active_sessions=active, max_sessions=limit)


def _capacity_text(active: int, limit: int) -> str:
    return f"Server at capacity: {active}/{limit} sessions active. Cannot accept new connections."


def _type_text(kind: Any) -> str:
    if kind is None:
        return ""
    return kind[:64] if isinstance(kind, str) else _preview(kind)


_MAX_CONTAINERS = 2**16  # arrays and objects one request may hold ('[' and '{' counted before parsing)
_MAX_DIGITS = 64  # digits in a row one request may hold: a token id needs few, and int() is quadratic in them
# A run of more digits, found as zeros once every digit is one (a translate and a substring
# search, both in C and linear: a regular expression rescans runs and costs ten times more)
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGITS = b"0" * (_MAX_DIGITS + 1)


def _costly_json(text: str | bytes | bytearray, max_tokens: int | None = None) -> tuple[str, str] | None:
    """Why JSON text would cost too much to parse, as (error code, text), or None; decided
    before json.loads builds it.

    16 MiB of ``[[]]`` costs seconds of CPU and most of a gigabyte, of
    4300-digit numbers a second, of ``1,1,...`` (8M items where an episode
    holds ``max_tokens``) most of a second, all holding the event loop; no step
    needs any of them. Upper bounds (brackets, commas or digits inside a string
    count too), counted in C, and only for a request long enough to pass them:
    an honest 1M-token step pays a few milliseconds.
    """
    if len(text) <= _MAX_CONTAINERS:
        return None
    plain = isinstance(text, str)
    bracket, brace, comma = ("[", "{", ",") if plain else (b"[", b"{", b",")
    if text.count(bracket) + text.count(brace) > _MAX_CONTAINERS:
        return INVALID_JSON, (f"more than {_MAX_CONTAINERS} arrays and objects ('[' and '{{'); a step's "
                              f"tokens are a list of token ids, or a few lists of them")
    items = text.count(comma) + 1
    if max_tokens is not None and items > max_tokens + _MAX_CONTAINERS:
        return VALIDATION_ERROR, f"{items} items (',') where an episode holds at most {max_tokens} tokens"
    data = text.encode("utf-8", "surrogatepass") if plain else text  # (no UTF-8 sequence holds a digit byte)
    if _LONG_DIGITS in data.translate(_DIGITS_AS_ZEROS):
        return VALIDATION_ERROR, f"a number over {_MAX_DIGITS} digits; a token id is a small integer"
    return None


def _parse_request(frame: str | bytes | bytearray, server: Any = None) -> dict[str, Any]:
    if not isinstance(frame, str):
        raise _RequestError(INVALID_JSON, "Binary frames are not supported: send JSON as a text frame")
    costly = _costly_json(frame, getattr(server, "max_episode_tokens", None)) if len(frame) > _MAX_CONTAINERS else None
    if costly is not None:
        code, why = costly
        raise _RequestError(code, f"{'Invalid JSON' if code == INVALID_JSON else 'Invalid message'}: {why}")
    try:
        message = json.loads(frame)
    except RecursionError:
        raise _RequestError(INVALID_JSON, "Invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise _RequestError(INVALID_JSON, f"Invalid JSON: {str(exc)[:120]}") from None
    if not isinstance(message, dict):
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: expected a JSON object, got {type(message).__name__}"
        )
    extra = message.keys() - _TOP_KEYS
    if extra and message.get("type") in _MESSAGE_TYPES:
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: unknown field(s) {_preview(sorted(extra))}"
        )
    return message


def _check_data(message: dict[str, Any]) -> dict[str, Any]:
    """The request's ``data`` object; absent is empty, anything else (null too) is refused, as OpenEnv does."""
    if "data" not in message:
        return {}
    data = message["data"]
    if not isinstance(data, dict):
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: 'data' must be an object, got {type(data).__name__}"
        )
    return data


def _check_no_data(message: dict[str, Any]) -> None:
    """``state`` and ``close`` carry no ``data``: OpenEnv refuses one (and keeps the session)."""
    if "data" in message:
        raise _RequestError(VALIDATION_ERROR, f"Invalid message: {_type_text(message['type'])} takes no 'data'")


def _step_tokens(message: dict[str, Any]) -> list[int]:
    data = _check_data(message)
    if "tokens" not in data:
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'tokens' is required")
    extra = data.keys() - _STEP_KEYS
    if extra:
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: unknown action field(s) {_preview(sorted(extra))}"
        )
    if "metadata" in data and not isinstance(data["metadata"], dict):
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'metadata' must be an object")
    tokens = data["tokens"]
    if type(tokens) is list and tokens and set(map(type, tokens)) == _TOKEN_TYPES and min(tokens) >= 0:
        return tokens  # the common case, checked in C without the general normaliser
    try:
        return tokens_to_list(tokens)
    except (TypeError, ValueError) as exc:
        raise _RequestError(VALIDATION_ERROR, f"Invalid message: {exc}") from None


def _reset_args(message: dict[str, Any]) -> dict[str, Any]:
    data = _check_data(message)
    seed, episode_id = data.get("seed"), data.get("episode_id")
    if seed is not None and type(seed) is not int:
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'seed' must be an integer")
    if episode_id is not None and not isinstance(episode_id, str):
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'episode_id' must be a string")
    if episode_id is not None and len(episode_id) > 256:
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'episode_id' is longer than 256")
    split, index, task_id = data.get("split"), data.get("index"), data.get("task_id")  # which task (OpenEnv 0.10's)
    if split is not None and not isinstance(split, str):
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'split' must be a string")
    if index is not None and type(index) is not int:
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'index' must be an integer")
    if task_id is not None and not isinstance(task_id, str):
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'task_id' must be a string")
    return {"seed": seed, "episode_id": episode_id, "delta": data.get(DELTA_KEY) is True,
            "split": split, "index": index, "task_id": task_id}


def _reset_outcome(env: ChatEnvironment, args: dict[str, Any]) -> Any:
    """Reset ``env`` as a request asks; a task it cannot pick is the client's VALIDATION_ERROR."""
    try:
        return env.reset_outcome(args["seed"], args["episode_id"], split=args["split"], index=args["index"],
                                 task_id=args["task_id"])
    except _NoSuchTask as exc:
        raise _RequestError(VALIDATION_ERROR, f"Invalid message: {exc}") from None


def _reset_reply(session: Session, args: dict[str, Any]) -> Reply:
    env = session.env  # (a session that cannot make one is an internal fault, not this reset's)
    try:
        outcome = _reset_outcome(env, args)
    except _RequestError:
        raise
    except Exception as exc:  # a hook failed
        return _error_reply(EXECUTION_ERROR, f"Reset failed: {str(exc)[:200]}")
    session.delta = args["delta"]
    history = session.history
    head, tail, _ = _NO_OUTCOME_PARTS if outcome is None else _observation_parts(outcome)
    return Reply([head, history.messages_json, _OBS_MID, history.tokens_json, tail])


def _step_reply(session: Session, tokens: list[int]) -> Reply:
    env = session.env  # (a session that cannot make one is an internal fault, not this step's)
    try:
        outcome = env.step_outcome(tokens)
    except Exception as exc:  # the tokenizer refused the ids, the episode is full or done, a hook failed
        return _error_reply(EXECUTION_ERROR, f"Step failed: {str(exc)[:200]}")
    history = session.history
    if outcome is None:  # no hook: the bytes are ready, and the step added its one message
        (head, tail, delta_tail), added = _NO_OUTCOME_PARTS, 1
    else:  # the step's message, and a scripted turn after it when the task has one
        (head, tail, delta_tail), added = _observation_parts(outcome), outcome[3]
    if not session.delta:
        return Reply([head, history.messages_json, _OBS_MID, history.tokens_json, tail])
    totals = b'%d,"tokens":%d' % (len(history.message_ends), history.token_count)
    message_json, token_text = history.last() if added == 1 else history.since(history.message_count - added)
    return Reply([head, message_json, _OBS_MID, token_text, _DELTA_MID, totals, delta_tail])


def _state_reply(session: Session) -> Reply:
    env = session.env
    history = session.history
    head = b'{"type":"state","data":{"episode_id":%s,"step_count":%d,"history_messages":[' % (
        _json_bytes(env.episode_id), env.step_count)
    return Reply([head, history.messages_json, b'],"history_tokens":[', history.history_tokens_json(), b"]}}"])


# OpenEnv's MCP endpoint (JSON-RPC 2.0). The chat environment has no tools; what it
# does have is OpenEnv's session methods, which name a session a WebSocket can attach to
_RPC_PARSE_ERROR, _RPC_INVALID_REQUEST, _RPC_INVALID_PARAMS = -32700, -32600, -32602
_RPC_INTERNAL_ERROR, _RPC_SERVER_ERROR = -32603, -32000


def _rpc_error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message, "data": data}}


def _mcp_reply(server: Any, request: Any, session: Session | None = None) -> dict[str, Any] | None:
    """Answer one JSON-RPC request sent to /mcp (HTTP) or as an ``mcp`` frame on /ws.

    A notification (a valid request with no ``id`` member) is answered with None:
    JSON-RPC 2.0 says a server must not reply to one. Its effect still happens,
    except a session/create's: a session whose id nobody is told is never made.
    """
    request_id = request.get("id") if isinstance(request, dict) else None
    if (not isinstance(request, dict) or request.get("jsonrpc") != "2.0"
            or not isinstance(request.get("method"), str) or request.keys() - {"jsonrpc", "method", "params", "id"}
            or not isinstance(request_id, (str, int, type(None))) or isinstance(request_id, bool)):
        return _rpc_error(None, _RPC_INVALID_REQUEST,
                          "Invalid request: a JSON-RPC 2.0 request needs 'jsonrpc': '2.0' and a string 'method'")
    method, params = request["method"], request.get("params", {})
    if "id" not in request:
        if method == "openenv/session/close" and isinstance(params, dict):
            _mcp_reply(server, {**request, "id": None}, session)  # its effect, its answer dropped
        return None
    if not isinstance(params, dict):
        return _rpc_error(request_id, _RPC_INVALID_PARAMS, "Params must be an object")
    if method == "openenv/session/create":
        if session is not None:  # a WebSocket's own session
            if session.id is None:
                import uuid

                session.id = str(uuid.uuid4())
            return {"jsonrpc": "2.0", "id": request_id, "result": {"session_id": session.id}}
        created = server.create_named_session() if server is not None else None
        if not isinstance(created, str):
            text, data = created or (_capacity_text(0, 0), {"active_sessions": 0, "max_sessions": 0})
            return _rpc_error(request_id, _RPC_SERVER_ERROR, text, data)
        return {"jsonrpc": "2.0", "id": request_id, "result": {"session_id": created}}
    if method == "openenv/session/close":
        target = params.get("session_id")
        if not target or not isinstance(target, str):
            return _rpc_error(request_id, _RPC_INVALID_PARAMS, "Invalid params - 'session_id' is required")
        if session is not None and target == session.id:
            return _rpc_error(request_id, _RPC_INVALID_REQUEST,
                              "Cannot close active WebSocket-managed session via MCP method")
        outcome = server.close_named_session(target) if server is not None else None
        if outcome is None:
            return _rpc_error(request_id, _RPC_INVALID_PARAMS, f"Unknown session_id: {_type_text(target)}")
        result = {"session_id": target, "closed": True} if outcome == "closed" else \
            {"session_id": target, "closed": False, "closing": True}
        return {"jsonrpc": "2.0", "id": request_id, "result": result}
    return _rpc_error(request_id, _RPC_INTERNAL_ERROR, "Environment does not support MCP")


def _mcp_http_reply(server: Any, body: bytes) -> dict[str, Any] | None:
    """POST /mcp: parse the body, then answer as ``_mcp_reply`` does (None: a notification)."""
    costly = _costly_json(body)
    if costly is not None:
        return _rpc_error(None, _RPC_INVALID_REQUEST, f"Invalid request: {costly[1]}")
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return _rpc_error(None, _RPC_PARSE_ERROR, "Parse error")
    return _mcp_reply(server, request)


# HTTP beside the WebSocket: the routes OpenEnv 0.10's chat_env server answers, with the
# same statuses and bodies of the same shape, from the same environment code

_ENV_NAME = "chat_env"
_TASK_ROUTES = {  # OpenEnv's task API: a server without tasks says 501, as OpenEnv does
    "splits": ("GET", "list_splits"), "tasks": ("POST", "list_tasks"), "num_tasks": ("POST", "num_tasks"),
    "task": ("POST", "get_task"), "task_range": ("POST", "get_task_range"),
}
_GET_ROUTES = ("/health", "/metadata", "/schema", "/openapi.json", "/state", "/list_environments")
_POST_ROUTES = ("/reset", "/step", "/mcp")


def _unprocessable(loc: str, message: str, value: Any) -> tuple[int, Any]:
    """A 422 shaped as OpenEnv's (pydantic's) validation errors."""
    return 422, {"detail": [{"type": "value_error", "loc": [loc], "msg": message, "input": value}]}


def _http_observation(history: _WireHistory, outcome: Any = None) -> bytes:
    """The stateless POST /reset and /step answer: the observation, OpenEnv 0.10's shape.

    Its metadata is in the observation, and beside it (null when empty); its reward
    a number, as OpenEnv's response model makes it (a bool reward is 1.0 or 0.0).
    """
    reward, done, metadata = (outcome or _NO_OUTCOME)[:3]
    meta = _json_bytes(metadata)
    return b"".join((b'{"observation":{"metadata":', meta, b',"messages":[', history.messages_json, _OBS_MID,
                     history.tokens_json, b']},"reward":%s,"done":%s,"metadata":%s}' % (
                         _json_bytes(None if reward is None else float(reward)), b"true" if done else b"false",
                         meta if metadata else b"null")))


def http_reply(server: Any, method: str, path: str, body: bytes | bytearray = b"") -> tuple[int, Any]:
    """Answer one plain HTTP request: (status, a JSON-able body or pre-encoded JSON bytes).

    ``server`` is the ChatServer (its tokenizer, limits, fresh environments and
    MCP sessions). The stateless POST /reset and /step run on a fresh environment
    each, as OpenEnv's do: sessions live on the WebSocket.
    """
    path = path.split("?", 1)[0]
    if method == "HEAD":
        method = "GET"  # HEAD answers as GET does, without the body (OpenEnv says 405)
    if path == "/ws":
        return 426, {"detail": "Upgrade Required: /ws is a WebSocket endpoint"}
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[1] in _TASK_ROUTES:
        allowed, name = _TASK_ROUTES[parts[1]]
        if method != allowed:
            return 405, {"detail": "Method Not Allowed"}
        if parts[0].lower() != _ENV_NAME:
            return 404, {"detail": f"unknown environment {_type_text(parts[0])!r}"}
        if server.tasks is None:
            return 501, {"detail": f"{name} is not supported for this environment"}
        return _task_route(server.tasks, name, body)
    if path not in _GET_ROUTES and path not in _POST_ROUTES:
        return 404, {"detail": "Not Found"}
    if (method == "GET") != (path in _GET_ROUTES) or method not in ("GET", "POST"):
        return 405, {"detail": "Method Not Allowed"}
    if path == "/health":
        return 200, {"status": "healthy"}
    if path == "/metadata":
        return 200, {
            "name": _ENV_NAME,
            "description": "Chat environment: each step appends one message given as token ids",
            "readme_content": None,
            "version": __version__,
            "author": None,
            "documentation_url": None,
            "server": f"chatenv/{__version__}",
            "tokenizer": _tokenizer_name(server.tokenizer),
            "active_sessions": server.active_sessions,
            "max_sessions": server.max_sessions,
            "worker": os.getpid(),  # which process answered (one of several with --workers)
        }
    if path == "/schema":
        return 200, {"action": _ACTION_SCHEMA, "observation": _OBSERVATION_SCHEMA, "state": _STATE_SCHEMA,
                     "reset_observation": _OBSERVATION_SCHEMA}
    if path == "/openapi.json":
        return 200, _openapi_document()
    if path == "/list_environments":
        return 200, [_ENV_NAME]
    if path == "/mcp":
        answer = _mcp_http_reply(server, body)
        return (200, answer) if answer is not None else (202, b"")  # a notification: accepted, no answer
    history = _WireHistory()
    env = server._new_environment(history=history)
    if path == "/state":
        return 200, env.state.to_dict()
    costly = _costly_json(body, server.max_episode_tokens)
    if costly is not None:
        return _unprocessable("body", costly[1], None)
    try:
        request = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError):
        return _unprocessable("body", "JSON decode error", None)
    if not isinstance(request, dict):
        return _unprocessable("body", "Input should be a valid dictionary", None)
    if path == "/reset":
        try:
            args = _reset_args({"data": request})
            outcome = _reset_outcome(env, args)
        except _RequestError as exc:
            return _unprocessable("body", exc.message, None)
        except Exception as exc:  # a hook failed
            return 500, {"detail": f"Reset failed: {str(exc)[:200]}"}
        return 200, _http_observation(history, outcome)
    action = request.get("action")
    if not isinstance(action, dict):
        return _unprocessable("action", "Field required: an object with 'tokens'", None)
    try:
        tokens = _step_tokens({"data": action})
    except _RequestError as exc:
        return _unprocessable("tokens", exc.message, None)
    try:
        env.reset_outcome()
        outcome = env.step_outcome(tokens)
    except Exception as exc:  # the tokenizer refused the ids, the episode is full, a hook failed
        return 500, {"detail": f"Step failed: {str(exc)[:200]}"}
    return 200, _http_observation(history, outcome)


def _task_route(tasks: Tasks, name: str, body: bytes) -> tuple[int, Any]:
    """A task route's answer, shaped as OpenEnv 0.10's; an unknown split is a 400 (OpenEnv leaves it to the environment)."""
    if name == "list_splits":
        return 200, [{"name": split, "type": split if split in _SPLIT_TYPES else "validation"}
                     for split in tasks.list_splits()]
    try:
        request = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        return 422, {"detail": [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": None}]}
    if not isinstance(request, dict):
        return 422, {"detail": [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]}
    fields = {"split": str, "index": int} if name == "get_task" else {"split": str}
    for key, kind in fields.items():
        value = request.get(key)
        if value is None:
            return 422, {"detail": [{"type": "missing", "loc": ["body", key], "msg": "Field required",
                                     "input": request}]}
        if type(value) is not kind:
            return _unprocessable(key, f"Input should be a valid {'string' if kind is str else 'integer'}", value)
    for key in ("start", "stop") if name == "get_task_range" else ():
        if request.get(key) is not None and type(request[key]) is not int:
            return _unprocessable(key, "Input should be a valid integer", request[key])
    split = request["split"]
    try:
        if name == "list_tasks":
            return 200, {"tasks": tasks.list_tasks(split), "env_name": _ENV_NAME}
        if name == "num_tasks":
            return 200, {"num_tasks": tasks.num_tasks(split)}
        if name == "get_task":
            return 200, {"task": tasks.get_task(split, request["index"])}
        return 200, {"tasks": tasks.get_task_range(split, request.get("start"), request.get("stop"))}
    except IndexError:
        return 400, {"detail": "Invalid task index"}
    except _NoSuchTask as exc:
        return 400, {"detail": str(exc)}


def _openapi_document() -> dict[str, Any]:
    """A minimal OpenAPI 3.1 description of the routes above (OpenEnv's validator reads it)."""
    def operation(summary: str) -> dict[str, Any]:
        return {"summary": summary, "responses": {"200": {"description": "Successful Response"}}}

    paths: dict[str, Any] = {
        "/health": {"get": operation("Health check")},
        "/metadata": {"get": operation("Environment metadata")},
        "/schema": {"get": operation("Action, observation and state JSON schemas")},
        "/state": {"get": operation("State of a fresh environment (sessions live on /ws)")},
        "/reset": {"post": operation("Reset a fresh environment (stateless)")},
        "/step": {"post": operation("Step a fresh environment (stateless)")},
        "/mcp": {"post": operation("MCP JSON-RPC endpoint")},
        "/list_environments": {"get": operation("Environments served")},
    }
    for route, (verb, name) in _TASK_ROUTES.items():
        paths[f"/{{env_name}}/{route}"] = {verb.lower(): operation(name)}
    # info.version is the API's version, which OpenEnv's validator reads as its HTTP standard's
    # profile (OpenEnv says 1.0.0); chatenv's own version is beside it
    return {"openapi": "3.1.0", "info": {"title": "chatenv", "version": "1.0.0", "x-chatenv-version": __version__},
            "paths": paths}


# Who may ask: one decision for every request, on both transports (the native server's
# upgrades and plain HTTP, the ASGI app's HTTP and WebSocket scopes), made from its head
# alone, before a body is read, a session opened or anything counted against a limit
_OPEN_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})  # answered without the token: liveness probes


def _authorized(headers: Any, token: str) -> bool:
    """Check ``Authorization: Bearer <token>`` (scheme in any case) in constant time."""
    import hmac

    values = headers.get_all("Authorization")  # .get() raises when the header is repeated
    scheme, _, given = (values[0] if len(values) == 1 else "").partition(" ")
    matches = hmac.compare_digest(given.strip().encode(), token.encode())
    return matches and scheme.lower() == "bearer"


def _host_name(host: str) -> str:
    """The name in a Host header: lowercased, without its port or an IPv6 address's brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback_host(name: str) -> bool:
    """localhost, a name under .localhost (RFC 6761), 127.0.0.0/8 or ::1 (IPv4-mapped too)."""
    import ipaddress

    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _access_refusal(method: str, path: str, upgrade: bool, headers: Any, *, token: str | None, loopback: bool,
                    allow_origins: frozenset[str],
                    allow_hosts: frozenset[str]) -> tuple[int, str, dict[str, str]] | None:
    """Why a request may not reach the server at all, as (status, text, extra headers),
    or None. Pure: both shells ask it of every request, and no route decides for itself.

    ``upgrade``: the request opens a session (a WebSocket upgrade to /ws). A server
    on a loopback address answers only loopback Host names (and ``allow_hosts``), so
    a web page whose name was rebound to 127.0.0.1 cannot reach it; a WebSocket
    upgrade or any request with a body that carries an ``Origin`` (a browser's)
    needs that origin in ``allow_origins``, since browsers let any page open
    WebSockets and POST to any address; clients that send no Origin (OpenEnv's,
    chatenv's, curl) are not affected. With a ``token``, every request but
    ``_OPEN_ROUTES`` needs ``Authorization: Bearer <token>``: 401 otherwise.
    Host and Origin come first: they need no secret, so a page a browser runs gets
    the same 403 whatever it sends, and learns nothing of the token, not even that
    one is set.
    """
    if loopback and "*" not in allow_hosts:
        hosts = headers.get_all("Host")
        if len(hosts) > 1:
            return 400, "Bad Request: more than one Host header\n", {}
        name = _host_name(hosts[0]) if hosts else ""
        if hosts and not _is_loopback_host(name) and name not in allow_hosts:
            return 403, (f"Forbidden: this server listens on a loopback address and answers only loopback "
                         f"Host names, not {_preview(name)} (allow it with --allow-host)\n"), {}
    if upgrade or method not in ("GET", "HEAD"):
        origins = headers.get_all("Origin")
        if origins and "*" not in allow_origins:
            origin = origins[0].strip().lower().rstrip("/")
            if len(origins) > 1 or origin not in allow_origins:
                return 403, (f"Forbidden: requests from web pages at {_preview(origin)} are not allowed "
                             f"(allow the origin with --allow-origin)\n"), {}
    if token is not None and (upgrade or (method, path.split("?", 1)[0]) not in _OPEN_ROUTES) \
            and not _authorized(headers, token):
        return (401, "Unauthorized: a valid 'Authorization: Bearer' token is required\n",
                {"WWW-Authenticate": "Bearer"})
    return None


# ------------------------------------------------------------------------------
# Server: asyncio transports driving websockets' Sans-I/O protocol
# ------------------------------------------------------------------------------

# websockets, through its documented API only: the Sans-I/O ServerProtocol (receive_data,
# receive_eof, events_received, data_to_send, send_*, fail, accept, reject, send_response,
# state, close_exc, close_expected), the permessage-deflate factories, the data structures
# (Frame, Opcode, Close, Request, Response, Headers) and the asyncio client. What it does not
# offer is done here, in the I/O shell, from documented facts. test_chatenv.py checks this
# module's source against the list of names it may reach (WEBSOCKETS_NAMES there).

# websockets' State and Opcode members, bound by _bind_websockets() on first use so that
# `import chatenv` does not import websockets; the hot path compares them by identity
_CONNECTING: Any = None
_OPEN: Any = None
_CLOSING: Any = None
_CLOSED: Any = None
_OP_CONT: Any = None
_OP_TEXT: Any = None
_OP_BINARY: Any = None
_OP_CLOSE: Any = None
_OP_PING: Any = None
_OP_PONG: Any = None


@functools.cache
def _bind_websockets() -> None:
    """Bind the State and Opcode members above (websockets.protocol.State, websockets.frames.Opcode)."""
    global _CONNECTING, _OPEN, _CLOSING, _CLOSED, _OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG
    from websockets.frames import Opcode
    from websockets.protocol import State

    _CONNECTING, _OPEN, _CLOSING, _CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED
    _OP_CONT, _OP_TEXT, _OP_BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
    _OP_CLOSE, _OP_PING, _OP_PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG


def _deflate_extensions(side: str) -> list[Any]:
    """permessage-deflate for "server" or "client", from the documented factory with the
    memory-saving settings websockets itself defaults to (4 KiB windows, memLevel 5)."""
    from websockets.extensions import permessage_deflate

    factory = (permessage_deflate.ServerPerMessageDeflateFactory if side == "server"
               else permessage_deflate.ClientPerMessageDeflateFactory)
    return [factory(server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5})]


def _close_code(exc: Any) -> int:
    """The code a session ended with, from a ConnectionClosed's close frames: the peer's,
    else ours (we failed it), else 1006 (no close frame at all)."""
    if exc.rcvd is not None:
        return exc.rcvd.code
    return exc.sent.code if exc.sent is not None else 1006


# Undocumented names the sync client's _SocketWire still reaches (moving onto ClientProtocol's
# documented API on branch client-bounds): delete with their last use; test_chatenv.py lists
# them as pending (SYNC_CLIENT_PENDING), so nothing else may use them


def _websockets_version() -> tuple[int, int]:
    """The installed websockets release as (major, minor), from its distribution's metadata:
    the tests' sync client takes ``legacy`` from 17.1 on."""
    from importlib.metadata import version

    major, minor = version("websockets").split(".")[:2]
    return int(major), int(minor)


_INBOX_LIMIT = 16  # queued requests per session before its socket stops being read
_SHUTDOWN_CODE = 1012  # "service restart": what OpenEnv 0.10 (uvicorn) closes sessions with on shutdown
_NAMED_SESSION_TTL_S = 600.0  # an MCP-created session no WebSocket has used for this long is dropped
_HTTP_HEAD_BYTES = 16 * 2**10  # largest request line and headers of any request, WebSocket upgrades included
_READ_BYTES = 2**16  # a request larger than this waits for the one before it to be answered (reading paused)
_MAX_FRAGMENTS = 4096  # frames one fragmented message may come in: a stream of tiny or empty ones is closed
_LARGE_REPLY_BYTES = 2**18  # a bigger reply goes out this much per loop turn, so no other session waits behind it
_ACCEPT_BATCH = 16  # connections taken from the listening socket per loop turn: sessions get turns between
_ACCEPT_RETRY_S = 0.25  # at the file-descriptor limit, accepting is retried this often (and whenever one closes)
_FD_LIMIT_EVICTIONS = 16  # stalled handshakes dropped each time the descriptor limit is hit, to make room
_LOG_LINES_PER_S = 20  # lines a second of one kind about sessions (opened, closed, dropped); more are counted
_CLOSE_TOO_BIG, _CLOSE_TRY_AGAIN = 1009, 1013  # the close codes chatenv fails a connection with
_wire_logger = logging.getLogger("chatenv.wire")
_wire_logger.setLevel(logging.WARNING)  # websockets logs every open/close at INFO; we log sessions




def _allow_list(value: Any, what: str) -> frozenset[str]:
    """Origins or host names, lowercased; a string may hold several, comma-separated."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{what} must be strings, not {value!r}")
    return frozenset(item.strip().lower().rstrip("/") for item in items if item.strip())


def _listen(host: str, port: int) -> list[Any]:
    """Listening sockets on every address ``host`` resolves to (all interfaces if empty), one port."""
    import socket

    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[Any] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            if listeners and not port:  # port 0: the one the first address got, for all of them
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds "::"
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address[:2]!r}: "
                                         f"{(exc.strerror or str(exc)).lower()}") from None
            sock.listen(1024)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _raise_fd_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; the soft limit then."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # macOS refuses an unlimited soft limit: keep what we have
            pass
    return None if soft == resource.RLIM_INFINITY else soft


class _LogLimiter:
    """Log lines of one kind at a bounded rate: the first ``burst`` each second as they
    come, then only a count, logged once a second with the last of them.

    A client causes a line per connection (a refusal, a session opened and closed);
    at thousands of connections a second that would fill a disk.
    """

    def __init__(self) -> None:
        self._clock = time.monotonic
        self.window = self._clock()
        self.kinds: dict[str, list[Any]] = {}  # kind -> [lines logged this window, lines held back, level, last]
        self.unlimited = False

    def log(self, kind: str, burst: int, level: int, message: str, *args: Any) -> None:
        """``message`` starts with ``kind``; a count of held-back lines reads "<kind>: N more ..."."""
        if self._clock() - self.window >= 1.0:
            self.flush()
        entry = self.kinds.get(kind)
        if entry is None:
            entry = self.kinds[kind] = [0, 0, level, None]
        if entry[0] < burst or self.unlimited:
            entry[0] += 1
            logger.log(level, message, *args)
        else:
            entry[1] += 1
            entry[3] = (message, args)

    def flush(self) -> None:
        now = self._clock()
        for kind, (_, held_back, level, last) in self.kinds.items():
            if held_back:
                text = last[0] % last[1]
                logger.log(level, "%s: %d more in the last %.1f s, not logged one by one (the last: %s)",
                           kind, held_back, now - self.window, text[len(kind):].lstrip(": "))
        self.kinds.clear()
        self.window = now


_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a method or header name (RFC 9110 5.6.2)
_HTTP_VERSION = re.compile(r"HTTP/1\.[01]")
_HTTP_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # bytes no request line or header may hold (tab may)


def _parse_http_head(head: bytes) -> tuple[str, str, Any, int]:
    """A request head (without its blank line) as (method, target, headers, Content-Length).

    Strict, as a request that two parsers could read two ways must not be read
    at all (RFC 9112): any malformed line, control byte, signed or non-decimal
    or conflicting Content-Length raises ValueError saying what is wrong.
    """
    from websockets.datastructures import Headers

    text = head.decode("latin-1")
    if _HTTP_CONTROL.search(text.replace("\r\n", "  ")):
        raise ValueError("a control character in the request line or headers")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _HTTP_TOKEN.fullmatch(parts[0]) or not parts[1] or not _HTTP_VERSION.fullmatch(parts[2]):
        raise ValueError(f"not a request line: {_preview(lines[0])}")
    headers, lengths = Headers(), set()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _HTTP_TOKEN.fullmatch(name):
            raise ValueError(f"not a header line: {_preview(line)}")
        value = value.strip(" \t")
        headers[name] = value
        if name.lower() == "content-length":
            if not value.isascii() or not value.isdigit() or len(value) > 18:
                raise ValueError(f"Content-Length is not a decimal number of bytes: {_preview(value)}")
            lengths.add(int(value))
    if len(lengths) > 1:
        raise ValueError(f"conflicting Content-Length headers: {sorted(lengths)}")
    return parts[0], parts[1], headers, lengths.pop() if lengths else 0


# What a session costs its server beyond its episode's history (its connection, the
# Sans-I/O protocol, the session and environment objects, a small last step kept for
# delta replies): 7.3 KB by RSS over a thousand open sessions (test_limits.py checks
# it), plus _LAST_KEPT_BYTES, rounded up
_SESSION_OVERHEAD_BYTES = 16 * 2**10


class _MemoryAccount:
    """What one session holds of its server's memory bound: a fixed overhead plus its episode.

    Admission reserves the overhead and an empty episode; the session's
    ``_WireHistory`` charges every change from there, so its episode is counted
    from its first byte. Closing it gives everything back; a charge after that
    (a step finishing in a worker thread as its socket goes) is ignored, so
    nothing is counted twice or lost.
    """

    __slots__ = ("server", "held", "open", "episode_bytes")

    def __init__(self, server: ChatServer, episode_bytes: int) -> None:
        self.server, self.held, self.open = server, _SESSION_OVERHEAD_BYTES + episode_bytes, True
        self.episode_bytes = episode_bytes  # of held, the episode's: at admission an empty one's

    def charge(self, size: int, refuse: bool = False) -> None:
        """Count ``size`` more bytes (fewer if negative); with ``refuse``, raise rather than pass the bound."""
        if not self.server.offload:  # every step runs on the event loop: nothing to race with
            return self._charge(size, refuse)
        with self.server._memory_lock:
            return self._charge(size, refuse)

    def _charge(self, size: int, refuse: bool) -> None:
        server = self.server
        if self.open:
            limit = server.max_memory_bytes
            if refuse and limit is not None and server.memory_used + size > limit:
                raise ValueError(
                    f"the server's memory bound is reached: its episodes hold {server.memory_used} bytes "
                    f"of --max-memory-bytes {limit} and this step needs {size} more; reset to free this episode"
                )
            server.memory_used += size
            self.held += size
            self.episode_bytes += size

    def close(self) -> None:
        with self.server._memory_lock:
            if self.open:
                self.server.memory_used -= self.held
                self.open, self.held = False, 0


def _per_session(hook: Any) -> Any:
    """A session's own instance of a hook: a copy of an object, which may keep state; a function is shared.

    An object that cannot be copied (it holds a lock or a connection) is shared,
    and must then be safe to call from several step threads at once.
    """
    import copy
    import types

    if hook is None or isinstance(hook, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return hook
    try:
        return copy.deepcopy(hook)
    except Exception:
        return hook


def _known_fast(hook: Any) -> bool:
    """Whether a hook is known to return at once (none, a built-in reward, a weighted sum of those)."""
    if isinstance(hook, _WeightedRubrics):
        return all(_known_fast(rubric) for _, rubric, _ in hook.rubrics)
    return hook is None or any(hook is builtin for builtin in _BUILTIN_REWARDS.values())


def _hook_thread_init(loop: Any) -> None:
    """A step thread's start: async hooks it meets are awaited on ``loop`` (see _settle)."""
    _hook_thread.loop = loop


class ChatServer:
    """An asyncio server: a chat session per WebSocket at /ws, HTTP probes beside.

    It drives websockets' Sans-I/O protocol from asyncio transports directly:
    no long-lived task or thread per connection; every frame goes through the
    protocol, and each loop turn's replies are written together, one frame each
    (a large one a chunk a turn). It accepts from its
    listening sockets itself, counting every connection from its first byte.
    Embedded-tokenizer steps run inline; any other tokenizer runs in a thread
    pool, so a slow tokenizer never stalls other sessions or pings.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        system_prompt: str | None = None,
        system_role: str = "system",
        auth_token: str | None = None,
        compression: str | None = None,
        allow_origins: Any = (),
        allow_hosts: Any = (),
        # Limits
        max_sessions: int = 256,
        max_named_sessions: int | None = None,
        max_handshakes: int = 1024,
        max_buffered_bytes: int | None = 2**28,
        max_message_bytes: int | None = 2**24,
        max_episode_tokens: int | None = 2**20,
        max_memory_bytes: int | None = 2**31,
        # Timeouts (seconds; None disables)
        open_timeout_s: float | None = 10.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        idle_timeout_s: float | None = None,
        send_timeout_s: float | None = 30.0,
        close_timeout_s: float = 2.0,
        offload: bool | None = None,
        sock: Any = None,
        # Rewards, tasks and episode ends: ChatEnvironment's, for every session (hook
        # objects copied per session, see _per_session); show_answers: task routes send answers
        transform: Any = None,
        rubric: Any = None,
        tasks: Any = None,
        max_turns: int | None = None,
        stop: Any = (),
        show_answers: bool = False,
    ) -> None:
        if compression not in (None, "none", "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, not {compression!r}")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_named_sessions is not None and max_named_sessions < 0:
            raise ValueError(f"max_named_sessions must be 0 (none) or more, not {max_named_sessions!r}")
        if max_memory_bytes is not None and max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be 0 or more (0 or None: no bound), not {max_memory_bytes!r}")
        if auth_token is not None and not auth_token.strip():
            raise ValueError("an empty auth token would let everyone in: set a token, or leave it unset")
        if auth_token is not None and auth_token != auth_token.strip():  # headers are read stripped: never a match
            raise ValueError("the auth token has leading or trailing whitespace, which no client's header can match")
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        self.tokenizer = load_tokenizer(tokenizer)
        # What each session's environment is made from: ChatEnvironment's arguments, the
        # system prompt tokenized once, here, for all of them (a tuple each one holds)
        self.system_prompt, self.system_role = system_prompt, system_role
        self.max_episode_tokens = max_episode_tokens
        system = {"role": system_role, "content": system_prompt}
        system_tokens = tuple(_tokenize_message(self.tokenizer, system)) if system_prompt else None
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, not {max_turns!r}")
        if tasks is not None and not hasattr(tasks, "pick"):
            tasks = Tasks(tasks, show_answers=show_answers)  # loaded once, here: sessions (and workers) share it
        self.tasks, self.transform, self.rubric = tasks, transform, rubric
        self.hooked = any(x is not None for x in (transform, rubric, tasks, max_turns)) or bool(stop)
        self._new_environment = functools.partial(  # (history=...): one factory, shared by every session
            ChatEnvironment, self.tokenizer, system_prompt, system_role, max_episode_tokens,
            system_tokens=system_tokens, tasks=tasks, max_turns=max_turns, stop=stop)
        if transform is not None or rubric is not None:  # each session its own copies of hooks that keep state
            self._new_environment = functools.partial(self._hooked_environment, self._new_environment)
        empty = _WireHistory()
        self._new_environment(history=empty)
        self._empty_episode_bytes = empty.nbytes  # what a new session's episode holds: its system prompt
        self.host, self.port = host, port
        self.auth_token = auth_token
        self.compression = None if compression == "none" else compression
        # Browsers: origins whose pages may open sessions or POST (a WebSocket is not
        # bound by the same-origin policy); Host names a loopback server answers
        # besides loopback ones, so DNS rebinding cannot reach it
        self.allow_origins = _allow_list(allow_origins, "allow_origins")
        self.allow_hosts = _allow_list(allow_hosts, "allow_hosts")
        self.max_sessions = max_sessions
        # Of those, sessions made over HTTP (openenv/session/create) at once: a quarter by
        # default, so a client looping on creates leaves the rest to WebSockets; 0: none
        self.max_named_sessions = max(1, max_sessions // 4) if max_named_sessions is None else max_named_sessions
        # Connections not (yet) sessions: handshakes, plain HTTP requests, refusals;
        # past the limit the oldest is dropped, so stalled ones cannot lock out new ones
        self.max_handshakes = max_handshakes
        # Bytes of incomplete incoming messages (partial frames, fragments, HTTP bodies)
        # all connections may hold together; the one that would pass it is closed (1013)
        self.max_buffered_bytes = max_buffered_bytes or None
        self.max_message_bytes = max_message_bytes
        # The bytes all sessions' episodes may hold together: each session is charged
        # _SESSION_OVERHEAD_BYTES plus its history's exact size (_MemoryAccount)
        self.max_memory_bytes = max_memory_bytes or None
        self.memory_used = 0
        self._memory_lock = threading.Lock()  # steps may run in the offload pool
        self.open_timeout_s = open_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.send_timeout_s = send_timeout_s
        self.close_timeout_s = close_timeout_s
        # Inline steps are safe only for a tokenizer known to be fast and hooks known to be
        # (the built-in rewards); others may wait on a judge or compute: those steps run in
        # a thread pool, a thread per busy session
        if offload is None:
            offload = not (isinstance(self.tokenizer, ByteTokenizer) and _known_fast(transform) and _known_fast(rubric))
        self.offload = offload
        self.sock = sock  # a bound socket to serve on instead of host:port (a worker's, see _Supervisor)
        self.active_sessions = 0
        self._connections: set[_Connection] = set()
        self._named: dict[str, list[Any]] = {}  # named sessions: id -> [session, attached, closing, last used]
        self._unflushed: list[_Connection] = []  # connections with writes queued this loop turn
        self._handshakes: dict[_Connection, None] = {}  # connections not sessions (yet), oldest first
        self._buffered_bytes = 0  # what max_buffered_bytes bounds: the sum of each connection's .held_bytes
        self._log = _LogLimiter()
        self._listeners: list[Any] = []  # listening sockets, accepted from by _accept
        self._loopback = False  # whether every listening address is a loopback one (the Host check applies)
        self._accept_paused = False  # at the file-descriptor limit
        self._accept_retry: Any = None
        self._loop: Any = None
        self._executor: Any = None
        self._housekeeper: Any = None
        self._stopped: Any = None

    # Lifecycle

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting; ``port`` then holds the bound port."""
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        _bind_websockets()
        # websockets' memory-saving deflate settings (smaller windows) when compressing
        self._extensions = _deflate_extensions("server") if self.compression else None
        descriptors = _raise_fd_limit()
        self._listeners = [self.sock] if self.sock is not None else _listen(self.host, self.port)
        for listener in self._listeners:
            listener.setblocking(False)
            self._loop.add_reader(listener.fileno(), self._accept, listener)
        addresses = [listener.getsockname() for listener in self._listeners]
        self.port = addresses[0][1]
        self._loopback = all(_is_loopback_host(str(address[0])) for address in addresses)
        self._housekeeper = self._loop.call_later(self._tick_s, self._housekeeping)
        logger.info(
            "listening on %s (WebSocket at /ws; max %d sessions; tokenizer %s; up to %s open files)",
            self.url, self.max_sessions, _tokenizer_name(self.tokenizer), descriptors or "?",
        )

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self, code: int = _SHUTDOWN_CODE, reason: str = "server shutting down") -> None:
        """Stop listening, close every session with ``code``, abort stragglers."""
        import asyncio

        if not self._listeners:
            return
        self._pause_accepting()
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._accept_retry is not None:
            self._accept_retry.cancel()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        self._log.flush()
        self._log.unlimited = True  # one line per session closed now: at most max_sessions of them
        for conn in list(self._connections):
            conn.start_close(code, reason)
        deadline = self._loop.time() + min(self.close_timeout_s, 0.5)
        while self._connections and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.transport.abort()
        await asyncio.sleep(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        logger.info("server stopped")

    # Accepting: our own loop on the listening sockets rather than asyncio's, which at
    # the file-descriptor limit logs a traceback per try and spins. Every connection
    # is counted from its first byte: until it is a session it is one of at most
    # max_handshakes, and the oldest of those is dropped to make room for a new one

    def _accept(self, listener: Any) -> None:
        import errno

        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the peer gave up while queued
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._at_fd_limit(exc)
                else:  # not expected from accept(); say so, at most once a second, and carry on
                    self._log.log("accept failed", 1, logging.WARNING, "accept failed: %s", exc)
                    self._pause_accepting()
                    self._retry_accepting(_ACCEPT_RETRY_S)
                return
            if len(self._handshakes) >= self.max_handshakes and self._drop_oldest_handshake():
                self._log.log("dropped a stalled handshake", 1, logging.WARNING,
                              "dropped a stalled handshake: %d connections are not sessions yet "
                              "(max_handshakes %d)", len(self._handshakes) + 1, self.max_handshakes)
            conn = _Connection(self)
            self._handshakes[conn] = None
            self._loop.create_task(self._attach(conn, sock))

    async def _attach(self, conn: _Connection, sock: Any) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: conn, sock)
        except Exception:  # the peer went away before its transport existed
            self._handshakes.pop(conn, None)
            sock.close()

    def _drop_oldest_handshake(self) -> bool:
        for conn in self._handshakes:
            if conn.transport is not None:
                del self._handshakes[conn]
                conn.transport.abort()
                return True
        return False

    def _at_fd_limit(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting until one frees (the backlog waits in the kernel)."""
        self._pause_accepting()
        dropped = 0
        while dropped < _FD_LIMIT_EVICTIONS and self._drop_oldest_handshake():
            dropped += 1
        self._log.log("at the file-descriptor limit", 1, logging.WARNING,
                      "at the file-descriptor limit (%s): not accepting until a descriptor frees; %d "
                      "connections open, %d sessions; dropped %d stalled handshakes to make room",
                      exc.strerror, len(self._connections), self.active_sessions, dropped)
        self._retry_accepting(0 if dropped else _ACCEPT_RETRY_S)

    def _pause_accepting(self) -> None:
        if not self._accept_paused:
            self._accept_paused = True
            for listener in self._listeners:
                self._loop.remove_reader(listener.fileno())

    def _retry_accepting(self, delay: float) -> None:
        if self._accept_retry is not None:
            if delay:
                return
            self._accept_retry.cancel()
        self._accept_retry = self._loop.call_later(delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        if self._accept_paused and self._listeners:
            self._accept_paused = False
            for listener in self._listeners:
                self._loop.add_reader(listener.fileno(), self._accept, listener)

    # Sessions

    def _new_session(self) -> Session | None:
        """A new session, or None when the server holds as many sessions or bytes as it may."""
        if self.active_sessions >= self.max_sessions:
            return None
        if self.max_memory_bytes is None:
            self.active_sessions += 1
            return Session(self._new_environment, self)
        need = _SESSION_OVERHEAD_BYTES + self._empty_episode_bytes  # the session and its empty episode
        with self._memory_lock:
            if self.memory_used + need > self.max_memory_bytes:
                return None
            self.memory_used += need
        self.active_sessions += 1
        return Session(self._new_environment, self, None, _MemoryAccount(self, self._empty_episode_bytes))

    def _free_session(self, session: Session) -> None:
        """Give back what a session held of the memory bound."""
        if session.account is not None:
            session.account.close()

    def _hooked_environment(self, make: Any, **kwargs: Any) -> ChatEnvironment:
        return make(transform=_per_session(self.transform), rubric=_per_session(self.rubric), **kwargs)

    def _run_offloaded(self, function: Any, *args: Any, loop: Any = None) -> Any:
        """``function(*args)`` in the step pool (a step, a stateless HTTP one too): a future.

        ``loop`` (default the server's) runs async hooks. With hooks the pool has a
        thread per session (made when needed), so sessions whose hooks wait never
        hold up the others; without, the default size.
        """
        loop = loop or self._loop
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(
                max_workers=self.max_sessions if self.hooked else None, thread_name_prefix="chatenv-step",
                initializer=_hook_thread_init, initargs=(loop,))
        return loop.run_in_executor(self._executor, function, *args)

    # Sessions as both shells (native and ASGI) open and close them: one decision, one place

    def _refusal(self, method: str, path: str, upgrade: bool, headers: Any, peer: str,
                 loopback: bool | None = None) -> tuple[int, str, dict[str, str]] | None:
        """Why a request is refused before it is read (``_access_refusal``): (status, text,
        headers), logged, or None. ``loopback``: whether the server's address is a loopback
        one (the ASGI server's, from its scope); by default, this server's listening address.
        """
        refused = _access_refusal(method, path, upgrade, headers, token=self.auth_token,
                                  loopback=self._loopback if loopback is None else loopback,
                                  allow_origins=self.allow_origins, allow_hosts=self.allow_hosts)
        if refused is None:
            return None
        if refused[0] == 401:  # never the path's query nor the header: either may hold a token
            what = "refused an unauthenticated WebSocket upgrade" if upgrade else "refused an unauthenticated request"
            self._log.log(what, 1, logging.WARNING, what + " from %s: %s %s", peer, method[:16],
                          _preview(path.split("?", 1)[0]))
        else:
            self._log.log("refused a request", 1, logging.WARNING, "refused a request from %s: %d %s",
                          peer, refused[0], refused[1].strip()[:200])
        return refused

    def _open_session(self, query: str, peer: str) -> tuple[Session | None, str | None, Reply | None]:
        """The session for an accepted /ws upgrade: (session, its name if attached, refusal)."""
        named_id = _query_value(query, "session_id")
        if named_id:  # attach to a named session (OpenEnv's HTTP MCP sessions)
            attached = self.attach_named_session(named_id)
            if isinstance(attached, str):
                return None, None, _error_reply(SESSION_ERROR, attached, close=True)
            self._log.log("session attached", _LOG_LINES_PER_S, logging.INFO, "session attached: %s to %s",
                          peer, _type_text(named_id))
            return attached, named_id, None
        session = self._new_session()
        if session is None and self.active_sessions < self.max_sessions:  # room for a session, not its bytes
            text = (f"Server at capacity: its episodes hold {self.memory_used} bytes of --max-memory-bytes "
                    f"{self.max_memory_bytes}, no room for another session. Cannot accept new connections.")
            self._log.log("refused a session", 1, logging.WARNING,
                          "refused a session from %s: memory bound reached (%d of %d bytes)",
                          peer, self.memory_used, self.max_memory_bytes)
            return None, None, _error_reply(CAPACITY_REACHED, text, close=True, active_sessions=self.active_sessions,
                                           max_sessions=self.max_sessions)
        if session is None:
            self._log.log("refused a session", 1, logging.WARNING, "refused a session from %s: at capacity (%d/%d)",
                          peer, self.active_sessions, self.max_sessions)
            return None, None, _capacity_reply(self.active_sessions, self.max_sessions)
        self._log.log("session opened", _LOG_LINES_PER_S, logging.INFO, "session opened: %s, %d/%d active",
                      peer, self.active_sessions, self.max_sessions)
        return session, None, None

    def _close_session(self, session: Session, named_id: str | None, peer: str, code: int,
                       requests: int, seconds: float) -> None:
        """A session's WebSocket has gone: free its slot (a named session only detaches)."""
        if named_id is not None:
            self.detach_named_session(named_id)
        else:
            self.active_sessions -= 1
            self._free_session(session)
        self._log.log("session closed", _LOG_LINES_PER_S, logging.INFO,
                      "session closed: %s, code %d, %d requests, %.1f s, %d/%d active",
                      peer, code, requests, seconds, self.active_sessions, self.max_sessions)

    # Named sessions: OpenEnv's MCP ``openenv/session/create`` makes one, a WebSocket
    # attaches to it with /ws?session_id=ID and leaves it alive when it goes; each
    # counts against max_sessions, and max_named_sessions, until closed or unused for
    # _NAMED_SESSION_TTL_S

    def create_named_session(self) -> str | tuple[str, dict[str, int]]:
        """A new named session's id, or why not: (text, data) naming the limit reached."""
        import uuid

        if len(self._named) >= self.max_named_sessions:
            self._expire_named_sessions()  # the ASGI app has no housekeeping timer to do it
        named, limit = len(self._named), self.max_named_sessions
        if named >= limit and self.active_sessions < self.max_sessions:  # when both are reached: the server's
            self._log.log("refused a session", 1, logging.WARNING,
                          "refused a session: %d/%d named sessions (--max-named-sessions)", named, limit)
            return (f"Server at capacity for named sessions: {named}/{limit} made with openenv/session/create "
                    f"are open (--max-named-sessions). Close one with openenv/session/close, or use /ws.",
                    {"named_sessions": named, "max_named_sessions": limit})
        session = self._new_session()
        if session is None:
            return _capacity_text(self.active_sessions, self.max_sessions), {
                "active_sessions": self.active_sessions, "max_sessions": self.max_sessions}
        session.id = str(uuid.uuid4())
        self._named[session.id] = [session, False, False, self._clock()]  # attached, closing, last used
        return session.id

    def attach_named_session(self, session_id: str) -> Session | str:
        """The named session for a WebSocket, or why it cannot be had (OpenEnv's words)."""
        entry = self._named.get(session_id)
        if entry is None:
            return f"Unknown session_id: {_type_text(session_id)}"
        if entry[1]:
            return f"Session {_type_text(session_id)} already has an attached WebSocket"
        entry[1] = True
        return entry[0]

    def detach_named_session(self, session_id: str) -> None:
        entry = self._named.get(session_id)
        if entry is not None:
            entry[1], entry[3] = False, self._clock()
            if entry[2]:
                self._drop_named(session_id)

    def close_named_session(self, session_id: str) -> str | None:
        """'closed', 'closing' (a WebSocket holds it: closed when it leaves), or None if unknown."""
        entry = self._named.get(session_id)
        if entry is None:
            return None
        if entry[1]:
            entry[2] = True
            return "closing"
        self._drop_named(session_id)
        return "closed"

    def _drop_named(self, session_id: str) -> None:
        entry = self._named.pop(session_id, None)
        if entry is not None:
            self.active_sessions -= 1
            self._free_session(entry[0])

    def _clock(self) -> float:
        return time.monotonic()

    def _expire_named_sessions(self) -> None:
        now = self._clock()
        for session_id, (_, attached, _, last_used) in list(self._named.items()):
            if not attached and now - last_used > _NAMED_SESSION_TTL_S:
                self._drop_named(session_id)

    # Writes: queued during a loop turn, sent together at the start of the next, so
    # replies leave in bursts, as from a server whose handlers are tasks, and peers
    # handling many sessions wake once per burst rather than once per reply

    def _schedule_flush(self, conn: _Connection) -> None:
        if not self._unflushed:
            self._loop.call_soon(self._flush_writes)
        self._unflushed.append(conn)

    def _flush_writes(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for conn in unflushed:
            try:
                conn.flush()
            except Exception as exc:  # flush guards its transport calls: a bug, still this connection's only
                conn.drop("flushing its writes", exc, logging.ERROR)

    # Keepalive and timeouts: one timer for the whole server, not one per session

    @property
    def _tick_s(self) -> float:
        timeouts = [
            t for t in (self.open_timeout_s, self.ping_interval_s, self.ping_timeout_s,
                        self.idle_timeout_s, self.send_timeout_s, self.close_timeout_s)
            if t
        ]
        return max(0.02, min([1.0] + [t / 4 for t in timeouts]))

    def _housekeeping(self) -> None:
        now = self._loop.time()
        if self._named:
            self._expire_named_sessions()
        if self._log.kinds and self._log._clock() - self._log.window >= 1.0:
            self._log.flush()  # the counts of lines held back: once a second at most
        for conn in list(self._connections):
            try:
                conn.check_timeouts(now)
            except Exception as exc:  # one broken connection must not stop the others' keepalive
                conn.drop("checking its timeouts", exc, logging.ERROR)
        self._housekeeper = self._loop.call_later(self._tick_s, self._housekeeping)


# Last parts of a tokenizer's path that name nothing a user would recognise on their own:
# /metadata shows the folder above them too ("qwen/tokenizer.json", not "tokenizer.json")
_GENERIC_PATH_PARTS = {"model", "models", "tokenizer", "tokenizer.json"}


def _tokenizer_name(tokenizer: Tokenizer) -> str:
    """A tokenizer's model name; of a local path, only its last part, or its last two when
    the last is generic (HTTP answers show it: never a full path)."""
    name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "name", None)
    if not isinstance(name, str) or not name:
        return type(tokenizer).__name__
    if not (os.path.isabs(name) or os.path.exists(name)):
        return name  # a model name: "gpt2", "org/model"
    parts = [part for part in name.replace(os.sep, "/").split("/") if part not in ("", ".", "..")]
    shown = parts[-2:] if len(parts) > 1 and parts[-1].lower() in _GENERIC_PATH_PARTS else parts[-1:]
    return "/".join(shown) or type(tokenizer).__name__


class _LargeReply:
    """A reply over _LARGE_REPLY_BYTES on its way out, a chunk a loop turn, never joined whole."""

    __slots__ = ("pieces", "index", "offset", "started")

    def __init__(self, pieces: list[bytes]) -> None:
        # Its frame as the protocol made it or, compressed, its payload parts
        self.pieces = pieces
        # Where the next chunk starts: pieces[index][offset:]
        self.index = self.offset = 0
        # Whether its first fragment is out (compressed, it goes as a fragment per chunk)
        self.started = False


class _Connection:
    """One TCP connection: feeds its bytes to the Sans-I/O protocol, runs the session.

    It lives in two phases. The handshake phase reads the request head (bounded in
    total), answers plain HTTP requests itself and hands a GET of /ws to websockets'
    protocol. The frame phase feeds every byte to the protocol and acts on the frames
    it parses. Replies are queued during a loop turn and flushed by the server at the next.
    """

    def __init__(self, server: ChatServer) -> None:
        from websockets.server import ServerProtocol

        # The server: its limits, clock and the loop turn's flush
        self.server = server
        # websockets' Sans-I/O protocol: the handshake, every frame, the closing handshake
        self.proto = ServerProtocol(
            max_size=server.max_message_bytes,
            extensions=server._extensions,
            logger=_wire_logger,
        )
        # asyncio's transport, from connection_made
        self.transport: Any = None
        # The client's address as "host:port", for the log
        self.peer = "?"

        # Handshake phase. The request head so far while it may be a WebSocket upgrade
        # (None: a plain HTTP request, read by _receive_http_request, or handed on)
        self.head: bytearray | None = bytearray()
        # Bytes of the request line and headers so far: at most _HTTP_HEAD_BYTES
        self.head_bytes = 0
        # A plain HTTP request with a body, as read so far; once answered, an empty
        # buffer that what the client still sends is discarded into
        self.http_body: bytearray | None = None
        # That request's method, target and Content-Length, once its head is whole (parsed once)
        self.http_head: tuple[str, str, int] | None = None

        # The session, from the accepted upgrade on (None: not yet, or refused)
        self.session: Session | None = None
        # The named session this WebSocket attached to (MCP), None for its own session
        self.named_id: str | None = None
        # Requests answered, for the log line when the session closes
        self.requests = 0

        # Frame phase. Whether permessage-deflate was negotiated
        self.compressed = False
        # At most this many bytes fed to the protocol are not parsed yet (a frame not whole):
        # counted from the frames it parses (see _receive_frames)
        self.pending = 0
        # A fragmented message so far, its opcode, and the frames it came in
        self.fragments: bytearray | None = None
        self.fragment_opcode: Any = None
        self.fragment_count = 0
        # Bytes of incomplete messages held here: this connection's part of max_buffered_bytes
        self.held_bytes = 0

        # Requests read and not handled yet, as (opcode, payload), one at a time and in order
        self.inbox: Any = None
        # A request is being handled in the server's offload pool
        self.offloaded = False
        # _drain is due in the next loop turn
        self.drain_scheduled = False
        # Reading is paused: the inbox is full, a large request waits, or writes are paused
        self.reading_paused = False

        # This loop turn's writes, flushed together by the server at the next turn
        self.writes: list[bytes] = []
        # A large reply going out a chunk a turn, and what is written meanwhile, sent after it
        self.large_reply: _LargeReply | None = None
        self.writes_after_large: list[bytes] = []
        # When the transport asked us to stop writing (None: writing)
        self.write_paused_at: float | None = None

        # Closing. The client's close frame has come (the protocol answers it)
        self.close_received = False
        # The protocol failed the connection (a frame it refused, or our _fail): our close
        # frame is out, what the client sends is discarded unread, and our end of stream
        # waits until the client has gone quiet (see check_timeouts)
        self.failed = False
        # Our last word is queued: the end of stream follows the writes before it, and
        # what the client sends from then on is discarded unread ...
        self.eof_queued = False
        # ... and is written: the TCP connection is half-closed
        self.eof_written = False
        # When the client must have closed the TCP connection (None: no closing under way)
        self.close_deadline: float | None = None

        # Timers, on the loop's clock: when the connection opened (then the session),
        # when bytes last came, when the last request came, when our ping went (None:
        # no ping in flight)
        now = server._loop.time()
        self.opened_at = self.last_rx = self.last_message = now
        self.ping_sent_at: float | None = None

    # asyncio protocol callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.inbox = collections.deque()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server._connections.add(self)
        if not self.server._listeners:  # accepted as the server was closing
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.server._loop.time()
        if self.eof_queued or self.failed:
            return  # we have said our last word; the rest is discarded until the client closes
        try:
            state = self.proto.state
            if state is _OPEN or state is _CLOSING:
                self._receive_frames(data)
            elif state is _CONNECTING:
                self._receive_head(data)
            if self.inbox and not self.offloaded and not self.drain_scheduled:
                self._drain()
        except Exception as exc:  # else asyncio logs a traceback per such request, unbounded
            if self.proto.state is _CONNECTING and not self.eof_queued:
                self._refuse_malformed(f"unreadable request ({type(exc).__name__})")
            else:
                self.drop("reading", exc, logging.WARNING)

    def eof_received(self) -> None:
        self.proto.receive_eof()
        self._queue_protocol_output()
        if self.failed and not self.eof_queued:
            self._queue_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        server, proto = self.server, self.proto
        server._connections.discard(self)
        server._handshakes.pop(self, None)
        if self.held_bytes:
            server._buffered_bytes -= self.held_bytes
            self.held_bytes = 0
        self.head = self.fragments = self.http_body = self.large_reply = None
        if server._accept_paused:  # a descriptor is free
            server._retry_accepting(0)
        if self.session is not None:
            if proto.state is not _CLOSED:  # the stream ended without its EOF: closed now
                proto.receive_eof()
            server._close_session(self.session, self.named_id, self.peer, _close_code(proto.close_exc),
                                  self.requests, server._loop.time() - self.opened_at)
            self.session = self.named_id = None
        if self.inbox:
            self.inbox.clear()

    def pause_writing(self) -> None:
        self.write_paused_at = self.server._loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        self._update_reading()
        if self.large_reply is not None:
            self.server._loop.call_soon(self._write_large_chunk)
        self._schedule_drain()

    # Handshake phase: the request head, a plain HTTP request, the upgrade

    def _receive_head(self, data: bytes) -> None:
        """Bytes before the protocol has answered the request. chatenv reads the request
        line itself: a GET of /ws goes to the protocol once its head is whole (and
        ASCII), so no release's take on other methods or on bytes past ASCII matters;
        every other request is read and answered here (_receive_http_request)."""
        head = self.head
        if head is None:
            self._receive_http_request(data)
            return
        start = max(0, len(head) - 3)
        head += data
        line_end = head.find(b"\r\n")
        if line_end < 0:
            if len(head) > _HTTP_HEAD_BYTES:
                self._refuse_head()
            return
        method, _, rest = bytes(head[:line_end]).partition(b" ")
        if method != b"GET" or rest.partition(b" ")[0].partition(b"?")[0] != b"/ws":
            self.head = None  # a plain HTTP request (OpenEnv's POST /reset, /step, /mcp, a probe)
            self._receive_http_request(bytes(head))
            return
        # A client must wait for the 101 before sending frames (RFC 6455 4.1); one that
        # pipelines them still gets the 101 first: feed the request alone, then the rest.
        # The request is bounded in total, not only per line as websockets bounds it
        end = head.find(b"\r\n\r\n", start)
        if end < 0 or end + 4 > _HTTP_HEAD_BYTES:
            if len(head) > _HTTP_HEAD_BYTES:
                self._refuse_head()
            return
        upgrade, rest = bytes(head[:end + 4]), bytes(head[end + 4:])
        self.head = None
        proto = self.proto
        # The head is read here, as strictly as any other request's, and access decided on
        # it before the protocol sees it: no release's take on a malformed head matters
        try:
            headers = _parse_http_head(upgrade[:-4])[2]
        except ValueError as exc:
            self._refuse_malformed(str(exc))
            return
        refusal = self.server._refusal("GET", "/ws", True, headers, self.peer)
        if refusal is None and not upgrade.isascii():  # no upgrade header has bytes past ASCII
            refusal = 400, "Bad Request: the upgrade request's head is not ASCII\n", {}
        if refusal is not None:
            status, text, headers = refusal
            response = proto.reject(status, text)
            for name, value in headers.items():
                response.headers[name] = value
            proto.send_response(response)
        else:
            proto.receive_data(upgrade)
            requests = proto.events_received()
            for event in requests:
                self._answer_request(event)
            if not requests and proto.handshake_exc is not None:  # it would close without a word
                for _ in proto.data_to_send():
                    pass
                self._refuse_malformed(_preview(proto.handshake_exc, 120))
                return
        self._queue_protocol_output()
        if rest and not self.transport.is_closing():
            self.data_received(rest)  # frames, or what a refused request is followed by

    def _answer_request(self, request: Any) -> None:
        """Answer a WebSocket upgrade's request the access checks let through; once
        accepted, the connection is in the frame phase, with a session."""
        server, proto = self.server, self.proto
        query = request.path.partition("?")[2]
        response = proto.accept(request)
        response.headers["Server"] = f"chatenv/{__version__}"
        if response.status_code != 101 and len(response.body) > 200:
            # websockets' reason quotes the offending header whole: echo a bounded slice
            response.body = response.body[:160] + b"...\n"
            del response.headers["Content-Length"]
            response.headers["Content-Length"] = str(len(response.body))
        proto.send_response(response)
        if response.status_code != 101:
            return
        self.compressed = "Sec-WebSocket-Extensions" in response.headers
        self.opened_at = self.last_message = server._loop.time()
        self.session, self.named_id, refused = server._open_session(query, self.peer)
        if refused is not None:
            self._send(refused)
        else:
            server._handshakes.pop(self, None)  # a session now, counted by max_sessions

    def _receive_http_request(self, data: bytes) -> None:
        """Collect a plain HTTP request with a Content-Length body, answer it, half-close.
        Its head is parsed once, when whole; then only the body is counted."""
        if self.offloaded:
            return  # the body is being answered in the offload pool; what follows is not read
        if self.http_body is None:
            self.http_body = bytearray()
        buffer = self.http_body
        if self.http_head is None:
            start = max(0, len(buffer) - 3)
            buffer += data
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0 or end + 4 > _HTTP_HEAD_BYTES:
                if end >= 0 or len(buffer) > _HTTP_HEAD_BYTES:
                    self._refuse_head()
                return
            self.head_bytes = end + 4
            try:
                method, target, headers, length = _parse_http_head(bytes(buffer[:end]))
            except ValueError as exc:
                self._refuse_malformed(str(exc))
                return
            del buffer[:end + 4]
            if "transfer-encoding" in headers:
                self._answer_http(411, {"detail": "Length Required: send the body with a Content-Length"})
                return
            refusal = self.server._refusal(method, target, False, headers, self.peer)
            if refusal is not None:  # from the head: the body is neither waited for nor held
                self._answer_http(refusal[0], {"detail": refusal[1].strip()}, extra=refusal[2])
                return
            limit = self.server.max_message_bytes
            if limit is not None and length > limit:
                self._answer_http(413, {"detail": f"Request body over the server's limit of {limit} bytes"})
                return
            self.http_head = (method, target, length)
        else:
            buffer += data
        method, target, length = self.http_head
        if len(buffer) < length:
            self._count_held()  # the rest of the body is on its way
            return
        del buffer[length:]  # (the body is read whole, never copied; it stays counted until answered)
        self._count_held()
        if self.server.offload and method == "POST":  # a stateless step, as a WebSocket's would be
            self.offloaded = True
            self.server._run_offloaded(http_reply, self.server, method, target, buffer).add_done_callback(
                self._on_http_offloaded)
            return
        status, body = http_reply(self.server, method, target, buffer)
        self._answer_http(status, body, head=method == "HEAD")

    def _on_http_offloaded(self, future: Any) -> None:
        self.offloaded = False
        if future.cancelled() or self.transport.is_closing():
            return
        exc = future.exception()
        if exc is not None:  # http_reply answers every bad request itself; this is a bug
            self.server._log.log("HTTP request failed", 1, logging.ERROR, "HTTP request failed outside the "
                                 "protocol for %s: %s", self.peer, _preview(exc, 200))
            self._answer_http(500, {"detail": "Internal Server Error"})
        else:
            self._answer_http(*future.result())

    def _refuse_malformed(self, why: str) -> None:
        self.server._log.log("refused a request", 1, logging.WARNING, "refused a request from %s: 400 %s",
                             self.peer, why)
        self._answer_http(400, {"detail": f"Bad Request: {why}"})

    def _refuse_head(self) -> None:
        self.server._log.log("refused a request", 1, logging.WARNING,
                             "refused a request from %s: its request line and headers are over %d bytes",
                             self.peer, _HTTP_HEAD_BYTES)
        self._answer_http(431, {"detail": f"Request Header Fields Too Large: over {_HTTP_HEAD_BYTES} bytes"})

    def _answer_http(self, status: int, body: Any, head: bool = False, extra: Any = None) -> None:
        """Answer a request ourselves (not through the protocol) and end the stream."""
        self.http_body = bytearray()  # what the client sends from now on is discarded
        self._count_held()
        self._queue_write(_http_response(status, body, head, extra))
        self._queue_eof()

    # Frame phase: every byte to the protocol, the frames it parses acted on here

    def _receive_frames(self, data: Any) -> None:
        """Feed the bytes to the protocol and act on the frames it parses.

        The protocol refuses a frame over max_message_bytes from its header and
        discards the rest; what it holds meanwhile (a frame not whole yet) is counted
        here from documented facts, each frame's payload and its header's least size,
        against max_buffered_bytes; fragments are counted as frames.
        """
        proto, held = self.proto, self.held_bytes
        proto.receive_data(data)
        events = proto.events_received()
        plain = not self.compressed
        parsed = first = 0  # least bytes the parsed frames took; of them, the first one's
        control = False
        for event in events:
            payload, opcode = event.data, event.opcode
            size = len(payload) if plain else 0  # compressed: its bytes on the wire are unknown
            size += 6 if size < 126 else 8 if size < 65536 else 14  # a masked frame's header
            parsed += size
            if not first:
                first = size
            if opcode is _OP_TEXT or opcode is _OP_BINARY:
                if event.fin:
                    self._enqueue(opcode, payload)
                else:
                    self.fragments, self.fragment_opcode, self.fragment_count = bytearray(payload), opcode, 1
            elif opcode is _OP_CONT:
                fragments = self.fragments
                if fragments is None:
                    break  # we failed the connection over this message
                fragments += payload
                self.fragment_count += 1
                if event.fin:
                    self.fragments = None
                    self._enqueue(self.fragment_opcode, fragments)
                elif self.fragment_count >= _MAX_FRAGMENTS:
                    self._fail(_CLOSE_TOO_BIG, f"message in more than {_MAX_FRAGMENTS} fragments")
                    break
            else:
                control = True
                if opcode is _OP_PONG:
                    self.ping_sent_at = None
                elif opcode is _OP_CLOSE:
                    self.close_received = True
        if control or proto.state is not _OPEN:
            self._queue_protocol_output()  # a pong, a close frame, the protocol failing the connection
        if self.eof_queued or self.failed:  # the protocol discards the rest, holding nothing
            self.fragments, pending = None, 0
        else:  # what it may still hold: what came, less what it parsed; at most this read's
            pending = self.pending + len(data) - parsed  # bytes after the first frame it completed
            if events and len(data) - parsed + first < pending:
                pending = len(data) - parsed + first
        self.pending = pending if pending > 0 else 0
        if self.pending or self.fragments is not None or held:
            self._count_held()
        if self.inbox and (held or len(data) > _READ_BYTES):  # a large request may have come whole:
            self._update_reading()  # then one at a time

    def _count_held(self) -> None:
        """Update this connection's part of max_buffered_bytes; close it if it takes the total past."""
        held = self.pending
        if self.fragments is not None:
            held += len(self.fragments)
        if self.http_body:
            held += len(self.http_body)
        server = self.server
        server._buffered_bytes += held - self.held_bytes
        self.held_bytes = held
        limit = server.max_buffered_bytes
        if limit is None or not held or server._buffered_bytes <= limit:
            return
        server._log.log("refused a large message", 1, logging.WARNING,
                        "refused a large message from %s: incomplete messages would hold more than "
                        "max_buffered_bytes (%d)", self.peer, limit)
        if self.http_body:
            self._answer_http(503, {"detail": "Service Unavailable: the server holds too much incoming data; "
                                              "try again later"})
            return
        self._fail(_CLOSE_TRY_AGAIN, "the server holds too much incoming data; try again later")
        self._count_held()

    def _fail(self, code: int, reason: str) -> None:
        """Close the session over what it sent: the protocol fails the connection (our close
        frame, then our end of stream) and what the client still sends is discarded unread."""
        self.fragments, self.pending = None, 0
        if self.proto.state is not _CLOSED:
            self.proto.fail(code, reason)
        self._queue_protocol_output()

    # Requests and replies

    def _enqueue(self, opcode: int, data: bytes) -> None:
        if self.session is None:
            return  # refused at capacity: its close is under way
        self.inbox.append((opcode, data))
        self.last_message = self.last_rx
        if len(self.inbox) >= _INBOX_LIMIT:
            self._update_reading()

    def _drain(self) -> None:
        """Handle one queued request; schedule the next so others get the loop too."""
        self.drain_scheduled = False
        if self.offloaded or self.write_paused_at is not None or self.large_reply is not None or not self.inbox:
            return
        session = self.session
        if session is None or self.proto.state != _OPEN:
            self.inbox.clear()
            return
        opcode, data = self.inbox.popleft()
        if opcode is _OP_TEXT:
            try:
                frame: Any = data.decode()
            except UnicodeDecodeError:
                self._reply(_error_reply(INVALID_JSON, "Invalid JSON: the text frame is not valid UTF-8"))
                return
        else:
            frame = bytes(data)
        if self.server.offload:
            self.offloaded = True
            self.server._run_offloaded(handle_frame, session, frame).add_done_callback(self._on_offloaded)
            return
        self._reply(handle_frame(session, frame))

    def _on_offloaded(self, future: Any) -> None:
        self.offloaded = False
        if future.cancelled() or self.transport.is_closing():
            return
        exc = future.exception()
        if exc is not None:  # handle_frame catches everything it should; this is a bug
            logger.error("step failed outside the protocol", exc_info=exc)
            self._reply(_error_reply(SESSION_ERROR, "Internal server error; the session is closed", close=True))
        else:
            self._reply(future.result())

    def _reply(self, reply: Reply) -> None:
        self.requests += 1
        self._send(reply)
        if self.inbox or self.reading_paused:
            self._update_reading()
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if self.inbox and not self.drain_scheduled:
            self.drain_scheduled = True
            self.server._loop.call_soon(self._drain)

    def _send(self, reply: Reply) -> None:
        proto = self.proto
        if proto.state != _OPEN:
            return
        parts = reply.parts
        if parts is not None:
            if sum(map(len, parts)) <= _LARGE_REPLY_BYTES:
                proto.send_text(parts[0] if len(parts) == 1 else b"".join(parts))
            else:
                self._queue_protocol_output()  # what the protocol queued goes first
                if self.compressed:  # a fragment per chunk, compressed as it goes
                    pieces = list(parts)
                else:  # one frame, written a chunk a turn
                    proto.send_text(b"".join(parts))
                    pieces = proto.data_to_send()
                self.large_reply = _LargeReply(pieces)
                # Until it is out, writes wait behind it (an instance attribute, so that
                # _queue_write itself stays lean)
                self._queue_write = self.writes_after_large.append
                self.server._loop.call_soon(self._write_large_chunk)
        if reply.close:
            proto.send_close(1000)
            self.close_deadline = self.server._loop.time() + self.server.close_timeout_s
        self._queue_protocol_output()

    def _write_large_chunk(self) -> None:
        """Write the next chunk of a large reply; later turns write the rest, so that no
        other session waits behind it and no reply is ever copied whole. The next
        request is not handled until it is out (its parts are the session's history)."""
        large = self.large_reply
        if large is None or self.transport.is_closing():
            return
        if self.writes:
            self.flush()  # replies queued before it go first
        if self.write_paused_at is not None:
            return  # resume_writing calls again
        pieces, index, offset = large.pieces, large.index, large.offset
        chunk, room = [], _LARGE_REPLY_BYTES
        while room and index < len(pieces):
            piece = pieces[index][offset:offset + room]
            chunk.append(piece)
            room -= len(piece)
            offset += len(piece)
            if offset >= len(pieces[index]):
                index, offset = index + 1, 0
        large.index, large.offset = index, offset
        done = index >= len(pieces)
        data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
        if self.compressed:  # a fragment per chunk, through the protocol
            proto = self.proto
            if proto.state != _OPEN:
                done, data = True, b""  # closed meanwhile: the rest of the message is moot
            else:
                if large.started:
                    proto.send_continuation(data, fin=done)
                else:
                    proto.send_text(data, fin=done)
                    large.started = True
                data = b"".join(proto.data_to_send())
        if data:
            try:
                self.transport.write(data)
            except Exception as exc:
                self.drop("writing", exc)
                return
        if not done:
            if self.write_paused_at is None:
                self.server._loop.call_soon(self._write_large_chunk)
            return
        self.large_reply = None
        del self._queue_write  # the class's again
        waiting, self.writes_after_large = self.writes_after_large, []
        for data in waiting:
            self._queue_write(data)
        self._update_reading()
        self._schedule_drain()

    # Writes: queued during a loop turn, flushed by the server at the start of the next

    def _queue_protocol_output(self) -> None:
        """Move what the protocol has to send into this turn's writes."""
        for data in self.proto.data_to_send():
            if data:
                self._queue_write(data)
            elif self.close_received or self.proto.state is not _CLOSING:
                self._queue_eof()  # SEND_EOF after the closing handshake, a refused upgrade, the client's EOF
            else:
                # SEND_EOF as the protocol fails the connection (RFC 6455 7.1.7): it would
                # close TCP now, under a client that may still be sending, and some clients
                # (websockets' asyncio one, mid-send) then fail without seeing our close
                # frame; what comes is discarded, and the end of stream waits until the
                # client has sent its last word (check_timeouts)
                self.failed = True
                if self.close_deadline is None:
                    self.close_deadline = self.server._loop.time() + self.server.close_timeout_s

    def _queue_eof(self) -> None:
        """Our last word: the end of stream, after the writes queued before it."""
        self.eof_queued = True
        if self.close_deadline is None:
            self.close_deadline = self.server._loop.time() + self.server.close_timeout_s
        self._queue_write(b"")

    def _queue_write(self, data: bytes) -> None:
        if not self.writes:
            self.server._schedule_flush(self)
        self.writes.append(data)

    def flush(self) -> None:
        """Write this turn's writes to the transport in one piece (the server calls it)."""
        writes, self.writes = self.writes, []
        transport = self.transport
        if transport.is_closing():
            return
        try:
            if writes:
                data = writes[0] if len(writes) == 1 else b"".join(writes)
                if data:
                    transport.write(data)
            if self.eof_queued and self.large_reply is None and not self.eof_written:
                # Half-close and keep reading until the client closes (or close_timeout_s):
                # closing outright would answer a client still sending with a TCP reset,
                # which can destroy our close frame before the client reads it
                self.eof_written = True
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
        except Exception as exc:  # the peer is gone: write_eof() raises ENOTCONN after a reset
            self.drop("writing", exc)

    def drop(self, doing: str, exc: BaseException, level: int = logging.INFO) -> None:
        """End this connection, and only it, over a failure while ``doing`` something.

        asyncio documents no exceptions for a transport's calls, yet a socket the peer
        has reset makes write_eof() raise; a failure on one connection must never reach
        another's work (the server's loops over connections call this), nor flood the log.
        """
        self.server._log.log("dropped a connection", _LOG_LINES_PER_S, level,
                             "dropped a connection: %s, failed %s: %s", self.peer, doing, _preview(exc, 200))
        try:
            self.transport.abort()
        except Exception:  # aborting only closes our socket; nothing is left to do if even that fails
            pass

    def _update_reading(self) -> None:
        inbox = self.inbox
        pause = (self.write_paused_at is not None or len(inbox) >= _INBOX_LIMIT
                 or any(len(data) > _READ_BYTES for _, data in inbox))  # a large request: one at a time
        if pause != self.reading_paused and not self.transport.is_closing():
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # Timeouts and closing, called by the server (its housekeeping timer, its close)

    def check_timeouts(self, now: float) -> None:
        server, proto = self.server, self.proto
        if self.close_deadline is not None:  # our last word is said: the client has this long to close
            if self.failed and not self.eof_queued:
                # Our close frame is out: once the client has gone quiet (its close frame was
                # its last word; the documented API does not show it after a failure), or at
                # the deadline, the end of stream, and the client has close_timeout_s to close
                if now - self.last_rx >= server.close_timeout_s / 4 or now > self.close_deadline:
                    self.close_deadline = None
                    self._queue_eof()
            elif now > self.close_deadline:
                self.transport.abort()
            return
        state = proto.state
        if state is _CONNECTING:
            if server.open_timeout_s and now - self.opened_at > server.open_timeout_s:
                self.transport.abort()
        elif state is _OPEN:
            if self.ping_sent_at is not None:
                if server.ping_timeout_s and now - self.ping_sent_at > server.ping_timeout_s:
                    server._log.log("keepalive ping timeout", _LOG_LINES_PER_S, logging.INFO,
                                    "keepalive ping timeout: dropping %s", self.peer)
                    self.transport.abort()
                    return
            elif server.ping_interval_s and now - self.last_rx >= server.ping_interval_s and self.large_reply is None:
                proto.send_ping(os.urandom(4))
                self.ping_sent_at = now
                self._queue_protocol_output()
            if self.write_paused_at is not None and server.send_timeout_s:
                if now - self.write_paused_at > server.send_timeout_s:
                    server._log.log("client stopped reading", _LOG_LINES_PER_S, logging.INFO,
                                    "client stopped reading for %.0f s: dropping %s", server.send_timeout_s,
                                    self.peer)
                    self.transport.abort()
                    return
            if server.idle_timeout_s and not self.offloaded and now - self.last_message > server.idle_timeout_s:
                self.start_close(1001, "idle timeout")
        else:
            self.close_deadline = now + server.close_timeout_s

    def start_close(self, code: int, reason: str) -> None:
        """Start the closing handshake (or drop a connection still in its handshake)."""
        if self.proto.state is _OPEN:
            self.proto.send_close(code, reason)
            self.close_deadline = self.server._loop.time() + self.server.close_timeout_s
            self._queue_protocol_output()
        elif self.proto.state is _CONNECTING:
            self.transport.abort()


def _query_value(query: str, name: str) -> str | None:
    """One parameter of a request's query string, percent-decoded."""
    if not query:
        return None
    from urllib.parse import parse_qs

    try:
        values = parse_qs(query, max_num_fields=16).get(name)
    except ValueError:  # more fields than any client of ours sends
        return None
    return values[0] if values else None


def _http_response(status: int, body: Any, head: bool = False, extra: Any = None) -> bytes:
    """The bytes of a plain HTTP answer (JSON, or ``body`` as given), and ``extra``
    headers (a refusal's) if any; the connection closes after it."""
    import email.utils
    import http

    payload = body if isinstance(body, bytes) else _json_bytes(body)
    more = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
    lines = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
             f"Date: {email.utils.formatdate(usegmt=True)}\r\nServer: chatenv/{__version__}\r\n"
             f"Connection: close\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n{more}\r\n")
    return lines.encode() + (b"" if head else payload)


async def _serve_until_signalled(server: ChatServer) -> None:
    import asyncio
    import signal

    await server.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, lambda s=signum: _on_signal(server, s))
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    await server.wait_stopped()


def _on_signal(server: ChatServer, signum: int) -> None:
    import asyncio
    import signal

    logger.info("received %s: closing every session", signal.Signals(signum).name)
    asyncio.ensure_future(server.close(_SHUTDOWN_CODE, "server shutting down"))


def _loop_runner(loop: str = "asyncio") -> Any:
    """``asyncio.run`` on the event loop named: "asyncio" (the standard one) or "uvloop"."""
    import asyncio

    if loop == "asyncio":
        return asyncio.run
    if loop != "uvloop":
        raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {_preview(loop)}")
    try:
        import uvloop
    except ImportError:
        raise ImportError("the uvloop event loop is not installed: pip install uvloop") from None

    def run(main: Any) -> Any:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)

    return run


def serve(tokenizer: Tokenizer | str | None = None, workers: int = 1, loop: str = "asyncio", **options: Any) -> None:
    """Run a server until SIGTERM or SIGINT; each session is then closed with 1012, as OpenEnv does.

    ``workers`` above 1 forks that many servers onto the one port under a
    supervisor (``_Supervisor``); each has its own sessions and limits.
    ``loop``: "asyncio" or "uvloop" (imported only then).
    """
    run = _loop_runner(loop)
    server = ChatServer(tokenizer, **options)
    if workers != 1:
        _Supervisor(server, workers, run).run()
        return
    run(_serve_until_signalled(server))


# Workers: `chatenv serve --workers N` runs N ordinary servers on one port, forked
# from a supervisor that restarts those that die or stop answering and passes
# SIGTERM/SIGINT on. Each worker's event loop writes a heartbeat byte to its own pipe;
# a worker silent too long (stopped, or its loop wedged) is killed and replaced. On
# Linux each worker listens on its own SO_REUSEPORT socket, so the kernel spreads
# connections over them evenly; elsewhere all accept from one listening socket
# that the supervisor binds and the workers inherit
_REUSE_PORT = sys.platform.startswith("linux")  # BSD/macOS SO_REUSEPORT does not balance
_WORKER_STABLE_S = 5.0  # a worker that ran this long was not crash-looping: restart it at once
_RESTART_DELAY_S = (0.1, 10.0)  # a crash-looping worker's restart delay: doubles from the first to the last
_WORKER_STOP_S = 5.0  # after SIGTERM, a worker still closing its sessions this long is killed
_HEARTBEAT_S = 0.5  # a worker's event loop writes a byte to its supervisor this often
_WORKER_SILENT_S = 4.0  # a worker whose loop wrote nothing this long is stopped or wedged: killed, replaced
_STOPPING_SILENT_S = 1.0  # while stopping, a worker silent this long will not act on SIGTERM: killed


def _note_signal(signum: int, frame: Any) -> None:
    """A Python-level handler, so the signal reaches the supervisor's wakeup pipe."""


class _Supervisor:
    """Fork ``workers`` copies of an unstarted ChatServer onto its port; restart them; stop them.

    The server is built (options checked, tokenizer loaded) once, before any
    fork, so a worker starts in milliseconds and a restarted one is identical.
    The supervisor runs no event loop: it sleeps on a pipe that signals
    (SIGCHLD included) are written to, then reaps, restarts or stops workers.
    """

    def __init__(self, server: ChatServer, workers: int, run_loop: Any = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number, at least 1, not {workers!r}")
        if not hasattr(os, "fork"):
            raise ValueError("more than one worker needs os.fork, which this platform does not have")
        self.server, self.workers = server, workers
        self.run_loop = run_loop  # what runs each worker's event loop (serve's ``loop``); None: asyncio.run
        self.reuse_port = _REUSE_PORT
        self.sock: Any = None  # with reuse_port the port's reservation (bound, never listening), else the listener
        self.address: Any = None  # (family, address) every worker binds
        self.pids: dict[int, tuple[int, float]] = {}  # live workers: pid -> (slot, started at)
        self.beats: dict[int, int] = {}  # heartbeat pipes' read ends: fd -> worker pid (closed at EOF)
        self.heard: dict[int, float] = {}  # live workers: pid -> when its loop last wrote (or it started)
        self.failures = [0] * workers  # per slot: deaths in a row that came soon after a start
        self.due: dict[int, float] = {}  # slots waiting for a restart: slot -> when
        self.stopping = False
        self.pipe: tuple[int, int] = (-1, -1)

    def run(self) -> None:
        import signal

        stop_signals = {signal.SIGTERM, signal.SIGINT}
        self._bind()
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        try:
            previous_fd = signal.set_wakeup_fd(self.pipe[1])  # ValueError outside the main thread
        except BaseException:
            self._close()
            raise
        previous = {signum: signal.signal(signum, _note_signal) for signum in (signal.SIGCHLD, *stop_signals)}
        try:
            import asyncio  # noqa: F401  (imported once here rather than in every new worker)

            from websockets.server import ServerProtocol  # noqa: F401

            for slot in range(self.workers):
                self._spawn(slot)
            logger.info("supervisor pid %d: %d workers on %s (%s)", os.getpid(), self.workers, self.server.url,
                        "a SO_REUSEPORT socket each" if self.reuse_port else "one shared socket")
            while True:
                now = self._now()
                received = self._wait(min([1.0, *(when - now for when in self.due.values()),
                                           *(heard + _WORKER_SILENT_S - now for heard in self.heard.values())]))
                if received & stop_signals:
                    name = signal.Signals(min(received & stop_signals)).name
                    logger.info("received %s: stopping %d workers", name, len(self.pids))
                    break
                self._kill_silent(_WORKER_SILENT_S)
                self._reap()
                for slot, when in list(self.due.items()):
                    if when <= self._now():
                        del self.due[slot]
                        try:
                            self._spawn(slot)
                        except OSError as exc:  # out of processes or memory, for now
                            logger.error("cannot start a worker (%s): trying again in %.0f s", exc, _RESTART_DELAY_S[1])
                            self.due[slot] = self._now() + _RESTART_DELAY_S[1]
        finally:
            self._stop(stop_signals)
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close()
        logger.info("supervisor stopped")

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _close(self) -> None:
        for fd in [*self.pipe, *self.beats]:
            if fd != -1:
                os.close(fd)
        self.pipe, self.beats = (-1, -1), {}
        self.sock.close()

    def _socket(self, listen: bool, reuse_port: bool) -> Any:
        import socket

        family, address = self.address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds "::"
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            if listen:
                sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind(self) -> None:
        """Take the port (resolving 0) before any worker exists; fail here if it is in use."""
        import socket

        server = self.server
        family, _, _, _, address = socket.getaddrinfo(
            server.host or None, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address = family, address
        if self.reuse_port and server.port:
            # With SO_REUSEPORT this bind could share a port another server listens
            # on (another supervisor's, say): a plain bind finds out if it is taken
            self._socket(listen=False, reuse_port=False).close()
        self.sock = self._socket(listen=not self.reuse_port, reuse_port=self.reuse_port)
        server.port = self.sock.getsockname()[1]
        self.address = family, (address[0], server.port, *address[2:])

    def _spawn(self, slot: int) -> None:
        supervisor = os.getpid()
        beat_read, beat_write = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            os.close(beat_read)
            os.close(beat_write)
            raise
        if pid == 0:
            os.close(beat_read)
            self._work(supervisor, beat_write)  # never returns
        os.close(beat_write)
        os.set_blocking(beat_read, False)
        self.beats[beat_read] = pid
        self.pids[pid] = (slot, self._now())
        self.heard[pid] = self._now()
        logger.debug("worker %d started: pid %d", slot, pid)

    def _work(self, supervisor: int, heartbeat: int) -> None:
        """The worker, in the child: an ordinary server on the supervisor's port. Exits, never returns."""
        import asyncio
        import signal

        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            for fd in [*self.pipe, *self.beats]:  # the supervisor's ends, other workers' heartbeats
                os.close(fd)
            os.set_blocking(heartbeat, False)
            if self.reuse_port:
                self.server.sock = self._socket(listen=True, reuse_port=True)
                self.sock.close()  # the reservation stays the supervisor's
            else:
                self.server.sock = self.sock
            (self.run_loop or asyncio.run)(_serve_worker(self.server, supervisor, heartbeat))
            code = 0
        except BaseException:
            logger.exception("worker pid %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)  # never unwind into the supervisor's caller

    def _wait(self, timeout: float) -> set[int]:
        """Sleep until a signal or a heartbeat comes or ``timeout`` passes; the signals that came."""
        import select

        readable, _, _ = select.select([self.pipe[0], *self.beats], [], [], max(0.0, timeout))
        now = self._now()
        for fd in readable:
            if fd == self.pipe[0]:
                continue
            pid = self.beats[fd]
            try:
                beat = os.read(fd, 512)
            except BlockingIOError:
                continue
            if beat:
                if pid in self.heard:
                    self.heard[pid] = now
            else:  # the worker is gone: its reaping follows its SIGCHLD
                del self.beats[fd]
                os.close(fd)
        try:
            return set(os.read(self.pipe[0], 512))
        except BlockingIOError:
            return set()

    def _kill_silent(self, silent_s: float) -> None:
        """SIGKILL each worker whose event loop has written nothing for ``silent_s``: stopped
        or wedged, it holds its share of the port's connections and answers none (reaped next)."""
        import signal

        now = self._now()
        for pid, heard in list(self.heard.items()):
            if now - heard > silent_s:
                del self.heard[pid]
                logger.error("worker pid %d has not answered for %.1f s (stopped, or its event loop is "
                             "blocked): killing it", pid, now - heard)
                self._kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        """Collect dead workers; schedule their restarts, later for each quick death in a row."""
        import signal

        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.pids:
                continue
            slot, started = self.pids.pop(pid)
            self.heard.pop(pid, None)
            if self.stopping:
                continue
            lived = self._now() - started
            self.failures[slot] = 0 if lived >= _WORKER_STABLE_S else self.failures[slot] + 1
            first, longest = _RESTART_DELAY_S
            delay = min(longest, first * 2 ** (self.failures[slot] - 1)) if self.failures[slot] else 0.0
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            logger.warning("worker pid %d %s after %.1f s, losing its sessions; restarting it in %.1f s",
                           pid, how, lived, delay)
            self.due[slot] = self._now() + delay

    def _stop(self, stop_signals: set[int]) -> None:
        """SIGTERM every worker (each closes its sessions with 1012), wait for them, SIGKILL stragglers.

        A stopped worker is continued so it acts on the SIGTERM; one whose loop stays
        silent (wedged) is killed, so stopping takes no longer than the workers' closing.
        """
        import signal

        self.stopping = True
        self.due.clear()
        now = self._now()
        for pid in self.pids:
            self._kill(pid, signal.SIGTERM)
            self._kill(pid, signal.SIGCONT)
            if pid in self.heard:
                self.heard[pid] = now  # a closing loop still beats: it has _STOPPING_SILENT_S from now to show it
        deadline = now + _WORKER_STOP_S
        while self.pids and self._now() < deadline:
            received = self._wait(min(0.1, deadline - self._now()))
            self._kill_silent(_STOPPING_SILENT_S)
            self._reap()
            if received & stop_signals:
                break  # asked again: do not wait
        for pid in list(self.pids):
            logger.warning("worker pid %d did not stop: killing it", pid)
            self._kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            del self.pids[pid]

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


async def _serve_worker(server: ChatServer, supervisor: int, heartbeat: int) -> None:
    """A worker's server: its loop writes a heartbeat byte to ``heartbeat`` (a pipe to the
    supervisor) every _HEARTBEAT_S, and it stops within a second of its supervisor dying."""
    import asyncio

    loop = asyncio.get_running_loop()

    def watch() -> None:
        if os.getppid() != supervisor:
            logger.warning("worker pid %d: the supervisor is gone, stopping", os.getpid())
            asyncio.ensure_future(server.close())
            return
        try:
            os.write(heartbeat, b".")
        except BlockingIOError:  # the supervisor has not read the last ones yet
            pass
        except OSError:  # the supervisor closed its end: it is stopping, or gone (seen next turn)
            pass
        loop.call_later(_HEARTBEAT_S, watch)

    watch()
    try:
        await _serve_until_signalled(server)
    finally:
        os.close(heartbeat)


class ServerURL(str):
    """The base URL of an in-process server; ``.server`` is the ChatServer itself."""

    server: ChatServer


class serve_in_thread:
    """Run a server on a free loopback port in a background thread.

    ``with serve_in_thread() as url: ...`` yields its base URL
    (``http://127.0.0.1:PORT``); leaving the block stops it and its sessions.
    """

    def __init__(self, tokenizer: Tokenizer | str | None = None, loop: str = "asyncio", **options: Any) -> None:
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        self._run_loop = _loop_runner(loop)  # "asyncio" or "uvloop"
        self.server = ChatServer(tokenizer, **options)
        self._thread: Any = None
        self._error: BaseException | None = None

    def __enter__(self) -> ServerURL:
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="chatenv-server", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise self._error
        url = ServerURL(self.server.url)
        url.server = self.server
        return url

    def _run(self, started: Any) -> None:
        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                started.set()
            await self.server.wait_stopped()

        try:
            self._run_loop(main())
        except BaseException:
            if self._error is None:
                logger.exception("in-process server crashed")

    def stop(self) -> None:
        import asyncio

        if self._thread is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.close(), self.server._loop).result(5)
        self._thread.join(5)

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


# The ASGI application: the same protocol and sessions under any ASGI server. OpenEnv's
# cloud launchers run `python -m uvicorn <app> --host 0.0.0.0 --port 8000`; the native
# server above stays the default and the faster path. What the app holds is bound as the
# native server bounds it: HTTP bodies count against max_buffered_bytes and must come
# within open_timeout_s, a received message over max_message_bytes closes with 1009, and
# a peer that stops reading is dropped after send_timeout_s. Handshakes, fragments,
# pings and descriptors are the ASGI server's (the image sets uvicorn's UVICORN_* limits)
_ASGI_EXPIRY_S = 1.0  # named sessions' expiry is checked on requests (the app has no timer), at most this often


def _asgi_transport(send: Any) -> Any:
    """The asyncio transport behind an ASGI server's ``send``, or None.

    ASGI has no message for "this peer stopped reading: drop it". uvicorn's ``send``
    is its protocol's bound method, whose ``transport`` is asyncio's: the app reads
    its write buffer and aborts it, as the native server does after send_timeout_s.
    Under another server (None) a send that does not finish in time ends the session.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    needed = ("abort", "get_write_buffer_size", "get_write_buffer_limits")
    return transport if all(hasattr(transport, name) for name in needed) else None


def _asgi_headers(scope: dict[str, Any]) -> Any:
    from websockets.datastructures import Headers

    return Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])])


def _asgi_peer(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _asgi_unread(transport: Any) -> bool:
    """Whether a transport's write buffer is over its low-water mark: the peer has not read it yet."""
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[0]


def _asgi_loopback(scope: dict[str, Any]) -> bool:
    """Whether the ASGI server was reached on a loopback address (its scope's "server")."""
    server = scope.get("server")
    return bool(server) and _is_loopback_host(str(server[0]))


def _asgi_extra(refusal: Any) -> list[tuple[bytes, bytes]]:
    """A refusal's extra headers (WWW-Authenticate), as an ASGI message lists them."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (refusal[2] if refusal else {}).items()]


class ASGIApp:
    """chatenv as an ASGI 3 application: ``python -m uvicorn chatenv:app``.

    It answers what the native server answers (``/ws`` sessions, HTTP routes)
    through the same ``handle_frame`` and ``http_reply`` and a ``ChatServer``'s
    session accounting; the ASGI server owns sockets, pings and shutdown (uvicorn
    closes sessions with 1012). Options are ChatServer's; the module-level
    ``app`` takes them from the environment, as ``chatenv serve`` does.
    """

    def __init__(self, tokenizer: Tokenizer | str | None = None, **options: Any) -> None:
        self._configure = lambda: ChatServer(tokenizer, **options)
        self.server: ChatServer | None = None
        self._expiry_due = 0.0  # when named sessions' expiry is next checked (server._clock)

    @classmethod
    def _from_environment(cls) -> ASGIApp:
        app = cls()
        def configure() -> ChatServer:
            tokenizer, options = _server_arguments(_parser().parse_args(["serve"]))
            return ChatServer(tokenizer, **options)

        app._configure = configure
        return app

    def _server(self) -> ChatServer:
        if self.server is None:
            self.server = self._configure()  # on first use: `import chatenv` stays cheap
        return self.server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        server = self._server()
        if server._named and server._clock() >= self._expiry_due:  # the native server's housekeeping does this
            self._expiry_due = server._clock() + _ASGI_EXPIRY_S
            server._expire_named_sessions()
        if kind == "http":
            await self._http(server, scope, receive, send)
        elif kind == "websocket":
            await self._websocket(server, scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                try:
                    self._server()
                except Exception as exc:  # a configuration error: say it, and do not start
                    await send({"type": "lifespan.startup.failed", "message": f"chatenv: error: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, server: ChatServer, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        body, limit, buffered = bytearray(), server.max_message_bytes, server.max_buffered_bytes
        refusal = server._refusal(scope["method"], scope["path"], False, _asgi_headers(scope), "?",
                                  _asgi_loopback(scope))
        if refusal is not None:  # a foreign Host or Origin, no token: refused before the body is read
            status, payload = refusal[0], {"detail": refusal[1].strip()}
        deadline = asyncio.get_running_loop().time() + server.open_timeout_s if server.open_timeout_s else None
        held = 0  # of body, what counts against max_buffered_bytes (server._buffered_bytes, shared with native)
        try:
            async with asyncio.timeout_at(deadline):
                while refusal is None:
                    event = await receive()
                    if event["type"] == "http.disconnect":
                        return
                    chunk = event.get("body", b"")
                    body += chunk
                    if limit is not None and len(body) > limit:
                        status, payload = 413, {"detail": f"Request body over the server's limit of {limit} bytes"}
                        break
                    if not event.get("more_body"):
                        request = (http_reply, server, scope["method"], scope["path"], bytes(body))
                        if server.offload and scope["method"] == "POST":  # a step, as a WebSocket's would be
                            status, payload = await server._run_offloaded(*request, loop=asyncio.get_running_loop())
                        else:
                            status, payload = request[0](*request[1:])
                        break
                    held += len(chunk)
                    server._buffered_bytes += len(chunk)
                    if buffered is not None and server._buffered_bytes > buffered:
                        server._log.log("refused a large message", 1, logging.WARNING,
                                        "refused a large message from %s: incomplete messages would hold more "
                                        "than max_buffered_bytes (%d)", _asgi_peer(scope), buffered)
                        status, payload = 503, {"detail": "Service Unavailable: the server holds too much incoming "
                                                          "data; try again later"}
                        break
        except TimeoutError:  # a stalled body: the native server drops it after open_timeout_s
            status, payload = 408, {"detail": f"Request Timeout: the body did not come within "
                                              f"{server.open_timeout_s} s"}
        finally:
            server._buffered_bytes -= held
        del body
        data = payload if isinstance(payload, bytes) else _json_bytes(payload)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   *_asgi_extra(refusal)]
        if status in (408, 413, 503):  # the rest of the body is not read: the connection goes with the answer
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})

    async def _websocket(self, server: ChatServer, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        if (await receive())["type"] != "websocket.connect":
            return
        peer = _asgi_peer(scope)
        headers = _asgi_headers(scope)
        refusal = server._refusal("GET", scope["path"], True, headers, peer, _asgi_loopback(scope))
        if refusal is None and scope["path"] != "/ws":
            refusal = 404, "Not Found\n", {}
        if refusal is not None and "websocket.http.response" in (scope.get("extensions") or {}):
            data = refusal[1].encode()  # the status and headers as the native server sends them
            await send({"type": "websocket.http.response.start", "status": refusal[0], "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode()),
                *_asgi_extra(refusal)]})
            await send({"type": "websocket.http.response.body", "body": data})
            return
        if refusal is not None:
            await send({"type": "websocket.close", "code": 1008})  # the ASGI server answers 403
            return
        await send({"type": "websocket.accept"})
        session, named_id, refused = server._open_session(scope.get("query_string", b"").decode("latin-1"), peer)
        if refused is not None:
            await send({"type": "websocket.send", "text": refused.data.decode()})
            await send({"type": "websocket.close", "code": 1000})
            return
        loop, requests, code, opened = asyncio.get_running_loop(), 0, 1006, server._clock()
        limit, transport, unread = server.max_message_bytes, _asgi_transport(send), False
        try:
            while True:
                event = await (self._receive_while_unread(server, receive, transport) if unread else receive())
                if event is None:  # the peer stopped reading: dropped
                    return
                if event["type"] == "websocket.disconnect":
                    code = event.get("code", 1000)
                    return
                text = event.get("text")
                frame = text if text is not None else event.get("bytes") or b""
                if limit is not None and len(frame) > limit // 4 and (
                        len(frame) > limit or len(text.encode() if text is not None else frame) > limit):
                    code = _CLOSE_TOO_BIG  # the ASGI server's own limit (uvicorn's --ws-max-size) may be larger
                    await self._send_within(server, send, transport, {
                        "type": "websocket.close", "code": code,
                        "reason": f"message over the server's limit of {limit} bytes"})
                    return
                if server.offload:
                    reply = await server._run_offloaded(handle_frame, session, frame, loop=loop)
                else:
                    reply = handle_frame(session, frame)
                requests += 1
                if reply.parts is not None:
                    if not await self._send_within(server, send, transport, {
                            "type": "websocket.send", "text": reply.data.decode()}, len(reply.data)):
                        return
                    unread = transport is not None and _asgi_unread(transport)
                if reply.close:
                    code = 1000
                    await self._send_within(server, send, transport, {"type": "websocket.close", "code": 1000})
                    return
        finally:
            server._close_session(session, named_id, peer, code, requests, server._clock() - opened)

    @staticmethod
    async def _send_within(server: ChatServer, send: Any, transport: Any, message: dict[str, Any],
                           size: int = 0) -> bool:
        """Send ``size`` bytes, waiting at most send_timeout_s for a peer that does not read; False: dropped.

        uvicorn's send waits while its transport's buffer is over the high-water
        mark (before writing, or after, by its websockets implementation), so a
        session never has more than one reply queued beyond it. A send that
        cannot wait (the buffer stays under the mark) goes without a timer.
        """
        import asyncio

        timeout = server.send_timeout_s
        if not timeout or (transport is not None and
                           transport.get_write_buffer_size() + size <= transport.get_write_buffer_limits()[1]):
            await send(message)
            return True
        try:
            async with asyncio.timeout(timeout):
                await send(message)
            return True
        except TimeoutError:
            ASGIApp._drop_unread(server, transport, timeout)
            return False

    @staticmethod
    async def _receive_while_unread(server: ChatServer, receive: Any, transport: Any) -> Any:
        """The next event, while a reply is still unread in ``transport``'s buffer: a peer that
        reads none of it for send_timeout_s is dropped (None), as the native server drops one."""
        import asyncio

        timeout = server.send_timeout_s
        if not timeout:
            return await receive()
        loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(receive())
        unread_since = loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=min(1.0, timeout / 4))
                if done:
                    return pending.result()
                if not _asgi_unread(transport):
                    return await pending  # read down to the low-water mark: nothing left to watch
                if loop.time() - unread_since > timeout:
                    ASGIApp._drop_unread(server, transport, timeout)
                    return None
        finally:
            if not pending.done():
                pending.cancel()

    @staticmethod
    def _drop_unread(server: ChatServer, transport: Any, timeout: float) -> None:
        server._log.log("client stopped reading", _LOG_LINES_PER_S, logging.INFO,
                        "client stopped reading for %.0f s: dropping %s", timeout,
                        "a connection" if transport is None else transport.get_extra_info("peername"))
        if transport is not None:
            transport.abort()


def __getattr__(name: str) -> Any:
    """``chatenv.app``: the ASGI application configured from the environment, made on first use."""
    if name == "app":
        app = globals()["app"] = ASGIApp._from_environment()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------
# Clients: ChatEnv (a blocking socket, Sans-I/O) and AsyncChatEnv (asyncio)
# ------------------------------------------------------------------------------


class ChatEnvError(RuntimeError):
    """An error in a reply, with its code (one of the protocol section's constants).

    Two kinds share it. The server said so: an error frame, whose ``code`` is the
    server's (``VALIDATION_ERROR``, ``CAPACITY_REACHED``, ...). The client saw it: a
    reply it cannot read (not JSON, nested too deeply, a field of the wrong type) is
    ``PROTOCOL_ERROR``, and a delta observation that does not extend the history it
    holds is ``DELTA_DESYNC``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EpisodeLostError(ConnectionError):
    """The session's connection ended mid-episode; call reset() to start a new one.

    ``close_code`` is the WebSocket close code that ended it (1006: the
    connection dropped without one), None when this client's close() ended it.
    """

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


_CLOSING_CODES = (CAPACITY_REACHED, SESSION_ERROR)  # error frames the server closes after
_BROKEN_CODES = (1002, 1007)  # close codes this client sends when the server's frames break the WebSocket protocol
_SEND_TIMER_BYTES = 2**16  # requests this large may wait on the socket: their send gets the whole message timeout
_CLIENT_READ_BYTES = 2**16  # most bytes the sync client takes from its socket per read
_IDLE_S = 0.1  # a sync client quiet this long is tended by the keepalive thread
_CLOSE_WAIT_S = 0.1  # close() waits this long for the server's close frame
_BACKOFF_S = (0.05, 2.0)  # capacity waits: first and largest pause between rounds of tries
_MAX_REPLY_BYTES = 2**31 - 1  # a max_message_bytes of None still refuses frames of 2 GiB or more: no reply is one
_TEND_BYTES = 2**18  # most bytes the keepalive thread reads from one idle connection per turn
_SETTLE_TURNS = 4  # loop turns AsyncChatEnv gives bytes that came before a request to be read (two do)
_DEADLINE_SLACK_S = 0.05  # a call's blocking read or send may end this much past its deadline, saving a syscall a read

_CLOSE_MEANINGS = {  # what each close code a chatenv or OpenEnv server sends means for a session
    1000: "closed normally",
    1001: "going away: the server shut down, or closed the idle session",
    1002: "protocol error",
    1003: "unsupported data",
    1007: "invalid data",
    1008: "policy violation",
    1009: "message too big: a request was over the server's --max-message-bytes",
    1011: "internal error on the server (or its keepalive timed out)",
    1012: "service restart: the server is restarting or shutting down",
    1013: "try again later",
}


def _ws_url(base_url: str) -> str:
    """Map http(s)://, ws(s):// or bare host:port to the session's ws(s)://.../ws URL."""
    url = base_url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "ws", url
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(scheme.lower())
    if scheme is None or not rest:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {base_url!r}")
    rest = rest.rstrip("/")
    if not rest.endswith("/ws"):
        rest += "/ws"
    return f"{scheme}://{rest}"


class _Closed(Exception):
    """A connection ended before its reply, as a shell saw it: the close code and reason
    (1006 when no close frame came), whether this client closed it (a limit, keepalive),
    and a data frame that arrived before the close (a server's refusal), if any."""

    def __init__(self, code: int, reason: str = "", ours: bool = False, leftover: Any = None) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.ours, self.leftover = code, reason, ours, leftover


class _Unsolicited(Exception):
    """A data frame arrived while no call waited for one (a server refusing a session)."""

    def __init__(self, frame: Any) -> None:
        super().__init__("unsolicited frame")
        self.frame = frame


# What a shell does next: the actions a call's plan (_Call) answers each report with.
# The shells do the I/O an action names and report what happened; the plan decides.
_CONNECT = "connect"
"""Open a connection to the server ``call.next_server()`` names, after the pause it
names; report ``call.on_connect()`` or ``call.on_connect_error(exc)``."""

_SEND = "send"
"""Send the request on the shell's connection and read one data frame: report
``call.on_reply(data)``, or drop the connection and report ``call.on_failure(exc)``."""

_AWAIT_CLOSE = "await close"
"""The reply was an error frame the server closes after: let go of the connection,
wait up to _CLOSE_WAIT_S for the server's close, report ``call.on_refusal_close(closed)``
(None when no close came)."""

_RETURN = "return"
"""The call has its reply: return ``call.result``."""


class _ClientCore:
    """What both clients share and decide, so their shells only move frames (Sans-I/O).

    It holds the options (listed here once: ChatEnv and AsyncChatEnv show this
    signature), the servers, whether the session is lost, and the episode as parsed
    so far; it builds request frames and parses replies. Each call gets a plan
    (_Call) that decides, from what the shell reports, the shell's next action or
    the error the call raises.
    """

    def __init__(
        self,
        base_url: str | list[str] | tuple[str, ...],
        *,
        # Session
        auth_token: str | None = None,
        delta: bool = True,
        compression: str | None = None,
        # Timeouts (seconds)
        connect_timeout_s: float | None = 10.0,
        message_timeout_s: float | None = 60.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        capacity_wait_s: float | None = None,
        # Limits
        max_message_bytes: int | None = 64 * 2**20,
    ) -> None:
        """A client of one server or several; nothing connects before a call or ``with``.

        Args:
            base_url: a server (http(s)://, ws(s):// or host:port), or a non-empty
                sequence of them: each new session goes to one with room, the
                clients of a process spread over them from a random start.
            auth_token: sent as ``Authorization: Bearer <token>``; None sends none.
            delta: ask a chatenv server for delta observations (only what a step
                adds) and rebuild the full ones; an OpenEnv server ignores the
                request and sends full ones.
            compression: "deflate" for permessage-deflate; None (or "none") sends
                frames as they are.
            connect_timeout_s: for TCP connect, TLS and the WebSocket handshake;
                ConnectionError past it. None disables the timeout.
            message_timeout_s: for each reply; past it the connection is closed
                (a late reply must not answer a later call) and the call raises
                TimeoutError. None disables the timeout.
            ping_interval_s: how often a quiet connection is pinged, between
                calls too, so idle sessions stay alive. None disables keepalive.
            ping_timeout_s: a ping unanswered this long closes the connection
                (1011) and loses the episode. None disables the timeout.
            capacity_wait_s: how long a reset keeps trying, with backoff, while
                every server answers CAPACITY_REACHED. None disables waiting: one
                round over the servers, then CAPACITY_REACHED.
            max_message_bytes: the largest reply accepted; a larger one closes the
                connection (1009). None disables the limit (a frame of 2 GiB or
                more, which no reply is, is still refused).
        """
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(url, str) for url in urls):
            raise ValueError("give a server's base URL, or a non-empty sequence of them")
        if compression not in (None, "none", "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, not {compression!r}")
        self.base_urls = [url.strip().rstrip("/") for url in urls]
        self.ws_urls = [_ws_url(url) for url in urls]
        self.server = 0  # the server in use, or tried last
        self._next_server = 0 if len(urls) == 1 else _random().randrange(len(urls))  # clients spread
        self.delta = delta
        self.compression = None if compression == "none" else compression
        self.capacity_wait_s = capacity_wait_s
        self.connect_timeout_s = connect_timeout_s
        self.message_timeout_s = message_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_message_bytes = max_message_bytes
        self.headers = [("User-Agent", f"chatenv/{__version__}")]
        if auth_token:
            self.headers.append(("Authorization", f"Bearer {auth_token}"))
        # websockets' asyncio connect(), for AsyncChatEnv; neither client uses a proxy
        self.connect_options = dict(
            open_timeout=connect_timeout_s,
            ping_interval=ping_interval_s,
            ping_timeout=ping_timeout_s,
            max_size=_MAX_REPLY_BYTES if max_message_bytes is None else max_message_bytes,
            compression=self.compression,
            additional_headers=dict(self.headers[1:]) or None,
            user_agent_header=self.headers[0][1],
            proxy=None,
            close_timeout=_CLOSE_WAIT_S,  # once a close is under way (our limit, say), end it soon
        )
        # Why the session is gone, and its close code: None while there is one to use
        self.lost: tuple[str, int | None] | None = None
        self._refusal: ChatEnvError | None = None  # the error frame a server closed after
        # The episode as parsed so far, to rebuild deltas and to parse only what is new.
        # Append-only: observations share prefixes of these lists (a new episode gets new ones).
        self._messages: list[dict[str, str]] = []
        self._tokens: list[int] = []
        self._seen: _Layout | None = None  # the last full observation frame and where its parts lie
        self.env_names: dict[str, str] = {}  # base URL -> its server's env name (the task routes' prefix)

    @property
    def base_url(self) -> str:
        return self.base_urls[self.server]

    @property
    def ws_url(self) -> str:
        return self.ws_urls[self.server]

    # Frames

    def reset_frame(self, kwargs: dict[str, Any]) -> str:
        data = dict(kwargs)
        if self.delta:
            data[DELTA_KEY] = True
        return _dumps({"type": "reset", "data": data})

    def step_frame(self, action: ChatAction | Any) -> str:
        if not isinstance(action, ChatAction):
            action = ChatAction(tokens=action)
        metadata = _dumps(action.metadata) if action.metadata else "{}"
        return '{"type":"step","data":{"tokens":%s,"metadata":%s}}' % (action.tokens, metadata)  # ints: repr is JSON

    state_frame = _dumps({"type": "state"})

    # Decisions: the session's state; each call's own are its plan's (_Call)

    def call(self, parse: Any, new_episode: bool) -> _Call:
        """Start a call whose reply ``parse`` reads (None: connect only): its plan. A
        step or state has no session to go to once the episode is lost (or close()
        ended it); a reset always goes ahead."""
        if self.lost is not None and not new_episode:
            raise self.lost_error()
        return _Call(self, parse, new_episode)

    def replied(self) -> None:
        """A reset got its reply: the session is usable again."""
        self.lost = None
        self._refusal = None

    def lose(self, why: str, code: int | None = None) -> EpisodeLostError:
        """The session is gone, ``why`` (and the close code that ended it): the one
        place ``lost`` is set. Returns the error later steps and states raise."""
        self.lost = (why, code)
        return self.lost_error()

    def close(self) -> None:
        """The shell's close() ended the session."""
        self.lose("this client's close() ended it")

    def closed(self, received: Any, sent: Any, received_then_sent: bool | None, leftover: Any) -> _Closed:
        """How a connection that left OPEN ended, from websockets' close frames: the
        server's close (it closed first), or this client's (why, in its words), or
        none (1006); ``leftover`` is a data frame that came before."""
        if received is not None and received_then_sent is not False:
            return _Closed(received.code, received.reason, leftover=leftover)
        if sent is None:
            return _Closed(1006, "", leftover=leftover)
        reason = sent.reason
        if sent.code == 1009:
            limit = self.max_message_bytes
            limit = f"max_message_bytes={limit}" if limit is not None else f"limit of {_MAX_REPLY_BYTES} bytes"
            reason = f"the server's reply is over this client's {limit} ({reason})"
        elif sent.code == 1011 and "keepalive" in reason:
            reason = f"keepalive: no pong within ping_timeout_s={self.ping_timeout_s} s"
        return _Closed(sent.code, reason, ours=True, leftover=leftover)

    def lost_error(self) -> EpisodeLostError:
        why, code = self.lost or ("the connection was lost", None)
        return EpisodeLostError(
            f"the session with {self.base_url} is gone ({why}); call reset() to start a new episode", code
        )

    def timeout_error(self) -> TimeoutError:
        return TimeoutError(
            f"no reply from {self.base_url} within message_timeout_s={self.message_timeout_s} s; the connection "
            "was closed so a late reply cannot answer a later call; call reset() to start again"
        )

    def closed_text(self, closed: _Closed) -> str:
        """Say how a connection ended: who closed it, its code and what the code means."""
        if closed.ours:
            return f"this client closed the connection with {closed.code}: {closed.reason}"
        if closed.code == 1006:
            text = ("the connection ended without a close frame (1006: the server was killed or the network "
                    "failed, or the server's keepalive gave up on this client")
        else:
            meaning = _CLOSE_MEANINGS.get(closed.code, "no known meaning")
            text = f"the server closed the connection with {closed.code} ({meaning}"
        if closed.reason:
            text += f"; {_preview(closed.reason, 120)}"
        text += ")"
        if self._refusal is not None:
            text += f" after {self._refusal.code}: {_preview(self._refusal.message, 200)}"
        return text

    def refusal(self, frame: Any) -> ChatEnvError | None:
        """The error frame a server sent before closing (CAPACITY_REACHED, SESSION_ERROR), if ``frame`` is one."""
        if frame is None:
            return None
        try:
            self._payload(frame, "error")
        except ChatEnvError as exc:
            return exc if exc.code in _CLOSING_CODES else None
        return None

    def connect_error(self, ws_url: str, exc: BaseException) -> ConnectionError:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            reason = " (missing or wrong auth token)" if status == 401 else ""
            return ConnectionError(f"{ws_url} refused the WebSocket upgrade: HTTP {status}{reason}")
        if isinstance(exc, TimeoutError):
            return ConnectionError(
                f"cannot connect to {ws_url}: no handshake within connect_timeout_s={self.connect_timeout_s} s"
            )
        return ConnectionError(f"cannot connect to {ws_url}: {exc}")

    # Replies

    def _payload(self, reply: bytes | bytearray | str, expected: str) -> dict[str, Any]:
        try:
            frame = json.loads(reply if isinstance(reply, str) else reply.decode())
        except UnicodeDecodeError as exc:
            raise ChatEnvError(PROTOCOL_ERROR, f"the server sent a text frame that is not UTF-8: {exc}") from None
        except RecursionError:
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent JSON nested too deeply to read") from None
        except ValueError as exc:
            raise ChatEnvError(PROTOCOL_ERROR, f"the server sent invalid JSON: {exc}") from None
        if not isinstance(frame, dict):
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent a frame that is not an object")
        data = frame.get("data")
        if frame.get("type") == "error":
            data = data if isinstance(data, dict) else {}
            raise ChatEnvError(str(data.get("code", "ERROR")), str(data.get("message", "")))
        if frame.get("type") != expected or not isinstance(data, dict):
            raise ChatEnvError(
                PROTOCOL_ERROR,
                f"the server sent a {_preview(frame.get('type'))} frame where {expected!r} was expected",
            )
        return data

    def parse_result(self, data: bytes | bytearray | str) -> StepResult:
        """Parse an observation frame: an extension of the last one, a delta, or anew.

        A full observation repeats the whole conversation each step. When it starts
        with the previous one's messages and tokens, byte for byte, only what it adds
        is parsed: a long episode costs O(new) per step, not O(history). Every field
        is type-checked; any reply that cannot be read is a PROTOCOL_ERROR.
        """
        if isinstance(data, str):
            data = data.encode()
        try:
            result = self._parse_extension(data) if self._seen is not None else None
            return result if result is not None else self._parse_observation(data)
        except ChatEnvError:
            raise
        except RecursionError:
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent JSON nested too deeply to read") from None
        except Exception as exc:  # a reply must never escape as another error type
            raise ChatEnvError(PROTOCOL_ERROR, f"the server sent an observation the client cannot read: "
                                               f"{type(exc).__name__}: {_preview(str(exc), 200)}") from None

    def _parse_observation(self, data: bytes | bytearray) -> StepResult:
        payload = self._payload(data, "observation")
        body = payload.get("observation")
        if not isinstance(body, dict):
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent an observation frame without an 'observation' object")
        messages, tokens = body.get("messages"), body.get("tokens")  # fresh: the client owns them
        if not isinstance(messages, list) or not isinstance(tokens, list):
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent an observation without lists of messages and tokens")
        _check_messages(messages, "observation.messages")
        _check_tokens(tokens, "observation.tokens")
        reward, done, metadata = _outcome(payload, body)
        totals = body.get("delta")
        if totals is not None:  # a delta: append, then check we are in sync
            if not isinstance(totals, dict):
                raise ChatEnvError(PROTOCOL_ERROR,
                                   f"the server sent observation.delta {_preview(totals)}, not an object")
            self._seen = None
            self._messages += messages
            self._tokens += tokens
            if totals.get("messages") != len(self._messages) or totals.get("tokens") != len(self._tokens):
                raise ChatEnvError(
                    DELTA_DESYNC,
                    f"rebuilt {len(self._messages)} messages / {len(self._tokens)} tokens, "
                    f"server has {_preview(totals.get('messages'))} / {_preview(totals.get('tokens'))}",
                )
        else:
            self._messages, self._tokens = messages, tokens
            self._seen = _frame_layout(data, payload, body)
        return self._result(done, reward, metadata)

    def _result(self, done: bool, reward: float | bool | None, metadata: dict[str, Any] | None) -> StepResult:
        obs = ChatObservation._sharing(self._messages, self._tokens, done, reward,
                                       dict(metadata) if metadata else None)
        return StepResult(obs, reward, done)

    def _parse_extension(self, data: bytes | bytearray) -> StepResult | None:
        """Parse only what a full frame adds to the previous one; None when it does not extend it.

        The previous frame's layout says where its head (up to ``"messages":[``), its
        messages, the bytes between messages and tokens, and its tokens lie. The new
        frame must start with the same head and messages and hold the same bytes
        between and the same tokens after its new messages; then [new messages, new
        tokens, the rest as an object] is parsed as one small JSON document. The rest
        (reward, done, metadata anywhere after the tokens) is read in full each time.
        """
        seen = self._seen
        view = seen.view
        if not data.startswith(view[:seen.messages_end]):
            return None
        between = view[seen.messages_end:seen.tokens_start]
        messages_end = data.find(between, seen.messages_end)  # the first "]," + key: never inside a string
        if messages_end < 0:
            return None
        tokens_start = messages_end + len(between)
        old_tokens = view[seen.tokens_start:seen.tokens_end]
        if not data.startswith(old_tokens, tokens_start):
            return None
        old_tokens_end = tokens_start + len(old_tokens)
        tokens_end = data.find(b"]", old_tokens_end)  # token ids are numbers: the first "]" ends them
        if tokens_end < 0:
            return None
        try:  # one small document: [new messages, new tokens, {"data": {"observation": {..}, ..}}]
            new_messages, new_tokens, outer = json.loads(b"".join((
                b"[[", data[_items_start(data, seen.messages_end, seen.messages_end > seen.head_end):messages_end],
                b"],[", data[_items_start(data, old_tokens_end, seen.tokens_end > seen.tokens_start):tokens_end],
                b'],{"data":{"observation":{"\\u0000":0', data[tokens_end + 1:], b"]",
            )).decode())  # decoded first: json.loads sniffs the encoding of bytes, slowly
        except (ValueError, TypeError, RecursionError):
            return None
        fields = outer.get("data") if type(outer) is dict and "type" not in outer else None
        body = fields.get("observation") if type(fields) is dict else None
        if type(body) is not dict or body.pop("\x00", None) != 0 or not _only_new_items(body):
            return None  # the rest repeats a key that changes what the head meant: read it all
        if not (_valid_messages(new_messages) and _valid_tokens(new_tokens)):
            return None  # the full parse names what is wrong
        if seen.static_data:
            fields = {**seen.static_data, **fields}
        if seen.static_body:
            body = {**seen.static_body, **body}
        try:
            reward, done, metadata = _outcome(fields, body)
        except ChatEnvError:
            return None
        self._messages += new_messages
        self._tokens += new_tokens
        seen.data, seen.view = data, memoryview(data)
        seen.messages_end, seen.tokens_start, seen.tokens_end = messages_end, tokens_start, tokens_end
        return self._result(done, reward, metadata)

    def parse_state(self, text: str | bytes | bytearray) -> ChatState:
        try:
            payload = self._payload(text, "state")
            episode_id, step_count = payload.get("episode_id"), payload.get("step_count", 0)
            messages, tokens = payload.get("history_messages", []), payload.get("history_tokens", [])
            if episode_id is not None and type(episode_id) is not str:
                raise ChatEnvError(PROTOCOL_ERROR, f"the server sent state.episode_id {_preview(episode_id)}, "
                                                   "not a string or null")
            if type(step_count) is not int:
                raise ChatEnvError(PROTOCOL_ERROR, f"the server sent state.step_count {_preview(step_count)}, "
                                                   "not an integer")
            if type(messages) is not list:
                raise ChatEnvError(PROTOCOL_ERROR, f"the server sent state.history_messages {_preview(messages)}, "
                                                   "not a list")
            _check_messages(messages, "state.history_messages")
            if type(tokens) is not list or not all(type(ids) is list for ids in tokens):
                raise ChatEnvError(PROTOCOL_ERROR, f"the server sent state.history_tokens {_preview(tokens)}, "
                                                   "not a list of token id lists")
            for ids in tokens:
                _check_tokens(ids, "state.history_tokens")
            return ChatState(episode_id, step_count, messages, tokens)
        except ChatEnvError:
            raise
        except RecursionError:
            raise ChatEnvError(PROTOCOL_ERROR, "the server sent JSON nested too deeply to read") from None
        except Exception as exc:  # a reply must never escape as another error type
            raise ChatEnvError(PROTOCOL_ERROR, f"the server sent a state the client cannot read: "
                                               f"{type(exc).__name__}: {_preview(str(exc), 200)}") from None


class _Call:
    """One call's plan: from what its shell reports, the shell's next action
    (_CONNECT, _SEND, _AWAIT_CLOSE, _RETURN) or the error the call raises.

    Every rule of a call lives here, so that the shells hold none:

    - a reply: returned (after a reset, the session is usable again);
    - an error frame the server closes after (CAPACITY_REACHED, SESSION_ERROR),
      as the reply or before it: a reset refused for room tries the next server;
      otherwise the session is lost and the refusal raised, its close noted;
    - any other error frame, or a reply that cannot be read: raised, the session
      stays;
    - the server closed a reused connection before the reply: a reset is sent
      again, once, on a new one; the server closed one this call opened: a reset
      tries the next server; otherwise EpisodeLostError;
    - this client closed it for a broken frame (1002, 1007): PROTOCOL_ERROR; for
      another reason (a limit, keepalive): EpisodeLostError;
    - no reply within message_timeout_s: TimeoutError; an interruption (Ctrl-C,
      a cancelled task): raised as it is. Both lose the session.

    New sessions go to every server once a round, from a rotating start. A server
    that refuses the connection or answers CAPACITY_REACHED is skipped. With
    ``capacity_wait_s``, more rounds follow after jittered exponential backoff
    while some server was full, until that deadline.
    """

    __slots__ = ("core", "parse", "new_episode", "fresh", "result", "refusal", "round", "rounds", "full",
                 "errors", "deadline", "backoff_s")

    def __init__(self, core: _ClientCore, parse: Any, new_episode: bool) -> None:
        self.core = core
        # The reply's parser (core.parse_result or core.parse_state), and the reply parsed
        self.parse = parse
        self.result: Any = None
        # A reset: it may open its session on any server
        self.new_episode = new_episode
        # Whether the connection in use was opened by this call (not one reused)
        self.fresh = False
        # The error frame the reply was, while the server's close is awaited
        self.refusal: ChatEnvError | None = None
        # Servers: those still to try this round, the rounds so far, what this round met
        self.round: list[int] = []
        self.rounds = 0
        self.full: ChatEnvError | None = None  # this round's last CAPACITY_REACHED
        self.errors: list[BaseException] = []  # this round's connection failures
        # Waiting for room: until when (capacity_wait_s from the first round), the next pause
        self.deadline: float | None = None
        self.backoff_s = _BACKOFF_S[0]

    def start(self, connected: bool) -> str:
        """The first action: the request on the shell's connection, or a new one."""
        return _SEND if connected else _CONNECT

    # Connecting

    def next_server(self) -> tuple[str, float]:
        """The server to open a session on (its ws:// URL) and how long to wait first;
        raises what the call raises when none is left."""
        core = self.core
        wait_s = 0.0
        if not self.round:
            if self.rounds:
                wait_s = self._pause()
            elif core.capacity_wait_s is not None:
                self.deadline = time.monotonic() + core.capacity_wait_s
            count = len(core.ws_urls)
            start, core._next_server = core._next_server, (core._next_server + 1) % count
            self.round = [(start + k) % count for k in range(count)]
            self.rounds += 1
            self.full, self.errors = None, []
        core.server = index = self.round.pop(0)
        return core.ws_urls[index], wait_s

    def _pause(self) -> float:
        """A round is over: the pause before the next, or raise (no server up, or no room in time)."""
        if self.full is None:  # every server is down: waiting for room cannot help
            if len(self.errors) == 1:
                raise self.errors[0]
            raise ConnectionError("; ".join(str(exc) for exc in self.errors) or "no server to connect to")
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is None or remaining <= 0:
            raise self.full
        wait_s = min(remaining, self.backoff_s * (0.5 + _random().random() / 2))
        self.backoff_s = min(2 * self.backoff_s, _BACKOFF_S[1])
        return wait_s

    def on_connect(self) -> str:
        """A connection opened: the request goes on it."""
        self.fresh = True
        return _SEND

    def on_connect_error(self, exc: BaseException) -> str:
        """The connection was refused or its handshake failed: the next server."""
        self.errors.append(exc)
        return _CONNECT

    # Replies

    def on_reply(self, data: bytes | bytearray | str) -> str:
        """A data frame answered the request: the reply, a refusal, or an error raised."""
        try:
            self.result = self.parse(data)
        except ChatEnvError as exc:
            if exc.code not in _CLOSING_CODES:
                raise  # the server answered: the session stays
            self.refusal = exc
            return _AWAIT_CLOSE
        if self.new_episode:
            self.core.replied()
        return _RETURN

    def on_refusal_close(self, closed: _Closed | None) -> str:
        """After _AWAIT_CLOSE: the server's close, None if it did not come in time."""
        return self._refused(self.refusal, closed)

    def _refused(self, error: ChatEnvError, closed: _Closed | None) -> str:
        """The server sent CAPACITY_REACHED or SESSION_ERROR, then closed (``closed``, if
        it came in time): the next server (a reset refused for room), or raise."""
        core = self.core
        core._refusal = error
        if self.new_episode and error.code == CAPACITY_REACHED:
            self.full = error
            return _CONNECT
        if closed is None:
            core.lose(f"the server sent {error.code}: {_preview(error.message, 200)}, then closed the session")
        else:
            core.lose(core.closed_text(closed), closed.code)
        raise error

    # Failures: the request got no reply, and the shell dropped the connection

    def on_failure(self, exc: BaseException) -> str:
        """What the shell caught instead of a reply: a frame before the close, the
        close, a timeout or an interruption; each decides (see the class)."""
        if isinstance(exc, _Closed):
            if exc.leftover is not None:
                return self.on_unsolicited(exc.leftover, exc)
            return self.on_close(exc)
        if isinstance(exc, _Unsolicited):
            return self.on_unsolicited(exc.frame, None)
        if isinstance(exc, TimeoutError):
            return self.on_timeout()
        return self.on_interrupt(exc)

    def on_unsolicited(self, frame: Any, closed: _Closed | None) -> str:
        """A data frame no request asked for came first (then ``closed``, if it did): a
        server's refusal of the session, or a server that broke the protocol."""
        core = self.core
        refusal = core.refusal(frame)
        if refusal is not None:
            return self._refused(refusal, closed)
        core.lose("the server sent a frame no request asked for")
        raise ChatEnvError(PROTOCOL_ERROR, f"the server sent a frame no request asked for: "
                                           f"{_preview(bytes(frame[:200]))}") from None

    def on_close(self, closed: _Closed) -> str:
        """The connection ended before the reply."""
        core = self.core
        if self.new_episode and not closed.ours and not self.fresh:
            return _CONNECT  # the reused connection had ended: once more, anew (once: the next is fresh)
        lost = core.lose(core.closed_text(closed), closed.code)
        if closed.ours and closed.code in _BROKEN_CODES:
            raise ChatEnvError(PROTOCOL_ERROR, f"the server's reply broke the WebSocket protocol: "
                                               f"{closed.reason}; the connection was closed") from None
        if self.new_episode and not closed.ours:  # this server took the connection and closed it
            self.errors.append(lost)
            return _CONNECT
        raise lost from None

    def on_timeout(self) -> str:
        """No reply within message_timeout_s (the shell closed the connection: a late
        reply must not answer a later call)."""
        core = self.core
        core.lose(f"no reply within message_timeout_s={core.message_timeout_s} s")
        raise core.timeout_error() from None

    def on_interrupt(self, exc: BaseException) -> str:
        """Ctrl-C, a cancelled task, or another exception between request and reply."""
        self.core.lose(f"a call was interrupted by {type(exc).__name__} between its request and its reply")
        raise exc


class _Layout:
    """Where a full observation frame's parts lie (byte offsets), to parse the next one
    only past them: its head ends after ``"messages":[``, its messages end at
    ``messages_end`` (their "]"), its tokens lie in ``[tokens_start, tokens_end)``.
    ``static_data`` and ``static_body`` are the members of ``data`` and
    ``observation`` that lie before the tokens end: the same bytes next time, so
    the same values."""

    __slots__ = ("data", "view", "head_end", "messages_end", "tokens_start", "tokens_end",
                 "static_data", "static_body")

    def __init__(self, data: Any, head_end: int, messages_end: int, tokens_start: int, tokens_end: int,
                 static_data: dict[str, Any], static_body: dict[str, Any]) -> None:
        self.data, self.view = data, memoryview(data)
        self.head_end, self.messages_end = head_end, messages_end
        self.tokens_start, self.tokens_end = tokens_start, tokens_end
        self.static_data, self.static_body = static_data, static_body


_json_decoder = json.JSONDecoder()


def _frame_layout(data: bytes | bytearray, payload: dict[str, Any], body: dict[str, Any]) -> _Layout | None:
    """The layout of a full observation frame, found by walking its JSON, whatever its
    spacing or key order; None when its messages do not come before its tokens.

    The walk reads ``data`` as latin-1, which maps bytes to characters one to one,
    so the offsets it finds in the text are byte offsets; values come from
    ``payload`` and ``body`` (the frame as json.loads read it).
    """
    text = data.decode("latin-1")
    try:
        frame = _members(text, _skip(text, 0))
        data_at = frame.get("data")
        if data_at is None or text[data_at[0]] != "{":
            return None
        fields = _members(text, data_at[0])
        body_at = fields.get("observation")
        if body_at is None or text[body_at[0]] != "{":
            return None
        members = _members(text, body_at[0])
        messages_at, tokens_at = members.get("messages"), members.get("tokens")
        if messages_at is None or tokens_at is None or messages_at[1] > tokens_at[0]:
            return None
    except (ValueError, IndexError):
        return None
    messages_end, tokens_end = messages_at[1] - 1, tokens_at[1] - 1  # the closing "]" of each
    if text[messages_end] != "]" or text[tokens_end] != "]":
        return None
    static_data = {k: payload[k] for k, at in fields.items() if at[0] < body_at[0] and k in payload}
    static_body = {k: body[k] for k, at in members.items()
                   if at[0] < tokens_at[1] and k not in ("messages", "tokens") and k in body}
    return _Layout(data, messages_at[0] + 1, messages_end, tokens_at[0] + 1, tokens_end, static_data, static_body)


def _skip(text: str, pos: int) -> int:
    """The position of the next non-whitespace character (JSON's whitespace)."""
    return json.decoder.WHITESPACE.match(text, pos).end()


def _members(text: str, pos: int) -> dict[str, tuple[int, int]]:
    """Where each member's value of the JSON object at ``pos`` lies: key -> (start, end).

    The values are skipped with the C decoder; a repeated key keeps the last one, as
    json.loads does.
    """
    if text[pos] != "{":
        raise ValueError("not an object")
    members: dict[str, tuple[int, int]] = {}
    pos = _skip(text, pos + 1)
    if text[pos] == "}":
        return members
    while True:
        if text[pos] != '"':
            raise ValueError("a key must be a string")
        key, pos = _json_decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos] != ":":
            raise ValueError("a key must be followed by ':'")
        start = _skip(text, pos + 1)
        _, end = _json_decoder.raw_decode(text, start)
        members.pop(key, None)
        members[key] = (start, end)
        pos = _skip(text, end)
        if text[pos] == "}":
            return members
        if text[pos] != ",":
            raise ValueError("members must be separated by ','")
        pos = _skip(text, pos + 1)


def _items_start(data: bytes | bytearray, pos: int, had_items: bool) -> int:
    """Where the array items after earlier ones begin: past their comma, if any follow."""
    if had_items and data[pos] != 0x5D:  # "]": none follow
        if data[pos] != 0x2C:  # ","
            raise ValueError("not a continuation of the previous items")
        return pos + 1
    return pos


def _only_new_items(body: dict[str, Any]) -> bool:
    """Whether an observation's members after its tokens leave messages and tokens as they were."""
    return "messages" not in body and "tokens" not in body and "delta" not in body


def _valid_messages(items: Any) -> bool:
    return type(items) is list and all(
        type(m) is dict and type(m.get("role")) is str and type(m.get("content")) is str for m in items
    )


def _valid_tokens(items: Any) -> bool:
    return type(items) is list and set(map(type, items)) <= _TOKEN_TYPES


def _check_messages(items: list[Any], what: str) -> None:
    if not _valid_messages(items):
        bad = next(m for m in items if not _valid_messages([m]))
        raise ChatEnvError(PROTOCOL_ERROR, f"the server sent {what} holding {_preview(bad)}, "
                                           "not a message with string role and content")


def _check_tokens(items: list[Any], what: str) -> None:
    if not _valid_tokens(items):
        bad = next(t for t in items if type(t) is not int)
        raise ChatEnvError(PROTOCOL_ERROR, f"the server sent {what} holding {_preview(bad)}, not a token id")


_REWARD_TYPES = (int, float, bool)  # a reward as OpenEnv 0.10 types it (bool | int | float | None), kept as sent


def _outcome(fields: dict[str, Any], body: dict[str, Any]) -> tuple[Any, bool, dict[str, Any] | None]:
    """An observation's reward, done and metadata, type-checked (OpenEnv 0.10 sends
    metadata inside the observation and, when not empty, beside reward too: the one
    inside when it holds anything, else the one beside)."""
    reward, done = fields.get("reward"), fields.get("done", False)
    if reward is not None and type(reward) not in _REWARD_TYPES:
        raise ChatEnvError(PROTOCOL_ERROR, f"the server sent reward {_preview(reward)}, "
                                           "not a number, a boolean or null")
    if type(done) is not bool:
        raise ChatEnvError(PROTOCOL_ERROR, f"the server sent done {_preview(done)}, not a boolean")
    inner, beside = body.get("metadata"), fields.get("metadata")
    for metadata in (inner, beside):
        if metadata is not None and type(metadata) is not dict:
            raise ChatEnvError(PROTOCOL_ERROR, f"the server sent metadata {_preview(metadata)}, not an object")
    return reward, done, inner or beside


def _random() -> Any:
    import random

    return random


# The task API: OpenEnv 0.10's HTTP routes, under its TaskProvider method names. Each
# method: (HTTP method, route under /{env_name}, its arguments, the reply's member
# that is the answer (None: the whole reply), the answer's type)
_TASK_CALLS = {
    "list_splits": ("GET", "splits", (), None, list),
    "list_tasks": ("POST", "tasks", ("split",), "tasks", list),
    "num_tasks": ("POST", "num_tasks", ("split",), "num_tasks", int),
    "get_task": ("POST", "task", ("split", "index"), "task", object),
    "get_task_range": ("POST", "task_range", ("split", "start", "stop"), "tasks", list),
}
_FALLBACK_ENV_NAME = "chat_env"  # the env name asked for when GET /list_environments names none


def _http_base(base_url: str) -> tuple[str, str, int, str]:
    """A client's base URL (http(s)://, ws(s):// or host:port, perhaps ending /ws) as
    the server's HTTP root: (scheme, host, port, path prefix)."""
    from urllib.parse import urlsplit

    url = urlsplit(_ws_url(base_url))
    scheme = "https" if url.scheme == "wss" else "http"
    prefix = url.path[:-len("/ws")]
    return scheme, url.hostname or "", url.port or (443 if scheme == "https" else 80), prefix


def _task_arguments(name: str, values: tuple[Any, ...]) -> dict[str, Any]:
    """A task call's JSON body, its arguments checked here (a wrong type is the caller's
    error, not the server's): ``split`` a string, the others integers or None."""
    body = {}
    for key, value in zip(_TASK_CALLS[name][2], values):
        if key == "split":
            if not isinstance(value, str):
                raise TypeError(f"{name}(): split must be a string, not {type(value).__name__}")
        elif value is None and key != "index":
            continue  # start/stop left out: the server's default (the split's ends)
        elif type(value) is not int:
            raise TypeError(f"{name}(): {key} must be an integer, not {type(value).__name__}")
        body[key] = value
    return body


def _http_exchange(core: _ClientCore, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    """One plain HTTP request to the server in use (blocking): (status, the body as JSON,
    or as text when it is not JSON). Never via a proxy; the client's auth token, TLS
    and timeouts; a body over max_message_bytes is a PROTOCOL_ERROR."""
    import http.client

    scheme, host, port, prefix = _http_base(core.base_url)
    timeout = core.message_timeout_s
    if scheme == "https":
        import ssl

        conn: Any = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = dict(core.headers)
    headers["Accept"] = "application/json"
    payload = None
    if body is not None:
        payload = _dumps(body).encode()
        headers["Content-Type"] = "application/json"
    where = f"{method} {prefix}{path} on {core.base_url}"
    try:
        conn.request(method, prefix + path, body=payload, headers=headers)
        answer = conn.getresponse()
        limit = core.max_message_bytes  # None: no limit
        data = answer.read() if limit is None else answer.read(limit + 1)
    except TimeoutError:
        raise TimeoutError(f"{where}: no answer within message_timeout_s={timeout} s") from None
    except OSError as exc:
        raise ConnectionError(f"{where}: {exc}") from None
    finally:
        conn.close()
    if limit is not None and len(data) > limit:
        raise ChatEnvError(PROTOCOL_ERROR, f"{where}: the answer is over this client's "
                                           f"max_message_bytes={core.max_message_bytes}")
    try:
        return answer.status, json.loads(data)
    except (ValueError, RecursionError):
        return answer.status, data.decode("utf-8", "replace")


def _task_call(core: _ClientCore, name: str, values: tuple[Any, ...]) -> Any:
    """Call OpenEnv's task route for ``name`` on the server in use and return its answer.

    The route's env name is the server's own, asked once per server of
    ``GET /list_environments``. A 4xx answer (an unknown split or a bad index; 401
    and 403 aside) is ChatEnvError(VALIDATION_ERROR), a 5xx one (a server without
    tasks says 501; an OpenEnv environment that raised, 500) EXECUTION_ERROR, each
    with the server's words; an answer of the wrong shape is PROTOCOL_ERROR.
    """
    method, route, _, member, kind = _TASK_CALLS[name]
    body = _task_arguments(name, values) if method == "POST" else None
    env_name = core.env_names.get(core.base_url)
    if env_name is None:
        status, names = _http_exchange(core, "GET", "/list_environments", None)
        ok = status == 200 and type(names) is list and names and isinstance(names[0], str)
        env_name = core.env_names[core.base_url] = names[0] if ok else _FALLBACK_ENV_NAME
    path = f"/{env_name}/{route}"
    status, answer = _http_exchange(core, method, path, body)
    where = f"{name}() ({method} {path} on {core.base_url})"
    if status != 200:
        detail = answer.get("detail", answer) if isinstance(answer, dict) else answer
        if isinstance(detail, list):  # pydantic's errors, as a 422 lists them
            detail = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in detail)
        text = f"{where}: HTTP {status}: {_preview(detail, 300) if not isinstance(detail, str) else detail[:300]}"
        if status in (401, 403):
            raise ConnectionError(f"{text} (missing or wrong auth token)")
        raise ChatEnvError(VALIDATION_ERROR if status < 500 else EXECUTION_ERROR, text)
    if member is not None:
        if type(answer) is not dict or member not in answer:
            raise ChatEnvError(PROTOCOL_ERROR, f"{where}: the server sent {_preview(answer)}, not an object "
                                               f"holding {member!r}")
        answer = answer[member]
    if not isinstance(answer, kind) or (kind is int and type(answer) is bool):
        raise ChatEnvError(PROTOCOL_ERROR, f"{where}: the server sent {_preview(answer)}, not a {kind.__name__}")
    return answer


class _ClientBase:
    """What ChatEnv and AsyncChatEnv share: the core (options, decisions, parsing),
    docker ownership, helpers."""

    # The options are listed once, on the core: help() and inspect.signature() show its
    # signature and its docstring here, and the core checks what is passed.
    @functools.wraps(_ClientCore.__init__, assigned=("__doc__",), updated=())
    def __init__(self, base_url: str | list[str] | tuple[str, ...], **options: Any) -> None:
        _bind_websockets()
        self._core = _ClientCore(base_url, **options)
        self._container: Any = None
        self._init_shell()

    def _init_shell(self) -> None:
        """The shell's own state: its connection and its lock."""
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """The server in use (or tried last): one of the base URLs the client was given."""
        return self._core.base_url

    message_to_action = staticmethod(message_to_action)

    @classmethod
    def _launch(
        cls,
        image: str,
        *,
        port: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60.0,
        docker: str = "docker",
        **client_options: Any,
    ) -> Any:
        """Start ``image`` (see the Docker section) and return a client that owns it."""
        container = _start_container(
            image, port=port, env_vars=env_vars, volumes=volumes, ready_timeout_s=ready_timeout_s, docker=docker
        )
        try:
            client = cls(container.base_url, **client_options)
        except BaseException:
            container.stop()
            raise
        client._container = container
        return client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class _SocketWire:
    """One WebSocket on a blocking socket, for ChatEnv.

    websockets' Sans-I/O ClientProtocol parses and writes every frame, the handshake
    included; this shell only moves bytes, within bounds of its own: a call's reads
    share one deadline (message_timeout_s from the request), checked after every
    read, so no trickle, ping or fragment stream outlasts it; a message may come in
    at most _MAX_FRAGMENTS frames of max_message_bytes in all; the keepalive thread
    reads at most _TEND_BYTES a turn, and of the data frames no call asked for keeps
    the first only. The caller's thread drives the wire during a call; the keepalive
    thread only while no call holds ``lock``.
    """

    def __init__(self, core: _ClientCore, lock: Any) -> None:
        self.core = core
        # The client's lock: held by each call, tried by the keepalive thread
        self.lock = lock
        self.sock: Any = None
        self.proto: Any = None
        self.poller: Any = None  # the socket alone, polled before a request: what came first is no reply
        # The payloads of a fragmented message being received, and their size
        self.fragments: list[Any] | None = None
        self.fragment_bytes = 0
        # The first data frame that arrived while no call waited, for the next call to raise
        self.unsolicited: Any = None
        # How the connection ended (a _Closed), None while it is open
        self.closed: _Closed | None = None
        # Keepalive: when the last call started, when bytes last came, the ping in flight
        self.clock = time.monotonic
        self.last_io = self.last_rx = self.clock()
        self.ping: bytes | None = None
        self.ping_sent_at = 0.0
        self.max_bytes = _MAX_REPLY_BYTES if core.max_message_bytes is None else core.max_message_bytes
        waits = [t for t in (core.message_timeout_s, core.ping_interval_s) if t is not None]
        self.wait_s = min(waits) if waits else None  # one blocking read at most; then keepalive and deadline
        self.timeout: float | None = None  # the socket's timeout now (wait_s, or less near a deadline)
        self.deadline: float | None = None  # the call's: no read or send under way waits past it
        self.interrupted = False  # close() from another thread cut the connection
        self.would_block: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
        self.tls = False  # bytes TLS has decrypted but not handed over are not in the poll's view

    # Opening

    def open(self, ws_url: str) -> None:
        """Connect and handshake within connect_timeout_s; raises ConnectionError."""
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        core = self.core
        uri = parse_uri(ws_url)
        timeout = core.connect_timeout_s
        deadline = None if timeout is None else self.clock() + timeout
        try:
            sock = socket.create_connection((uri.host, uri.port), timeout)  # never through a proxy
        except OSError as exc:
            raise core.connect_error(ws_url, exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if uri.secure:
                import ssl

                sock.settimeout(self._remaining(deadline))
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
                self.would_block += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
                self.tls = True
            extensions = None
            if core.compression == "deflate":
                extensions = _deflate_extensions("client")
            proto = ClientProtocol(uri, extensions=extensions, max_size=self.max_bytes, logger=_wire_logger)
            request = proto.connect()
            for name, value in core.headers:
                request.headers[name] = value
            proto.send_request(request)
            sock.settimeout(self._remaining(deadline))
            sock.sendall(b"".join(proto.data_to_send()))
            frames = self._handshake(sock, proto, deadline)
        except Exception as exc:
            sock.close()
            raise core.connect_error(ws_url, exc) from exc
        except BaseException:
            sock.close()
            raise
        self.sock, self.proto = sock, proto
        self.poller = _poller(sock)
        self._set_timeout(self.wait_s)
        if frames:  # frames that came with the handshake's answer (a refusal)
            try:
                self._frames(frames, idle=True)
            except _Closed:
                pass  # recorded in self.closed

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - self.clock()
        if remaining <= 0:
            raise TimeoutError("connect timeout")
        return remaining

    def _handshake(self, sock: Any, proto: Any, deadline: float | None) -> list[Any]:
        """Read the server's answer to the upgrade (the protocol bounds its size); returns
        the frames that came with it."""
        while True:
            sock.settimeout(self._remaining(deadline))
            data = sock.recv(_CLIENT_READ_BYTES)
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            if proto.handshake_exc is not None:
                raise proto.handshake_exc
            events = proto.events_received()
            if events:
                return events[1:]  # the first is the answer
            if not data:
                raise EOFError("the server closed the connection during the handshake")

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout

    # Calls (under the client's lock)

    def call(self, frame: str) -> Any:
        """Send one request and return the next data frame's payload: its reply. A data
        frame that came before the request was written is none: it is raised."""
        if self.closed is None and (self.poller is None or self.poller.poll(0) or self.tls and self.sock.pending()):
            self._read_available(idle=True)  # pings, a close, or a frame no request asked for
        if self.closed is not None:
            raise self.closed
        if self.unsolicited is not None:
            raise _Unsolicited(self.unsolicited)
        if self.timeout != self.wait_s:  # lowered near the last call's deadline
            self._set_timeout(self.wait_s)
        self.last_io = start = self.clock()
        timeout = self.core.message_timeout_s
        self.deadline = None if timeout is None else start + timeout
        proto = self.proto
        proto.send_text(frame.encode())
        data = b"".join(proto.data_to_send())
        if len(data) >= _SEND_TIMER_BYTES and self.deadline is not None:  # it may wait on the server reading it
            self._set_timeout(max(self.deadline - self.clock(), 1e-3))
        self._send(data)
        while True:
            message = self._frames(self._recv(), idle=False)
            if message is not None:
                return message

    def _near_deadline(self) -> None:
        """Keep the next blocking read or send from waiting past the call's deadline (to
        within _DEADLINE_SLACK_S); raise TimeoutError once it has passed."""
        deadline, timeout = self.deadline, self.timeout
        if deadline is None:
            return
        remaining = deadline - self.clock()
        if remaining <= 0:
            raise TimeoutError("no reply within the message timeout")
        if not timeout or remaining < timeout - _DEADLINE_SLACK_S:
            self._set_timeout(remaining)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise
        except OSError as exc:
            raise self._shut(_Closed(1006, str(exc), leftover=self._leftover())) from None

    def _recv(self) -> bytes:
        """The next bytes of a call's reply: a wait for nothing is keepalive, until the
        deadline (checked before every read, whatever came before); a dead socket or
        the end of stream ends the session."""
        recv, clock = self.sock.recv, self.clock
        while True:
            deadline, timeout = self.deadline, self.timeout
            if deadline is not None and (not timeout or deadline - clock() < timeout - _DEADLINE_SLACK_S):
                self._near_deadline()
            try:
                data = recv(_CLIENT_READ_BYTES)
            except TimeoutError:
                self._keepalive(self.clock(), idle=False)
                continue
            except OSError as exc:
                raise self._shut(_Closed(1006, str(exc))) from None
            if not data:
                raise self._eof()
            return data

    # Frames

    def _frames(self, data: bytes, idle: bool) -> Any:
        """Feed received bytes to the protocol and act on what it parsed: pongs and the
        echo of a close are sent, the first data message returned (when ``idle``, kept
        for the next call, which raises it)."""
        proto = self.proto
        if type(data) is not list:
            proto.receive_data(data)
            events = proto.events_received()
            if len(events) == 1 and not idle and self.fragments is None and proto.state == _OPEN:
                event = events[0]  # the hot path: the whole reply alone, nothing to answer
                if event.fin and (event.opcode == _OP_TEXT or event.opcode == _OP_BINARY):
                    return event.data
        else:
            events = data  # parsed already (with the handshake's answer)
        message = None
        try:
            for event in events:
                opcode = event.opcode
                if opcode == _OP_TEXT or opcode == _OP_BINARY:
                    if not event.fin:
                        self.fragments, self.fragment_bytes = [event.data], len(event.data)
                        continue
                    done = event.data
                elif opcode == _OP_CONT and self.fragments is not None:
                    self.fragments.append(event.data)
                    self.fragment_bytes += len(event.data)
                    if len(self.fragments) > _MAX_FRAGMENTS:
                        raise self._fail(1009, f"the server sent a message in more than {_MAX_FRAGMENTS} fragments")
                    if self.fragment_bytes > self.max_bytes:
                        raise self._fail(1009, f"the server's reply of over {self.max_bytes} bytes is over this "
                                               f"client's max_message_bytes={self.core.max_message_bytes}")
                    if not event.fin:
                        continue
                    done, self.fragments = b"".join(self.fragments), None
                else:
                    if opcode == _OP_PONG and event.data == self.ping:
                        self.ping = None
                    continue
                if message is None and not idle:
                    message = done
                elif self.unsolicited is None:
                    self.unsolicited = done  # the first is kept: a refusal, or proof of a broken server
            self._flush(idle)  # pongs, the echo of a close, our own close after a protocol error
            if proto.state != _OPEN:
                raise self._closing()
        except _Closed:
            if message is None:
                raise
        return message  # a reply that came before the connection ended is still the reply: the end is the next call's

    def _read_available(self, idle: bool) -> None:
        """Read what has come, without blocking, at most _TEND_BYTES; frames are handled
        as ``_frames`` does when idle."""
        sock = self.sock
        self._set_timeout(0.0)
        try:
            for _ in range(_TEND_BYTES // _CLIENT_READ_BYTES):
                try:
                    data = sock.recv(_CLIENT_READ_BYTES)
                except self.would_block:
                    return
                except OSError as exc:
                    raise self._shut(_Closed(1006, str(exc))) from None
                if not data:
                    raise self._eof()
                self.last_rx = self.clock()
                self._frames(data, idle=True)
                if self.unsolicited is not None:
                    return  # the next call raises it: nothing after it matters
        except _Closed:
            pass  # recorded in self.closed
        finally:
            if self.closed is None:
                self._set_timeout(self.wait_s)

    def _flush(self, idle: bool) -> None:
        """Send what the protocol has queued (the end of stream is ours to do: close)."""
        data = b"".join(self.proto.data_to_send())
        if not data:
            return
        try:
            if idle:  # the keepalive thread never blocks: a tiny frame fits, or the peer is stuck
                self._set_timeout(0.0)
                if self.sock.send(data) != len(data):
                    raise BlockingIOError("partial send")
            else:  # a call's: a server that does not read its pongs holds it no longer than the deadline
                self._near_deadline()
                self.sock.sendall(data)
        except TimeoutError:
            if idle:
                raise self._shut(_Closed(1006, "cannot send to the server: it does not read")) from None
            raise
        except OSError as exc:
            raise self._shut(_Closed(1006, f"cannot send to the server: {exc}")) from None

    # Keepalive (calls and the keepalive thread)

    def _keepalive(self, now: float, idle: bool) -> float | None:
        """Send a ping after ping_interval_s of quiet; give up on a peer that does not
        answer within ping_timeout_s. Returns when to look again (None: never)."""
        core = self.core
        interval, timeout = core.ping_interval_s, core.ping_timeout_s
        if interval is None or self.closed is not None:
            return None
        if self.ping is not None:
            if timeout is None:
                return None
            if now - self.ping_sent_at > timeout:
                raise self._fail(1011, f"keepalive: no pong within ping_timeout_s={timeout} s")
            return self.ping_sent_at + timeout
        quiet_since = max(self.last_io, self.last_rx)
        if now - quiet_since < interval:
            return quiet_since + interval
        self.ping, self.ping_sent_at = os.urandom(4), now
        self.proto.send_ping(self.ping)
        self._flush(idle)
        return None if timeout is None else now + timeout

    @property
    def listening(self) -> bool:
        """Whether the keepalive thread should read this wire: open, and holding no frame
        for the next call (once one is held, nothing after it matters)."""
        return self.closed is None and self.unsolicited is None

    def tend(self, now: float) -> float | None:
        """The keepalive thread's upkeep of an idle wire, under its lock and never blocking:
        read what came (at most _TEND_BYTES: answering pings, keeping the first data
        frame for the next call, noting a close), send keepalive pings, give up on a
        dead peer. Returns when to come back."""
        if self.unsolicited is None:
            self._read_available(idle=True)
        try:
            return self._keepalive(now, idle=True)
        except _Closed:
            return None
        finally:
            if self.closed is None:
                self._set_timeout(self.wait_s)

    # Endings

    def _leftover(self) -> Any:
        """A data frame that arrived before the connection broke, if one can still be read."""
        try:
            self._read_available(idle=True)
        except (OSError, ValueError):
            pass
        return self.unsolicited

    def _eof(self) -> _Closed:
        """The server closed the TCP connection without a close frame (or close() cut it)."""
        if self.interrupted:
            return self._shut(_Closed(1000, "close() was called from another thread", ours=True))
        if self.proto.state != _OPEN:  # after a close frame
            return self._closing()
        return self._shut(_Closed(1006, "", leftover=self.unsolicited))

    def interrupt(self) -> None:
        """End a call another thread has under way (its blocking read returns at once)."""
        import socket

        self.interrupted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def _closing(self) -> _Closed:
        """The protocol left OPEN: the server's close frame, or our own after a broken
        frame; the connection is dropped, and the close read from the protocol's
        close_exc (documented once the protocol has seen the end of stream)."""
        proto = self.proto
        proto.receive_eof()  # we end it now: the protocol is CLOSED
        proto.data_to_send()
        exc = proto.close_exc
        return self._shut(self.core.closed(exc.rcvd, exc.sent, exc.rcvd_then_sent, self.unsolicited))

    def _fail(self, code: int, reason: str) -> _Closed:
        """Close the connection ourselves (a limit, keepalive), telling the server why."""
        try:
            if self.proto.state == _OPEN:
                self.proto.send_close(code, reason[:120])
                self._set_timeout(0.0)
                self.sock.send(b"".join(self.proto.data_to_send()))
        except (OSError, ValueError):
            pass
        return self._shut(_Closed(code, reason, ours=True))

    def _shut(self, closed: _Closed) -> _Closed:
        if self.closed is None:
            self.closed = closed
        try:
            self.sock.close()
        except OSError:
            pass
        return closed

    def await_close(self) -> _Closed | None:
        """After an error frame the server closes after: its close, if it comes within
        _CLOSE_WAIT_S; then the connection is dropped."""
        self.deadline = self.clock() + _CLOSE_WAIT_S
        try:
            while self.closed is None:
                self._frames(self._recv(), idle=True)
        except (_Closed, OSError):
            pass
        closed = self.closed
        self.abort()
        return None if closed is None or closed.ours else closed

    def abort(self) -> None:
        """Drop the connection now, telling the server (best effort, never blocking)."""
        if self.closed is None:
            self._fail(1000, "")

    def close(self) -> None:
        """Close the session: a close frame, then the server's answer for a moment."""
        if self.closed is not None:
            return
        proto, sock = self.proto, self.sock
        try:
            proto.send_close(1000)
            sock.settimeout(_CLOSE_WAIT_S)
            sock.sendall(b"".join(proto.data_to_send()))
            deadline = self.clock() + _CLOSE_WAIT_S
            while self.clock() < deadline:
                data = sock.recv(_CLIENT_READ_BYTES)
                if not data:
                    break
                proto.receive_data(data)
                if any(event.opcode == _OP_CLOSE for event in proto.events_received()):
                    break
        except Exception:  # a dead or stuck server: the socket is closed all the same
            pass
        self._shut(_Closed(1000, "closed by close()", ours=True))


class _Keepalive:
    """The one daemon thread that keeps idle ChatEnv connections alive.

    A sync client reads its socket only inside its calls. While user code sleeps
    or computes between calls, this thread waits on the sockets of clients that
    have been quiet for _IDLE_S (and whose lock it can take without waiting),
    answers the server's pings, sends the client's own per ping_interval_s, and
    gives up on a peer that stops answering. It holds the wires weakly, takes a
    client's lock only to do non-blocking work, and never blocks interpreter exit.
    Pure-Python user code holding the GIL still lets it run (the GIL's switch
    interval, 5 ms by default).
    """

    def __init__(self) -> None:
        import socket

        self.clock = time.monotonic
        self.wires: Any = weakref.WeakSet()
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="chatenv-keepalive", daemon=True)
        self.thread.start()

    def watch(self, wire: _SocketWire) -> None:
        with self.lock:
            self.wires.add(wire)
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass  # already awake, or its buffer is full of wake-ups

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # one bad turn must not end every client's keepalive
                logger.exception("keepalive thread error")

                time.sleep(_IDLE_S)

    def _turn(self) -> None:
        now = self.clock()
        with self.lock:
            wires = list(self.wires)
        due: float | None = None
        sockets = [self.wake_r]
        for wire in wires:
            if wire.closed is not None:
                with self.lock:
                    self.wires.discard(wire)
                continue
            idle_at = wire.last_io + _IDLE_S
            when: float | None = idle_at
            if now >= idle_at:
                if wire.lock.acquire(blocking=False):
                    try:
                        when = wire.tend(now)
                    finally:
                        wire.lock.release()
                    if wire.listening:
                        sockets.append(wire.sock)
                else:  # a call is under way: look again once it may have ended
                    when = now + _IDLE_S
            if when is not None and (due is None or when < due):
                due = when
        wires = wire = None  # held weakly only, while waiting
        _wait_readable(sockets, None if due is None else max(0.0, due - self.clock()))
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass


def _poller(sock: Any) -> Any:
    """A poll object for ``sock`` alone, to see without blocking whether bytes came before a
    request is written (None without poll or a socket: nothing is checked)."""
    import select

    if sock is None or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def _wait_readable(sockets: list[Any], timeout: float | None) -> None:
    """Block until one of ``sockets`` is readable or ``timeout`` passes (poll: no fd limit)."""
    import select

    if hasattr(select, "poll"):
        poller = select.poll()
        for sock in sockets:
            fd = sock.fileno()
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        poller.poll(None if timeout is None else int(timeout * 1000) + 1)
    else:
        select.select([s for s in sockets if s.fileno() >= 0], [], [], timeout)


_keepalive: _Keepalive | None = None  # the process's keepalive thread, started with its first client
_keepalive_lock = threading.Lock()
_keepalive_forks: list[bool] = []  # holds True once a forked child is told to start its own


def _watch(wire: _SocketWire) -> None:
    """Hand a new connection to the keepalive thread (started on first use, once per process)."""
    global _keepalive
    with _keepalive_lock:
        if _keepalive is None:
            if not _keepalive_forks and hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_keepalive)
                _keepalive_forks.append(True)
            _keepalive = _Keepalive()
        keepalive = _keepalive
    keepalive.watch(wire)


def _forget_keepalive() -> None:
    """In a forked child the keepalive thread is gone: the child's first client starts its own."""
    global _keepalive, _keepalive_lock
    _keepalive, _keepalive_lock = None, threading.Lock()


class ChatEnv(_ClientBase):
    """Synchronous client: one WebSocket session with a chat environment server.

    ``ChatEnv(base_url, **options)``: one server or several (a new session goes
    to one with room); the options, the same for AsyncChatEnv, are listed with
    __init__.

    Its I/O runs in the caller's thread, on a blocking socket; between calls a
    process-wide keepalive thread answers the server's pings. Calls from several
    threads are serialised by a lock.
    """

    def _init_shell(self) -> None:
        # Held by each call; the keepalive thread tends the connection only while it is free
        self._lock = threading.Lock()
        # The connection, None until a call opens one (or once it is dropped)
        self._wire: _SocketWire | None = None

    @classmethod
    def from_docker_image(cls, image: str, **options: Any) -> ChatEnv:
        """Run ``image`` with ``docker run``, wait for /health, return a client owning it.

        Options: ``port``, ``env_vars``, ``volumes`` (host path -> container path,
        read-only: a hook file and its tasks, say), ``ready_timeout_s``, ``docker``,
        and any client option. close() stops and removes the container.
        """
        return cls._launch(image, **options)

    def _connect(self, call: _Call) -> str:
        """_CONNECT: a new connection on the plan's next server (after its pause), until one opens."""
        action = _CONNECT
        while action is _CONNECT:
            ws_url, wait_s = call.next_server()
            if wait_s:
                time.sleep(wait_s)
            wire = _SocketWire(self._core, self._lock)
            try:
                wire.open(ws_url)
            except ConnectionError as exc:
                action = call.on_connect_error(exc)
            else:
                _watch(wire)
                self._wire = wire
                action = call.on_connect()
        return action

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.abort()

    def _call(self, frame: str, parse: Any, new_episode: bool = False) -> Any:
        """Send ``frame`` and return its reply, doing what the call's plan says (see _Call)."""
        with self._lock:
            call = self._core.call(parse, new_episode)
            action = call.start(self._wire is not None)
            while action is not _RETURN:
                if action is _SEND:
                    try:
                        data = self._wire.call(frame)
                    except BaseException as exc:  # no reply was read: the connection cannot be trusted
                        self._drop()
                        action = call.on_failure(exc)
                    else:
                        action = call.on_reply(data)
                elif action is _CONNECT:
                    action = self._connect(call)
                elif action is _AWAIT_CLOSE:
                    wire, self._wire = self._wire, None
                    action = call.on_refusal_close(wire.await_close())
            return call.result

    def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode, on a new connection if the last one ended (close() included).

        ``kwargs`` go to the server's reset as they are: ``seed``, ``episode_id``, and a
        task by ``split`` and ``index`` (OpenEnv 0.10's convention) or ``task_id``."""
        core = self._core
        return self._call(core.reset_frame(kwargs), core.parse_result, new_episode=True)

    def step(self, action: ChatAction | Any) -> StepResult:
        """Append one message; raises EpisodeLostError if the session is gone."""
        return self._call(self._core.step_frame(action), self._core.parse_result)

    def state(self) -> ChatState:
        return self._call(self._core.state_frame, self._core.parse_state)

    # The task API (OpenEnv 0.10's TaskProvider names), over HTTP to the server in use;
    # no session needed. ChatEnvError(VALIDATION_ERROR) for an unknown split or a bad
    # index, EXECUTION_ERROR from a server without tasks (see _task_call)

    def list_splits(self) -> list[dict[str, Any]]:
        """The server's task splits, as ``[{"name": "train", "type": "train"}, ...]``."""
        return _task_call(self._core, "list_splits", ())

    def list_tasks(self, split: str) -> list[Any]:
        """The task specs of ``split`` (a server may send a bounded preview of a large one)."""
        return _task_call(self._core, "list_tasks", (split,))

    def num_tasks(self, split: str) -> int:
        return _task_call(self._core, "num_tasks", (split,))

    def get_task(self, split: str, index: int) -> Any:
        """One task spec; ``reset(split=split, index=index)`` poses it."""
        return _task_call(self._core, "get_task", (split, index))

    def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[Any]:
        """The task specs ``[start:stop]`` of ``split``, as a slice (None: the split's ends)."""
        return _task_call(self._core, "get_task_range", (split, start, stop))

    def close(self) -> None:
        """Close the session (and stop the container this client started, if any).

        Afterwards step() and state() raise EpisodeLostError; reset() connects anew.
        A call another thread has under way is ended first (it raises EpisodeLostError).
        """
        if not self._lock.acquire(timeout=_CLOSE_WAIT_S):
            wire = self._wire
            if wire is not None:
                wire.interrupt()
            self._lock.acquire()
        try:
            wire, self._wire = self._wire, None
            if wire is not None:
                wire.close()
            self._core.close()
        finally:
            self._lock.release()
        container, self._container = self._container, None
        if container is not None:
            container.stop()

    def __enter__(self) -> ChatEnv:
        with self._lock:
            if self._wire is None:
                self._connect(self._core.call(None, new_episode=True))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            wire = self.__dict__.get("_wire")
            if wire is not None:
                wire.abort()  # no lock: this may run in any thread, the keepalive one included
        except Exception:
            pass


async def _open_socket(ws_url: str) -> Any:
    """A TCP connection to a ws(s):// URL's host, opened here (the first address that answers)
    and handed to websockets' connect(sock=...), so that AsyncChatEnv owns it (see _shut)."""
    import asyncio
    import socket

    from websockets.uri import parse_uri

    uri = parse_uri(ws_url)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"cannot resolve {uri.host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
        else:
            return sock
    raise error


def _shut(sock: Any) -> None:
    """Shut a connection's socket both ways: its transport reads the end of stream and closes."""
    import socket

    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass


class AsyncChatEnv(_ClientBase):
    """Asynchronous client: the same API and options as ChatEnv with ``await`` and
    ``async with``, on websockets' asyncio client (its keepalive runs while the loop
    does). Calls from several tasks are serialised by a lock."""

    def _init_shell(self) -> None:
        # websockets' asyncio connection, None until a call opens one (or once it is dropped)
        self._ws: Any = None
        # Its socket, opened here so that it can be dropped at once (_drop)
        self._sock: Any = None
        # Held by each call: an asyncio.Lock, made in the loop of the first call
        self._lock: Any = None
        # The connection's socket, polled before a request: what came first is read and raised
        self._poller: Any = None
        # The one recv() in flight on the connection, from its opening on: never cancelled
        # while the connection lives (websockets 17.4 loses the first frame of a fragmented
        # message to a recv() cancelled at the wrong moment, then asserts on the rest)
        self._next: Any = None

    @classmethod
    async def from_docker_image(cls, image: str, **options: Any) -> AsyncChatEnv:
        """The async twin of ChatEnv.from_docker_image (docker runs in a worker thread)."""
        import asyncio

        launch = functools.partial(cls._launch, image, **options)
        return await asyncio.get_running_loop().run_in_executor(None, launch)

    async def _connect(self, call: _Call) -> str:
        """_CONNECT: a new connection on the plan's next server (after its pause), until one opens."""
        import asyncio

        from websockets.asyncio.client import connect

        core = self._core
        action = _CONNECT
        while action is _CONNECT:
            ws_url, wait_s = call.next_server()
            if wait_s:
                await asyncio.sleep(wait_s)
            sock = None
            try:
                async with asyncio.timeout(core.connect_timeout_s):
                    sock = await _open_socket(ws_url)
                    self._ws = await connect(ws_url, sock=sock, **core.connect_options)
            except asyncio.CancelledError:
                _shut(sock)
                raise
            except Exception as exc:
                _shut(sock)
                action = call.on_connect_error(core.connect_error(ws_url, exc))
            else:
                self._sock = sock
                self._poller = _poller(sock)
                self._next = asyncio.ensure_future(self._ws.recv(decode=False))
                action = call.on_connect()
        return action

    def _drop(self) -> None:
        """Drop the connection at once (the reply, if any, must never be read): its socket is
        shut both ways, so the connection sees its end of stream now, not after a closing handshake."""
        sock, self._ws, self._sock, self._poller = self._sock, None, None, None
        _shut(sock)
        received, self._next = self._next, None
        if received is not None:
            if not received.done():
                received.cancel()
            elif not received.cancelled():
                received.exception()  # retrieved: a lost connection's error is the call's, not a log line's

    def _take(self, ws: Any) -> Any:
        """The message the recv() in flight got (or its error), and the next recv() started."""
        import asyncio

        received, self._next = self._next, None
        data = received.result()
        self._next = asyncio.ensure_future(ws.recv(decode=False))
        return data

    async def _roundtrip(self, ws: Any, frame: str) -> Any:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(self._core.message_timeout_s):
                turns = 0
                if self._poller is not None and self._poller.poll(0):  # bytes came since the last reply:
                    while turns < _SETTLE_TURNS and not self._next.done():  # the loop reads them first
                        await asyncio.sleep(0)
                        turns += 1
                if self._next.done():  # a frame came that no request asked for (or the close)
                    raise _Unsolicited(self._take(ws))
                await ws.send(frame)
                while True:  # waiting on the recv() in flight never cancels it
                    done, _ = await asyncio.wait((self._next,), timeout=_CLOSE_WAIT_S)
                    if done:
                        return self._take(ws)
                    if ws.state is not _OPEN:  # a close under way (this side failed it: a reply over
                        _shut(self._sock)  # max_message_bytes, a broken frame): end it now, not when the server closes TCP
        except ConnectionClosed as exc:
            raise await self._closed(ws, exc) from None

    async def _await_close(self, ws: Any) -> _Closed | None:
        """After an error frame the server closes after: its close, if it comes within _CLOSE_WAIT_S."""
        import asyncio

        closed = False
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await ws.wait_closed()
                closed = True
        except Exception:
            pass
        self._drop()
        if not closed or ws.close_code == 1006:  # no close frame came (1006: the stream ended without)
            return None
        return _Closed(ws.close_code, ws.close_reason)

    async def _closed(self, ws: Any, exc: Any) -> _Closed:
        """How the connection ended, and a frame the server sent before (recv still returns it)."""
        import asyncio

        leftover = None
        received = self._next or asyncio.ensure_future(ws.recv(decode=False))
        await asyncio.wait((received,), timeout=0.1)
        if received.done() and not received.cancelled() and received.exception() is None:
            leftover = received.result()
        elif not received.done():
            received.cancel()
        self._next = None
        return self._core.closed(exc.rcvd, exc.sent, exc.rcvd_then_sent, leftover)

    async def _call(self, frame: str, parse: Any, new_episode: bool = False) -> Any:
        """Send ``frame`` and return its reply, doing what the call's plan says (see _Call)."""
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            call = self._core.call(parse, new_episode)
            action = call.start(self._ws is not None)
            while action is not _RETURN:
                if action is _SEND:
                    try:
                        data = await self._roundtrip(self._ws, frame)
                    except BaseException as exc:  # no reply was read: the connection cannot be trusted
                        self._drop()
                        action = call.on_failure(exc)
                    else:
                        action = call.on_reply(data)
                elif action is _CONNECT:
                    action = await self._connect(call)
                elif action is _AWAIT_CLOSE:
                    action = call.on_refusal_close(await self._await_close(self._ws))
            return call.result

    async def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode, on a new connection if the last one ended (close() included)."""
        core = self._core
        return await self._call(core.reset_frame(kwargs), core.parse_result, new_episode=True)

    async def step(self, action: ChatAction | Any) -> StepResult:
        return await self._call(self._core.step_frame(action), self._core.parse_result)

    async def state(self) -> ChatState:
        return await self._call(self._core.state_frame, self._core.parse_state)

    # The task API, as ChatEnv's (the blocking HTTP request runs in the loop's executor)

    async def _task(self, name: str, *values: Any) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, _task_call, self._core, name, values)

    async def list_splits(self) -> list[dict[str, Any]]:
        return await self._task("list_splits")

    async def list_tasks(self, split: str) -> list[Any]:
        return await self._task("list_tasks", split)

    async def num_tasks(self, split: str) -> int:
        return await self._task("num_tasks", split)

    async def get_task(self, split: str, index: int) -> Any:
        return await self._task("get_task", split, index)

    async def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[Any]:
        return await self._task("get_task_range", split, start, stop)

    async def close(self) -> None:
        """Close the session (and stop the container); then step() and state() raise
        EpisodeLostError and reset() connects anew."""
        import asyncio

        ws = self._ws
        self._core.close()
        if ws is not None:
            try:
                # close() first drains the write buffer, which a stuck server never empties
                async with asyncio.timeout(0.5):
                    await ws.close()
            except Exception:
                pass
            self._drop()
        container, self._container = self._container, None
        if container is not None:
            await asyncio.get_running_loop().run_in_executor(None, container.stop)

    async def __aenter__(self) -> AsyncChatEnv:
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._ws is None:
                await self._connect(self._core.call(None, new_episode=True))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


# ------------------------------------------------------------------------------
# Docker: launch a server image with `docker run`, own it, remove it
# ------------------------------------------------------------------------------

_CONTAINER_PORT = 8000  # the port the image's server listens on inside the container
_STOP_TIMEOUT_S = 2  # `docker stop -t`: grace before SIGKILL; chatenv exits in < 1 s
_LOG_TAIL_LINES = 20  # container log lines quoted in a DockerError
_DOCKER_CALL_TIMEOUT_S = 30.0  # most any docker CLI call but `docker run` may take

# What the docker CLI's stderr says when the daemon, an image or a container is missing
_DAEMON_DOWN_MARKERS = (
    "cannot connect to the docker daemon",
    "is the docker daemon running",
    "error during connect",
    "permission denied while trying to connect",
)
_IMAGE_MISSING_MARKERS = (
    "unable to find image",
    "no such image",
    "pull access denied",
    "repository does not exist",
    "manifest unknown",
    "invalid reference format",
)
_GONE_MARKERS = ("no such container", "no such object", "is not running")


class DockerError(RuntimeError):
    """A Docker operation failed; the message says what and why."""


def _docker_exe(docker: str) -> str:
    """Return the docker CLI's full path; DockerError if it is not installed."""
    import shutil

    exe = shutil.which(docker)
    if exe is None:
        raise DockerError(
            f"the docker command line is not installed (no {docker!r} on PATH); "
            "install Docker to use from_docker_image()")
    return exe


def _docker(exe: str, *args: str, timeout: float = _DOCKER_CALL_TIMEOUT_S,
            check: bool = True) -> Any:
    """Run ``docker ARGS`` and return its CompletedProcess (text).

    With ``check`` a non-zero exit raises DockerError; a daemon that cannot be
    reached is always named as such.
    """
    import subprocess

    try:
        proc = subprocess.run([exe, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DockerError(f"`docker {' '.join(args[:2])}` did not finish within {timeout:g} s "
                          "(is the Docker daemon responsive?)") from None
    except OSError as exc:
        raise DockerError(f"cannot run the docker command line {exe!r}: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.lower()
        if any(m in err for m in _DAEMON_DOWN_MARKERS):
            raise DockerError("the Docker daemon is not reachable (is dockerd running, and may "
                              f"this user use it?): {_last_line(proc.stderr)}")
        if check:
            raise DockerError(f"`docker {' '.join(args[:2])}` failed (exit {proc.returncode}): "
                              f"{_last_line(proc.stderr)}")
    return proc


def _last_line(text: str) -> str:
    """The last meaningful line of the docker CLI's stderr, for an error message."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # The docker CLI ends some errors with a "Run/See 'docker run --help'" hint: skip it.
    lines = [ln for ln in lines if not ln.startswith(("Run '", "See '"))]
    return lines[-1] if lines else "(no output)"


def _logs_tail(exe: str, name: str, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last lines the container wrote (stdout and stderr interleaved), best effort."""
    import subprocess

    try:
        proc = subprocess.run([exe, "logs", "--tail", str(lines), name],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=10)
        return proc.stdout.rstrip() or "(no output)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(could not read the container's logs: {exc})"


def _remove(exe: str, name: str) -> None:
    """``docker rm -f NAME``, ignoring a container that is already gone; DockerError otherwise."""
    proc = _docker(exe, "rm", "-f", name, check=False)
    if proc.returncode != 0 and not any(m in proc.stderr.lower() for m in _GONE_MARKERS):
        raise DockerError(f"could not remove container {name}: {_last_line(proc.stderr)}")


# Containers started by this process and not yet stopped: removed at interpreter exit.
_live_containers: dict[str, _Container] = {}
_live_lock = threading.Lock()


@atexit.register
def _stop_live_containers() -> None:
    """Remove every container this process started and did not stop; never raises.

    One ``docker rm -f`` call: at exit, speed beats a graceful shutdown.
    """
    if not _live_containers:
        return
    import subprocess

    with _live_lock:
        by_exe: dict[str, list[str]] = {}
        for c in _live_containers.values():
            by_exe.setdefault(c._docker, []).append(c.name)
        _live_containers.clear()
    for exe, names in by_exe.items():
        try:
            subprocess.run([exe, "rm", "-f", *names], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class _Container:
    """Handle to one running server container: where it listens and how to stop it."""

    def __init__(self, name: str, host_port: int, image: str, docker_exe: str) -> None:
        self.name = name
        self.image = image
        self.host_port = host_port
        self.base_url = f"http://127.0.0.1:{host_port}"
        self._docker = docker_exe
        self._stopped = False
        self._lock = threading.Lock()
        with _live_lock:
            _live_containers[name] = self

    def stop(self) -> None:
        """``docker stop`` (short grace: the server exits on SIGTERM), then ``docker rm -f``.

        Idempotent; a container that is already gone is not an error.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            with _live_lock:
                _live_containers.pop(self.name, None)
            try:
                _docker(self._docker, "stop", "-t", str(_STOP_TIMEOUT_S), self.name,
                        timeout=_STOP_TIMEOUT_S + 30, check=False)
            except DockerError:
                pass  # rm -f below kills it anyway, and reports a real failure
            _remove(self._docker, self.name)

    def __enter__(self) -> _Container:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<_Container {self.name} {self.image} at {self.base_url} ({state})>"


def _health_ok(base_url: str, timeout: float) -> bool:
    """Whether GET /health answers 200 within ``timeout`` seconds (never via a proxy)."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base_url + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        # Refused, reset (docker-proxy accepts before the server listens), timed out,
        # HTTP error status: not ready yet.
        return False


def _container_state(exe: str, name: str) -> tuple[str, int | None]:
    """Return the container's (status, exit code), e.g. ("running", 0) or ("exited", 2)."""
    proc = _docker(exe, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name,
                   check=False)
    if proc.returncode != 0:
        return "gone", None
    status, _, code = proc.stdout.strip().partition(" ")
    return status, int(code) if code.lstrip("-").isdigit() else None


def _published_port(exe: str, name: str) -> int:
    """Return the loopback host port Docker mapped to the container's port 8000."""
    out = _docker(exe, "port", name, f"{_CONTAINER_PORT}/tcp").stdout
    for line in out.splitlines():           # e.g. "127.0.0.1:49153"
        host, _, port = line.strip().rpartition(":")
        if port.isdigit() and host in ("127.0.0.1", "0.0.0.0"):
            return int(port)
    raise DockerError(f"container {name} has no published port for {_CONTAINER_PORT}/tcp: "
                      f"{out.strip()!r}")


def _start_container(image: str, *, port: int | None = None, env_vars: Mapping[str, str] | None = None,
                     volumes: Mapping[str, str] | None = None, ready_timeout_s: float = 60.0,
                     docker: str = "docker") -> _Container:
    """Start ``image`` and return its _Container once GET /health answers 200.

    The container's port 8000 is published on 127.0.0.1:``port`` (a free port Docker
    picks when None); ``env_vars`` are passed as ``-e K=V``; ``volumes`` maps host
    paths (which must exist) to absolute container paths, each mounted read-only
    (``-v HOST:CONTAINER:ro``), so a hook module and its task files can be named by
    ``PYTHONPATH``, ``CHATENV_RUBRIC`` and ``CHATENV_TASKS``. On any failure (docker
    missing, daemon unreachable, unknown image, the container exits, not healthy in
    time, an interrupt) it raises DockerError with the reason and the container's
    last log lines, and removes the container: nothing is left behind.
    """
    import uuid

    exe = _docker_exe(docker)
    if not image or not isinstance(image, str):
        raise DockerError(f"image must be a non-empty string, not {image!r}")
    name = f"chatenv-{uuid.uuid4().hex[:12]}"
    publish = f"127.0.0.1:{'' if port is None else int(port)}:{_CONTAINER_PORT}"
    args = ["run", "-d", "--name", name, "-p", publish, "--label", "chatenv.launcher=1"]
    for key, value in (env_vars or {}).items():
        key = str(key)
        if not key or "=" in key:
            raise DockerError(f"invalid environment variable name {key!r}")
        args += ["-e", f"{key}={value}"]
    for host, target in (volumes or {}).items():
        host, target = os.path.abspath(os.fspath(host)), str(target)
        if not os.path.exists(host):
            raise DockerError(f"volume {host!r} does not exist on this host")
        if not target.startswith("/") or ":" in host + target:
            raise DockerError(f"invalid volume {host!r} -> {target!r}: the container path must be absolute, "
                              "and neither may hold ':'")
        args += ["-v", f"{host}:{target}:ro"]
    args.append(image)

    try:
        # `docker run` pulls a missing image; allow it more time than other calls.
        proc = _docker(exe, *args, timeout=max(ready_timeout_s, 120.0), check=False)
        if proc.returncode != 0:
            err = proc.stderr.lower()
            if any(m in err for m in _IMAGE_MISSING_MARKERS):
                raise DockerError(f"Docker image {image!r} was not found locally and could not "
                                  f"be pulled: {_last_line(proc.stderr)}")
            raise DockerError(f"`docker run` of image {image!r} failed (exit "
                              f"{proc.returncode}): {_last_line(proc.stderr)}")
        host_port = _published_port(exe, name) if port is None else int(port)
        container = _Container(name, host_port, image, exe)
        _wait_healthy(exe, container, ready_timeout_s)
        return container
    except BaseException:
        # Also on KeyboardInterrupt: never leave a container behind. `docker run` may
        # have created it even when it failed (e.g. port already allocated).
        with _live_lock:
            _live_containers.pop(name, None)
        try:
            _remove(exe, name)
        except DockerError:
            pass  # the original error matters more (e.g. the daemon just went away)
        raise


def _wait_healthy(exe: str, container: _Container, ready_timeout_s: float) -> None:
    """Poll /health (short timeouts, small backoff) until it answers 200.

    DockerError, with the log tail, if the container exits first or the deadline passes.
    """
    deadline = time.monotonic() + ready_timeout_s
    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        if _health_ok(container.base_url, timeout=max(0.05, min(1.0, remaining))):
            return
        status, code = _container_state(exe, container.name)
        if status not in ("running", "created", "restarting"):
            raise DockerError(
                f"container {container.name} (image {container.image!r}) stopped before its "
                f"server became healthy (status {status}, exit code {code}); last "
                f"{_LOG_TAIL_LINES} log lines:\n{_logs_tail(exe, container.name)}")
        if time.monotonic() >= deadline:
            raise DockerError(
                f"container {container.name} (image {container.image!r}) did not answer "
                f"GET {container.base_url}/health within {ready_timeout_s:g} s; last "
                f"{_LOG_TAIL_LINES} log lines:\n{_logs_tail(exe, container.name)}")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)


# ------------------------------------------------------------------------------
# Command line: chatenv serve
# ------------------------------------------------------------------------------

# Environment variables read by `chatenv serve` when a flag is not given; the
# second name in each pair is OpenEnv's, so chatenv drops into its deployments
_ENV_FALLBACKS = {
    "host": ("CHATENV_HOST",),
    "port": ("CHATENV_PORT",),
    "tokenizer": ("CHATENV_TOKENIZER", "TOKENIZER_NAME"),
    "system_prompt": ("CHATENV_SYSTEM_PROMPT", "SYSTEM_PROMPT"),
    "max_sessions": ("CHATENV_MAX_SESSIONS",),
    "max_named_sessions": ("CHATENV_MAX_NAMED_SESSIONS",),
    "max_message_bytes": ("CHATENV_MAX_MESSAGE_BYTES",),
    "max_episode_tokens": ("CHATENV_MAX_EPISODE_TOKENS",),
    "max_memory_bytes": ("CHATENV_MAX_MEMORY_BYTES",),
    "compression": ("CHATENV_COMPRESSION",),
    "idle_timeout_s": ("CHATENV_IDLE_TIMEOUT_S",),
    "workers": ("CHATENV_WORKERS",),
    "loop": ("CHATENV_LOOP",),
    "allow_origins": ("CHATENV_ALLOW_ORIGIN",),
    "allow_hosts": ("CHATENV_ALLOW_HOST",),
    "auth_token": ("CHATENV_AUTH_TOKEN",),
    "log_level": ("CHATENV_LOG_LEVEL",),
    # Rewards, tasks and episode ends (repeated flags: comma-separated variables, but
    # CHATENV_STOP, whose texts may hold commas: one a line)
    "rubrics": ("CHATENV_RUBRIC",),
    "transform": ("CHATENV_TRANSFORM",),
    "tasks": ("CHATENV_TASKS",),
    "max_turns": ("CHATENV_MAX_TURNS",),
    "stop": ("CHATENV_STOP",),
    "show_answers": ("CHATENV_SHOW_ANSWERS",),
}


class _ConfigError(ValueError):
    """A bad flag or variable value: ``chatenv serve`` prints it as one line and exits 2."""


# Validators, one per kind of setting: text in, value out, ValueError saying what is
# wanted. Flags and variables go through the same ones, so they fail the same way
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be an integer") from None


def _integer_in(low: int, high: float, wanted: str) -> Any:
    """A validator taking an integer from ``low`` to ``high``; ``wanted`` says so when not."""
    def validate(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise ValueError(wanted)
        return value

    return validate


_port = _integer_in(0, 65535, "must be a TCP port from 0 to 65535 (0: a free one)")
_at_least_one = _integer_in(1, float("inf"), "must be at least 1")
_size = _integer_in(0, float("inf"), "must be 0 (no limit) or more")
_count = _integer_in(0, float("inf"), "must be 0 (none) or more")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError("must be 0 (off) or a positive number of seconds")
    return value


def _choice(*choices: str) -> Any:
    """A validator taking one of ``choices`` in any case and giving it as spelled here.

    The error lists them: quoted, or bare when upper case (log levels, as logging spells them).
    """
    spelled = [c if c.isupper() else repr(c) for c in choices]
    wanted = f"must be {', '.join(spelled[:-1])} or {spelled[-1]}"
    by_case = {c.lower(): c for c in choices}

    def validate(text: str) -> str:
        try:
            return by_case[text.lower()]
        except KeyError:
            raise ValueError(wanted) from None

    return validate


_compression = _choice("none", "deflate")
_log_level = _choice("DEBUG", "INFO", "WARNING", "ERROR")
_loop_name = _choice("asyncio", "uvloop")


def _auth_token(text: str) -> str:
    if not text.strip():  # a secret that was never filled in must not mean "no auth"
        raise ValueError("is empty: an empty auth token would let everyone in; set a token, or leave it unset")
    if text != text.strip():  # a header's value is read stripped: such a token could never match
        raise ValueError("has leading or trailing whitespace, which no client's header can match; "
                         "remove it (the token is not shown)")
    return text


def _host(text: str) -> str:
    if not text.strip():  # "" would bind every interface
        raise ValueError("must not be empty")
    return text


def _origin(text: str) -> str:
    text = text.strip().rstrip("/")
    if text != "*" and text != "null" and ("://" not in text or text.endswith("://")):
        raise ValueError("must be an origin such as https://example.com, or * for any")
    return text


def _host_allowed(text: str) -> str:
    text = text.strip()
    if not text or "/" in text:
        raise ValueError("must be a host name such as example.com (any port), or * for any")
    return text


def _each(validate: Any) -> Any:
    """A comma-separated variable's validator, from one value's (the flag repeats instead)."""
    def convert(text: str) -> list[Any]:
        return [validate(item) for item in text.split(",") if item.strip()]

    convert.__name__ = validate.__name__
    return convert


def _text(text: str) -> str:
    return text


def _hook(text: str) -> Any:
    """A hook a SPEC names: a built-in reward's name, or ``module:attr`` (uvicorn's app form), imported now."""
    import importlib

    text = text.strip()
    if text in _BUILTIN_REWARDS:
        return _BUILTIN_REWARDS[text]
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"must be a built-in reward ({', '.join(_BUILTIN_REWARDS)}) or module:attr")
    try:
        hook: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import {module_name!r} ({_one_line(exc, 120)})") from None
    try:
        for name in attr.split("."):
            hook = getattr(hook, name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(hook):
        raise ValueError(f"{attr!r} is not callable: a hook is called with the observation")
    return hook


def _rubric_spec(text: str) -> tuple[str, Any, float]:
    """``SPEC[=WEIGHT]``: (the SPEC as its score's name, the rubric, the weight, 1 by default)."""
    spec, weight = text.strip(), 1.0
    if "=" in spec:
        spec, _, given = spec.rpartition("=")
        try:
            weight = float(given)
        except ValueError:
            raise ValueError("the weight after '=' must be a number") from None
        if weight != weight or abs(weight) == float("inf"):
            raise ValueError("the weight after '=' must be a finite number")
    return spec.strip(), _hook(spec), weight


def _tasks_spec(text: str) -> tuple[str, Any]:
    """``[SPLIT=]PATH``: (the split, ``train`` by default, and its task file, loaded and checked now)."""
    split, _, path = text.rpartition("=") if "=" in text and not os.path.exists(text) else ("", "", text)
    split = split.strip() or "train"
    try:
        return split, _TaskFile(path)
    except OSError as exc:
        raise ValueError(f"cannot read the task file {path}: {exc.strerror or exc}") from None


def _stop_text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty (it would end every episode)")
    return text


def _lines(validate: Any) -> Any:
    """A variable's validator taking one value a line (for values that may hold commas)."""
    def convert(text: str) -> list[Any]:
        return [validate(item) for item in text.splitlines() if item]

    convert.__name__ = validate.__name__
    return convert


_boolean = _choice("true", "false", "1", "0", "yes", "no")


# Each setting of `chatenv serve`: its validator and its default (flags default to
# None, so a variable is read, and checked, only when its flag is not given)
_SETTINGS: dict[str, tuple[Any, Any]] = {
    "host": (_host, "127.0.0.1"),
    "port": (_port, 8000),
    "tokenizer": (_text, None),
    "system_prompt": (_text, None),
    "max_sessions": (_at_least_one, 256),
    "max_named_sessions": (_count, None),  # None: a quarter of max_sessions, at least 1
    "max_message_bytes": (_size, 2**24),
    "max_episode_tokens": (_size, 2**20),
    "max_memory_bytes": (_size, 2**31),
    "compression": (_compression, "none"),
    "idle_timeout_s": (_seconds, 0.0),
    "auth_token": (_auth_token, None),
    "workers": (_at_least_one, 1),
    "loop": (_loop_name, "asyncio"),
    "allow_origins": (_each(_origin), ()),
    "allow_hosts": (_each(_host_allowed), ()),
    "log_level": (_log_level, "INFO"),
    "rubrics": (_each(_rubric_spec), ()),
    "transform": (_hook, None),
    "tasks": (_each(_tasks_spec), ()),
    "max_turns": (_at_least_one, None),
    "stop": (_lines(_stop_text), ()),
    "show_answers": (_boolean, "false"),
}


def _flag_type(validate: Any) -> Any:
    """An argparse ``type`` from a validator: its error names the value given."""
    import argparse

    def convert(text: str) -> Any:
        try:
            return validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, not {_preview(text)}") from None

    convert.__name__ = validate.__name__.strip("_")
    return convert


def _setting(args: Any, name: str) -> Any:
    """A setting's value: its flag, else its environment variable (validated), else its default."""
    given = getattr(args, name, None)
    if given is not None:
        return given  # a flag, already checked by its argparse type
    validate, default = _SETTINGS[name]
    for variable in _ENV_FALLBACKS[name]:
        raw = os.environ.get(variable)
        if raw is None or (raw == "" and name != "auth_token"):  # empty: unset, as docker -e X= means
            continue
        try:
            return validate(raw)
        except ValueError as exc:
            shown = "" if name == "auth_token" else f", not {_preview(raw)}"  # never echo a secret
            raise _ConfigError(f"{variable}: {exc}{shown}") from None
    return default


def _pin_malloc_threshold() -> None:
    """Keep glibc's mmap threshold at its default, 128 KiB, for this server process.

    glibc raises it each time a large block is freed (up to 32 MiB); from then on
    growing history buffers live on the heap and leave holes it never gives back,
    and RSS drifts tens of MB past what the memory bound counts. Pinned, each large
    buffer is a mapping of its own, returned whole when its episode ends.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: elsewhere mallopt's numbers mean other things
        libc.mallopt(-3, 2**17)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment
    except Exception:  # no ctypes, not glibc: nothing to do
        pass


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one bounded line (library errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parser() -> Any:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one line, the same prefix flags and variables get
            self.exit(2, f"chatenv: error: {' '.join(message.split())}\n")

    parser = Parser(
        prog="chatenv",
        description="Serve OpenEnv's chat environment over its WebSocket protocol "
        "(ws://HOST:PORT/ws, GET /health), with an embedded byte-level tokenizer by default.",
        epilog="Each flag falls back to an environment variable (CHATENV_PORT, CHATENV_TOKENIZER "
        "or OpenEnv's TOKENIZER_NAME, CHATENV_SYSTEM_PROMPT or OpenEnv's SYSTEM_PROMPT, "
        "CHATENV_AUTH_TOKEN, ...). Example: chatenv serve --port 8000",
    )
    parser.add_argument("--version", action="version", version=f"chatenv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_cmd = commands.add_parser(
        "serve", help="run the server until SIGTERM or Ctrl-C",
        description="Run a chat environment server until SIGTERM or Ctrl-C (sessions then "
        "close with 1012). Flags fall back to environment variables, shown in brackets.",
    )
    sizes = _flag_type(_size)
    serve_cmd.add_argument("--host", type=_flag_type(_host), help="interface to bind; 0.0.0.0 opens it to the network "
                           "[CHATENV_HOST] (default: 127.0.0.1)")
    serve_cmd.add_argument("--port", type=_flag_type(_port),
                           help="TCP port, 0 for a free one [CHATENV_PORT] (default: 8000)")
    serve_cmd.add_argument("--tokenizer",
                           help="'default' (embedded, byte-level), a tokenizer.json, a local directory "
                           "or a model name for transformers (the local cache first) "
                           "[CHATENV_TOKENIZER, TOKENIZER_NAME]")
    serve_cmd.add_argument("--system-prompt",
                           help="first message of every episode [CHATENV_SYSTEM_PROMPT, SYSTEM_PROMPT]")
    serve_cmd.add_argument("--max-sessions", type=_flag_type(_at_least_one),
                           help="concurrent sessions; newcomers get CAPACITY_REACHED [CHATENV_MAX_SESSIONS] "
                           "(default: 256)")
    serve_cmd.add_argument("--max-named-sessions", type=_flag_type(_count),
                           help="of those, sessions made over HTTP with MCP openenv/session/create, so a "
                           "client looping on them leaves room on /ws; 0 for none [CHATENV_MAX_NAMED_SESSIONS] "
                           "(default: a quarter of --max-sessions, at least 1)")
    serve_cmd.add_argument("--max-message-bytes", type=sizes,
                           help="largest incoming message; larger ones close the session with 1009; 0 for "
                           "no limit [CHATENV_MAX_MESSAGE_BYTES] (default: 16777216)")
    serve_cmd.add_argument("--max-episode-tokens", type=sizes,
                           help="tokens one episode may hold; a step past it is an EXECUTION_ERROR; 0 for "
                           "no limit [CHATENV_MAX_EPISODE_TOKENS] (default: 1048576)")
    serve_cmd.add_argument("--max-memory-bytes", type=sizes,
                           help="bytes all episodes together may hold; a step past it is an EXECUTION_ERROR "
                           "and a session that cannot fit gets CAPACITY_REACHED; 0 for no limit "
                           "[CHATENV_MAX_MEMORY_BYTES] (default: 2147483648)")
    serve_cmd.add_argument("--compression", type=_flag_type(_compression),
                           help="'none' or 'deflate' (permessage-deflate) [CHATENV_COMPRESSION] (default: none)")
    serve_cmd.add_argument("--idle-timeout-s", type=_flag_type(_seconds),
                           help="close sessions silent this long; 0, the default, for never "
                           "[CHATENV_IDLE_TIMEOUT_S]")
    serve_cmd.add_argument("--auth-token", type=_auth_token_flag,
                           help="require 'Authorization: Bearer TOKEN' on every route but GET /health; "
                           "prefer the variable "
                           "[CHATENV_AUTH_TOKEN], which process listings do not show")
    serve_cmd.add_argument("--workers", type=_flag_type(_at_least_one),
                           help="server processes on the one port, each with its own sessions and limits "
                           "(--max-sessions and --max-memory-bytes are per worker), under a supervisor that "
                           "restarts those that die [CHATENV_WORKERS] (default: 1: no fork)")
    serve_cmd.add_argument("--loop", type=_flag_type(_loop_name),
                           help="the event loop: 'asyncio' or 'uvloop' (when installed) [CHATENV_LOOP] "
                           "(default: asyncio)")
    serve_cmd.add_argument("--allow-origin", dest="allow_origins", action="append", type=_flag_type(_origin),
                           help="a web page origin (https://example.com) allowed to open sessions and POST; "
                           "repeat for more, * for any; requests that carry no Origin (non-browser clients) "
                           "are never refused [CHATENV_ALLOW_ORIGIN, comma-separated] (default: none)")
    serve_cmd.add_argument("--allow-host", dest="allow_hosts", action="append", type=_flag_type(_host_allowed),
                           help="a Host name answered besides loopback ones when listening on a loopback "
                           "address (behind a proxy); repeat for more, * for any [CHATENV_ALLOW_HOST, "
                           "comma-separated] (default: none)")
    serve_cmd.add_argument("--log-level", type=_flag_type(_log_level),
                           help="DEBUG, INFO, WARNING or ERROR [CHATENV_LOG_LEVEL] (default: INFO)")
    hooks = serve_cmd.add_argument_group("rewards, tasks and episode ends")
    hooks.add_argument("--rubric", dest="rubrics", action="append", type=_flag_type(_rubric_spec),
                       metavar="SPEC[=WEIGHT]",
                       help="score every step: a built-in (" + ", ".join(_BUILTIN_REWARDS) + ") or module:attr "
                       "(a function or object called with (action, observation)); repeat for a weighted sum, "
                       "each score in metadata['rewards'] [CHATENV_RUBRIC, comma-separated]")
    hooks.add_argument("--transform", type=_flag_type(_hook), metavar="SPEC",
                       help="module:attr called with each observation, returning it (may set reward, done, "
                       "metadata) [CHATENV_TRANSFORM]")
    hooks.add_argument("--tasks", action="append", type=_flag_type(_tasks_spec), metavar="[SPLIT=]PATH",
                       help="a JSONL task file, one task a line; split 'train' by default; repeat for more "
                       "splits [CHATENV_TASKS, comma-separated]")
    hooks.add_argument("--max-turns", type=_flag_type(_at_least_one), metavar="N",
                       help="an episode is done after N assistant steps [CHATENV_MAX_TURNS]")
    hooks.add_argument("--stop", action="append", type=_flag_type(_stop_text), metavar="TEXT",
                       help="an episode is done when an assistant message holds TEXT; repeat for more "
                       "[CHATENV_STOP, one a line]")
    hooks.add_argument("--show-answers", action="store_const", const="true",
                       help="task routes include each task's answer [CHATENV_SHOW_ANSWERS] (default: no)")
    return parser


def _auth_token_flag(text: str) -> str:
    """--auth-token's argparse type: like the others, but never echoes the token."""
    import argparse

    try:
        return _auth_token(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server_arguments(args: Any) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and ChatServer options that ``chatenv serve``'s arguments ask for.

    Flags win over environment variables; each value is checked here (the ASGI app
    builds its server the same way), and a bad one raises _ConfigError naming it.
    """
    value = {name: _setting(args, name) for name in _SETTINGS}
    spec = value["tokenizer"]
    try:
        tokenizer = load_tokenizer(spec)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or _one_line(exc)
        shown = _preview(spec, 1024)  # a path: whole, its last part is what tells
        raise _ConfigError(f"{_source(args, 'tokenizer')}: {reason}, not {shown}") from None
    options = dict(
        host=value["host"], port=value["port"], system_prompt=value["system_prompt"],
        max_sessions=value["max_sessions"], max_named_sessions=value["max_named_sessions"],
        max_message_bytes=value["max_message_bytes"] or None,
        max_episode_tokens=value["max_episode_tokens"] or None,
        max_memory_bytes=value["max_memory_bytes"] or None,
        compression=value["compression"], auth_token=value["auth_token"],
        idle_timeout_s=value["idle_timeout_s"] or None,
        allow_origins=value["allow_origins"], allow_hosts=value["allow_hosts"],
    )
    if value["rubrics"]:
        options["rubric"] = _WeightedRubrics(list(value["rubrics"]))
    if value["tasks"]:
        files: dict[str, Any] = {}
        for split, file in value["tasks"]:
            if split in files:
                raise _ConfigError(f"--tasks: the split {split!r} is given twice (one split, one file), "
                                   f"not {file.path!r}")
            files[split] = file
        options["tasks"] = Tasks(files, show_answers=value["show_answers"] in ("true", "1", "yes"))
    options.update(transform=value["transform"], max_turns=value["max_turns"], stop=tuple(value["stop"]))
    return tokenizer, options


def _source(args: Any, name: str) -> str:
    """Where a setting's value came from, as its error names it: its flag (argparse's
    spelling, "argument --port") when given or defaulted, else the variable that set it."""
    if getattr(args, name, None) is None:
        for variable in _ENV_FALLBACKS[name]:
            if os.environ.get(variable):
                return variable
    return f"argument --{name.replace('_', '-')}"


def _listen_error(exc: OSError, args: Any, options: dict[str, Any]) -> str:
    """The one line (without "chatenv: error: ") for a server that could not listen."""
    import errno

    host, port = options["host"], options["port"]
    if exc.errno == errno.EADDRINUSE:
        return f"{_source(args, 'port')}: already in use on {host}, not {_preview(str(port))}"
    if exc.errno == errno.EACCES:
        return f"{_source(args, 'port')}: not allowed here ({_one_line(exc)}), not {_preview(str(port))}"
    return f"{_source(args, 'host')}: cannot listen there ({_one_line(exc)}), not {_preview(host)}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``chatenv``, ``python -m chatenv`` and ``server`` (which serves)."""
    if argv is None and os.path.basename(sys.argv[0]) == "server":
        argv = ["serve", *sys.argv[1:]]  # the command OpenEnv's HF sandbox launcher runs
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    try:  # configuration: a bad value is one line and exit 2, never a traceback
        log_level, workers, loop = _setting(args, "log_level"), _setting(args, "workers"), _setting(args, "loop")
        tokenizer, options = _server_arguments(args)
    except _ConfigError as exc:
        print(f"chatenv: error: {exc}", file=sys.stderr)
        return 2
    _pin_malloc_threshold()
    logging.basicConfig(
        level=log_level,  # with workers, each line says which process wrote it
        format="%(asctime)s %(levelname)s %(name)s" + ("[%(process)d]" if workers != 1 else "") + ": %(message)s",
    )
    try:
        serve(tokenizer, workers=workers, loop=loop, **options)
    except (ImportError, ValueError, TypeError) as exc:  # an option ChatServer refused
        print(f"chatenv: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # could not listen: the port is taken, the host unknown
        print(f"chatenv: error: {_listen_error(exc, args, options)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
