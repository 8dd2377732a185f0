"""Teachers: the black-box chat model that Remap-Reflect-Adjust queries (§2.2, App. A).

One small interface::

    teacher.chat(messages) -> str                        # one request; raises on failure
    teacher.chat_many(batch, validate=None, on_reply=None) -> list[str | TeacherFailure]

``chat_many`` never raises for a bad reply. Each request is retried (exponential backoff
with jitter, or the server's Retry-After) when the backend fails (HTTP error, timeout,
dropped connection, malformed or empty response) or when ``validate(reply)`` returns a
problem (garbage, a list with no parseable item, ...); after ``retry.max_attempts`` tries
it becomes a ``TeacherFailure`` that the caller counts and skips. ``on_reply(i, result)``
is called as soon as request ``i`` is settled (from a worker thread when requests run
concurrently), so progress can be saved as it happens.

Backends (``make_teacher(kind, ...)``):

* ``sandbox`` -- ``ChatTeacher`` around the simulated teacher of ``rankgrpo.sandbox``
  (imported only when asked for), or around any object with ``.chat(messages) -> str``.
* ``openai``  -- ``OpenAITeacher``: any OpenAI-compatible ``/chat/completions`` endpoint
  over plain ``urllib``; base URL, model and sampling parameters are options, the API key
  is read from the environment variable whose *name* is an option and is sent only in
  the Authorization header (never logged, stored, or part of the cache key). Requests run
  on a thread pool of ``concurrency`` workers.
* ``hf``      -- ``HFTeacher``: a local transformers causal LM, batched, greedy by
  default, through ``rankgrpo.sampling.sample`` (imported only when used).

``CachedTeacher(teacher, path)`` adds an on-disk cache to any backend: an append-only
JSONL file of ``{"key", "reply"}`` lines, the key being the SHA-256 of the backend's
identity (model and sampling parameters) and the messages. Only replies that passed
validation are stored, each as soon as it arrives (written and flushed, so a killed
process loses nothing; a torn last line from a power cut is skipped on load). A rerun
after a crash therefore requests only what is missing, and failed requests are tried
again.
"""
from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

Messages = list  # list[dict]: [{"role": "user", "content": "..."}]
Validator = Callable[[str], "str | None"]  # reply -> None if usable, else a short problem description
OnReply = Callable[[int, "str | TeacherFailure"], None]


class TeacherError(RuntimeError):
    """One failed request. ``retryable`` is False for errors a retry cannot fix (HTTP 400/401/403/404)."""

    def __init__(self, message: str, retryable: bool = True, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class TeacherFailure:
    """A request that still failed after its retries: why, and how many tries it took."""

    reason: str
    attempts: int


@dataclass
class RetryPolicy:
    """When and how long to retry a failed or invalid request.

    max_attempts:    tries per request, the first included (1 = never retry).
    base_delay:      seconds before the second try; doubles on every further try.
    max_delay:       cap of the exponential backoff.
    max_retry_after: cap on a server's Retry-After (seconds), which otherwise wins.
    The backoff is drawn uniformly from [d/2, d] ("equal jitter") so that many clients
    failing together do not retry together.
    """

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 600.0

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the second try)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        d = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return d * (0.5 + 0.5 * rng.random())


