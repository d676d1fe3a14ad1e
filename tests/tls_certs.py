"""Certificate authorities of a test's own, made with the ``openssl`` command, for TLS tests.

A test that checks TLS to the broker needs a CA nobody else trusts (so that the machine's own
CAs cannot make a wrong setting pass), a server certificate naming the address the test connects
to, and client certificates for mutual TLS. Each :class:`TestCA` writes its files in a directory
of the test's own; keys are unencrypted EC P-256 (fast to make, accepted by RabbitMQ's Erlang)::

    ca = TestCA.create(tmp_path / "ca")
    server = ca.issue("broker", ips=["127.0.0.1"], server=True)
    client = ca.issue("worker", client=True)
    # server.cert, server.key, ca.cert: paths of PEM files

Every certificate is valid from now for :data:`DAYS` days. The extensions are written out here,
so nothing of the machine's ``openssl.cnf`` applies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Validity of every certificate made here (days).
DAYS = 2

#: How long one ``openssl`` command may take.
OPENSSL_TIMEOUT = 60.0

#: The configuration of every ``openssl req`` here: a subject from ``-subj``, the extensions of
#: the ``ext`` section (filled in per certificate).
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ext]
{extensions}
"""

_CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


class OpenSSLError(RuntimeError):
    """An ``openssl`` command failed; says which and what it printed."""


def require_openssl() -> str:
    """The ``openssl`` command's path, or OpenSSLError when it is not installed."""
    found = shutil.which("openssl")
    if found is None:
        raise OpenSSLError("the openssl command is not installed (Debian: apt-get install openssl)")
    return found


def need_openssl() -> None:
    """Fail on CI, skip elsewhere, saying why, when the ``openssl`` command is not installed."""
    try:
        require_openssl()
    except OpenSSLError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))


@dataclass(frozen=True)
class Issued:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCA:
    """A CA of a test's own: its certificate and key, and the directory it issues into."""

    __test__ = False  # not a pytest test class, whatever its name

    directory: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "activity-tests CA") -> TestCA:
        """A new CA (a self-signed certificate) in ``directory`` (made if missing)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.pem", directory / "ca.key"
        _req(directory / "ca.cnf", _CA_EXTENSIONS, ["-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)])
        return cls(directory, cert, key)

    def issue(self, name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = False,
              client: bool = False) -> Issued:
        """A certificate signed by this CA, with common name ``name`` and the given DNS names and IP
        addresses (its subjectAltName: what a client checks a server's name against); for a
        ``server``, a ``client`` (mutual TLS) or both."""
        stem = self.directory / name
        usages = [usage for usage, wanted in (("serverAuth", server), ("clientAuth", client)) if wanted]
        names = [f"DNS:{host}" for host in dns] + [f"IP:{address}" for address in ips]
        extensions = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature",
                      "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"]
        if usages:
            extensions.append(f"extendedKeyUsage = {', '.join(usages)}")
        if names:
            extensions.append(f"subjectAltName = {', '.join(names)}")
        cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
        _req(stem.with_suffix(".cnf"), "\n".join(extensions),
             ["-subj", f"/CN={name}", "-CA", str(self.cert), "-CAkey", str(self.key),
              "-keyout", str(key), "-out", str(cert)])
        return Issued(cert, key)


def locked_copy(key: Path, out: Path, passphrase: str = "a passphrase") -> Path:
    """A copy of ``key`` locked with ``passphrase`` (AES-128): what a worker cannot use."""
    argv = [require_openssl(), "pkey", "-in", str(key), "-aes128", "-passout", f"pass:{passphrase}", "-out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    if done.returncode != 0:
        raise OpenSSLError(f"openssl pkey failed ({done.returncode}): {done.stderr.strip()}")
    return out


def _req(config: Path, extensions: str, args: list[str]) -> None:
    """``openssl req -x509`` with a new EC key and the extensions given: a certificate."""
    config.write_text(_CONFIG.format(extensions=extensions))
    argv = [require_openssl(), "req", "-x509", "-new", "-config", str(config), "-extensions", "ext",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(DAYS), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT)
    if done.returncode != 0:
        raise OpenSSLError(f"openssl {' '.join(argv[1:3])} failed ({done.returncode}): {done.stderr.strip()}")
