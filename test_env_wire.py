"""The environment keeps its episode in a history it is given; the protocol's is JSON.

``ChatEnvironment`` writes its conversation into a history: its own Python lists
(``_History``) by default, or, under a server's session, the ``_WireHistory`` the
protocol sends its replies from. These tests pin that both give the same
episode, that the wire history's bytes are exactly ``json.dumps`` of it, that
its memory account is charged its exact size, and that a server makes each
session's environment from explicit arguments (its system prompt tokenized once).
"""

from __future__ import annotations

import json
import random

import pytest

import chatenv
from chatenv import ChatAction, ChatEnvironment, ChatServer, Session, handle_frame


def _compact(value) -> bytes:
    """Compact JSON as UTF-8; text with no UTF-8 form (a lone surrogate) keeps its escapes."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


class TextTokenizer:
    """Ids are code points: decode() makes any text, quotes, controls and lone surrogates included."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))

    def encode(self, text):
        return [ord(c) for c in text]


_TRICKY = ['"', "\\", "\n\t\x00\x1f", "\u00e9\u2028\u2029", "\U0001f600", "\udc80", "</script>", "plain"]


def _episode(history=None, **options):
    """One episode stepped through the environment's public methods; its views."""
    env = ChatEnvironment(TextTokenizer(), history=history, **options)
    env.reset(episode_id="e")
    rng = random.Random(7)
    for text in _TRICKY + ["".join(rng.choice(_TRICKY) for _ in range(rng.randrange(1, 40))) for _ in range(20)]:
        env.append_tokens([[ord(c)] for c in text])  # nested: the public method normalises
    env.step(ChatAction([65, 66]))
    return env, (env.history_messages, env.history_tokens, env.observation(), env.state,
                 env.message_count, env.token_count, env.step_count)


@pytest.mark.parametrize("system_prompt", [None, 'Be "brief"\n\u00e9'])
def test_own_history_and_wire_history_hold_the_same_episode(system_prompt):
    _, plain = _episode(system_prompt=system_prompt)
    wire = chatenv._WireHistory()
    _, sent = _episode(wire, system_prompt=system_prompt)
    assert plain == sent
    messages, token_lists = plain[0], [list(ids) for ids in plain[1]]
    assert len(messages) == len(token_lists) == (23 if system_prompt else 22) + 7
    assert plain[3].history_tokens == token_lists and plain[6] == len(messages) - (1 if system_prompt else 0)


def test_wire_history_bytes_are_json_dumps_of_the_episode():
    wire = chatenv._WireHistory()
    env, (messages, token_lists, observation, *_) = _episode(wire, system_prompt="sys")
    assert bytes(wire.messages_json) == b",".join(map(_compact, messages))
    assert bytes(wire.tokens_json) == _compact(observation.tokens)[1:-1]
    assert wire.history_tokens_json() == _compact([list(ids) for ids in token_lists])[1:-1]
    assert wire.last() == (_compact(messages[-1]), b"65,66")
    assert (wire.messages(), wire.tokens(), wire.token_lists()) == (
        messages, observation.tokens, [list(ids) for ids in token_lists])
    assert b'"\\udc80"' in wire.messages_json  # a lone surrogate: no UTF-8 form, so its message keeps the escape
    assert wire.nbytes == len(wire.messages_json) + len(wire.tokens_json) + 16 * len(messages)


def test_protocol_replies_are_the_sessions_wire_history():
    session = Session(ChatEnvironment)  # made as make_env(history=session.history)
    reset = handle_frame(session, '{"type":"reset","data":{"episode_id":"e"}}').json()  # now: it holds live buffers
    assert isinstance(session.history, chatenv._WireHistory) and session.env.history_messages == []
    step = handle_frame(session, '{"type":"step","data":{"tokens":[72,105]}}')
    expected = {"messages": [{"role": "assistant", "content": "Hi"}], "tokens": [72, 105]}
    assert step.data == _compact({"type": "observation", "data": {"observation": {"metadata": {}, **expected},
                                                                   "reward": None, "done": False}})
    assert reset["data"]["observation"]["messages"] == []
    state = handle_frame(session, '{"type":"state"}')
    assert state.data == _compact({"type": "state", "data": {
        "episode_id": "e", "step_count": 1, "history_messages": expected["messages"], "history_tokens": [[72, 105]]}})


def test_append_ids_takes_flat_ids_and_failures_change_nothing():
    for history in (None, chatenv._WireHistory()):
        env = ChatEnvironment(max_episode_tokens=4, history=history)
        env.reset(episode_id="e")
        assert env.append_ids([72, 105]) == {"role": "assistant", "content": "Hi"}
        before = (env.state, env.observation(), env.message_count, env.token_count)
        for bad in ([72, 4000], [65, 65, 65]):  # the tokenizer refuses an id; the episode would pass 4 tokens
            with pytest.raises(ValueError):
                env.append_ids(bad)
            assert (env.state, env.observation(), env.message_count, env.token_count) == before
        with pytest.raises(ValueError):
            env.append_tokens([True])  # append_tokens checks; append_ids trusts its caller
        assert env.state == before[0]


