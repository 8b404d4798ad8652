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

import atexit
import dataclasses
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    # Environment
    "ChatEnvironment",
    # Protocol
    "Session",
    "Reply",
    "handle_frame",
    # Server
    "ChatServer",
    "serve",
    "serve_in_thread",
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


def _preview(value: Any, limit: int = 64) -> str:
    """Return a bounded repr of client input, so errors never echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokens_to_list(value: Any, what: str = "tokens") -> list[int]:
    """Flatten token ids (list, tuple, nested, tensor-like, dict with input_ids) to ints.

    Strict where OpenEnv coerces: bools, floats, strings and negative numbers
    are rejected with a ValueError (TypeError for a wrong container type).
    """
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
        raise ValueError(f"{what} must hold at least one token id")
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
        value = fields[name] = source[:length]
        if "messages" in fields and "tokens" in fields:
            del fields["_shared"]  # both read: the episode's lists are no longer needed
        return value

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


# ------------------------------------------------------------------------------
# Tokenizers: an embedded byte-level default, duck typing, optional HF loaders
# ------------------------------------------------------------------------------


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


def load_tokenizer(spec: Any = None) -> Any:
    """Return a tokenizer: the embedded default, a tokenizer object, or one loaded by name.

    ``spec`` is None or "default" (embedded), a path to a ``tokenizer.json``
    (via ``tokenizers``), or a local directory or model name (via
    ``transformers.AutoTokenizer``). Those libraries are imported only here.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in _DEFAULT_TOKENIZER_NAMES):
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        _check_tokenizer(spec)
        return spec
    path = os.fspath(spec)
    if path.endswith(".json") or os.path.isfile(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"loading {path} needs the 'tokenizers' package: pip install 'chatenv[hf]'"
            ) from None
        tokenizer = Tokenizer.from_file(path)
        tokenizer.no_padding()  # a tokenizer.json may pad or cut every encoding to a
        tokenizer.no_truncation()  # fixed length; a chat message is its own length
        return tokenizer
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            f"loading tokenizer {path!r} needs the 'transformers' package: "
            "pip install 'chatenv[hf]'"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; say which spec failed
        raise ValueError(f"cannot load tokenizer {path!r}: {exc}") from exc


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


def _tokenize_message(tokenizer: Any, message: Mapping[str, Any]) -> list[int]:
    """Tokenize one chat message: the chat template, else ``encode("role: content\\n")``."""
    if not isinstance(message, Mapping):
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


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Decode ids with special tokens skipped, as OpenEnv does."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.decode returned {type(text).__name__}, not str")
    return text


# ------------------------------------------------------------------------------
# Environment: the conversation, kept alongside its pre-serialised JSON
# ------------------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact, like OpenEnv
_json_string = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str


def _message_json(message: Mapping[str, str]) -> bytes:
    """``{"role":..,"content":..}`` exactly as json.dumps would write it, faster."""
    return ('{"role":%s,"content":%s}' % (_json_string(message["role"]), _json_string(message["content"]))).encode()


class ChatEnvironment:
    """One episode of chat: reset() starts it, step() appends a message.

    Besides the Python history it keeps the JSON of the history, appended to at
    each step, so the server's O(history) replies are joins, never re-dumps.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        system_prompt: str | None = None,
        system_role: str = "system",
        max_episode_tokens: int | None = None,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer)
        self.system_prompt = system_prompt
        self.system_role = system_role
        self.max_episode_tokens = max_episode_tokens  # None: episodes grow without bound
        self._system_message: dict[str, str] | None = None
        self._system_tokens: list[int] = []
        if system_prompt:
            self._system_message = {"role": system_role, "content": system_prompt}
            self._system_tokens = _tokenize_message(self.tokenizer, self._system_message)
        self._clear(None)

    def _clear(self, episode_id: str | None) -> None:
        self.episode_id = episode_id
        self.step_count = 0
        self.history_messages: list[dict[str, str]] = []
        self.history_tokens: list[tuple[int, ...]] = []
        self._flat_tokens: list[int] = []
        # JSON of the history, items comma-joined without brackets
        self.messages_json = bytearray()
        self.tokens_json = bytearray()
        self.history_tokens_json = bytearray()
        if self._system_message is not None:
            self._append(dict(self._system_message), list(self._system_tokens))

    def _append(self, message: dict[str, str], ids: list[int]) -> None:
        sep = b"," if self.history_messages else b""
        self.history_messages.append(message)
        self.history_tokens.append(tuple(ids))  # a tuple of ints leaves the GC's care
        token_text = ",".join(map(str, ids)).encode()
        message_json = _message_json(message)
        self.messages_json += sep + message_json
        self.tokens_json += (b"," if self._flat_tokens else b"") + token_text
        self.history_tokens_json += sep + b"[" + token_text + b"]"
        self._flat_tokens += ids
        self.last_json = (message_json, token_text)  # what a delta reply sends

    def reset(self, seed: int | None = None, episode_id: str | None = None) -> ChatObservation:
        """Start a new episode; the history holds only the system prompt, if any."""
        import uuid

        self._clear(episode_id if episode_id is not None else str(uuid.uuid4()))
        return self.observation()

    def step(self, action: ChatAction | Any) -> ChatObservation:
        """Append the action's tokens, decoded, as an assistant message."""
        self.append_tokens(action.tokens if isinstance(action, ChatAction) else action)
        return self.observation()

    def append_tokens(self, tokens: Any) -> dict[str, str]:
        """Decode and append one message; on failure the history is unchanged."""
        return self._append_step(tokens_to_list(tokens))

    def _append_step(self, ids: list[int]) -> dict[str, str]:
        """append_tokens() for ids the protocol has already validated."""
        limit = self.max_episode_tokens
        if limit is not None and len(self._flat_tokens) + len(ids) > limit:
            raise ValueError(
                f"the episode would hold {len(self._flat_tokens) + len(ids)} tokens, over this "
                f"environment's limit of {limit}: reset() to start a new one"
            )
        message = {"role": "assistant", "content": _decode(self.tokenizer, ids)}
        self._append(message, ids)
        self.step_count += 1
        return message

    def observation(self) -> ChatObservation:
        return ChatObservation(
            messages=[dict(m) for m in self.history_messages],
            tokens=list(self._flat_tokens),
        )

    @property
    def state(self) -> ChatState:
        return ChatState(
            episode_id=self.episode_id,
            step_count=self.step_count,
            history_messages=[dict(m) for m in self.history_messages],
            history_tokens=[list(t) for t in self.history_tokens],
        )

    @property
    def token_count(self) -> int:
        return len(self._flat_tokens)

    def message_to_action(self, message: Mapping[str, Any]) -> ChatAction:
        """Tokenize a chat message into an action with this environment's tokenizer."""
        return ChatAction(tokens=_tokenize_message(self.tokenizer, message))


# ------------------------------------------------------------------------------
# Protocol: one frame in, one reply out; pure, no sockets
# ------------------------------------------------------------------------------

# The error codes of the wire protocol (PROTOCOL.md)
INVALID_JSON = "INVALID_JSON"
UNKNOWN_TYPE = "UNKNOWN_TYPE"
VALIDATION_ERROR = "VALIDATION_ERROR"
EXECUTION_ERROR = "EXECUTION_ERROR"
CAPACITY_REACHED = "CAPACITY_REACHED"
SESSION_ERROR = "SESSION_ERROR"

_MESSAGE_TYPES = ("reset", "step", "state", "close", "mcp")
_STEP_KEYS = frozenset(("tokens", "metadata"))
_TOP_KEYS = frozenset(("type", "data"))
_INT_ONLY = {int}
DELTA_KEY = "chatenv_delta"  # reset data key asking a chatenv server for delta observations

_OBS_HEAD = b'{"type":"observation","data":{"observation":{"metadata":{},"messages":['
_OBS_MID = b'],"tokens":['
_OBS_TAIL = b']},"reward":null,"done":false}}'
_DELTA_MID = b'],"delta":{"messages":'
_DELTA_TAIL = b'}},"reward":null,"done":false}}'


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
    """One session's state: its environment (made on first use) and delta mode.

    ``server`` is what the protocol asks about the rest of the server (its MCP
    sessions, see ``_mcp_reply``); None for a session on its own.
    """

    __slots__ = ("_make_env", "_env", "delta", "server", "id")

    def __init__(self, make_env: Any, server: Any = None, session_id: str | None = None) -> None:
        self._make_env = make_env
        self._env: ChatEnvironment | None = None
        self.delta = False
        self.server = server
        self.id = session_id  # set when the session is named (OpenEnv's MCP sessions) or asked for

    @property
    def env(self) -> ChatEnvironment:
        if self._env is None:
            self._env = self._make_env()
        return self._env


