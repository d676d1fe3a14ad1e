"""The API client: what every answer means (classify), and real HTTP against a local server."""

from __future__ import annotations

import email.utils
import http.server
import importlib.util
import shutil
import socket
import ssl
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.errors import Permanent, Refused, Rejected, Transient, Unauthorized, UploadError
from worker.events import jsonutil
from worker.sandbox import Sandbox
from worker.upload.client import BODY_EXCERPT, ApiClient, classify, parse_retry_after

pytestmark = pytest.mark.timeout(30)

KEY = "test-api-key-7f3a9c1e-SECRET"
EVENTS = [
    {
        "activity_name": "Purchase",
        "asset_id": "asset-1",
        "timestamp": "2021-12-29T12:06:28Z",
        "activity_source": "web",
        "activity_params": {"amount": 10, "items": [{"sku": "a"}]},
        "identity": "someone@example.com",
    }
]
SUCCESS = '{"status": "success", "message": "ok"}'


# --- classify -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, SUCCESS),
        (200, '{"status":"success"}'),
        (200, '{"status":"Success"}'),
        (201, SUCCESS),
        (202, SUCCESS),
        (299, SUCCESS),
    ],
)
def test_2xx_success_is_delivered(status: int, body: str) -> None:
    assert classify(status, body) is None


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, "<html><body>Welcome to our proxy</body></html>"),
        (200, ""),
        (204, ""),
        (200, '{"status":"fail","message":"Invalid payload"}'),
        (200, '{"status":"error"}'),
        (200, "{}"),
        (200, "[]"),
        (200, '"success"'),
        (200, "null"),
        (200, "{not json"),
        (202, '{"message":"accepted"}'),
    ],
)
def test_2xx_without_success_is_transient(status: int, body: str) -> None:
    with pytest.raises(Transient) as info:
        classify(status, body)
    assert info.value.status == status
    assert info.value.body == body[:BODY_EXCERPT]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, Rejected),
        (401, Unauthorized),
        (403, Refused),
        (404, Refused),
        (405, Refused),
        (413, Refused),
        (422, Refused),
    ],
)
def test_permanent_statuses(status: int, reason: type[Permanent]) -> None:
    body = '{"status":"fail","message":"nope"}'
    with pytest.raises(Permanent) as info:
        classify(status, body, retry_after="30")
    assert type(info.value) is reason  # what to do: split, fix the key, or give up
    assert info.value.status == status
    assert info.value.body == body
    assert str(info.value)  # a sentence, not an empty message


def test_401_says_what_to_fix() -> None:
    with pytest.raises(Permanent) as info:
        classify(401, "")
    assert "NETCORE_API_KEY" in str(info.value)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_transient_statuses(status: int) -> None:
    with pytest.raises(Transient) as info:
        classify(status, "<html>busy</html>")
    assert info.value.status == status
    assert info.value.retry_after is None
    assert info.value.body == "<html>busy</html>"


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), (" 5 ", 5.0), ("0", 0.0)])
def test_retry_after_seconds(status: int, header: str, seconds: float) -> None:
    with pytest.raises(Transient) as info:
        classify(status, "", header)
    assert info.value.retry_after == seconds


