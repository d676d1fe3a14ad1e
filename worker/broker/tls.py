"""TLS connections to the broker: each node checked against its own name, and one line when TLS fails.

**Why a transport of our own.** kombu checks a broker's host name only when its ``ssl`` options
say ``server_hostname: None``, and then writes the name of the node it connects to *into the
options it was given* (``establish_connection`` of ``kombu.transport.pyamqp``). Those options are
shared: by every connection Celery opens (its ``broker_use_ssl``), and by the nodes of a failover
list one connection goes through (kombu's switch to the next node keeps the first options). So
after the first connection every node would be checked against the first node's name, and a
failover to a node with a certificate of its own would fail. kombu also rewrites a URL's
``localhost`` to 127.0.0.1 (for good, in the connection) before it fills the name in, so a
certificate naming ``localhost`` would be checked against the address instead.

:class:`Transport` is kombu's ``amqps`` transport except for that: each connection attempt gets a
copy of the options with the name of the node it connects to, as its URL writes it, and leaves
the shared options (and the node's name) as they were. A fresh dict per connection would not do,
since one connection fails over across nodes; and kombu picks the transport of the next node of
a list by its URL's scheme, so :func:`register` makes this transport the scheme ``amqps``'s, for
the process (:mod:`worker.broker.connection` and :mod:`config.celeryconfig` call it, so the
worker's own connections and Celery's are all made here). Any ``amqps://`` connection of the
process is then checked against its host name, even one given no options at all.

:func:`explain` turns a TLS failure into one line that says what to change.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, get_transport_cls, pyamqp

#: The URL scheme of AMQP over TLS.
SCHEME = "amqps"

#: OpenSSL's verification codes for a certificate that names another host, address or email.
_NAME_MISMATCH = frozenset({62, 63, 64})

#: The broker's TLS alerts that say it refused our certificate, or our lack of one.
_CLIENT_REFUSED = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that signed the client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it refused the client certificate",
}


class Transport(pyamqp.SSLTransport):
    """kombu's ``amqps`` transport, checking each node against its own name (see the module docstring)."""

    def establish_connection(self) -> Any:
        client: Any = self.client  # the kombu Connection connecting
        shared, name = client.ssl, client.hostname
        options = dict(shared) if isinstance(shared, dict) else {}
        if not options.get("server_hostname"):
            options["server_hostname"] = name or "localhost"  # kombu's default host
        client.ssl = options
        try:
            return super().establish_connection()  # type: ignore[no-untyped-call]
        finally:
            client.ssl, client.hostname = shared, name


def register() -> None:
    """Make :class:`Transport` the transport of every ``amqps://`` connection of this process."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
    if get_transport_cls(SCHEME) is not Transport:  # kombu keeps what it resolved once
        raise RuntimeError(f"an {SCHEME}:// connection was made before {__name__} was imported: "
                           "it would not check each node against its own name")


def failure(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``error`` (kombu re-raises it as its own), or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_permanent(error: BaseException) -> bool:
    """Whether ``error`` is a TLS refusal that trying again cannot mend: the broker's certificate
    failed our checks, or the broker refused our certificate (or its absence)."""
    cause = failure(error)
    return isinstance(cause, ssl.SSLCertVerificationError) or (
        cause is not None and cause.reason in _CLIENT_REFUSED)


def explain(error: BaseException, *, node: str, options: Mapping[str, Any] | None) -> str | None:
    """One line saying why TLS with ``node`` (``host:port``) failed and what to change, or None when
    ``error`` is no TLS failure. ``options``: the connection's ``ssl`` options (paths only are named)."""
    cause = failure(error)
    if cause is None:
        return None
    options = options or {}
    if isinstance(cause, ssl.SSLCertVerificationError):
        if cause.verify_code in _NAME_MISMATCH:
            return (f"TLS: the certificate of the broker at {node} does not name the host the URL gives "
                    f"({cause.verify_message.rstrip('.')}): name the broker in CELERY_BROKER_URL as its certificate does")
        ca_file = options.get("ca_certs")
        cas = (f"the CAs of BROKER_TLS_CA_FILE={ca_file}" if ca_file
               else "the system's CAs (set BROKER_TLS_CA_FILE to the CA that signed it)")
        return f"TLS: the certificate of the broker at {node} is not trusted ({cause.verify_message.rstrip('.')}) by {cas}"
    certificate = options.get("certfile")
    given = (f"BROKER_TLS_CERT_FILE={certificate}" if certificate
             else "none given: set BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE")
    if cause.reason in _CLIENT_REFUSED:
        return f"TLS: the broker at {node} refused this client: {_CLIENT_REFUSED[cause.reason]} ({given})"
    if isinstance(cause, ssl.SSLEOFError):
        return (f"TLS: the broker at {node} closed the connection during the TLS handshake: it may require a "
                f"client certificate, or one signed by another CA (client certificate: {given})")
    return f"TLS with the broker at {node} failed: {cause}"