class _RequestError(Exception):
    """A request the protocol refuses: becomes an error frame, session kept."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_reply(code: str, message: str, close: bool = False, **extra: Any) -> Reply:
    """An error frame, as OpenEnv shapes it: {"type":"error","data":{message, code}}."""
    data = {"message": message, "code": code, **extra}
    return Reply([_dumps({"type": "error", "data": data}).encode()], close)


def handle_frame(session: Session, frame: str | bytes | bytearray) -> Reply:
    """Handle one incoming frame for a session and return the reply.

    A text frame arrives as ``str``, a binary frame as ``bytes``. Every
    malformed frame gets an error reply and leaves the session usable; only an
    internal fault (never the client's input) ends it with SESSION_ERROR.
    """
    try:
        message = _parse_request(frame)
        kind = message.get("type")
        if kind == "step":
            return _step_reply(session, _step_tokens(message))
        if kind == "reset":
            return _reset_reply(session, _reset_args(message))
        if kind == "state":
            _check_data(message)
            return _state_reply(session.env)
        if kind == "close":
            return Reply(None, close=True)
        if kind == "mcp":
            data = message.get("data")
            reply = _mcp_reply(session.server, data, session)
            return Reply([_dumps({"type": "mcp", "data": reply}).encode()])
        raise _RequestError(UNKNOWN_TYPE, f"Unknown message type: {_type_text(kind)}")
    except _RequestError as exc:
        return error_reply(exc.code, exc.message)
    except Exception:
        logger.exception("internal error while handling a frame; closing the session")
        return error_reply(SESSION_ERROR, "Internal server error; the session is closed", close=True)


def capacity_reply(active: int, limit: int) -> Reply:
    """The frame a newcomer gets when the server is full, before the socket closes."""
    return error_reply(CAPACITY_REACHED, _capacity_text(active, limit), close=True,
                       active_sessions=active, max_sessions=limit)


def _capacity_text(active: int, limit: int) -> str:
    return f"Server at capacity: {active}/{limit} sessions active. Cannot accept new connections."


def _type_text(kind: Any) -> str:
    if kind is None:
        return ""
    return kind[:64] if isinstance(kind, str) else _preview(kind)


def _parse_request(frame: str | bytes | bytearray) -> dict[str, Any]:
    if not isinstance(frame, str):
        raise _RequestError(INVALID_JSON, "Binary frames are not supported: send JSON as a text frame")
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
    data = message.get("data")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: 'data' must be an object, got {type(data).__name__}"
        )
    return data


def _step_tokens(message: dict[str, Any]) -> list[int]:
    data = _check_data(message)
    if "tokens" not in data:
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'tokens' is required")
    extra = data.keys() - _STEP_KEYS
    if extra:
        raise _RequestError(
            VALIDATION_ERROR, f"Invalid message: unknown action field(s) {_preview(sorted(extra))}"
        )
    if data.get("metadata") is not None and not isinstance(data["metadata"], dict):
        raise _RequestError(VALIDATION_ERROR, "Invalid message: 'metadata' must be an object")
    tokens = data["tokens"]
    if type(tokens) is list and tokens and set(map(type, tokens)) == _INT_ONLY and min(tokens) >= 0:
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
    return {"seed": seed, "episode_id": episode_id, "delta": data.get(DELTA_KEY) is True}


def _reset_reply(session: Session, args: dict[str, Any]) -> Reply:
    env = session.env
    env.reset(seed=args["seed"], episode_id=args["episode_id"])
    session.delta = args["delta"]
    return Reply([_OBS_HEAD, env.messages_json, _OBS_MID, env.tokens_json, _OBS_TAIL])


def _step_reply(session: Session, tokens: list[int]) -> Reply:
    env = session.env
    try:
        env._append_step(tokens)
    except Exception as exc:  # the tokenizer refused the ids, or the episode is full: the client's doing
        return error_reply(EXECUTION_ERROR, f"Step failed: {str(exc)[:200]}")
    if not session.delta:
        return Reply([_OBS_HEAD, env.messages_json, _OBS_MID, env.tokens_json, _OBS_TAIL])
    totals = b'%d,"tokens":%d' % (len(env.history_messages), env.token_count)
    message_json, token_text = env.last_json
    return Reply([_OBS_HEAD, message_json, _OBS_MID, token_text, _DELTA_MID, totals, _DELTA_TAIL])


def _state_reply(env: ChatEnvironment) -> Reply:
    head = b'{"type":"state","data":{"episode_id":%s,"step_count":%d,"history_messages":[' % (
        _dumps(env.episode_id).encode(), env.step_count)
    return Reply([head, env.messages_json, b'],"history_tokens":[', env.history_tokens_json, b"]}}"])


# OpenEnv's MCP endpoint (JSON-RPC 2.0). The chat environment has no tools; what it
# does have is OpenEnv's session methods, which name a session a WebSocket can attach to
_RPC_PARSE_ERROR, _RPC_INVALID_REQUEST, _RPC_INVALID_PARAMS = -32700, -32600, -32602
_RPC_INTERNAL_ERROR, _RPC_SERVER_ERROR = -32603, -32000


def _rpc_error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message, "data": data}}


def _mcp_reply(server: Any, request: Any, session: Session | None = None) -> dict[str, Any]:
    """Answer one JSON-RPC request sent to /mcp (HTTP) or as an ``mcp`` frame on /ws."""
    request_id = request.get("id") if isinstance(request, dict) else None
    if (not isinstance(request, dict) or request.get("jsonrpc") != "2.0"
            or not isinstance(request.get("method"), str) or request.keys() - {"jsonrpc", "method", "params", "id"}
            or not isinstance(request_id, (str, int, type(None))) or isinstance(request_id, bool)):
        return _rpc_error(None, _RPC_INVALID_REQUEST,
                          "Invalid request: a JSON-RPC 2.0 request needs 'jsonrpc': '2.0' and a string 'method'")
    method, params = request["method"], request.get("params", {})
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
            active, limit = created if created else (0, 0)
            return _rpc_error(request_id, _RPC_SERVER_ERROR, _capacity_text(active, limit),
                              {"active_sessions": active, "max_sessions": limit})
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


def mcp_http_reply(server: Any, body: bytes) -> dict[str, Any]:
    """POST /mcp: parse the body, then answer as ``_mcp_reply`` does."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return _rpc_error(None, _RPC_PARSE_ERROR, "Parse error")
    return _mcp_reply(server, request)


# HTTP beside the WebSocket: the routes OpenEnv 0.10's chat_env server answers, with the
# same statuses and bodies of the same shape, from the same environment code

_ENV_NAME = "chat_env"
_TASK_ROUTES = {  # OpenEnv's task API; the chat environment has no tasks: 501, as OpenEnv says
    "splits": ("GET", "list_splits"), "tasks": ("POST", "list_tasks"), "num_tasks": ("POST", "num_tasks"),
    "task": ("POST", "get_task"), "task_range": ("POST", "get_task_range"),
}
_GET_ROUTES = ("/health", "/metadata", "/schema", "/openapi.json", "/state", "/list_environments")
_POST_ROUTES = ("/reset", "/step", "/mcp")


def _unprocessable(loc: str, message: str, value: Any) -> tuple[int, Any]:
    """A 422 shaped as OpenEnv's (pydantic's) validation errors."""
    return 422, {"detail": [{"type": "value_error", "loc": [loc], "msg": message, "input": value}]}


def _http_observation(env: ChatEnvironment) -> bytes:
    """The stateless POST /reset and /step answer: the observation, OpenEnv 0.10's shape."""
    return b"".join((b'{"observation":{"metadata":{},"messages":[', env.messages_json, _OBS_MID,
                     env.tokens_json, b']},"reward":null,"done":false,"metadata":null}'))


def http_reply(server: Any, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
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
        return 501, {"detail": f"{name} is not supported for this environment"}
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
        }
    if path == "/schema":
        return 200, {"action": _ACTION_SCHEMA, "observation": _OBSERVATION_SCHEMA, "state": _STATE_SCHEMA,
                     "reset_observation": _OBSERVATION_SCHEMA}
    if path == "/openapi.json":
        return 200, _openapi_document()
    if path == "/list_environments":
        return 200, [_ENV_NAME]
    if path == "/mcp":
        return 200, mcp_http_reply(server, body)
    env = server._new_environment()
    if path == "/state":
        return 200, env.state.to_dict()
    try:
        request = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError):
        return _unprocessable("body", "JSON decode error", None)
    if not isinstance(request, dict):
        return _unprocessable("body", "Input should be a valid dictionary", None)
    if path == "/reset":
        try:
            args = _reset_args({"data": request})
        except _RequestError as exc:
            return _unprocessable("body", exc.message, None)
        env.reset(seed=args["seed"], episode_id=args["episode_id"])
        return 200, _http_observation(env)
    action = request.get("action")
    if not isinstance(action, dict):
        return _unprocessable("action", "Field required: an object with 'tokens'", None)
    try:
        tokens = _step_tokens({"data": action})
    except _RequestError as exc:
        return _unprocessable("tokens", exc.message, None)
    env.reset()
    try:
        env._append_step(tokens)
    except Exception as exc:  # the tokenizer refused the ids, or the episode is full
        return 500, {"detail": f"Step failed: {str(exc)[:200]}"}
    return 200, _http_observation(env)


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
    return {"openapi": "3.1.0", "info": {"title": "chatenv", "version": __version__}, "paths": paths}


# ------------------------------------------------------------------------------
# Server: asyncio transports driving websockets' Sans-I/O protocol
# ------------------------------------------------------------------------------

# WebSocket opcodes and Sans-I/O connection states, as plain ints: websockets'
# enums are IntEnums, so the hot path compares them without importing it early
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_CONNECTING, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3
_INBOX_LIMIT = 16  # queued requests per session before its socket stops being read
_SHUTDOWN_CODE = 1012  # "service restart": what OpenEnv 0.10 (uvicorn) closes sessions with on shutdown
_NAMED_SESSION_TTL_S = 600.0  # an MCP-created session no WebSocket has used for this long is dropped
_HTTP_HEAD_BYTES = 16 * 2**10  # largest request line and headers of a plain HTTP request
_READ_BYTES = 2**16  # most bytes taken from a socket per read
_wire_logger = logging.getLogger("chatenv.wire")
_wire_logger.setLevel(logging.WARNING)  # websockets logs every open/close at INFO; we log sessions

_ACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "metadata": {"type": "object"},
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
    "type": "object",
    "properties": {
        "messages": {"type": "array", "items": _MESSAGE_SCHEMA},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "done": {"type": "boolean"},
        "reward": {"type": ["number", "null"]},
        "metadata": {"type": "object"},
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


def _frame_header(length: int) -> bytes:
    """The header of one unmasked, final text frame (RFC 6455 section 5.2)."""
    import struct

    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


def _authorized(headers: Any, token: str) -> bool:
    """Check ``Authorization: Bearer <token>`` (scheme in any case) in constant time."""
    import hmac

    values = headers.get_all("Authorization")  # .get() raises when the header is repeated
    scheme, _, given = (values[0] if len(values) == 1 else "").partition(" ")
    matches = hmac.compare_digest(given.strip().encode(), token.encode())
    return matches and scheme.lower() == "bearer"


class ChatServer:
    """An asyncio server: a chat session per WebSocket at /ws, HTTP probes beside.

    It drives websockets' Sans-I/O protocol from asyncio transports directly:
    no task or thread per connection; whole request frames are read without the
    protocol's parser, and each loop turn's replies are written together, one
    frame each. Embedded-tokenizer steps run inline; any other tokenizer runs in
    a thread pool, so a slow tokenizer never stalls other sessions or pings.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        system_prompt: str | None = None,
        system_role: str = "system",
        auth_token: str | None = None,
        compression: str | None = None,
        # Limits
        max_sessions: int = 256,
        max_message_bytes: int | None = 2**24,
        max_episode_tokens: int | None = 2**20,
        # Timeouts (seconds; None disables)
        open_timeout_s: float | None = 10.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        idle_timeout_s: float | None = None,
        send_timeout_s: float | None = 30.0,
        close_timeout_s: float = 2.0,
        offload: bool | None = None,
        sock: Any = None,
    ) -> None:
        if compression not in (None, "none", "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, not {compression!r}")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if auth_token is not None and not auth_token.strip():
            raise ValueError("an empty auth token would let everyone in: set a token, or leave it unset")
        self.tokenizer = load_tokenizer(tokenizer)
        self._prototype = ChatEnvironment(self.tokenizer, system_prompt, system_role, max_episode_tokens)
        self.host, self.port = host, port
        self.auth_token = auth_token
        self.compression = None if compression == "none" else compression
        self.max_sessions = max_sessions
        self.max_message_bytes = max_message_bytes
        self.open_timeout_s = open_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.send_timeout_s = send_timeout_s
        self.close_timeout_s = close_timeout_s
        # Inline steps are safe only for a tokenizer known to be fast
        self.offload = not isinstance(self.tokenizer, ByteTokenizer) if offload is None else offload
        self.sock = sock  # a bound socket to serve on instead of host:port (a worker's, see _Supervisor)
        self.active_sessions = 0
        self._connections: set[_Connection] = set()
        self._named: dict[str, list[Any]] = {}  # named sessions: id -> [session, attached, closing, last used]
        self._unflushed: list[_Connection] = []  # connections with writes queued this loop turn
        self._listener: Any = None
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

        from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
        from websockets.frames import apply_mask  # in C when websockets' speedups are built

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._unmask = apply_mask
        # websockets' memory-saving deflate settings (smaller windows) when compressing
        self._extensions = enable_server_permessage_deflate(None) if self.compression else None
        if self.sock is not None:
            self._listener = await self._loop.create_server(lambda: _Connection(self), sock=self.sock, backlog=1024)
        else:
            self._listener = await self._loop.create_server(
                lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=1024
            )
        self.port = self._listener.sockets[0].getsockname()[1]
        self._housekeeper = self._loop.call_later(self._tick_s, self._housekeeping)
        logger.info(
            "listening on %s (WebSocket at /ws; max %d sessions; tokenizer %s)",
            self.url, self.max_sessions, _tokenizer_name(self.tokenizer),
        )

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self, code: int = _SHUTDOWN_CODE, reason: str = "server shutting down") -> None:
        """Stop listening, close every session with ``code``, abort stragglers."""
        import asyncio

        if self._listener is None:
            return
        self._listener.close()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for conn in list(self._connections):
            conn.shut(code, reason)
        deadline = self._loop.time() + min(self.close_timeout_s, 0.5)
        while self._connections and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.transport.abort()
        await asyncio.sleep(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._listener = None
        self._stopped.set()
        logger.info("server stopped")

    # Sessions

    def _new_session(self) -> Session | None:
        if self.active_sessions >= self.max_sessions:
            return None
        self.active_sessions += 1
        return Session(self._new_environment, self)

    def _new_environment(self) -> ChatEnvironment:
        import copy

        env = copy.copy(self._prototype)  # shares the tokenizer and system tokens
        env._clear(None)
        return env

    def _run_offloaded(self, session: Session, frame: Any) -> Any:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(thread_name_prefix="chatenv-step")
        return self._loop.run_in_executor(self._executor, handle_frame, session, frame)

    # Sessions as both shells (native and ASGI) open and close them: one decision, one place

    def _handshake_refusal(self, headers: Any, peer: str) -> tuple[int, str, dict[str, str]] | None:
        """Why a WebSocket upgrade to /ws is refused: (status, text, headers), or None."""
        if self.auth_token is not None and not _authorized(headers, self.auth_token):
            logger.warning("refused an unauthenticated WebSocket upgrade from %s", peer)
            return (401, "Unauthorized: a valid 'Authorization: Bearer' token is required\n",
                    {"WWW-Authenticate": "Bearer"})
        return None

    def _open_session(self, query: str, peer: str) -> tuple[Session | None, str | None, Reply | None]:
        """The session for an accepted /ws upgrade: (session, its name if attached, refusal)."""
        named_id = _query_value(query, "session_id")
        if named_id:  # attach to a named session (OpenEnv's HTTP MCP sessions)
            attached = self.attach_named_session(named_id)
            if isinstance(attached, str):
                return None, None, error_reply(SESSION_ERROR, attached, close=True)
            logger.info("session attached: %s to %s", peer, _type_text(named_id))
            return attached, named_id, None
        session = self._new_session()
        if session is None:
            logger.warning("refused a session from %s: at capacity (%d/%d)",
                           peer, self.active_sessions, self.max_sessions)
            return None, None, capacity_reply(self.active_sessions, self.max_sessions)
        logger.info("session opened: %s, %d/%d active", peer, self.active_sessions, self.max_sessions)
        return session, None, None

    def _close_session(self, session: Session, named_id: str | None, peer: str, code: int,
                       requests: int, seconds: float) -> None:
        """A session's WebSocket has gone: free its slot (a named session only detaches)."""
        if named_id is not None:
            self.detach_named_session(named_id)
        else:
            self.active_sessions -= 1
        logger.info("session closed: %s, code %d, %d requests, %.1f s, %d/%d active",
                    peer, code, requests, seconds, self.active_sessions, self.max_sessions)

    # Named sessions: OpenEnv's MCP ``openenv/session/create`` makes one, a WebSocket
    # attaches to it with /ws?session_id=ID and leaves it alive when it goes; each
    # counts against max_sessions until closed or unused for _NAMED_SESSION_TTL_S

    def create_named_session(self) -> str | tuple[int, int]:
        """A new named session's id, or (active, limit) when the server is full."""
        import uuid

        session = self._new_session()
        if session is None:
            return self.active_sessions, self.max_sessions
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
        if self._named.pop(session_id, None) is not None:
            self.active_sessions -= 1

    def _clock(self) -> float:
        import time

        return time.monotonic()

    def _expire_named_sessions(self) -> None:
        now = self._clock()
        for session_id, (_, attached, _, last_used) in list(self._named.items()):
            if not attached and now - last_used > _NAMED_SESSION_TTL_S:
                self._drop_named(session_id)

    # Writes: queued during a loop turn, sent together at the start of the next, so
    # replies leave in bursts, as from a server whose handlers are tasks, and peers
    # handling many sessions wake once per burst rather than once per reply

    def _queue_flush(self, conn: _Connection) -> None:
        if not self._unflushed:
            self._loop.call_soon(self._flush_writes)
        self._unflushed.append(conn)

    def _flush_writes(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for conn in unflushed:
            conn.write_out()

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
        for conn in list(self._connections):
            try:
                conn.check_timeouts(now)
            except Exception:  # one broken connection must not stop the others' keepalive
                logger.exception("keepalive check failed for %s", conn.peer)
                conn.transport.abort()
        self._housekeeper = self._loop.call_later(self._tick_s, self._housekeeping)


def _tokenizer_name(tokenizer: Any) -> str:
    """A tokenizer's model name; of a local path, only its last part (HTTP answers show it)."""
    name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "name", None)
    if not isinstance(name, str) or not name:
        return type(tokenizer).__name__
    if os.path.isabs(name) or os.path.exists(name):
        return os.path.basename(name.rstrip("/" + os.sep)) or type(tokenizer).__name__
    return name


class _Connection:
    """One TCP connection: feeds bytes to the Sans-I/O protocol, runs the session."""

    def __init__(self, server: ChatServer) -> None:
        from websockets.server import ServerProtocol

        self.server = server
        self.proto = ServerProtocol(
            max_size=server.max_message_bytes,
            extensions=server._extensions,
            logger=_wire_logger,
        )
        self.transport: Any = None
        self.peer = "?"
        self.session: Session | None = None
        self.requests = 0
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = _OP_TEXT
        self.inbox: Any = None
        self.busy = False
        self.drain_scheduled = False
        self.reading_paused = False
        self.write_paused_at: float | None = None
        self.outgoing: list[bytes] = []
        self.eof_queued = False
        self.fast_frames = False
        now = server._loop.time()
        self.opened_at = self.last_rx = self.last_message = now
        self.ping_sent_at: float | None = None
        self.close_deadline: float | None = None
        self.head_tail = b""  # last bytes of the handshake so far, to find its end across reads
        self.http_body: bytes | None = None  # a plain HTTP request with a body, as read so far
        self.named_id: str | None = None  # the named session this WebSocket attached to

    # asyncio protocol callbacks

    def connection_made(self, transport: Any) -> None:
        import collections

        self.transport = transport
        # asyncio's selector transport receives into a fresh 256 KiB bytes per read,
        # which glibc maps and unmaps each time (3 syscalls a request); 64 KiB stays
        # on the heap. An attribute of that transport only; others ignore it.
        transport.max_size = _READ_BYTES
        self.inbox = collections.deque()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        self.last_rx = self.server._loop.time()
        if self.eof_queued:
            return  # we have said our last word; the rest is discarded until the client closes
        if proto.state == _OPEN:
            if self.fast_frames and proto.current_size is None and not proto.reader.buffer:
                data = self._take_data_frames(data)
            if data:
                self._receive(data)
        elif proto.state == _CONNECTING and not proto.eof_sent:
            if self.http_body is not None or (not self.head_tail and data[:1] not in (b"G", b"H")):
                # A request with a body (OpenEnv's POST /reset, /step, /mcp), which the
                # WebSocket handshake parser would refuse with no answer at all
                self._receive_http_request(data)
                return
            # A client must wait for the 101 before sending frames (RFC 6455 4.1); one that
            # pipelines them still gets the 101 first: feed the request alone, then the rest
            window = self.head_tail + data
            end = window.find(b"\r\n\r\n")
            if end < 0:
                self.head_tail = window[-3:]
            elif end + 4 - len(self.head_tail) < len(data):
                split = end + 4 - len(self.head_tail)
                self._receive(data[:split])
                if not self.transport.is_closing():
                    self.data_received(data[split:])
                return
            self._receive(data)
        else:
            self._receive(data)
        if self.inbox and not self.busy and not self.drain_scheduled:
            self._drain()

    def _receive_http_request(self, data: bytes) -> None:
        """Collect a plain HTTP request with a Content-Length body, answer it, half-close."""
        buffer = self.http_body = (self.http_body or b"") + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _HTTP_HEAD_BYTES:
                self._answer_http(431, {"detail": "Request Header Fields Too Large"})
            return
        lines = buffer[:end].decode("latin-1").split("\r\n")
        method, _, target = lines[0].partition(" ")
        target = target.rpartition(" ")[0] or target
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif name == "transfer-encoding":
                self._answer_http(411, {"detail": "Length Required: send the body with a Content-Length"})
                return
        limit = self.server.max_message_bytes
        if limit is not None and length > limit:
            self._answer_http(413, {"detail": f"Request body over the server's limit of {limit} bytes"})
            return
        if len(buffer) - end - 4 < length:
            return  # the rest of the body is on its way
        status, body = http_reply(self.server, method[:16], target, buffer[end + 4:end + 4 + length])
        self._answer_http(status, body, head=method == "HEAD")

    def _answer_http(self, status: int, body: Any, head: bool = False) -> None:
        self.http_body = b""  # what the client sends from now on is discarded
        self._write(_http_response(status, body, head).serialize())
        self._write_eof()

    def _take_data_frames(self, data: bytes) -> bytes:
        """Read the whole, masked data frames at the head of ``data`` directly; return the rest.

        The hot path: a request is one such frame. Anything else (control frames,
        fragments, oversize or malformed frames, a partial frame) is left to the
        Sans-I/O parser, which is at a frame boundary whenever this runs.
        """
        pos, size, limit = 0, len(data), self.server.max_message_bytes
        while size - pos >= 6:
            first, second = data[pos], data[pos + 1]
            opcode, length, head = first & 0x0F, second & 0x7F, pos + 2
            if first & 0xF0 != 0x80 or not second & 0x80 or (opcode != _OP_TEXT and opcode != _OP_BINARY):
                break  # fragmented, reserved bits, unmasked, or a control frame
            if length >= 126:
                width = 2 if length == 126 else 8
                if size - head < width:
                    break
                length = int.from_bytes(data[head:head + width], "big")
                head += width
            end = head + 4 + length
            if end > size or (limit is not None and length > limit):
                break
            self._enqueue(opcode, self.server._unmask(data[head + 4:end], data[head:head + 4]))
            pos = end
        return data[pos:] if pos else data

    def _receive(self, data: bytes) -> None:
        """Feed bytes to the Sans-I/O protocol and act on what it parsed."""
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            opcode = getattr(event, "opcode", None)
            if opcode is None:
                self._on_request(event)
            elif opcode == _OP_TEXT or opcode == _OP_BINARY:
                if event.fin:
                    self._enqueue(opcode, event.data)
                else:
                    self.fragments, self.fragment_opcode = [event.data], opcode
            elif opcode == _OP_CONT:
                if self.fragments is not None:
                    self.fragments.append(event.data)
                    if event.fin:
                        self._enqueue(self.fragment_opcode, b"".join(self.fragments))
                        self.fragments = None
            elif opcode == _OP_PONG:
                self.ping_sent_at = None
        self._flush()

    def eof_received(self) -> None:
        self.proto.receive_eof()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server._connections.discard(self)
        if self.session is not None:
            code = self.proto.close_rcvd.code if self.proto.close_rcvd else 1006
            if self.proto.close_sent is not None and self.proto.close_rcvd is None:
                code = self.proto.close_sent.code
            server._close_session(self.session, self.named_id, self.peer, code, self.requests,
                                  server._loop.time() - self.opened_at)
            self.session = self.named_id = None
        if self.inbox:
            self.inbox.clear()

    def pause_writing(self) -> None:
        self.write_paused_at = self.server._loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        self._update_reading()
        self._schedule_drain()

    # Handshake and HTTP

    def _on_request(self, request: Any) -> None:
        server, proto = self.server, self.proto
        path, _, query = request.path.partition("?")
        if path != "/ws":
            status, body = http_reply(server, request.method, path)
            proto.send_response(_http_response(status, body, head=request.method == "HEAD"))
            return
        refusal = server._handshake_refusal(request.headers, self.peer)
        if refusal is not None:
            status, text, headers = refusal
            response = proto.reject(status, text)
            for name, value in headers.items():
                response.headers[name] = value
            proto.send_response(response)
            return
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
        self.fast_frames = not proto.extensions
        self.opened_at = self.last_message = server._loop.time()
        self.session, self.named_id, refused = server._open_session(query, self.peer)
        if refused is not None:
            self._send(refused)

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
        if self.busy or self.write_paused_at is not None or not self.inbox:
            return
        session = self.session
        if session is None or self.proto.state != _OPEN:
            self.inbox.clear()
            return
        opcode, data = self.inbox.popleft()
        if opcode == _OP_TEXT:
            try:
                frame: Any = data.decode()
            except UnicodeDecodeError:
                self._reply(error_reply(INVALID_JSON, "Invalid JSON: the text frame is not valid UTF-8"))
                return
        else:
            frame = bytes(data)
        if self.server.offload:
            self.busy = True
            self.server._run_offloaded(session, frame).add_done_callback(self._on_offloaded)
            return
        self._reply(handle_frame(session, frame))

    def _on_offloaded(self, future: Any) -> None:
        self.busy = False
        if future.cancelled() or self.transport.is_closing():
            return
        exc = future.exception()
        if exc is not None:  # handle_frame catches everything it should; this is a bug
            logger.error("step failed outside the protocol", exc_info=exc)
            self._reply(error_reply(SESSION_ERROR, "Internal server error; the session is closed", close=True))
        else:
            self._reply(future.result())

    def _reply(self, reply: Reply) -> None:
        self.requests += 1
        self._send(reply)
        if self.inbox:
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
            if self.fast_frames:  # header and payload in one piece, one copy
                self._flush()  # whatever the protocol queued (the handshake) goes first
                self._write(b"".join([_frame_header(sum(map(len, parts))), *parts]))
            else:
                proto.send_text(b"".join(parts))
        if reply.close:
            proto.send_close(1000)
            self.close_deadline = self.server._loop.time() + self.server.close_timeout_s
        self._flush()

    def _flush(self) -> None:
        """Move what the protocol has to send into this turn's writes."""
        for data in self.proto.data_to_send():
            if data:
                self._write(data)
            else:  # the protocol's end of stream: a server closes the TCP connection
                self._write_eof()

    def _write_eof(self) -> None:
        self.eof_queued = True
        self._write(b"")

    def _write(self, data: bytes) -> None:
        if not self.outgoing:
            self.server._queue_flush(self)
        self.outgoing.append(data)

    def write_out(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.transport.is_closing():
            return
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        if data:
            self.transport.write(data)
        if self.eof_queued:
            # Half-close and keep reading until the client closes (or close_timeout_s):
            # closing outright would answer a client still sending with a TCP reset,
            # which can destroy our close frame before the client reads it
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()

    def _update_reading(self) -> None:
        pause = self.write_paused_at is not None or len(self.inbox) >= _INBOX_LIMIT
        if pause != self.reading_paused and not self.transport.is_closing():
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # Timeouts, called by the server's housekeeping timer

    def check_timeouts(self, now: float) -> None:
        server, proto = self.server, self.proto
        state = proto.state
        if state == _CONNECTING:
            if server.open_timeout_s and now - self.opened_at > server.open_timeout_s:
                self.transport.abort()
        elif state == _OPEN:
            if self.ping_sent_at is not None:
                if server.ping_timeout_s and now - self.ping_sent_at > server.ping_timeout_s:
                    logger.info("keepalive ping timeout: dropping %s", self.peer)
                    self.transport.abort()
                    return
            elif server.ping_interval_s and now - self.last_rx >= server.ping_interval_s:
                proto.send_ping(os.urandom(4))
                self.ping_sent_at = now
                self._flush()
            if self.write_paused_at is not None and server.send_timeout_s:
                if now - self.write_paused_at > server.send_timeout_s:
                    logger.info("client stopped reading for %.0f s: dropping %s", server.send_timeout_s, self.peer)
                    self.transport.abort()
                    return
            if server.idle_timeout_s and not self.busy and now - self.last_message > server.idle_timeout_s:
                self.shut(1001, "idle timeout")
        elif self.close_deadline is None:
            self.close_deadline = now + server.close_timeout_s
        elif now > self.close_deadline:
            self.transport.abort()

    def shut(self, code: int, reason: str) -> None:
        """Start the closing handshake (or drop a connection still in its handshake)."""
        if self.proto.state == _OPEN:
            self.proto.send_close(code, reason)
            self.close_deadline = self.server._loop.time() + self.server.close_timeout_s
            self._flush()
        elif self.proto.state == _CONNECTING:
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


def _http_response(status: int, body: Any, head: bool = False) -> Any:
    import email.utils
    import http

    from websockets.datastructures import Headers
    from websockets.http11 import Response

    payload = body if isinstance(body, bytes) else _dumps(body).encode()
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Server", f"chatenv/{__version__}"),
        ("Connection", "close"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
    ])
    return Response(status, http.HTTPStatus(status).phrase, headers, b"" if head else payload)


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


def serve(tokenizer: Any = None, workers: int = 1, **options: Any) -> None:
    """Run a server until SIGTERM or SIGINT; each session is then closed with 1012, as OpenEnv does.

    ``workers`` above 1 forks that many servers onto the one port under a
    supervisor (``_Supervisor``); each has its own sessions and limits.
    """
    import asyncio

    server = ChatServer(tokenizer, **options)
    if workers != 1:
        _Supervisor(server, workers).run()
        return
    asyncio.run(_serve_until_signalled(server))


# Workers: `chatenv serve --workers N` runs N ordinary servers on one port, forked
# from a supervisor that restarts those that die and passes SIGTERM/SIGINT on. On
# Linux each worker listens on its own SO_REUSEPORT socket, so the kernel spreads
# connections over them evenly; elsewhere all accept from one listening socket
# that the supervisor binds and the workers inherit
_REUSE_PORT = sys.platform.startswith("linux")  # BSD/macOS SO_REUSEPORT does not balance
_WORKER_STABLE_S = 5.0  # a worker that ran this long was not crash-looping: restart it at once
_RESTART_DELAY_S = (0.1, 10.0)  # a crash-looping worker's restart delay: doubles from the first to the last
_WORKER_STOP_S = 5.0  # after SIGTERM, a worker still closing its sessions this long is killed


def _note_signal(signum: int, frame: Any) -> None:
    """A Python-level handler, so the signal reaches the supervisor's wakeup pipe."""


class _Supervisor:
    """Fork ``workers`` copies of an unstarted ChatServer onto its port; restart them; stop them.

    The server is built (options checked, tokenizer loaded) once, before any
    fork, so a worker starts in milliseconds and a restarted one is identical.
    The supervisor runs no event loop: it sleeps on a pipe that signals
    (SIGCHLD included) are written to, then reaps, restarts or stops workers.
    """

    _STOP_SIGNALS = (15, 2)  # SIGTERM, SIGINT (their numbers on every POSIX system)

    def __init__(self, server: ChatServer, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number, at least 1, not {workers!r}")
        if not hasattr(os, "fork"):
            raise ValueError("more than one worker needs os.fork, which this platform does not have")
        self.server, self.workers = server, workers
        self.reuse_port = _REUSE_PORT
        self.sock: Any = None  # with reuse_port the port's reservation (bound, never listening), else the listener
        self.address: Any = None
        self.pids: dict[int, tuple[int, float]] = {}  # live workers: pid -> (slot, started at)
        self.failures = [0] * workers  # per slot: deaths in a row that came soon after a start
        self.due: dict[int, float] = {}  # slots waiting for a restart: slot -> when
        self.pipe: tuple[int, int] = (-1, -1)

    def run(self) -> None:
        import signal

        self._bind()
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        handled = (signal.SIGCHLD, *self._STOP_SIGNALS)
        previous_fd = signal.set_wakeup_fd(self.pipe[1])  # ValueError outside the main thread
        previous = {signum: signal.signal(signum, _note_signal) for signum in handled}
        try:
            import asyncio  # noqa: F401  (imported once here, not again in every worker)

            from websockets.server import ServerProtocol  # noqa: F401

            for slot in range(self.workers):
                self._spawn(slot)
            logger.info("supervisor pid %d: %d workers on %s (%s)", os.getpid(), self.workers, self.server.url,
                        "one SO_REUSEPORT socket each" if self.reuse_port else "one shared socket")
            while True:
                received = self._wait(min([1.0, *(when - self._now() for when in self.due.values())]))
                stop = received.intersection(self._STOP_SIGNALS)
                if stop:
                    logger.info("received %s: stopping %d workers", signal.Signals(min(stop)).name, len(self.pids))
                    break
                self._reap()
                for slot, when in list(self.due.items()):
                    if when <= self._now():
                        del self.due[slot]
                        self._spawn(slot)
        finally:
            self._stop()
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in self.pipe:
                os.close(fd)
            self.sock.close()
        logger.info("supervisor stopped")

    @staticmethod
    def _now() -> float:
        import time

        return time.monotonic()

    def _socket(self, listen: bool) -> Any:
        import socket

        family, address = self.address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds "::"
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            if listen:
                sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind(self) -> None:
        """Take the port (resolving 0) before any worker exists, and fail here if it is in use."""
        import socket

        server = self.server
        family, _, _, _, address = socket.getaddrinfo(
            server.host or None, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address = family, address
        if self.reuse_port and server.port:
            # SO_REUSEPORT would let this bind share a port another server listens on
            # (another supervisor's, say): a plain bind finds out whether it is taken
            reuse_port, self.reuse_port = self.reuse_port, False
            try:
                self._socket(listen=False).close()
            finally:
                self.reuse_port = reuse_port
        self.sock = self._socket(listen=not self.reuse_port)
        server.port = self.sock.getsockname()[1]
        self.address = family, (address[0], server.port, *address[2:])

    def _spawn(self, slot: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._work(supervisor)  # never returns
        self.pids[pid] = (slot, self._now())
        logger.debug("worker %d started: pid %d", slot, pid)

    def _work(self, supervisor: int) -> None:
        """The worker, in the child: an ordinary server on the supervisor's port; exits, never returns."""
        import asyncio
        import signal

        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, *self._STOP_SIGNALS):
                signal.signal(signum, signal.SIG_DFL)
            for fd in self.pipe:
                os.close(fd)
            if self.reuse_port:
                self.server.sock = self._socket(listen=True)
                self.sock.close()  # the reservation stays the supervisor's
            else:
                self.server.sock = self.sock
            asyncio.run(_serve_worker(self.server, supervisor))
            code = 0
        except BaseException:
            logger.exception("worker pid %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)  # never unwind into the supervisor's caller

    def _wait(self, timeout: float) -> set[int]:
        """Sleep until a signal or ``timeout``; the signals received."""
        import select

        select.select([self.pipe[0]], [], [], max(0.0, timeout))
        try:
            return set(os.read(self.pipe[0], 512))
        except BlockingIOError:
            return set()

    def _reap(self) -> None:
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
            if self.pipe[0] == -1:
                continue  # stopping: not restarted
            lived = self._now() - started
            self.failures[slot] = 0 if lived >= _WORKER_STABLE_S else self.failures[slot] + 1
            first, last = _RESTART_DELAY_S
            delay = 0.0 if not self.failures[slot] else min(last, first * 2 ** (self.failures[slot] - 1))
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            logger.warning("worker pid %d %s after %.1f s, losing its sessions; restarting it in %.1f s",
                           pid, how, lived, delay)
            self.due[slot] = self._now() + delay

    def _stop(self) -> None:
        """SIGTERM every worker (each closes its sessions with 1012), wait, SIGKILL stragglers."""
        import signal

        self.due.clear()
        for pid in self.pids:
            with contextlib_suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        reading, self.pipe = self.pipe, (-1, -1)
        deadline = self._now() + _WORKER_STOP_S
        try:
            while self.pids and self._now() < deadline:
                self.pipe = reading
                received = self._wait(min(0.1, deadline - self._now()))
                self.pipe = (-1, -1)
                self._reap()
                if received.intersection(self._STOP_SIGNALS):
                    break  # asked twice: do not wait
        finally:
            self.pipe = reading
        for pid in list(self.pids):
            logger.warning("worker pid %d did not stop: killing it", pid)
            with contextlib_suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib_suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del self.pids[pid]


async def _serve_worker(server: ChatServer, supervisor: int) -> None:
    """A worker's server, which also stops within a second of its supervisor dying."""
    import asyncio

    loop = asyncio.get_running_loop()

    def watch() -> None:
        if os.getppid() != supervisor:
            logger.warning("worker pid %d: the supervisor is gone, stopping", os.getpid())
            asyncio.ensure_future(server.close())
        else:
            loop.call_later(1.0, watch)

    loop.call_later(1.0, watch)
    await _serve_until_signalled(server)


class ServerURL(str):
    """The base URL of an in-process server; ``.server`` is the ChatServer itself."""

    server: ChatServer


class serve_in_thread:
    """Run a server on a free loopback port in a background thread.

    ``with serve_in_thread() as url: ...`` yields its base URL
    (``http://127.0.0.1:PORT``); leaving the block stops it and its sessions.
    """

    def __init__(self, tokenizer: Any = None, **options: Any) -> None:
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
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
        import asyncio

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
            asyncio.run(main())
        except BaseException:
            if self._error is None:
                logger.exception("in-process server crashed")

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result."""
        import asyncio

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.server._loop).result(5)

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
# server above stays the default and the faster path


class ASGIApp:
    """chatenv as an ASGI 3 application: ``python -m uvicorn chatenv:app``.

    It answers what the native server answers (``/ws`` sessions, HTTP routes)
    through the same ``handle_frame`` and ``http_reply`` and a ``ChatServer``'s
    session accounting; the ASGI server owns sockets, pings and shutdown (uvicorn
    closes sessions with 1012). Options are ChatServer's; the module-level
    ``app`` takes them from the environment, as ``chatenv serve`` does.
    """

    def __init__(self, tokenizer: Any = None, **options: Any) -> None:
        self._configure = lambda: ChatServer(tokenizer, **options)
        self.server: ChatServer | None = None

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
        elif kind == "http":
            await self._http(self._server(), scope, receive, send)
        elif kind == "websocket":
            await self._websocket(self._server(), scope, receive, send)

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
        body, limit = bytearray(), server.max_message_bytes
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            body += event.get("body", b"")
            if limit is not None and len(body) > limit:
                status, payload = 413, {"detail": f"Request body over the server's limit of {limit} bytes"}
                break
            if not event.get("more_body"):
                status, payload = http_reply(server, scope["method"], scope["path"], bytes(body))
                break
        data = payload if isinstance(payload, bytes) else _dumps(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})

    async def _websocket(self, server: ChatServer, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        from websockets.datastructures import Headers

        if (await receive())["type"] != "websocket.connect":
            return
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "?"
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])])
        refusal = server._handshake_refusal(headers, peer) if scope["path"] == "/ws" else (404, "", {})
        if refusal is not None:
            await send({"type": "websocket.close", "code": 1008})  # the ASGI server answers 403
            return
        await send({"type": "websocket.accept"})
        server._expire_named_sessions()
        session, named_id, refused = server._open_session(scope.get("query_string", b"").decode("latin-1"), peer)
        if refused is not None:
            await send({"type": "websocket.send", "text": refused.data.decode()})
            await send({"type": "websocket.close", "code": 1000})
            return
        loop, requests, code, opened = asyncio.get_running_loop(), 0, 1006, server._clock()
        try:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    code = event.get("code", 1000)
                    return
                text = event.get("text")
                frame = text if text is not None else event.get("bytes") or b""
                if server.offload:
                    reply = await loop.run_in_executor(None, handle_frame, session, frame)
                else:
                    reply = handle_frame(session, frame)
                requests += 1
                if reply.parts is not None:
                    await send({"type": "websocket.send", "text": reply.data.decode()})
                if reply.close:
                    code = 1000
                    await send({"type": "websocket.close", "code": 1000})
                    return
        finally:
            server._close_session(session, named_id, peer, code, requests, server._clock() - opened)


def __getattr__(name: str) -> Any:
    """``chatenv.app``: the ASGI application configured from the environment, made on first use."""
    if name == "app":
        app = globals()["app"] = ASGIApp._from_environment()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------
# Clients: ChatEnv (websockets' threading client) and AsyncChatEnv (asyncio)
# ------------------------------------------------------------------------------


class ChatEnvError(RuntimeError):
    """The server answered with an error frame; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EpisodeLostError(ConnectionError):
    """The session's connection ended mid-episode; call reset() to start a new one."""


_CLOSING_CODES = (CAPACITY_REACHED, SESSION_ERROR)  # error frames the server closes after
_SEND_TIMER_BYTES = 2**16  # frames this large may wait on the socket: their send is timed


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


def _websockets_major() -> int:
    from websockets.version import version

    return int(version.split(".")[0])


def _closed(exc: BaseException) -> bool:
    """Whether ``exc`` is websockets' ConnectionClosed (imported on this error path only)."""
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, ConnectionClosed)


def _is_loopback(ws_url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(ws_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ClientCore:
    """What both clients share: URL, connect options, request frames, reply parsing.

    With ``delta`` it asks a chatenv server for delta observations and rebuilds
    full ones; an OpenEnv server ignores the request and sends full ones.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float | None,
        message_timeout_s: float | None,
        max_message_bytes: int | None,
        ping_interval_s: float | None,
        ping_timeout_s: float | None,
        compression: str | None,
        auth_token: str | None,
        delta: bool,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_url = _ws_url(base_url)
        self.message_timeout_s = message_timeout_s
        self.delta = delta
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
        self.connect_options = dict(
            open_timeout=connect_timeout_s,
            ping_interval=ping_interval_s,
            ping_timeout=ping_timeout_s,
            max_size=max_message_bytes,
            compression=None if compression == "none" else compression,
            additional_headers=headers,
            user_agent_header=f"chatenv/{__version__}",
        )
        if _is_loopback(self.ws_url):
            self.connect_options["proxy"] = None  # never send loopback through a proxy
        self.lost = False  # the connection died mid-episode
        # The episode as parsed so far, to rebuild deltas and to parse only what is new.
        # Append-only: observations share prefixes of these lists (a new episode gets new ones).
        self._messages: list[dict[str, str]] = []
        self._tokens: list[int] = []
        self._seen: tuple[bytes, int, int, int] | None = None  # the last full frame, its layout

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

    # Replies

    def _payload(self, reply: bytes | str, expected: str) -> dict[str, Any]:
        try:
            frame = json.loads(reply.decode() if isinstance(reply, bytes) else reply)
        except ValueError as exc:
            raise ChatEnvError("PROTOCOL_ERROR", f"the server sent invalid JSON: {exc}") from None
        if not isinstance(frame, dict):
            raise ChatEnvError("PROTOCOL_ERROR", "the server sent a frame that is not an object")
        data = frame.get("data")
        if frame.get("type") == "error":
            data = data if isinstance(data, dict) else {}
            raise ChatEnvError(str(data.get("code", "ERROR")), str(data.get("message", "")))
        if frame.get("type") != expected or not isinstance(data, dict):
            raise ChatEnvError(
                "PROTOCOL_ERROR",
                f"the server sent a {_preview(frame.get('type'))} frame where {expected!r} was expected",
            )
        return data

    def parse_result(self, data: bytes | str) -> StepResult:
        """Parse an observation frame: a delta, an extension of the last one, or anew.

        A full observation repeats the whole conversation each step. When it starts
        with the previous one's messages and tokens, byte for byte, only the new tail
        is parsed: a long episode costs O(new) per step, not O(history).
        """
        if isinstance(data, str):
            data = data.encode()
        result = self._parse_extension(data)
        if result is not None:
            return result
        payload = self._payload(data, "observation")
        body = payload.get("observation")
        body = body if isinstance(body, dict) else {}
        messages, tokens = body.get("messages"), body.get("tokens")  # fresh: the client owns them
        if not isinstance(messages, list) or not isinstance(tokens, list):
            raise ChatEnvError("PROTOCOL_ERROR", "the server sent an observation without lists of messages and tokens")
        totals = body.get("delta")
        if isinstance(totals, dict):  # a delta: append, then check we are in sync
            self._messages += messages
            self._tokens += tokens
            self._seen = None
            if totals.get("messages") != len(self._messages) or totals.get("tokens") != len(self._tokens):
                raise ChatEnvError(
                    "DELTA_DESYNC",
                    f"rebuilt {len(self._messages)} messages / {len(self._tokens)} tokens, "
                    f"server has {totals.get('messages')} / {totals.get('tokens')}",
                )
        else:
            self._messages, self._tokens = messages, tokens
            layout = _frame_layout(data)
            self._seen = (data, *layout) if layout else None
        metadata = body.get("metadata")
        return self._result(bool(payload.get("done", False)), payload.get("reward"),
                            dict(metadata) if isinstance(metadata, dict) else None)

    def _result(self, done: bool, reward: float | None, metadata: dict[str, Any] | None = None) -> StepResult:
        obs = ChatObservation._sharing(self._messages, self._tokens, done, reward, metadata)
        return StepResult(obs, reward, done)

    def _parse_extension(self, data: bytes) -> StepResult | None:
        """Parse only what a frame adds to the previous one; None when it does not extend it."""
        if self._seen is None or not data.startswith(_OBS_HEAD):
            return None
        last, messages_end, tokens_start, tokens_end = self._seen
        view = memoryview(last)
        if not data.startswith(view[len(_OBS_HEAD):messages_end], len(_OBS_HEAD)):
            return None
        new_messages_end = data.find(_OBS_MID, messages_end)
        new_tokens_start = new_messages_end + len(_OBS_MID)
        if new_messages_end < 0 or not data.startswith(view[tokens_start:tokens_end], new_tokens_start):
            return None
        old_tokens_end = new_tokens_start + tokens_end - tokens_start
        new_tokens_end = data.find(b"]", old_tokens_end)
        if new_tokens_end < 0:
            return None
        try:  # one small document: [new messages, new tokens, {reward, done}]
            new_messages, new_tokens, outer = json.loads(b"".join((
                b"[[", data[_items_start(data, messages_end, messages_end > len(_OBS_HEAD)):new_messages_end],
                b"],[", data[_items_start(data, old_tokens_end, tokens_end > tokens_start):new_tokens_end],
                b'],{"o":{', data[new_tokens_end + 1:-1], b"]",
            )).decode())  # decoded first: json.loads sniffs the encoding of bytes, slowly
        except (ValueError, TypeError):
            return None
        if not isinstance(outer, dict):
            return None
        self._messages += new_messages
        self._tokens += new_tokens
        self._seen = (data, new_messages_end, new_tokens_start, new_tokens_end)
        return self._result(bool(outer.get("done", False)), outer.get("reward"))

    def parse_state(self, text: str | bytes) -> ChatState:
        return ChatState.from_dict(self._payload(text, "state"))

    # Errors

    def refusal(self, text: str | bytes | None) -> ChatEnvError | None:
        """The error frame a server sent just before closing (CAPACITY_REACHED, SESSION_ERROR)."""
        if text is None:
            return None
        try:
            self._payload(text, "error")
        except ChatEnvError as exc:
            return exc if exc.code in _CLOSING_CODES else None
        return None

    def lost_error(self) -> EpisodeLostError:
        return EpisodeLostError(
            f"the connection to {self.base_url} was lost and the episode with it; "
            "call reset() to start a new one"
        )

    def timeout_error(self) -> TimeoutError:
        return TimeoutError(
            f"no reply from {self.base_url} within {self.message_timeout_s} s; the connection "
            "was closed so a late reply cannot answer a later call; call reset() to start again"
        )

    def connect_error(self, exc: BaseException) -> ConnectionError:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            reason = " (missing or wrong auth token)" if status == 401 else ""
            return ConnectionError(f"{self.ws_url} refused the WebSocket upgrade: HTTP {status}{reason}")
        if isinstance(exc, TimeoutError):
            return ConnectionError(f"cannot connect to {self.ws_url}: no handshake within the connect timeout")
        return ConnectionError(f"cannot connect to {self.ws_url}: {exc}")


def _frame_layout(data: bytes) -> tuple[int, int, int] | None:
    """Where a compact full observation frame's messages end and its tokens start and end."""
    messages_end = data.find(_OBS_MID, len(_OBS_HEAD))  # cannot occur inside a JSON string
    tokens_end = data.find(b"]", messages_end + len(_OBS_MID))
    if not data.startswith(_OBS_HEAD) or messages_end < 0 or tokens_end < 0:
        return None
    return messages_end, messages_end + len(_OBS_MID), tokens_end


def _items_start(data: bytes, pos: int, had_items: bool) -> int:
    """Where the array items after earlier ones begin: past their comma, if any follow."""
    if had_items and data[pos] != 0x5D:  # "]": none follow
        if data[pos] != 0x2C:  # ","
            raise ValueError("not a continuation of the previous items")
        return pos + 1
    return pos


def message_to_action(message: Mapping[str, Any], tokenizer: Any) -> ChatAction:
    """Tokenize a chat message (``role``, ``content``) into a ChatAction."""
    return ChatAction(tokens=_tokenize_message(tokenizer, message))


class _ClientBase:
    """Constructor, docker ownership and helpers common to ChatEnv and AsyncChatEnv."""

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str | None = None,
        delta: bool = True,
        compression: str | None = None,
        # Timeouts (seconds; None disables)
        connect_timeout_s: float | None = 10.0,
        message_timeout_s: float | None = 60.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        # Limits
        max_message_bytes: int | None = 64 * 2**20,
    ) -> None:
        self._core = _ClientCore(
            base_url,
            connect_timeout_s=connect_timeout_s,
            message_timeout_s=message_timeout_s,
            max_message_bytes=max_message_bytes,
            ping_interval_s=ping_interval_s,
            ping_timeout_s=ping_timeout_s,
            compression=compression,
            auth_token=auth_token,
            delta=delta,
        )
        self._ws: Any = None
        self._container: Any = None

    @property
    def base_url(self) -> str:
        return self._core.base_url

    message_to_action = staticmethod(message_to_action)

    @classmethod
    def _launch(
        cls,
        image: str,
        *,
        port: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60.0,
        docker: str = "docker",
        **client_options: Any,
    ) -> Any:
        """Start ``image`` (see the Docker section) and return a client that owns it."""
        container = _start_container(
            image, port=port, env_vars=env_vars, ready_timeout_s=ready_timeout_s, docker=docker
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


class ChatEnv(_ClientBase):
    """Synchronous client: one WebSocket session with a chat environment server."""

    @classmethod
    def from_docker_image(cls, image: str, **options: Any) -> ChatEnv:
        """Run ``image`` with ``docker run``, wait for /health, return a client owning it.

        Options: ``port``, ``env_vars``, ``ready_timeout_s``, ``docker``, and any
        client option. close() stops and removes the container.
        """
        return cls._launch(image, **options)

    def _connect(self) -> None:
        from websockets.sync.client import connect

        options = self._core.connect_options
        if _websockets_major() >= 17:  # 17 deprecates connect() outside `with` unless told
            options = dict(options, legacy=True)
        try:
            self._ws = connect(self._core.ws_url, **options)
        except Exception as exc:
            raise self._core.connect_error(exc) from exc

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close_timeout = 0.1
            try:
                ws.close()
            except Exception:
                pass

    def _leftover(self) -> str | bytes | None:
        """A frame that arrived before the close (recv still returns buffered frames)."""
        try:
            return self._ws.recv(timeout=0, decode=False)
        except Exception:
            return None

    def _roundtrip(self, frame: str, new_episode: bool) -> bytes:
        core = self._core
        for attempt in (1, 2):
            if self._ws is None:
                if core.lost and not new_episode:
                    raise core.lost_error()
                self._connect()
            try:
                self._send(frame)
                return self._ws.recv(timeout=core.message_timeout_s, decode=False)
            except TimeoutError:
                self._drop()
                core.lost = True
                raise core.timeout_error() from None
            except Exception as exc:
                if not _closed(exc):
                    raise
                refusal = core.refusal(self._leftover())
                self._drop()
                core.lost = True
                if refusal is not None:  # the server said why it closed: say it too
                    raise refusal from exc
                if not new_episode or attempt == 2:
                    raise core.lost_error() from exc
        raise AssertionError("unreachable")

    def _send(self, frame: str) -> None:
        """Send within message_timeout_s: a server that stopped reading cannot hold a big
        frame's send forever (past the deadline the socket is shut, TimeoutError raised).

        Only a frame larger than the socket buffers can block; smaller ones skip the timer.
        """
        ws, timeout = self._ws, self._core.message_timeout_s
        if timeout is None or len(frame) < _SEND_TIMER_BYTES:
            ws.send(frame)
            return
        import socket

        expired = threading.Event()

        def expire() -> None:
            expired.set()
            try:
                ws.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            ws.send(frame)
        except Exception:
            if expired.is_set():
                raise TimeoutError("send timed out") from None
            raise
        finally:
            timer.cancel()
        if expired.is_set():
            raise TimeoutError("send timed out")

    def _call(self, frame: str, parse: Any, new_episode: bool = False) -> Any:
        text = self._roundtrip(frame, new_episode)
        try:
            return parse(text)
        except ChatEnvError as exc:
            if exc.code in _CLOSING_CODES:  # the server closes after these
                self._drop()
                self._core.lost = True
            raise

    def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode (reconnecting if the connection was lost)."""
        core = self._core
        result = self._call(core.reset_frame(kwargs), core.parse_result, new_episode=True)
        core.lost = False
        return result

    def step(self, action: ChatAction | Any) -> StepResult:
        """Append one message; raises EpisodeLostError if the session is gone."""
        return self._call(self._core.step_frame(action), self._core.parse_result)

    def state(self) -> ChatState:
        return self._call(self._core.state_frame, self._core.parse_state)

    def close(self) -> None:
        """Close the session (and stop the container this client started, if any)."""
        self._drop()
        container, self._container = self._container, None
        if container is not None:
            container.stop()

    def __enter__(self) -> ChatEnv:
        if self._ws is None:
            self._connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ws", None) is not None:
            self._drop()


class AsyncChatEnv(_ClientBase):
    """Asynchronous client: the same API as ChatEnv with ``await`` and ``async with``."""

    @classmethod
    async def from_docker_image(cls, image: str, **options: Any) -> AsyncChatEnv:
        """The async twin of ChatEnv.from_docker_image (docker runs in a worker thread)."""
        import asyncio
        import functools

        launch = functools.partial(cls._launch, image, **options)
        return await asyncio.get_running_loop().run_in_executor(None, launch)

    async def _connect(self) -> None:
        from websockets.asyncio.client import connect

        try:
            self._ws = await connect(self._core.ws_url, **self._core.connect_options)
        except Exception as exc:
            raise self._core.connect_error(exc) from exc

    async def _drop(self) -> None:
        import asyncio

        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close_timeout = 0.1
            try:
                # close() first drains the write buffer, which a stuck server never empties
                async with asyncio.timeout(0.5):
                    await ws.close()
            except Exception:
                ws.transport.abort()

    async def _leftover(self) -> str | bytes | None:
        """A frame that arrived before the close (recv still returns buffered frames)."""
        import asyncio

        try:
            async with asyncio.timeout(0.1):
                return await self._ws.recv(decode=False)
        except Exception:
            return None

    async def _roundtrip(self, frame: str, new_episode: bool) -> bytes:
        import asyncio

        core = self._core
        for attempt in (1, 2):
            if self._ws is None:
                if core.lost and not new_episode:
                    raise core.lost_error()
                await self._connect()
            try:
                async with asyncio.timeout(core.message_timeout_s):
                    await self._ws.send(frame)
                    return await self._ws.recv(decode=False)
            except TimeoutError:
                await self._drop()
                core.lost = True
                raise core.timeout_error() from None
            except Exception as exc:
                if not _closed(exc):
                    raise
                refusal = core.refusal(await self._leftover())
                await self._drop()
                core.lost = True
                if refusal is not None:  # the server said why it closed: say it too
                    raise refusal from exc
                if not new_episode or attempt == 2:
                    raise core.lost_error() from exc
        raise AssertionError("unreachable")

    async def _call(self, frame: str, parse: Any, new_episode: bool = False) -> Any:
        text = await self._roundtrip(frame, new_episode)
        try:
            return parse(text)
        except ChatEnvError as exc:
            if exc.code in _CLOSING_CODES:  # the server closes after these
                await self._drop()
                self._core.lost = True
            raise

    async def reset(self, **kwargs: Any) -> StepResult:
        core = self._core
        result = await self._call(core.reset_frame(kwargs), core.parse_result, new_episode=True)
        core.lost = False
        return result

    async def step(self, action: ChatAction | Any) -> StepResult:
        return await self._call(self._core.step_frame(action), self._core.parse_result)

    async def state(self) -> ChatState:
        return await self._call(self._core.state_frame, self._core.parse_state)

    async def close(self) -> None:
        await self._drop()
        container, self._container = self._container, None
        if container is not None:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, container.stop)

    async def __aenter__(self) -> AsyncChatEnv:
        if self._ws is None:
            await self._connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


# ------------------------------------------------------------------------------
# Docker: launch a server image with `docker run`, own it, remove it
# ------------------------------------------------------------------------------

_CONTAINER_PORT = 8000
_STOP_TIMEOUT_S = 2          # `docker stop -t`: grace before SIGKILL; chatenv exits in < 1 s
_LOG_TAIL_LINES = 20
_DOCKER_CALL_TIMEOUT_S = 30.0

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


def _docker_exe(docker):
    """The docker CLI's full path, or DockerError if it is not installed."""
    import shutil

    exe = shutil.which(docker)
    if exe is None:
        raise DockerError(
            f"the docker command line is not installed (no {docker!r} on PATH); "
            "install Docker to use from_docker_image()")
    return exe


def _docker(exe, *args, timeout=_DOCKER_CALL_TIMEOUT_S, check=True):
    """Run `docker ARGS`; return the CompletedProcess (text). With check, a non-zero
    exit raises DockerError; a daemon that cannot be reached is always named as such."""
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


def _last_line(text):
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # The docker CLI ends some errors with a "Run/See 'docker run --help'" hint: skip it.
    lines = [ln for ln in lines if not ln.startswith(("Run '", "See '"))]
    return lines[-1] if lines else "(no output)"


def _logs_tail(exe, name, lines=_LOG_TAIL_LINES):
    """The last lines the container wrote (stdout and stderr interleaved), best effort."""
    import subprocess

    try:
        proc = subprocess.run([exe, "logs", "--tail", str(lines), name],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=10)
        return proc.stdout.rstrip() or "(no output)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(could not read the container's logs: {exc})"


def _remove(exe, name):
    """`docker rm -f NAME`, ignoring a container that is already gone. Raises
    DockerError for any other failure."""
    proc = _docker(exe, "rm", "-f", name, check=False)
    if proc.returncode != 0 and not any(m in proc.stderr.lower() for m in _GONE_MARKERS):
        raise DockerError(f"could not remove container {name}: {_last_line(proc.stderr)}")


# Containers started by this process and not yet stopped: removed at interpreter exit.
_live_containers = {}
_live_lock = threading.Lock()


@atexit.register
def _stop_live_containers():
    """Remove every container this process started and did not stop (one `docker rm
    -f` call: at exit, speed beats a graceful shutdown). Never raises."""
    if not _live_containers:
        return
    import subprocess

    with _live_lock:
        by_exe = {}
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

    def __init__(self, name, host_port, image, docker_exe):
        self.name = name
        self.image = image
        self.host_port = host_port
        self.base_url = f"http://127.0.0.1:{host_port}"
        self._docker = docker_exe
        self._stopped = False
        self._lock = threading.Lock()
        with _live_lock:
            _live_containers[name] = self

    def stop(self):
        """`docker stop` (short grace: the server exits on SIGTERM) then `docker rm -f`.
        Idempotent; a container that is already gone is not an error."""
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

    def logs(self, lines=_LOG_TAIL_LINES):
        """The last `lines` lines of the container's output (for diagnostics)."""
        return _logs_tail(self._docker, self.name, lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        state = "stopped" if self._stopped else "running"
        return f"<_Container {self.name} {self.image} at {self.base_url} ({state})>"


def _health_ok(base_url, timeout):
    """True if GET /health answers 200 within `timeout` seconds (never via a proxy)."""
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


def _container_state(exe, name):
    """(status, exit_code) of the container, e.g. ("running", 0) or ("exited", 2)."""
    proc = _docker(exe, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name,
                   check=False)
    if proc.returncode != 0:
        return "gone", None
    status, _, code = proc.stdout.strip().partition(" ")
    return status, int(code) if code.lstrip("-").isdigit() else None


def _published_port(exe, name):
    """The loopback host port Docker mapped to the container's port 8000."""
    out = _docker(exe, "port", name, f"{_CONTAINER_PORT}/tcp").stdout
    for line in out.splitlines():           # e.g. "127.0.0.1:49153"
        host, _, port = line.strip().rpartition(":")
        if port.isdigit() and host in ("127.0.0.1", "0.0.0.0"):
            return int(port)
    raise DockerError(f"container {name} has no published port for {_CONTAINER_PORT}/tcp: "
                      f"{out.strip()!r}")


def _start_container(image, *, port=None, env_vars=None, ready_timeout_s=60.0,
                     docker="docker", name_prefix="chatenv"):
    """Start IMAGE detached with its port 8000 published on 127.0.0.1:PORT (a free port,
    chosen by Docker, when port is None), passing env_vars as -e K=V, and wait until
    GET /health answers 200. Returns a _Container. On any failure (docker missing,
    daemon unreachable, unknown image, container exits, not healthy in time, interrupt)
    raises DockerError with the reason and the container's last log lines, and the
    container is removed: nothing is left behind."""
    import uuid

    exe = _docker_exe(docker)
    if not image or not isinstance(image, str):
        raise DockerError(f"image must be a non-empty string, not {image!r}")
    name = f"{name_prefix}-{uuid.uuid4().hex[:12]}"
    publish = f"127.0.0.1:{'' if port is None else int(port)}:{_CONTAINER_PORT}"
    args = ["run", "-d", "--name", name, "-p", publish, "--label", "chatenv.launcher=1"]
    for key, value in (env_vars or {}).items():
        key = str(key)
        if not key or "=" in key:
            raise DockerError(f"invalid environment variable name {key!r}")
        args += ["-e", f"{key}={value}"]
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


def _wait_healthy(exe, container, ready_timeout_s):
    """Poll /health (short timeouts, small backoff) until 200; raise DockerError with
    the log tail if the container exits first or the deadline passes."""
    import time

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
    "max_message_bytes": ("CHATENV_MAX_MESSAGE_BYTES",),
    "max_episode_tokens": ("CHATENV_MAX_EPISODE_TOKENS",),
    "compression": ("CHATENV_COMPRESSION",),
    "idle_timeout_s": ("CHATENV_IDLE_TIMEOUT_S",),
    "log_level": ("CHATENV_LOG_LEVEL",),
}


def _from_env(name: str, default: Any) -> Any:
    for variable in _ENV_FALLBACKS[name]:
        value = os.environ.get(variable)
        if value not in (None, ""):
            return value
    return default


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
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
        "close with 1001). Flags fall back to environment variables, shown in brackets.",
    )
    serve_cmd.add_argument("--host", default=_from_env("host", "127.0.0.1"),
                           help="interface to bind; 0.0.0.0 opens it to the network [CHATENV_HOST] (default: %(default)s)")
    serve_cmd.add_argument("--port", type=int, default=int(_from_env("port", 8000)),
                           help="TCP port, 0 for a free one [CHATENV_PORT] (default: %(default)s)")
    serve_cmd.add_argument("--tokenizer", default=_from_env("tokenizer", None),
                           help="'default' (embedded, byte-level), a tokenizer.json, a local directory "
                           "or a model name for transformers [CHATENV_TOKENIZER, TOKENIZER_NAME]")
    serve_cmd.add_argument("--system-prompt", default=_from_env("system_prompt", None),
                           help="first message of every episode [CHATENV_SYSTEM_PROMPT, SYSTEM_PROMPT]")
    serve_cmd.add_argument("--max-sessions", type=int, default=int(_from_env("max_sessions", 256)),
                           help="concurrent sessions; newcomers get CAPACITY_REACHED [CHATENV_MAX_SESSIONS] "
                           "(default: %(default)s)")
    serve_cmd.add_argument("--max-message-bytes", type=int,
                           default=int(_from_env("max_message_bytes", 2**24)),
                           help="largest incoming message; larger ones close the session with 1009 "
                           "[CHATENV_MAX_MESSAGE_BYTES] (default: %(default)s)")
    serve_cmd.add_argument("--max-episode-tokens", type=int,
                           default=int(_from_env("max_episode_tokens", 2**20)),
                           help="tokens one episode may hold; a step past it is an EXECUTION_ERROR, so one "
                           "session cannot grow the server's memory forever; 0 for no limit "
                           "[CHATENV_MAX_EPISODE_TOKENS] (default: %(default)s)")
    serve_cmd.add_argument("--compression", choices=("none", "deflate"),
                           default=_from_env("compression", "none"),
                           help="permessage-deflate negotiation [CHATENV_COMPRESSION] (default: %(default)s)")
    serve_cmd.add_argument("--idle-timeout-s", type=float, default=_from_env("idle_timeout_s", None),
                           help="close sessions silent this long; off by default [CHATENV_IDLE_TIMEOUT_S]")
    serve_cmd.add_argument("--auth-token", default=os.environ.get("CHATENV_AUTH_TOKEN"),  # set but empty: refused
                           help="require 'Authorization: Bearer TOKEN' on /ws; prefer the variable "
                           "[CHATENV_AUTH_TOKEN], which process listings do not show")
    serve_cmd.add_argument("--log-level", default=_from_env("log_level", "INFO"),
                           choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                           help="[CHATENV_LOG_LEVEL] (default: %(default)s)")
    return parser


def _server_arguments(args: Any) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and ChatServer options that ``chatenv serve``'s arguments ask for."""
    tokenizer = load_tokenizer(args.tokenizer)
    options = dict(
        host=args.host, port=args.port, system_prompt=args.system_prompt,
        max_sessions=args.max_sessions, max_message_bytes=args.max_message_bytes,
        max_episode_tokens=args.max_episode_tokens or None,
        compression=args.compression, auth_token=args.auth_token,
        idle_timeout_s=float(args.idle_timeout_s) if args.idle_timeout_s else None,
    )
    return tokenizer, options


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``chatenv``, ``python -m chatenv`` and ``server`` (which serves)."""
    if argv is None and os.path.basename(sys.argv[0]) == "server":
        argv = ["serve", *sys.argv[1:]]  # the command OpenEnv's HF sandbox launcher runs
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tokenizer, options = _server_arguments(args)
        serve(tokenizer, **options)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        print(f"chatenv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
