"""TLS to the broker: the settings of a CA bundle and a client certificate, read and checked once.

Hosted RabbitMQ often takes ``amqps://`` only, and some want a client certificate (mutual TLS).
With an ``amqps://`` ``CELERY_BROKER_URL`` every connection the worker and its commands open is
TLS with these options (:meth:`BrokerTLS.ssl_options`, the ``ssl`` of kombu's connections and
Celery's ``broker_use_ssl``): the broker's certificate must be signed by a CA of
``BROKER_TLS_CA_FILE`` (else by one the system trusts), and must name the host the URL names
(:mod:`worker.broker.tls` checks each node of a failover list against its own name).

The files are read at start-up, so that a wrong path, a file that holds no certificate, a key
that is not the certificate's, or a key locked with a passphrase stops the worker with one line
naming the setting, instead of failing at every connection later. Paths may be logged; what the
files hold never is (the ``ssl`` module's errors name no content either).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import certifi

from worker.errors import SettingsError

#: The settings (environment variables) this module reads.
CA_FILE, CERT_FILE, KEY_FILE = "BROKER_TLS_CA_FILE", "BROKER_TLS_CERT_FILE", "BROKER_TLS_KEY_FILE"


class _Encrypted(Exception):
    """Raised by :func:`_no_passphrase`: OpenSSL asked for the key's passphrase."""


@dataclass(frozen=True, kw_only=True)
class BrokerTLS:
    """TLS options to the broker (each a path, or empty: not set). Build it with :meth:`from_env`."""

    #: PEM bundle of the CAs that may sign the broker's certificate; empty: the system's CAs.
    ca_file: str = ""
    #: The client certificate (PEM) for mutual TLS, and its unencrypted key; both or neither.
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BrokerTLS:
        """Read the settings and check their files; raise :class:`SettingsError` naming the first bad one."""
        tls = cls(ca_file=env.get(CA_FILE, "").strip(), cert_file=env.get(CERT_FILE, "").strip(),
                  key_file=env.get(KEY_FILE, "").strip())
        if bool(tls.cert_file) != bool(tls.key_file):
            raise SettingsError(f"{CERT_FILE} and {KEY_FILE} go together: set both (the client certificate and "
                                "its key) or neither")
        tls._check_files()
        return tls

    @property
    def configured(self) -> Mapping[str, str]:
        """The settings that are set, by name (``{"BROKER_TLS_CA_FILE": path, ...}``)."""
        named = {CA_FILE: self.ca_file, CERT_FILE: self.cert_file, KEY_FILE: self.key_file}
        return {name: path for name, path in named.items() if path}

    def ssl_options(self) -> dict[str, Any]:
        """kombu's ``ssl`` options (py-amqp's): the broker's certificate required and its name checked
        (``server_hostname`` None: each node's own, filled in per connection by
        :mod:`worker.broker.tls`). A new dict each call: kombu writes into the one it is given."""
        options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None,
                                   "ca_certs": self.ca_file or default_ca_file()}
        if self.cert_file:
            options.update(certfile=self.cert_file, keyfile=self.key_file)
        return options

    def describe(self) -> str:
        """What TLS checks and presents, for ``netcore-activity check`` (paths only, never content)."""
        if self.ca_file:
            cas = f"the CAs of {CA_FILE}={self.ca_file}"
        elif default_ca_file() is None:
            cas = f"the system's CAs ({CA_FILE} not set)"
        else:
            cas = f"certifi's CA bundle (the system has none; {CA_FILE} not set)"
        client = (f"client certificate {CERT_FILE}={self.cert_file} (key {KEY_FILE}={self.key_file}, never shown)"
                  if self.cert_file else f"no client certificate ({CERT_FILE} not set)")
        return f"TLS on: the broker's certificate checked against {cas} and its host name; {client}"

    def _check_files(self) -> None:
        for name, path in self.configured.items():
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                raise SettingsError(f"{name}={path}: cannot be read ({error.strerror or error})") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for name, path in ((CA_FILE, self.ca_file), (CERT_FILE, self.cert_file)):
            if path:
                try:
                    context.load_verify_locations(cafile=path)
                except ssl.SSLError:
                    raise SettingsError(f"{name}={path}: holds no PEM certificate") from None
        if self.cert_file:
            self._check_key(context)

    def _check_key(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
        except _Encrypted:
            raise SettingsError(f"{KEY_FILE}={self.key_file}: the key is locked with a passphrase, which the "
                                "worker cannot give: use it unlocked, in a file only the worker can read") from None
        except ssl.SSLError as error:
            if error.reason == "KEY_VALUES_MISMATCH":
                raise SettingsError(f"{KEY_FILE}={self.key_file}: is not the key of "
                                    f"{CERT_FILE}={self.cert_file}") from None
            raise SettingsError(f"{KEY_FILE}={self.key_file}: holds no PEM private key") from None


def default_ca_file() -> str | None:
    """The CA bundle when no ``BROKER_TLS_CA_FILE`` is set: None (the system's CAs, which py-amqp
    loads itself) when the system has a CA store, else certifi's bundle (a container without
    CA certificates would otherwise trust nothing)."""
    paths = ssl.get_default_verify_paths()
    return None if paths.cafile or paths.capath else certifi.where()


def _no_passphrase() -> bytes:
    """The ``password`` of ``load_cert_chain``: called only for an encrypted key, which is refused."""
    raise _Encrypted()
