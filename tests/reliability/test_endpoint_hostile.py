"""The endpoint client against a hostile local server (stdlib ``http.server`` on 127.0.0.1): 500s, a
silent server, one dripping bytes, truncated and non-HTTP replies, resets, redirects to another
port, a 5 MB answer. Each must end within the deadline as one clear ``EndpointError``, never leak the
key elsewhere and never turn the POST into a GET. Every server loop is bounded."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rizzearch.rag.endpoint import MAX_RESPONSE_BYTES, EndpointError, EndpointGenerator

KEY = "sk-test-do-not-leak"
MSGS = [{"role": "user", "content": "What is hearsay?"}]


def reply(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


class Hostile(BaseHTTPRequestHandler):
    """Behaviour from the first path segment (``/MODE/v1/chat/completions``); every request is logged."""

    log: list = []
    calls: dict = {}
    other_port = 0  # the second server, where redirects point
    stop = threading.Event()

    def log_message(self, *a):
        pass

    def _record(self, method: str) -> str:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        mode = self.path.strip("/").split("/")[0]
        Hostile.log.append({"port": self.server.server_address[1], "method": method, "path": self.path,
                            "auth": self.headers.get("Authorization"), "body": body})
        Hostile.calls[mode] = Hostile.calls.get(mode, 0) + 1
        return mode

    def do_GET(self):
        self._record("GET")
        self._send(200, reply("a GET was answered"))

    def do_POST(self):
        mode = self._record("POST")
        try:
            getattr(self, "m_" + mode, self.m_ok)()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: that is the point
            pass

    def _send(self, code: int, data: bytes, headers: dict | None = None):
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def m_ok(self):
        self._send(200, reply(f"fine from port {self.server.server_address[1]}"))

    def m_e500(self):
        self._send(500, b'{"error": "overloaded"}')

    def m_hang(self):
        Hostile.stop.wait(5.0)

    def m_drip(self):  # honest headers, then one byte every 50 ms: 20 s for the body
        data = reply("x" * 300)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        for b in data[:400]:
            if Hostile.stop.wait(0.05):
                return
            self.wfile.write(bytes([b]))
            self.wfile.flush()

    def m_driphead(self):  # the status line and headers themselves, one byte every 50 ms
        for b in (b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 200)[:400]:
            if Hostile.stop.wait(0.05):
                return
            self.wfile.write(bytes([b]))
            self.wfile.flush()

    def m_truncate(self):  # announces 500 bytes, sends 20, closes
        self.send_response(200)
        self.send_header("Content-Length", "500")
        self.end_headers()
        self.wfile.write(reply("cut")[:20])

    def m_chunkcut(self):  # a chunked body that stops mid-stream
        self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"choices\": [{\"m\r\n")

    def m_nothttp(self):
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")

    def m_reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def m_notjson(self):
        self._send(200, b"<html>\n<body>gateway says hi</body>\n</html>")

    def m_redirect302(self):
        self._send(302, b"", {"Location": f"http://127.0.0.1:{Hostile.other_port}/ok/v1/chat/completions"})

    def m_redirect307(self):  # keeps the method, but to another port: another origin
        self._send(307, b"", {"Location": f"http://127.0.0.1:{Hostile.other_port}/ok/v1/chat/completions"})

    def m_redirectsame(self):  # same origin, method-preserving: followed
        self._send(308, b"", {"Location": "/ok/v1/chat/completions"})

    def m_big(self):  # 5 MB with an honest Content-Length
        self._send(200, reply("z" * (5 << 20)))

    def m_bignolen(self):  # 5 MB with no length: read until close
        self.send_response(200)
        self.end_headers()
        data = reply("z" * (5 << 20))
        for i in range(0, len(data), 1 << 16):
            self.wfile.write(data[i:i + (1 << 16)])

    def m_flaky(self):  # truncated on the first call, fine after
        return self.m_truncate() if Hostile.calls["flaky"] == 1 else self.m_ok()


def _serve():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def servers():
    """(main port, other port): two hostile servers on 127.0.0.1."""
    Hostile.stop.clear()
    a, b = _serve(), _serve()
    Hostile.other_port = b.server_address[1]
    yield a.server_address[1], b.server_address[1]
    Hostile.stop.set()
    for s in (a, b):
        s.shutdown()
        s.server_close()


@pytest.fixture(autouse=True)
def _fresh_log():
    Hostile.log.clear()
    Hostile.calls.clear()


def client(port: int, mode: str, **kw) -> EndpointGenerator:
    kw = {"api_key": KEY, "timeout": 0.5, "retries": 1, "backoff": 0.05, **kw}
    return EndpointGenerator(f"http://127.0.0.1:{port}/{mode}/v1", model="m", **kw)


def fails(g: EndpointGenerator, match: str, within: float) -> str:
    """Assert ``g.chat`` raises EndpointError matching ``match`` within ``within`` seconds; the message."""
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=match) as e:
        g.chat(MSGS)
    took = time.monotonic() - t0
    assert took < within, f"took {took:.2f}s"
    msg = str(e.value)
    assert "\n" not in msg and KEY not in msg
    return msg


@pytest.mark.parametrize("mode", ["hang", "drip", "driphead"])
def test_endpoint_timeout_is_a_deadline(servers, mode):
    # 2 attempts x 0.5 s + 0.05 s backoff; before, a dripping server held the request for its whole body (20 s)
    msg = fails(client(servers[0], mode), r"timed out.*0\.5s deadline.*after 2 attempt", within=3.0)
    assert "deadline" in msg and Hostile.calls[mode] == 2


@pytest.mark.parametrize("mode, match", [
    ("truncate", r"truncated response \(20 bytes received, 480 more announced\)"),
    ("chunkcut", r"truncated response"),
    ("nothttp", r"not an HTTP reply .*SSH-2\.0"),
    ("reset", r"connection (reset|closed without a reply)"),
    ("e500", r"HTTP 500"),
    ("notjson", r"malformed response, not JSON"),
])
def test_endpoint_broken_replies_are_retried_then_one_clear_error(servers, mode, match):
    fails(client(servers[0], mode, retries=2), match + r".*after 3 attempt", within=5.0)
    assert Hostile.calls[mode] == 3  # each retried


def test_endpoint_truncated_once_then_fine(servers):
    assert client(servers[0], "flaky").chat(MSGS).startswith("fine")
    assert Hostile.calls["flaky"] == 2


@pytest.mark.parametrize("mode", ["redirect302", "redirect307"])
def test_endpoint_redirect_to_another_port_is_not_followed(servers, mode):
    main, other = servers
    msg = fails(client(main, mode, retries=2), rf"HTTP 30[27] redirect to http://127\.0\.0\.1:{other}/.*not followed", 3.0)
    assert "API key" in msg
    assert Hostile.calls[mode] == 1  # a redirect is not retried either
    assert [e for e in Hostile.log if e["port"] == other] == []  # nothing reached the other port: no key, no GET
    assert all(e["method"] == "POST" for e in Hostile.log)


def test_endpoint_same_origin_308_keeps_method_body_and_key(servers):
    main, _ = servers
    assert client(main, "redirectsame").chat(MSGS) == f"fine from port {main}"
    first, second = Hostile.log
    assert second["method"] == "POST" and second["path"] == "/ok/v1/chat/completions"
    assert second["auth"] == f"Bearer {KEY}" and second["body"] == first["body"] and second["port"] == main


@pytest.mark.parametrize("mode", ["big", "bignolen"])
def test_endpoint_response_size_is_capped(servers, mode):
    msg = fails(client(servers[0], mode, timeout=5.0), rf"over the {MAX_RESPONSE_BYTES}-byte limit", within=5.0)
    assert "max_response_bytes" in msg and Hostile.calls[mode] == 1  # not retried
    small = client(servers[0], "ok", max_response_bytes=40)
    with pytest.raises(EndpointError, match="over the 40-byte limit"):
        small.chat(MSGS)


def test_endpoint_refuses_credentials_in_the_url():
    from rizzearch.errors import ConfigError

    with pytest.raises(ConfigError, match="must not contain credentials") as e:
        EndpointGenerator(f"http://user:{KEY}@127.0.0.1:9/v1")
    assert KEY not in str(e.value)
    with pytest.raises(ConfigError, match="timeout > 0"):
        EndpointGenerator("http://127.0.0.1:9/v1", timeout=0)


def test_endpoint_json_without_an_answer_is_one_clear_line(servers):
    g = client(servers[0], "ok")
    assert g._parse(reply("a")) == "a"
    with pytest.raises(EndpointError, match=r"no choices\[0\]\.message\.content in \[1, 2\]"):
        g._parse(b"[1, 2]")
    with pytest.raises(EndpointError, match="server error: boom"):
        g._parse(b'{"error": "boom\\nagain"}')


def test_endpoint_deadline_covers_a_server_that_never_accepts():
    """A listening socket whose accept queue is full: the connection never gets going."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    try:
        for _ in range(3):  # fill the (tiny) accept queue; nobody ever accepts
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fill.append(c)
        fails(EndpointGenerator(f"http://127.0.0.1:{port}/v1", timeout=0.5, retries=1, backoff=0.05),
              r"timed out.*after 2 attempt", within=3.0)
    finally:
        for c in fill:
            c.close()
        srv.close()