def normalize_messages(messages: Messages) -> list[dict]:
    """Only ``role`` and ``content`` of each message (what is sent and what is hashed)."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def request_key(identity: dict, messages: Messages) -> str:
    """SHA-256 of the backend identity (model + sampling parameters) and the messages."""
    blob = json.dumps({"teacher": identity, "messages": normalize_messages(messages)},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- the interface


class Teacher:
    """Base class: subclasses implement ``chat`` (one request) and ``identity``.

    ``chat_many`` runs the requests (sequentially, or on ``concurrency`` threads) with
    retries and validation, and returns one ``str | TeacherFailure`` per request.
    """

    def __init__(self, retry: RetryPolicy | None = None, concurrency: int = 1, seed: int = 0):
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, int(concurrency))
        self._rng = random.Random(seed)

    def identity(self) -> dict:
        """Everything that determines the replies (model, sampling parameters); part of the cache key."""
        raise NotImplementedError

    def chat(self, messages: Messages) -> str:
        raise NotImplementedError

    def chat_many(self, batch: Sequence[Messages], validate: Validator | None = None,
                  on_reply: OnReply | None = None) -> list[str | TeacherFailure]:
        """One reply or ``TeacherFailure`` per request of ``batch``, in order (see the module docstring)."""
        results: list = [None] * len(batch)
        lock = threading.Lock()

        def settle(i: int, result) -> None:
            with lock:
                results[i] = result
                if on_reply is not None:
                    on_reply(i, result)

        if self.concurrency == 1 or len(batch) <= 1:
            for i, messages in enumerate(batch):
                settle(i, self.chat_with_retries(messages, validate))
            return results
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self.chat_with_retries, m, validate): i for i, m in enumerate(batch)}
            for future in as_completed(futures):
                settle(futures[future], future.result())
        finally:  # on an interrupt, drop queued requests instead of sending them
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def chat_with_retries(self, messages: Messages, validate: Validator | None = None) -> str | TeacherFailure:
        """One request with the retry policy; a usable reply or a ``TeacherFailure``."""
        reason, retry_after = "no attempt", None
        attempt = 0
        for attempt in range(1, self.retry.max_attempts + 1):
            if attempt > 1:
                time.sleep(self.retry.delay(attempt - 1, retry_after, self._rng))
            retry_after = None
            try:
                reply = self.chat(messages)
            except TeacherError as e:
                reason, retry_after = str(e), e.retry_after
                if not e.retryable:
                    break
                continue
            except Exception as e:  # a backend bug or an unexpected library error: count it, do not crash
                reason = f"{type(e).__name__}: {e}"
                continue
            reason = _problem(reply, validate)
            if reason is None:
                return reply
        return TeacherFailure(reason=reason, attempts=attempt)


def _problem(reply: Any, validate: Validator | None) -> str | None:
    if not isinstance(reply, str) or not reply.strip():
        return "empty reply"
    if validate is not None:
        problem = validate(reply)
        if problem:
            return f"invalid reply: {problem}"
    return None


# ----------------------------------------------------------------------------- sandbox / any chat object


class ChatTeacher(Teacher):
    """Any object with ``.chat(messages) -> str``, e.g. the sandbox's simulated teacher.

    name:     identifies the replies in the cache key.
    settings: anything else that changes the replies (seeds, configs), also in the cache key.
    """

    def __init__(self, backend, name: str, retry: RetryPolicy | None = None, settings: dict | None = None):
        super().__init__(retry or RetryPolicy(max_attempts=3, base_delay=0.0))
        self.backend = backend
        self.name = name
        self.settings = settings or {}

    def identity(self) -> dict:
        return {"backend": "chat", "name": self.name, **({"settings": self.settings} if self.settings else {})}

    def chat(self, messages: Messages) -> str:
        return self.backend.chat(normalize_messages(messages))

    def __repr__(self) -> str:
        return f"ChatTeacher({self.name!r})"


def sandbox_teacher(sim=None, *, name: str = "sandbox", **kwargs) -> ChatTeacher:
    """The sandbox's simulated teacher as a ``Teacher``.

    Wraps ``sim`` if given, else builds ``rankgrpo.sandbox.SandboxTeacher(**kwargs)``
    (e.g. ``world=world, ooc_rate=0.3``; imported here, so the other backends never load
    the sandbox). The teacher's and the world's configs, when it has them, go into the
    cache key, so changing either never serves stale cached replies.
    """
    if sim is None:
        from rankgrpo.sandbox import SandboxTeacher

        sim = SandboxTeacher(**kwargs)
    settings = {}
    for label, obj in (("teacher", getattr(sim, "config", None)),
                       ("world", getattr(getattr(sim, "world", None), "config", None))):
        if dataclasses.is_dataclass(obj):
            settings[label] = dataclasses.asdict(obj)
    return ChatTeacher(sim, name=name, settings=settings)


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP


_RETRYABLE_STATUS = {408, 409, 425, 429}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAITeacher(Teacher):
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...), stdlib only.

    model:        the model name sent in each request.
    base_url:     the API root; requests go to ``{base_url}/chat/completions``.
    api_key_env:  NAME of the environment variable holding the API key. If it is unset or
                  empty no Authorization header is sent (local servers need none).
    temperature:  sampling temperature (0: the most reproducible choice; the paper does not say).
    max_tokens:   reply budget; a judge reply rates ~100 candidates, so keep it >= 2048.
    extra_params: further request fields (e.g. {"top_p": 1, "seed": 0}); part of the cache key.
    timeout:      seconds per HTTP request (connect and each read).
    concurrency:  requests in flight at once (thread pool).
    retry:        the ``RetryPolicy``.
    """

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", *,
                 api_key_env: str | None = "OPENAI_API_KEY", temperature: float = 0.0, max_tokens: int = 2048,
                 extra_params: dict | None = None, timeout: float = 120.0, concurrency: int = 8,
                 retry: RetryPolicy | None = None, seed: int = 0):
        super().__init__(retry, concurrency, seed)
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.params = {"temperature": temperature, "max_tokens": max_tokens, **(extra_params or {})}
        self.timeout = timeout
        self.n_requests = 0  # HTTP requests sent (for progress reports)
        self._count_lock = threading.Lock()

    def identity(self) -> dict:
        return {"backend": "openai", "model": self.model, "params": self.params}

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAITeacher(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def chat(self, messages: Messages) -> str:
        """One POST; raises ``TeacherError`` (retryable or not) on any failure."""
        body = {"model": self.model, "messages": normalize_messages(messages), **self.params}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                         headers=self._headers(), method="POST")
        with self._count_lock:
            self.n_requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            retryable = e.code in _RETRYABLE_STATUS or e.code >= 500
            raise TeacherError(f"HTTP {e.code} from {self.url}", retryable,
                               parse_retry_after(e.headers.get("Retry-After") if e.headers else None)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # includes timeouts
            reason = getattr(e, "reason", e)
            raise TeacherError(f"{type(e).__name__} ({reason}) from {self.url}") from None
        return reply_content(raw)


def reply_content(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions response body, or a retryable ``TeacherError``."""
    try:
        payload = json.loads(raw.decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TeacherError(f"malformed response (not JSON, {len(raw)} bytes)") from None
    except (KeyError, IndexError, TypeError):
        raise TeacherError("malformed response (no choices[0].message.content)") from None
    if not isinstance(content, str) or not content.strip():
        raise TeacherError("empty reply")
    return content


# ----------------------------------------------------------------------------- local transformers model


class HFTeacher(Teacher):
    """A local causal LM as the teacher, through our own sampler (``rankgrpo.sampling.sample``).

    Requests are rendered with the tokenizer's chat template and generated ``batch_size``
    at a time. Greedy by default (deterministic, so an invalid reply is not retried);
    with ``greedy=False`` invalid replies are sampled again up to ``retry.max_attempts``.
    """

    def __init__(self, model, tokenizer, name: str, *, max_new_tokens: int = 1024, batch_size: int = 8,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 retry: RetryPolicy | None = None):
        super().__init__(retry or RetryPolicy(max_attempts=3, base_delay=0.0), 1, seed)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.greedy, self.temperature, self.top_p, self.seed = greedy, temperature, top_p, seed

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: str = "float32", **kwargs) -> "HFTeacher":
        from rankgrpo.models import load_model, load_tokenizer

        return cls(load_model(path, dtype=dtype, device=device), load_tokenizer(path), name=str(path), **kwargs)

    def identity(self) -> dict:
        sampling = {"greedy": True} if self.greedy else {"temperature": self.temperature, "top_p": self.top_p}
        return {"backend": "hf", "name": self.name, "max_new_tokens": self.max_new_tokens, **sampling}

    def __repr__(self) -> str:
        return f"HFTeacher({self.name!r})"

    def _eos_ids(self) -> list[int]:
        """The tokenizer's and generation config's eos ids and the chat template's end-of-turn token."""
        from rankgrpo.models import end_of_turn_ids

        ids = list(end_of_turn_ids(self.tokenizer))
        for value in (getattr(self.tokenizer, "eos_token_id", None),
                      getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            ids += value if isinstance(value, (list, tuple)) else [value]
        ids = sorted({int(i) for i in ids if i is not None})
        if not ids:
            raise ValueError("the tokenizer and model define no eos token id")
        return ids

    def generate(self, batch: Sequence[Messages]) -> list[str]:
        """Replies for ``batch``, ``batch_size`` prompts per call of the sampler."""
        import torch

        from rankgrpo.data import chat_prompt_ids
        from rankgrpo.sampling import sample

        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        out = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            prompts = [chat_prompt_ids(self.tokenizer, normalize_messages(m)) for m in chunk]
            with torch.no_grad():
                rollout = sample(self.model, prompts, group_size=1, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, top_p=self.top_p, greedy=self.greedy,
                                 eos_token_ids=self._eos_ids(), generator=generator)
            for row in range(rollout.num_rows):
                ids = rollout.completion_ids[row, : int(rollout.lengths[row])].tolist()
                out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def chat(self, messages: Messages) -> str:
        return self.generate([messages])[0]

    def chat_many(self, batch: Sequence[Messages], validate: Validator | None = None,
                  on_reply: OnReply | None = None) -> list[str | TeacherFailure]:
        results: list = [None] * len(batch)
        todo = list(range(len(batch)))
        attempts = 1 if self.greedy else self.retry.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                replies: list = self.generate([batch[i] for i in todo])
            except Exception as e:  # e.g. out of memory: every request of this round fails
                replies = [TeacherError(f"{type(e).__name__}: {e}")] * len(todo)
            retry = []
            for i, reply in zip(todo, replies):
                problem = str(reply) if isinstance(reply, Exception) else _problem(reply, validate)
                results[i] = reply if problem is None else TeacherFailure(problem, attempt)
                if problem is None or attempt == attempts:
                    if on_reply is not None:
                        on_reply(i, results[i])
                else:
                    retry.append(i)
            todo = retry
            if not todo:
                break
        return results


# ----------------------------------------------------------------------------- the cache


class ReplyCache:
    """Append-only JSONL of ``{"key": ..., "reply": ...}``; the last line for a key wins.

    Malformed lines (a torn last line after a power cut, or manual edits) are skipped and
    counted in ``n_skipped``. Appends are thread-safe, flushed line by line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        self.n_skipped = 0
        self._lock = threading.Lock()
        self._file = None
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.replies[row["key"]] = row["reply"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.n_skipped += line.strip() != ""

    def __len__(self) -> int:
        return len(self.replies)

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torn = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
                self._file = open(self.path, "a", encoding="utf-8")
                if torn:  # start on a fresh line after a torn one
                    self._file.write("\n")
            self._file.write(line)
            self._file.flush()
            self.replies[key] = reply

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class CachedTeacher(Teacher):
    """Any teacher with the on-disk reply cache of the module docstring.

    A cached reply is reused when it still passes ``validate``; everything else is sent
    to the wrapped teacher, and its usable replies are stored the moment they arrive.
    ``hits`` and ``misses`` count requests answered from the cache and sent on.
    """

    def __init__(self, teacher: Teacher, path: str | Path):
        super().__init__(teacher.retry, teacher.concurrency)
        self.teacher = teacher
        self.cache = ReplyCache(path)
        self.hits = 0
        self.misses = 0

    def identity(self) -> dict:
        return self.teacher.identity()

    def key(self, messages: Messages) -> str:
        return request_key(self.identity(), messages)

    def __repr__(self) -> str:
        return f"CachedTeacher({self.teacher!r}, {str(self.cache.path)!r})"

    def chat(self, messages: Messages) -> str:
        key = self.key(messages)
        reply = self.cache.get(key)
        if reply is None:
            reply = self.teacher.chat(messages)
            self.cache.put(key, reply)
        return reply

    def chat_many(self, batch: Sequence[Messages], validate: Validator | None = None,
                  on_reply: OnReply | None = None) -> list[str | TeacherFailure]:
        keys = [self.key(m) for m in batch]
        results: list = [None] * len(batch)
        missing = []
        for i, key in enumerate(keys):
            reply = self.cache.get(key)
            if reply is not None and _problem(reply, validate) is None:
                results[i] = reply
                self.hits += 1
                if on_reply is not None:
                    on_reply(i, reply)
            else:
                missing.append(i)
        self.misses += len(missing)

        def store(j: int, result) -> None:
            i = missing[j]
            if isinstance(result, str):
                self.cache.put(keys[i], result)
            results[i] = result
            if on_reply is not None:
                on_reply(i, result)

        self.teacher.chat_many([batch[i] for i in missing], validate, store)
        return results

    def close(self) -> None:
        self.cache.close()


# ----------------------------------------------------------------------------- factory


def make_teacher(kind: str, *, cache_path: str | Path | None = None, **options) -> Teacher:
    """``"sandbox"`` | ``"openai"`` | ``"hf"`` -> a teacher, cached at ``cache_path`` if given.

    options go to ``sandbox_teacher``, ``OpenAITeacher`` or ``HFTeacher.from_pretrained``
    (``path=...``) respectively.
    """
    if kind == "sandbox":
        teacher: Teacher = sandbox_teacher(**options)
    elif kind == "openai":
        teacher = OpenAITeacher(**options)
    elif kind == "hf":
        teacher = HFTeacher.from_pretrained(**options)
    else:
        raise ValueError(f"unknown teacher {kind!r} (use 'sandbox', 'openai' or 'hf')")
    return CachedTeacher(teacher, cache_path) if cache_path is not None else teacher
