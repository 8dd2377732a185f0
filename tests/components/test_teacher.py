"""Teachers against a real HTTP server on 127.0.0.1 (retries, Retry-After, timeouts, the cache,
resume after a killed run), the generic chat wrapper, and the local-model teacher."""
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rankgrpo.demos.teacher import (
    CachedTeacher, ChatTeacher, OpenAITeacher, ReplyCache, RetryPolicy, TeacherFailure, make_teacher,
    parse_retry_after, request_key, sandbox_teacher,
)

CLIENT_TIMEOUT = 0.3  # seconds; the "slow" fault sleeps longer than this
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)
ROOT = Path(__file__).resolve().parents[2]


class FakeChatAPI:
    """A real chat-completions server in a thread. The reply to a message is "echo: <message>".

    Faults are scripted by words in the message: "fail500:K", "slow:K", "rate:K" (429 with
    Retry-After), "garbage:K" (200, not JSON), "empty:K" (200, empty content) and "junk:K"
    (200, a valid response with useless content) hit the first K requests of that message;
    "always500" and "auth401" hit every request. ``hang_at`` = n blocks the n-th request until
    ``release`` is set (to kill a client mid-request).
    """

    def __init__(self, retry_after: str = "0.4"):
        self.requests: list[str] = []
        self.times: list[float] = []
        self.auth_headers: list[str | None] = []
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.hung = threading.Event()
        self.hang_at: int | None = None
        self.retry_after = retry_after
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                message = body["messages"][-1]["content"]
                with api.lock:
                    api.requests.append(message)
                    api.times.append(time.monotonic())
                    api.auth_headers.append(self.headers.get("Authorization"))
                    api.counts[message] += 1
                    n_total, n_this = len(api.requests), api.counts[message]
                try:
                    api.respond(self, message, n_total, n_this, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @staticmethod
    def _fault(message: str, name: str, n_this: int) -> bool:
        for word in message.split():
            if word.startswith(name + ":") and n_this <= int(word.split(":")[1]):
                return True
        return False

    def respond(self, h, message: str, n_total: int, n_this: int, body: dict) -> None:
        if self.hang_at is not None and n_total == self.hang_at:
            self.hung.set()
            self.release.wait(10)
            return
        if "always500" in message or self._fault(message, "fail500", n_this):
            return self._send(h, 500, b'{"error": "internal"}')
        if "auth401" in message:
            return self._send(h, 401, b'{"error": "bad key"}')
        if self._fault(message, "rate", n_this):
            return self._send(h, 429, b'{"error": "slow down"}', {"Retry-After": self.retry_after})
        if self._fault(message, "slow", n_this):
            self.release.wait(1.0)  # longer than the client's timeout
        if self._fault(message, "garbage", n_this):
            return self._send(h, 200, b"<html>502 Bad Gateway</html>")
        content = f"echo: {message}"
        if self._fault(message, "empty", n_this):
            content = ""
        elif self._fault(message, "junk", n_this):
            content = "I'm sorry, I can't help with that."
        payload = {"id": "x", "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop"}]}
        self._send(h, 200, json.dumps(payload).encode())

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with FakeChatAPI() as server:
        yield server


def openai_teacher(api, **kwargs) -> OpenAITeacher:
    options = dict(model="teacher-model", base_url=api.url, api_key_env="RANKGRPO_TEST_KEY",
                   timeout=CLIENT_TIMEOUT, concurrency=4, retry=FAST_RETRY)
    options.update(kwargs)
    return OpenAITeacher(**options)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def echo_or_junk(reply: str) -> str | None:
    return None if reply.startswith("echo: ") else "not an echo"


# ----------------------------------------------------------------------------- retries


def test_openai_teacher_retries_500s_timeouts_garbage_and_empty_replies(api):
    prompts = ["plain", "fail500:2 a", "slow:1 b", "garbage:1 c", "empty:1 d", "junk:2 e"]
    start = time.monotonic()
    replies = openai_teacher(api).chat_many([user(p) for p in prompts], validate=echo_or_junk)
    assert replies == [f"echo: {p}" for p in prompts]
    assert [api.counts[p] for p in prompts] == [1, 3, 2, 2, 2, 3]
    assert time.monotonic() - start < 5