def test_opening_message_json_is_right_for_every_server_and_role():
    """The wire history writes a server's system message once; servers, prompts and roles never mix."""
    servers = [ChatServer(system_prompt=p, system_role=r) for p, r in
               (("A", "system"), ("B", "system"), ("A", "developer"), ("A", "system"))]
    sessions = [server._new_session() for server in servers for _ in range(2)]
    for _ in range(2):
        for session in sessions:
            frame = handle_frame(session, '{"type":"reset"}').json()
            server = session.server
            message = {"role": server.system_role, "content": server.system_prompt}
            assert frame["data"]["observation"]["messages"] == [message]
            assert frame["data"]["observation"]["tokens"] == chatenv.message_to_action(message, server.tokenizer).tokens


def test_sessions_environments_come_from_the_servers_arguments_tokenized_once():
    class CountingTokenizer(chatenv.ByteTokenizer):
        calls = 0

        def apply_chat_template(self, conversation, tokenize=True, **kwargs):
            CountingTokenizer.calls += 1
            return super().apply_chat_template(conversation, tokenize=tokenize, **kwargs)

    tokenizer = CountingTokenizer()
    server = ChatServer(tokenizer, system_prompt="Be brief.", system_role="developer", max_episode_tokens=40)
    assert CountingTokenizer.calls == 1
    sessions = [server._new_session() for _ in range(3)]
    envs = [session.env for session in sessions]
    for session in sessions:
        handle_frame(session, '{"type":"reset"}')
    assert CountingTokenizer.calls == 1  # the prompt is tokenized once, for every session
    assert len({id(env) for env in envs}) == len({id(s.history) for s in sessions}) == 3
    for env in envs:
        assert env.tokenizer is tokenizer and (env.system_prompt, env.system_role) == ("Be brief.", "developer")
        assert env.max_episode_tokens == 40
    handle_frame(sessions[0], '{"type":"step","data":{"tokens":[72,105]}}')
    assert [env.message_count for env in envs] == [2, 1, 1]  # each its own episode


def test_wire_history_charges_its_account_exactly_and_a_refusal_changes_nothing():
    server = ChatServer(system_prompt="Be brief.", max_memory_bytes=chatenv._SESSION_OVERHEAD_BYTES + 600)
    session = server._new_session()
    overhead = chatenv._SESSION_OVERHEAD_BYTES
    assert server.memory_used == overhead + server._empty_episode_bytes  # reserved before the env exists
    handle_frame(session, '{"type":"reset"}')
    assert server.memory_used == overhead + session.history.nbytes == overhead + server._empty_episode_bytes
    steps = 0
    while True:
        reply = handle_frame(session, '{"type":"step","data":{"tokens":[72,105,33]}}').json()
        assert server.memory_used == overhead + session.history.nbytes <= server.max_memory_bytes
        if reply["type"] == "error":
            break
        steps += 1
    assert reply["data"]["code"] == "EXECUTION_ERROR" and "--max-memory-bytes" in reply["data"]["message"]
    assert steps > 5 and session.env.step_count == steps and session.history.message_count == steps + 1
    handle_frame(session, '{"type":"reset"}')
    assert server.memory_used == overhead + server._empty_episode_bytes
    server._free_session(session)
    server._free_session(session)  # twice: nothing given back twice
    assert server.memory_used == 0


def test_a_session_that_cannot_make_its_environment_is_a_session_error_on_every_frame():
    def broken(history):
        raise RuntimeError("boom")

    for frame in ('{"type":"reset"}', '{"type":"step","data":{"tokens":[72]}}', '{"type":"state"}'):
        reply = handle_frame(Session(broken), frame)
        assert reply.close and reply.json()["data"]["code"] == "SESSION_ERROR", frame


def test_own_history_holds_any_id_a_tokenizer_decodes():
    """Its ids live in a 32-bit array; an id past that moves them to a list, nothing lost."""
    env = ChatEnvironment(TextTokenizer())
    env.reset()
    env.step(ChatAction([72, 105]))
    with pytest.raises(ValueError):  # chr() refuses it: the step fails, nothing changes
        env.step(ChatAction([0x110000]))
    assert (env.token_count, env.message_count, env.history_tokens) == (2, 1, [(72, 105)])

    class WideTokenizer(TextTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    wide = ChatEnvironment(WideTokenizer())
    wide.reset()
    for ids in ([1, 2], [2**40, 3], [2**70], [4]):
        wide.step(ChatAction(ids))
    assert wide.history_tokens == [(1, 2), (2**40, 3), (2**70,), (4,)]
    assert wide.observation().tokens == [1, 2, 2**40, 3, 2**70, 4] and wide.token_count == 6
    assert wide.state.history_messages[-2] == {"role": "assistant", "content": str(2**70)}