def test_retry_after_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    with pytest.raises(Transient) as info:
        classify(503, "", email.utils.format_datetime(when, usegmt=True))
    assert info.value.retry_after is not None
    assert 100.0 <= info.value.retry_after <= 121.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:20:00 GMT", 0.0),  # in the past: no wait, not negative
        ("Wed, 21 Oct 2015 09:28:00 +0200", 60.0),
        ("30", 30.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 27, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(header, now=now) == expected


def test_unparseable_retry_after_is_ignored_not_fatal() -> None:
    with pytest.raises(Transient) as info:
        classify(429, "", "whenever")
    assert info.value.retry_after is None


def test_retry_after_with_a_non_decimal_digit_is_ignored() -> None:
    with pytest.raises(Transient) as info:
        classify(503, "", "\xb2")
    assert info.value.retry_after is None


def test_body_excerpt_is_bounded() -> None:
    body = "x" * 10_000
    for status in (200, 400, 503):
        with pytest.raises(UploadError) as info:
            classify(status, body)
        assert info.value.body == "x" * BODY_EXCERPT


# --- a local HTTP server ----------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class LocalServer:
    url: str
    release: threading.Event
    seen: list[Seen] = field(default_factory=list)
    answer: Callable[[Seen], Answer] = lambda seen: (200, {"Content-Type": "application/json"}, SUCCESS.encode())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client that timed out leaves a broken pipe behind, as expected."""


def _serve(ssl_context: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    state: dict[str, LocalServer] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            local = state["server"]
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            local.seen.append(seen)
            status, headers, body = local.answer(seen)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _Server(("127.0.0.1", 0), Handler)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    scheme = "https" if ssl_context is not None else "http"
    local = LocalServer(f"{scheme}://127.0.0.1:{httpd.server_port}/v1/activity/upload", threading.Event())
    state["server"] = local
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield local
    finally:
        local.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to the local servers must not go through a proxy named in the environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from _serve()


def client_for(url: str, *, timeout: float = 2.0, session: requests.Session | None = None) -> ApiClient:
    return ApiClient(url=url, api_key=KEY, timeout=timeout, connect_timeout=timeout, session=session)


def assert_no_key(exc: BaseException) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    texts.append(getattr(exc, "body", ""))
    for text in texts:
        assert KEY not in text


def test_post_sends_the_key_the_content_type_and_the_events(server: LocalServer) -> None:
    client = client_for(server.url)
    try:
        assert client.post(EVENTS) is None
    finally:
        client.close()
    (seen,) = server.seen
    assert seen.method == "POST"
    assert seen.path == "/v1/activity/upload"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert jsonutil.loads(seen.body) == EVENTS


def test_post_reuses_one_session_for_many_batches(server: LocalServer) -> None:
    client = client_for(server.url)
    try:
        for _ in range(3):
            client.post(EVENTS)
    finally:
        client.close()
    assert len(server.seen) == 3


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "reason"),
    [
        (400, {}, b'{"status":"fail"}', Rejected, None),
        (401, {}, b"", Unauthorized, None),
        (404, {}, b"not here", Refused, None),
        (503, {"Retry-After": "7"}, b"busy", Transient, None),
        (200, {"Content-Type": "text/html"}, b"<html>proxy</html>", Transient, None),
    ],
)
def test_post_classifies_the_answer(
    server: LocalServer, status: int, headers: dict[str, str], body: bytes, error: type, reason: str | None
) -> None:
    server.answer = lambda seen: (status, headers, body)
    client = client_for(server.url)
    try:
        with pytest.raises(error) as info:
            client.post(EVENTS)
    finally:
        client.close()
    assert info.value.status == status and type(info.value) is error
    if "Retry-After" in headers:
        assert info.value.retry_after == 7.0
    assert_no_key(info.value)


def test_post_with_a_strange_retry_after_is_still_transient(server: LocalServer) -> None:
    server.answer = lambda seen: (503, {"Retry-After": "\xb2"}, b"busy")
    client = client_for(server.url)
    try:
        with pytest.raises(Transient):
            client.post(EVENTS)
    finally:
        client.close()


def test_read_timeout_is_transient(server: LocalServer) -> None:
    def stall(seen: Seen) -> Answer:
        server.release.wait(10)
        return 200, {}, SUCCESS.encode()

    server.answer = stall
    client = client_for(server.url, timeout=0.05)
    try:
        with pytest.raises(Transient) as info:
            client.post(EVENTS)
    finally:
        client.close()
    assert info.value.status is None
    assert "0.05" in str(info.value)
    assert_no_key(info.value)


def test_an_answer_that_trickles_in_is_cut_off_at_the_deadline_not_only_per_read() -> None:
    """A server that sends its answer one byte every 0.3 s never trips a 1 s read timeout;
    the whole request's deadline (timeout + connect timeout) cuts it off."""
    with Sandbox(api_key=KEY) as sandbox:
        sandbox.add_fault(trickle=0.3)
        client = client_for(sandbox.url + "/v1/activity/upload", timeout=1.0)
        try:
            began = time.monotonic()
            with pytest.raises(Transient) as info:
                client.post(EVENTS)
            took = time.monotonic() - began
            assert "within" in str(info.value) and info.value.status is None
            assert took < client.deadline + 1.0  # the answer alone would take about 6 s
            sandbox.clear_faults()
            client.post(EVENTS)  # the connection cut is replaced: the next request goes through
        finally:
            client.close()


def test_connection_refused_is_transient() -> None:
    # a bound socket that does not listen: connections to it are refused, and no other test
    # can take the port meanwhile
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = client_for(f"http://127.0.0.1:{port}/v1/activity/upload", timeout=1.0)
        try:
            with pytest.raises(Transient) as info:
                client.post(EVENTS)
        finally:
            client.close()
    assert info.value.status is None
    assert_no_key(info.value)


def test_https_to_a_plain_http_port_is_permanent_refused(server: LocalServer) -> None:
    url = server.url.replace("http://", "https://", 1)
    client = client_for(url, timeout=2.0)
    try:
        with pytest.raises(Permanent) as info:
            client.post(EVENTS)
    finally:
        client.close()
    assert type(info.value) is Refused
    assert "TLS" in str(info.value)
    assert_no_key(info.value)
    assert server.seen == []  # nothing was ever read as a request, and no downgrade to http


# --- TLS with a self-signed certificate ---------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    if importlib.util.find_spec("cryptography") is not None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.now(timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private, hashes.SHA256())
        )
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor openssl is available to make a certificate")
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=20)
    if result.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {result.stderr.decode(errors='replace')[-200:]}")
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[LocalServer, Path]]:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for local in _serve(context):
        yield local, cert


def test_untrusted_certificate_is_permanent_refused(tls_server: tuple[LocalServer, Path]) -> None:
    server, _ = tls_server
    client = client_for(server.url)
    try:
        with pytest.raises(Permanent) as info:
            client.post(EVENTS)
    finally:
        client.close()
    assert type(info.value) is Refused
    assert info.value.status is None
    assert_no_key(info.value)
    assert server.seen == []  # the key never left over an unverified connection


def test_trusted_certificate_works(tls_server: tuple[LocalServer, Path]) -> None:
    """The control for the test above: the same server, its certificate trusted, delivers."""
    server, cert = tls_server
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, if set, would override verify
    session.verify = str(cert)
    client = client_for(server.url, session=session)
    try:
        client.post(EVENTS)
    finally:
        client.close()
    (seen,) = server.seen
    assert seen.headers["authorization"] == f"Bearer {KEY}"



def test_a_proxy_from_the_environment_is_still_used(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment is read once, not on every request (a ~/.netrc lookup each time cost more
    than a request); what it says, such as HTTP_PROXY, still holds."""
    proxy = server.url.removesuffix("/v1/activity/upload")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = client_for("http://api.netcore.invalid/v1/activity/upload")
    monkeypatch.delenv("HTTP_PROXY")  # read at construction: later changes do not matter
    try:
        client.post(EVENTS)
    finally:
        client.close()
    (seen,) = server.seen
    assert seen.path == "http://api.netcore.invalid/v1/activity/upload"  # a proxy's request line