def test_openai_teacher_gives_up_with_counted_failures_and_never_raises(api):
    teacher = openai_teacher(api, retry=RetryPolicy(max_attempts=3, base_delay=0.01))
    replies = teacher.chat_many([user("always500"), user("ok"), user("auth401"), user("slow:9 x")])
    assert replies[1] == "echo: ok"
    assert isinstance(replies[0], TeacherFailure) and replies[0].attempts == 3 and "HTTP 500" in replies[0].reason
    assert isinstance(replies[2], TeacherFailure) and replies[2].attempts == 1 and "HTTP 401" in replies[2].reason
    assert isinstance(replies[3], TeacherFailure) and "timed out" in replies[3].reason
    assert (api.counts["always500"], api.counts["auth401"], api.counts["slow:9 x"]) == (3, 1, 3)


def test_openai_teacher_honours_retry_after(api):
    replies = openai_teacher(api).chat_many([user("rate:1 r")])
    assert replies == ["echo: rate:1 r"]
    assert api.times[1] - api.times[0] >= 0.38  # Retry-After: 0.4, while the backoff alone is ~0.01
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))) <= 31


def test_backoff_is_exponential_with_jitter_and_capped():
    import random

    policy, rng = RetryPolicy(base_delay=1.0, max_delay=5.0), random.Random(0)
    for retry, (low, high) in enumerate([(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.5, 5.0), (2.5, 5.0)], 1):
        assert low <= policy.delay(retry, None, rng) <= high
    assert policy.delay(1, 30.0, rng) == 30.0
    assert RetryPolicy(max_retry_after=10).delay(1, 1e6, rng) == 10


def test_api_key_is_sent_but_never_stored_or_shown(api, tmp_path, monkeypatch):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("RANKGRPO_TEST_KEY", secret)
    teacher = CachedTeacher(openai_teacher(api), tmp_path / "cache.jsonl")
    replies = teacher.chat_many([user("hello"), user("always500")])
    teacher.close()
    assert api.auth_headers[0] == f"Bearer {secret}"
    visible = [repr(teacher), json.dumps(teacher.identity()), str(replies), (tmp_path / "cache.jsonl").read_text()]
    assert not any(secret in text for text in visible)
    monkeypatch.delenv("RANKGRPO_TEST_KEY")
    openai_teacher(api).chat(user("no key"))
    assert api.auth_headers[-1] is None  # unset variable: no header (local servers need none)


# ----------------------------------------------------------------------------- cache and resume


def test_cache_second_run_makes_zero_requests_and_failures_are_retried(api, tmp_path):
    path = tmp_path / "teacher.jsonl"
    prompts = [user(f"q{i}") for i in range(6)] + [user("always500")]
    first = CachedTeacher(openai_teacher(api, retry=RetryPolicy(max_attempts=2, base_delay=0.01)), path)
    replies = first.chat_many(prompts)
    first.close()
    n_first = len(api.requests)
    assert n_first == 6 + 2 and isinstance(replies[-1], TeacherFailure)
    second = CachedTeacher(openai_teacher(api, retry=RetryPolicy(max_attempts=2, base_delay=0.01)), path)
    assert len(second.cache) == 6
    again = second.chat_many(prompts[:6])
    assert again == replies[:6] and len(api.requests) == n_first  # zero requests
    assert (second.hits, second.misses) == (6, 0)
    second.chat_many(prompts)  # the failed request is tried again, the others are not
    assert len(api.requests) == n_first + 2 and api.requests[-1] == "always500"


def test_cache_key_covers_model_params_and_messages():
    ident = {"backend": "openai", "model": "m", "params": {"temperature": 0.0}}
    key = request_key(ident, user("a"))
    assert key == request_key(dict(ident), [{"role": "user", "content": "a", "name": "ignored"}])
    assert key != request_key({**ident, "model": "m2"}, user("a"))
    assert key != request_key({**ident, "params": {"temperature": 1.0}}, user("a"))
    assert key != request_key(ident, user("b"))


def test_cached_reply_that_fails_validation_is_requested_again(api, tmp_path):
    path = tmp_path / "t.jsonl"
    teacher = CachedTeacher(openai_teacher(api), path)
    teacher.chat_many([user("junk:1 z")])  # no validator: the junk reply is cached
    assert teacher.chat_many([user("junk:1 z")], validate=echo_or_junk) == ["echo: junk:1 z"]
    assert api.counts["junk:1 z"] == 2


def test_reply_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ReplyCache(path)
    cache.put("k1", "one")
    cache.close()
    with open(path, "a") as f:
        f.write('{"key": "k2", "reply": "tw')  # a write cut short
    cache = ReplyCache(path)
    assert cache.replies == {"k1": "one"} and cache.n_skipped == 1
    cache.put("k3", "three")
    cache.close()
    assert ReplyCache(path).replies == {"k1": "one", "k3": "three"}


