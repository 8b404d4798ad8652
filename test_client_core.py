"""The client core's decisions, pure: no sockets, no server.

Each test plays a shell: it starts a call, reports what a connection would have
done (a reply, an error frame, a close, a timeout) and asserts the action the
plan answers with, the error it raises and what the session becomes.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
from websockets.frames import Close

import chatenv
from chatenv import ChatEnvError, EpisodeLostError
from chatenv import _AWAIT_CLOSE, _CONNECT, _RETURN, _SEND, _Closed, _ClientCore, _Unsolicited

OBSERVATION = json.dumps({"type": "observation", "data": {
    "observation": {"messages": [{"role": "assistant", "content": "Hi"}], "tokens": [72, 105]},
    "reward": None, "done": False}}).encode()
STATE = json.dumps({"type": "state", "data": {
    "episode_id": "e", "step_count": 1, "history_messages": [], "history_tokens": []}})


def error_frame(code: str, message: str = "no") -> bytes:
    return json.dumps({"type": "error", "data": {"code": code, "message": message}}).encode()


def core_of(urls="http://h:1", **options) -> _ClientCore:
    return _ClientCore(urls, **options)


def reset_call(core, connected=True):
    call = core.call(core.parse_result, new_episode=True)
    return call, call.start(connected)


def step_call(core, connected=True):
    call = core.call(core.parse_result, new_episode=False)
    return call, call.start(connected)


def lose_session(core):
    """A step whose connection the server closed: the episode is lost."""
    call, _ = step_call(core)
    with pytest.raises(EpisodeLostError):
        call.on_failure(_Closed(1001, "bye"))


# Replies


def test_a_call_sends_on_the_connection_it_has_or_connects_first():
    core = core_of()
    assert step_call(core, connected=True)[1] is _SEND
    assert step_call(core, connected=False)[1] is _CONNECT


def test_a_reply_returns_parsed_and_a_reset_makes_a_lost_session_usable():
    core = core_of(delta=False)
    lose_session(core)
    call, action = reset_call(core)
    assert action is _SEND and call.on_reply(OBSERVATION) is _RETURN
    assert call.result.observation.tokens == [72, 105]
    assert core.lost is None
    call, _ = step_call(core)  # no longer refused before it starts
    state_call = core.call(core.parse_state, new_episode=False)
    assert state_call.start(True) is _SEND and state_call.on_reply(STATE) is _RETURN
    assert state_call.result.episode_id == "e"


def test_an_error_frame_the_server_keeps_the_session_after_is_raised_and_the_session_stays():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_reply(error_frame(chatenv.VALIDATION_ERROR, "tokens must be ints"))
    assert info.value.code == chatenv.VALIDATION_ERROR and info.value.message == "tokens must be ints"
    assert core.lost is None
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_reply(b"not json")
    assert info.value.code == chatenv.PROTOCOL_ERROR and core.lost is None


def test_a_lost_session_refuses_steps_and_states_before_any_io_but_not_resets():
    core = core_of()
    lose_session(core)
    for parse in (core.parse_result, core.parse_state):
        with pytest.raises(EpisodeLostError, match="call reset"):
            core.call(parse, new_episode=False)
    assert reset_call(core)[1] is _SEND


def test_close_loses_the_session_with_no_close_code():
    core = core_of()
    core.close()
    with pytest.raises(EpisodeLostError, match=r"close\(\) ended it") as info:
        core.call(core.parse_result, new_episode=False)
    assert info.value.close_code is None


# Refusals: error frames the server closes after


def test_session_error_awaits_the_close_then_loses_the_session_naming_both():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.SESSION_ERROR, "broken")) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError) as info:
        call.on_refusal_close(_Closed(1008, "policy"))
    assert info.value.code == chatenv.SESSION_ERROR
    why, code = core.lost
    assert code == 1008 and "1008" in why and "after SESSION_ERROR: 'broken'" in why
    with pytest.raises(EpisodeLostError) as lost:
        core.call(core.parse_result, new_episode=False)
    assert lost.value.close_code == 1008


def test_a_refusal_whose_close_never_came_is_lost_without_a_code():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.SESSION_ERROR)) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError):
        call.on_refusal_close(None)
    why, code = core.lost
    assert code is None and why.startswith("the server sent SESSION_ERROR") and why.endswith("closed the session")


def test_capacity_on_a_step_is_raised_and_loses_the_session():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED)) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError) as info:
        call.on_refusal_close(_Closed(1013, ""))
    assert info.value.code == chatenv.CAPACITY_REACHED and core.lost[1] == 1013


def test_a_reset_refused_for_room_tries_each_server_once_then_raises_capacity():
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    core = core_of(urls)
    call, action = reset_call(core, connected=False)
    tried = []
    while True:
        assert action is _CONNECT
        try:
            ws_url, wait_s = call.next_server()
        except ChatEnvError as exc:  # a round with no room and no capacity_wait_s: no more rounds
            assert exc.code == chatenv.CAPACITY_REACHED and exc.message == ws_url
            break
        assert wait_s == 0.0
        tried.append(ws_url)
        assert core.ws_url == ws_url  # the server in use, for messages and base_url
        assert call.on_connect() is _SEND
        assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED, ws_url)) is _AWAIT_CLOSE
        action = call.on_refusal_close(_Closed(1013, ""))
    assert sorted(tried) == sorted(chatenv._ws_url(u) for u in urls)
    assert core.lost is None  # a full server is no lost episode


def test_with_capacity_wait_a_full_round_is_followed_by_a_backed_off_one():
    core = core_of(["http://a:1", "http://b:1"], capacity_wait_s=30)
    call, _ = reset_call(core, connected=False)
    waits = []
    for _ in range(6):  # three rounds of two servers
        _, wait_s = call.next_server()
        waits.append(wait_s)
        call.on_connect()
        assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED)) is _AWAIT_CLOSE
        assert call.on_refusal_close(_Closed(1013, "")) is _CONNECT
    first, second = chatenv._BACKOFF_S[0], 2 * chatenv._BACKOFF_S[0]
    assert waits[0] == waits[1] == waits[3] == waits[5] == 0.0  # within a round: no pause
    assert first / 2 <= waits[2] <= first and second / 2 <= waits[4] <= second  # jittered, doubling


def test_a_refusal_sent_before_the_reply_is_a_refusal_not_a_protocol_error():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_failure(_Unsolicited(error_frame(chatenv.SESSION_ERROR, "idle")))
    assert info.value.code == chatenv.SESSION_ERROR and core.lost[1] is None
    call, _ = step_call(core_of())
    closed = _Closed(1001, "going away", leftover=error_frame(chatenv.SESSION_ERROR, "idle"))
    with pytest.raises(ChatEnvError) as info:
        call.on_failure(closed)
    assert info.value.code == chatenv.SESSION_ERROR and call.core.lost[1] == 1001


def test_a_frame_no_request_asked_for_is_a_protocol_error_and_loses_the_session():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError, match="no request asked for") as info:
        call.on_failure(_Unsolicited(OBSERVATION))
    assert info.value.code == chatenv.PROTOCOL_ERROR
    assert core.lost == ("the server sent a frame no request asked for", None)


# Closes before the reply


def test_a_reset_on_a_reused_connection_the_server_closed_is_sent_again_once_anew():
    core = core_of()
    call, _ = reset_call(core, connected=True)
    assert call.on_failure(_Closed(1001, "idle")) is _CONNECT
    assert core.lost is None  # nothing is lost yet: the reset goes again
    call.next_server()
    assert call.on_connect() is _SEND
    assert call.on_failure(_Closed(1012, "restart")) is _CONNECT  # the new one closed too: the next server
    assert core.lost[1] == 1012
    with pytest.raises(EpisodeLostError, match="1012") as info:  # one server, and it closed: that error
        call.next_server()
    assert info.value.close_code == 1012


def test_a_step_whose_connection_the_server_closed_loses_the_episode():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(EpisodeLostError, match=r"going away") as info:
        call.on_failure(_Closed(1001, ""))
    assert info.value.close_code == 1001 and core.lost[1] == 1001
    call, _ = step_call(core_of())
    with pytest.raises(EpisodeLostError, match="without a close frame") as info:
        call.on_failure(_Closed(1006))
    assert info.value.close_code == 1006


@pytest.mark.parametrize("code", sorted(chatenv._BROKEN_CODES))
def test_this_client_closing_for_a_broken_frame_is_a_protocol_error(code):
    core = core_of()
    call, _ = reset_call(core)  # even a reset is not retried: the server broke the protocol
    with pytest.raises(ChatEnvError, match="broke the WebSocket protocol: bad frame") as info:
        call.on_failure(_Closed(code, "bad frame", ours=True))
    assert info.value.code == chatenv.PROTOCOL_ERROR and core.lost[1] == code


def test_this_client_closing_for_a_limit_loses_the_episode_even_on_a_reset():
    core = core_of()
    call, _ = reset_call(core)
    with pytest.raises(EpisodeLostError, match="this client closed the connection with 1009") as info:
        call.on_failure(_Closed(1009, "too big", ours=True))
    assert info.value.close_code == 1009


# Timeouts and interruptions


def test_a_timeout_closes_and_loses_the_session_and_says_which_option():
    core = core_of(message_timeout_s=7)
    call, _ = step_call(core)
    with pytest.raises(TimeoutError, match="message_timeout_s=7 s"):
        call.on_failure(TimeoutError())
    assert core.lost == ("no reply within message_timeout_s=7 s", None)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interruption_is_raised_as_it_is_and_loses_the_session(interruption):
    core = core_of()
    call, _ = reset_call(core)
    exc = interruption("stop")
    with pytest.raises(interruption) as info:
        call.on_failure(exc)
    assert info.value is exc
    assert core.lost == (f"a call was interrupted by {interruption.__name__} between its request and its reply",
                         None)


# Connecting


def test_servers_that_refuse_connections_are_each_tried_once_then_named_together():
    core = core_of(["http://a:1", "http://b:1"])
    call, _ = reset_call(core, connected=False)
    for _ in range(2):
        ws_url, _ = call.next_server()
        assert call.on_connect_error(ConnectionError(f"cannot connect to {ws_url}")) is _CONNECT
    with pytest.raises(ConnectionError, match=r"ws://(a|b):1/ws; cannot connect to ws://(a|b):1/ws"):
        call.next_server()
    one = core_of("http://a:1")
    call, _ = reset_call(one, connected=False)
    call.next_server()
    error = ConnectionError("refused")
    call.on_connect_error(error)
    with pytest.raises(ConnectionError) as info:
        call.next_server()
    assert info.value is error  # one server: its own error, as it was


def test_new_sessions_rotate_over_the_servers():
    core = core_of(["http://a:1", "http://b:1", "http://c:1"])
    firsts = []
    for _ in range(3):
        call, _ = reset_call(core, connected=False)
        firsts.append(call.next_server()[0])
    assert sorted(firsts) == ["ws://a:1/ws", "ws://b:1/ws", "ws://c:1/ws"]


# How a close reads


def test_the_core_reads_a_close_from_websockets_close_frames():
    core = core_of(max_message_bytes=100, ping_timeout_s=3)
    theirs = core.closed(Close(1001, "bye"), Close(1001, "bye"), True, b"x")
    assert (theirs.code, theirs.reason, theirs.ours, theirs.leftover) == (1001, "bye", False, b"x")
    ours_first = core.closed(Close(1000, ""), Close(1002, "bad"), False, None)
    assert (ours_first.code, ours_first.ours) == (1002, True)
    too_big = core.closed(None, Close(1009, "over"), None, None)
    assert too_big.ours and too_big.reason == "the server's reply is over this client's max_message_bytes=100 (over)"
    keepalive = core.closed(None, Close(1011, "keepalive ping timeout"), None, None)
    assert keepalive.reason == "keepalive: no pong within ping_timeout_s=3 s"
    other = core.closed(None, Close(1011, "internal"), None, None)
    assert other.reason == "internal"
    neither = core.closed(None, None, None, None)
    assert (neither.code, neither.ours) == (1006, False)


# The options, listed once


def test_the_options_are_the_cores_keyword_only_ones_shown_on_both_clients():
    core_params = list(inspect.signature(_ClientCore).parameters.values())
    names = [p.name for p in core_params[1:]]
    assert len(names) == 9 and all(p.kind is p.KEYWORD_ONLY for p in core_params[1:])
    for client in (chatenv.ChatEnv, chatenv.AsyncChatEnv):
        assert list(inspect.signature(client).parameters.values()) == core_params
        entries = dict(re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", inspect.cleandoc(client.__init__.__doc__),
                                  re.M | re.S))
        assert list(entries) == ["base_url"] + names  # each option documented, in the signature's order
        for name in names:
            if name.endswith("_s"):  # the timeouts (and capacity_wait_s, ping_interval_s)
                assert "None disables" in " ".join(entries[name].split()), name
        with pytest.raises(TypeError, match="not_an_option"):
            client("http://h:1", not_an_option=1)
