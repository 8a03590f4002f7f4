"""A client for OpenAI-compatible ``/chat/completions`` servers (llama.cpp, vLLM, Ollama, a hosted API)
that a slow, broken or hostile server cannot hang, flood or trick into leaking the key.

What it guarantees (tested against a local server in ``tests/reliability/test_endpoint_*.py``):

* **Deadline.** ``timeout`` bounds each attempt as a whole: connecting, sending, the status line,
  the headers and the body. Every socket read waits at most for the time left before the deadline
  (``time.monotonic``), and the body is read in chunks of at most 16 KiB, so a server dripping one
  byte at a time is cut off at the deadline like one that says nothing. A call takes at most
  ``(retries + 1) * timeout`` plus the backoff waits.
* **Retries.** Timeouts, refused or reset connections, replies that are not HTTP, truncated bodies
  (fewer bytes than Content-Length, or a cut chunked stream), bodies that are not JSON, 429 and 5xx
  are retried ``retries`` times with exponential backoff; then ``EndpointError`` says what went wrong
  the last time. Other 4xx and well-formed JSON without an answer are not retried.
* **No credential forwarding.** Redirects are not followed, except 307/308 to the same scheme, host
  and port (which keep the method and the body), at most 3 in a row. Any other redirect is an error
  naming where it pointed; nothing (in particular not the ``Authorization`` header) is sent there,
  and a POST never becomes a GET. Credentials inside the URL (``http://user:key@host``) are refused:
  they would be written into every error message; use ``api_key`` / ``RIZZ_LLM_API_KEY``.
* **Size cap.** A response body over ``max_response_bytes`` (default ``MAX_RESPONSE_BYTES``, 1 MiB) is
  an error, found from Content-Length before reading or by counting while reading.

No proxy is used (``http_proxy`` and friends are ignored): the server is contacted directly.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import time
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urljoin, urlsplit

from rizzearch.errors import ConfigError, RizzError

if TYPE_CHECKING:
    from rizzearch.rag.generators import GenerationRequest

MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB: a chat answer is a few KiB; anything far bigger is a broken or hostile server
MAX_REDIRECTS = 3
CHUNK = 16384  # bytes per read of the body


class EndpointError(RizzError):
    """The chat endpoint is unreachable, timed out, refused the request or answered something malformed."""


class _Final(Exception):
    """A failure that retrying cannot fix (a redirect elsewhere, a response over the size cap)."""


class _NotJSON(Exception):
    """A 2xx body that is not JSON (perhaps cut short by a server that sent no length): retried."""


class _Reply(NamedTuple):
    status: int
    reason: str
    location: str | None
    body: bytes


# --------------------------------------------------------------------------------------------
# Sockets whose reads stop at a deadline
# --------------------------------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """Raw reads from ``sock`` that never wait past ``deadline`` (``time.monotonic()`` seconds)."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _DeadlineSocket:
    """A connected socket whose ``sendall`` and ``makefile`` (what ``http.client`` reads the response from)
    obey a deadline.

    ``close`` does nothing: ``http.client`` closes the connection's socket while the response is still
    being read (a real socket defers that until its files close); ``_post`` closes the real one at the end.
    """

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self.deadline = sock, deadline

    def close(self) -> None:
        pass

    def sendall(self, data) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(left)
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self.deadline))

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin: after connecting (and the TLS handshake), reads go through ``_DeadlineSocket``."""

    deadline = 0.0
    raw_sock = None

    def connect(self):
        super().connect()
        self.raw_sock = self.sock
        self.sock = _DeadlineSocket(self.sock, self.deadline)


class _HTTP(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPS(_DeadlineConnection, http.client.HTTPSConnection):
    pass


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme.lower(), (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme.lower())


def _read_body(resp: http.client.HTTPResponse, cap: int, deadline: float, keep_excess: bool) -> bytes:
    """The body, read in chunks until the deadline; over ``cap`` bytes: cut there (``keep_excess``) or _Final."""
    length = resp.getheader("Content-Length")
    if not keep_excess and length and length.strip().isdigit() and int(length) > cap:
        raise _Final(f"response of {int(length)} bytes is over the {cap}-byte limit (max_response_bytes); not read")
    buf = bytearray()
    while True:
        if time.monotonic() >= deadline:
            raise TimeoutError("deadline passed")
        chunk = resp.read1(CHUNK)
        if not chunk:
            break
        buf += chunk
        if len(buf) > cap:
            if keep_excess:
                return bytes(buf[:cap])
            raise _Final(f"response is over the {cap}-byte limit (max_response_bytes); stopped reading")
    if resp.length:  # the server closed before sending all of Content-Length
        raise http.client.IncompleteRead(bytes(buf), resp.length)
    return bytes(buf)


def _describe(e: BaseException, timeout: float) -> str:
    """One line saying what a network failure was."""
    if isinstance(e, TimeoutError):
        return f"timed out: no complete answer within the {timeout}s deadline"
    if isinstance(e, http.client.IncompleteRead):
        return f"truncated response ({len(e.partial)} bytes received, {e.expected} more announced)"
    if isinstance(e, http.client.RemoteDisconnected):
        return "connection closed without a reply"
    if isinstance(e, http.client.BadStatusLine):
        return f"not an HTTP reply (status line {str(e.args[0] if e.args else e)[:80]!r})"
    if isinstance(e, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(e, http.client.HTTPException):
        return f"broken HTTP reply ({type(e).__name__}: {str(e)[:80]})"
    if isinstance(e, socket.gaierror):
        return f"unreachable (cannot resolve the host name: {e.strerror or e})"
    return f"unreachable ({e.strerror or e})" if isinstance(e, OSError) else f"failed ({type(e).__name__}: {e})"


def _one_line(text: str, n: int = 200) -> str:
    return " ".join(text.split())[:n]


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class EndpointGenerator:
    """Client for an OpenAI-compatible chat completions endpoint.

    Args:
        base_url: server root including ``/v1`` (``http://127.0.0.1:8080/v1``); default from
            ``RIZZ_LLM_BASE_URL`` or ``OPENAI_BASE_URL``.
        model: model name sent in the request; default ``RIZZ_LLM_MODEL`` / ``OPENAI_MODEL`` or ``default``.
        api_key: bearer token (optional); default ``RIZZ_LLM_API_KEY`` / ``OPENAI_API_KEY``.
        timeout: deadline in seconds for each attempt as a whole (connect, send, headers and body).
        retries: extra attempts after a timeout, a connection or protocol failure, a non-JSON body, 429 or 5xx.
        backoff: first wait between attempts in seconds (doubled each time).
        temperature: sampling temperature sent to the server.
        max_tokens: completion length limit sent to the server.
        max_response_bytes: longest response body accepted (default 1 MiB).
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 0.5, temperature: float = 0.0,
                 max_tokens: int = 512, max_response_bytes: int = MAX_RESPONSE_BYTES):
        base_url = base_url or _env("RIZZ_LLM_BASE_URL", "OPENAI_BASE_URL")
        if not base_url:
            raise ConfigError("no endpoint: pass base_url (e.g. http://127.0.0.1:8080/v1) or set RIZZ_LLM_BASE_URL")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        parts = urlsplit(base_url)
        if parts.username is not None or parts.password is not None:
            raise ConfigError("base_url must not contain credentials (user:key@host); pass the key as api_key "
                              "or set RIZZ_LLM_API_KEY")
        if not parts.hostname:
            raise ConfigError(f"base_url has no host name: {base_url!r}")
        if retries < 0 or not timeout > 0 or backoff < 0 or max_response_bytes < 1:
            raise ConfigError(f"need retries >= 0, timeout > 0, backoff >= 0 and max_response_bytes >= 1, got "
                              f"retries={retries}, timeout={timeout}, backoff={backoff}, max_response_bytes={max_response_bytes}")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model or _env("RIZZ_LLM_MODEL", "OPENAI_MODEL") or "default"
        self.api_key = api_key or _env("RIZZ_LLM_API_KEY", "OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff = float(timeout), retries, backoff
        self.temperature, self.max_tokens, self.max_response_bytes = temperature, max_tokens, max_response_bytes
        self.name = f"endpoint:{self.model}"

    def settings(self) -> dict:
        """What decides this generator's answers (for keying saved answers; never the key)."""
        return {"url": self.url, "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _post(self, url: str, data: bytes, headers: dict, deadline: float) -> _Reply:
        """One POST to ``url``: its status, reason, Location and body (capped), all before ``deadline``."""
        p = urlsplit(url)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        conn = (_HTTPS if p.scheme == "https" else _HTTP)(p.hostname, p.port, timeout=left)
        conn.deadline = deadline
        try:
            conn.request("POST", (p.path or "/") + (f"?{p.query}" if p.query else ""), body=data, headers=headers)
            resp = conn.getresponse()
            ok = 200 <= resp.status < 300
            body = _read_body(resp, self.max_response_bytes if ok else 4096, deadline, keep_excess=not ok)
            return _Reply(resp.status, resp.reason, resp.getheader("Location"), body)
        finally:
            conn.close()
            if conn.raw_sock is not None:
                conn.raw_sock.close()

    def _request(self, data: bytes, headers: dict) -> _Reply:
        """POST to the endpoint within one deadline, following only same-origin 307/308 redirects."""
        deadline = time.monotonic() + self.timeout
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            reply = self._post(url, data, headers, deadline)
            if reply.status not in (301, 302, 303, 307, 308):
                return reply
            target = urljoin(url, reply.location or "")
            if not reply.location:
                raise _Final(f"HTTP {reply.status} redirect without a Location header")
            if reply.status not in (307, 308) or _origin(target) != _origin(url):
                raise _Final(f"HTTP {reply.status} redirect to {_one_line(target, 120)} not followed (only 307/308 to "
                             "the same scheme, host and port are; nothing was sent there, the API key included)")
            url = target
        raise _Final(f"more than {MAX_REDIRECTS} redirects in a row")

    def chat(self, messages: list[dict], temperature: float | None = None, seed: int | None = None) -> str:
        """Send ``messages``; return the assistant's text. EndpointError on any failure."""
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature if temperature is None else temperature}
        if seed is not None:
            body["seed"] = seed
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._request(data, headers)
            except _Final as e:
                raise EndpointError(f"{self.url}: {e}") from None
            except (OSError, http.client.HTTPException) as e:  # timeouts, resets, refusals, truncation, not HTTP
                last = _describe(e, self.timeout)
                continue
            if 200 <= reply.status < 300:
                try:
                    return self._parse(reply.body)
                except _NotJSON as e:
                    last = str(e)
                    continue
            last = f"HTTP {reply.status} {reply.reason}: {_one_line(reply.body[:200].decode(errors='replace'))}"
            if reply.status == 429 or reply.status >= 500:
                continue
            raise EndpointError(f"{self.url}: {last}")
        raise EndpointError(f"{self.url}: {last} (after {self.retries + 1} attempt(s))")

    def _parse(self, raw: bytes) -> str:
        """The answer text of a 2xx reply. _NotJSON if it is not JSON, EndpointError if it holds no answer."""
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _NotJSON(f"malformed response, not JSON ({_one_line(str(e), 80)}): {raw[:120]!r}") from None
        if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
            raise EndpointError(f"{self.url}: server error: {_one_line(str(obj['error']))}")
        try:
            content = obj["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url}: malformed response, no choices[0].message.content in "
                                f"{_one_line(json.dumps(obj), 120)}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise EndpointError(f"{self.url}: malformed response, choices[0].message.content is "
                                f"{type(content).__name__}, not a string")
        return content.strip()

    def generate(self, request: GenerationRequest) -> str:
        return self.chat(request.messages)