CHILD = """
import sys
from rankgrpo.demos.teacher import CachedTeacher, OpenAITeacher, RetryPolicy
teacher = CachedTeacher(OpenAITeacher("teacher-model", sys.argv[1], api_key_env=None, timeout=30, concurrency=1,
                                      retry=RetryPolicy(max_attempts=2, base_delay=0.01)), sys.argv[2])
teacher.chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(10)])
"""


def test_a_killed_run_resumes_and_requests_only_the_missing_replies(api, tmp_path):
    path = tmp_path / "teacher.jsonl"
    api.hang_at = 5  # the 5th request (q4) never returns; the run is killed while waiting
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, api.url, str(path)], env=env)
    try:
        assert api.hung.wait(timeout=60), "the child never reached the 5th request"
    finally:
        child.kill()
        child.wait(timeout=30)
    api.hang_at = None
    assert api.requests == [f"q{i}" for i in range(5)]
    teacher = CachedTeacher(openai_teacher(api), path)
    replies = teacher.chat_many([user(f"q{i}") for i in range(10)])
    assert replies == [f"echo: q{i}" for i in range(10)]
    assert sorted(api.requests[5:]) == sorted(f"q{i}" for i in range(4, 10))  # only the missing ones
    assert teacher.hits == 4


# ----------------------------------------------------------------------------- other backends


class FlakySimulator:
    """A chat object that raises on its first call and returns nonsense on its second."""

    def __init__(self):
        self.calls = 0

    def chat(self, messages):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("simulated crash")
        if self.calls == 2:
            return "   "
        return "Heat (1995)"


def test_chat_teacher_wraps_any_chat_object_with_retries():
    sim = FlakySimulator()
    teacher = sandbox_teacher(sim, name="sandbox:seed=0")  # wraps without importing the sandbox
    assert teacher.chat_many([user("x")]) == ["Heat (1995)"] and sim.calls == 3
    failure = ChatTeacher(FlakySimulator(), "s", RetryPolicy(max_attempts=2, base_delay=0)).chat_many([user("x")])[0]
    assert isinstance(failure, TeacherFailure) and failure.reason == "empty reply" and failure.attempts == 2
    assert teacher.identity() == {"backend": "chat", "name": "sandbox:seed=0"}
    with pytest.raises(ValueError):
        make_teacher("carrier-pigeon")


def test_sandbox_teacher_configs_enter_the_cache_key():
    from rankgrpo import sandbox
    from rankgrpo.catalog import Catalog, CatalogItem

    world = sandbox.World(sandbox.SandboxConfig(n_films=200), Catalog([CatalogItem("Heat", 1995)]))
    keys = {request_key(sandbox_teacher(world=world, **opts).identity(), user("x"))
            for opts in ({}, {"seed": 1}, {"ooc_rate": 0.1})}
    assert len(keys) == 3


def test_on_reply_reports_every_request_once(api):
    seen = []
    openai_teacher(api).chat_many([user(f"p{i}") for i in range(8)] + [user("auth401")],
                                  on_reply=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(9))


class ByteTokenizer:
    """Just enough tokenizer for HFTeacher: bytes as ids, a trivial chat template, eos = 0."""

    eos_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return {"input_ids": [b % 255 + 1 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 1 for i in ids if i != 0).decode("latin-1")


@pytest.fixture
def one_thread():
    """A tiny model: extra threads only add overhead (a lot of it on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hf_teacher_generates_batched_and_greedy(one_thread):
    from rankgrpo.demos.teacher import HFTeacher
    from rankgrpo.models import tiny_model

    model = tiny_model("qwen2", vocab_size=256, initializer_range=0.5)
    teacher = HFTeacher(model, ByteTokenizer(), "tiny", max_new_tokens=6, batch_size=2)
    batch = [user("a"), user("bb"), user("ccc")]
    replies = teacher.chat_many(batch)
    assert all(isinstance(r, str) and 0 < len(r) <= 6 for r in replies)
    assert teacher.chat_many(batch) == replies  # greedy: deterministic
    assert teacher.chat(batch[1]) == replies[1]  # batching does not change a reply
    failures = teacher.chat_many(batch, validate=lambda r: "never good")
    assert all(isinstance(f, TeacherFailure) and f.attempts == 1 for f in failures)  # greedy: no retry
