"""The OpenAI-compatible teacher against every HTTP status it must treat differently.

A real HTTP server on 127.0.0.1 answers each message by a script in the message itself:
"status:CODE:K" fails the first K requests of that message with CODE (the first with
Retry-After: 7), "reset:K" and "cut:K" break the first K responses in the middle of the body
(a TCP reset, or a clean close before Content-Length bytes). Retry waits are recorded instead
of slept, so the test checks the delays the teacher chose without spending them.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rankgrpo.demos.teacher as teacher_module
from rankgrpo.demos.teacher import OpenAITeacher, RetryPolicy, TeacherFailure

NOT_RETRIED = [400, 401, 403, 404]
RETRIED = [408, 409, 425, 429, 500, 502, 503, 504]
RETRY_AFTER = 7  # seconds, sent with the first failure of each message
BASE_DELAY = 0.5


class ScriptedAPI:
    def __init__(self):
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                message = body["messages"][-1]["content"]
                with api.lock:
                    api.counts[message] += 1
                    n = api.counts[message]
                try:
                    api.respond(self, message, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @staticmethod
    def respond(h, message: str, n: int) -> None:
        kind, *args = message.split(":")
        ok = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo {message}"}}]})
        if kind == "status" and n <= int(args[1]):
            data = b'{"error": "scripted"}'
            h.send_response(int(args[0]))
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            if n == 1:
                h.send_header("Retry-After", str(RETRY_AFTER))
            h.end_headers()
            h.wfile.write(data)
            return
        data = ok.encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if kind in ("reset", "cut") and n <= int(args[0]):
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            if kind == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        h.wfile.write(data)


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = ScriptedAPI()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """The teacher's waits between tries, recorded instead of slept."""
    recorded: list[float] = []
    fake_time = types.SimpleNamespace(sleep=recorded.append, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(teacher_module, "time", fake_time)
    return recorded


def teacher(api, attempts=3) -> OpenAITeacher:
    return OpenAITeacher("m", api.url, api_key_env=None, timeout=5.0, concurrency=1,
                         retry=RetryPolicy(max_attempts=attempts, base_delay=BASE_DELAY, max_delay=60.0))


def user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("code", NOT_RETRIED)
def test_client_errors_are_tried_once(api, sleeps, code):
    message = f"status:{code}:9"
    [reply] = teacher(api).chat_many([user(message)])
    assert isinstance(reply, TeacherFailure) and reply.attempts == 1 and f"HTTP {code}" in reply.reason
    assert api.counts[message] == 1 and sleeps == []


@pytest.mark.parametrize("code", RETRIED)
def test_transient_errors_are_retried_honouring_retry_after(api, sleeps, code):
    """Two failures, then success. The first failure carried Retry-After: 7, so the first wait is
    exactly 7 s; the second carried none, so the second wait is the backoff of retry 2,
    uniform in [BASE_DELAY, 2 * BASE_DELAY] (equal jitter on 2 * BASE_DELAY)."""
    message = f"status:{code}:2"
    [reply] = teacher(api).chat_many([user(message)])
    assert reply == f"echo {message}"
    assert api.counts[message] == 3
    assert len(sleeps) == 2 and sleeps[0] == RETRY_AFTER
    assert BASE_DELAY <= sleeps[1] <= 2 * BASE_DELAY


@pytest.mark.parametrize("code", RETRIED)
def test_transient_errors_give_up_after_max_attempts(api, sleeps, code):
    message = f"status:{code}:9"
    [reply] = teacher(api, attempts=3).chat_many([user(message)])
    assert isinstance(reply, TeacherFailure) and reply.attempts == 3 and f"HTTP {code}" in reply.reason
    assert api.counts[message] == 3


@pytest.mark.parametrize("kind", ["reset", "cut"])
def test_connection_broken_mid_body_is_retried(api, sleeps, kind):
    message = f"{kind}:1"
    [reply] = teacher(api).chat_many([user(message)])
    assert reply == f"echo {message}"
    assert api.counts[message] == 2 and len(sleeps) == 1
