"""TLS settings to the broker (config.tls), and the amqps transport that checks each node's own name.

The settings tests use certificates the test makes (``openssl``); the transport tests put a
recorder in place of py-amqp's connection, so they see what options each attempt was given.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import certifi
import pytest
from kombu import Connection

from config import tls as tls_settings
from config.settings import Settings, SettingsError
from tests.tls_certs import Issued, TestCA, locked_copy, need_openssl
from worker.broker import tls

pytestmark = pytest.mark.timeout(60)

PASSWORD = "br0ker-Pa55word"
TLS_URL = f"amqps://worker:{PASSWORD}@broker.example:5671/vh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestCA, Issued, Issued]:
    """A CA, a client certificate of it, and another one (whose key is not the first's)."""
    need_openssl()
    ca = TestCA.create(tmp_path_factory.mktemp("ca"))
    return ca, ca.issue("worker", client=True), ca.issue("other", client=True)


def load(**env: str) -> Settings:
    return Settings.from_env({"CELERY_BROKER_URL": TLS_URL, **env}, require_api=False)


def refused(**env: str) -> str:
    with pytest.raises(SettingsError) as error:
        load(**env)
    return str(error.value)


def mutual(ca: TestCA, client: Issued) -> dict[str, str]:
    return {"BROKER_TLS_CA_FILE": str(ca.cert), "BROKER_TLS_CERT_FILE": str(client.cert),
            "BROKER_TLS_KEY_FILE": str(client.key)}


# --- settings -----------------------------------------------------------------------------------


def test_a_plain_broker_has_no_tls() -> None:
    settings = Settings.from_env({}, require_api=False)
    assert settings.broker_tls is None and settings.broker_ssl() is None


def test_amqps_without_settings_requires_a_certificate_naming_each_host_signed_by_the_systems_cas() -> None:
    options = load().broker_ssl()
    assert options == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None,
                       "ca_certs": tls_settings.default_ca_file()}


def test_without_a_system_ca_store_certifis_bundle_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    found = ssl.get_default_verify_paths()
    assert tls_settings.default_ca_file() is None  # this machine has a store: py-amqp loads it itself
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: found._replace(cafile=None, capath=None))
    assert tls_settings.default_ca_file() == certifi.where()
    assert load().broker_ssl() == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None,
                                   "ca_certs": certifi.where()}
    assert "certifi's CA bundle (the system has none" in tls_settings.BrokerTLS().describe()


def test_a_ca_file_and_a_client_certificate(certs: tuple[TestCA, Issued, Issued]) -> None:
    ca, client, _ = certs
    settings = load(**mutual(ca, client))
    assert settings.broker_ssl() == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None,
                                     "ca_certs": str(ca.cert), "certfile": str(client.cert),
                                     "keyfile": str(client.key)}


def test_each_connection_gets_options_of_its_own(certs: tuple[TestCA, Issued, Issued]) -> None:
    settings = load(**mutual(*certs[:2]))
    first = settings.broker_ssl()
    assert first is not None
    first["server_hostname"] = "written-by-kombu"
    assert settings.broker_ssl() != first


def test_the_client_certificate_and_its_key_go_together(certs: tuple[TestCA, Issued, Issued]) -> None:
    _, client, _ = certs
    expected = ("BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE go together: set both (the client certificate and "
                "its key) or neither")
    assert refused(BROKER_TLS_CERT_FILE=str(client.cert)) == expected
    assert refused(BROKER_TLS_KEY_FILE=str(client.key)) == expected


def test_a_file_that_cannot_be_read_is_named(certs: tuple[TestCA, Issued, Issued], tmp_path: Path) -> None:
    ca, client, _ = certs
    missing = tmp_path / "missing.pem"
    assert refused(BROKER_TLS_CA_FILE=str(missing)) == (
        f"BROKER_TLS_CA_FILE={missing}: cannot be read (No such file or directory)")
    assert refused(BROKER_TLS_CERT_FILE=str(client.cert), BROKER_TLS_KEY_FILE=str(tmp_path)) == (
        f"BROKER_TLS_KEY_FILE={tmp_path}: cannot be read (Is a directory)")


def test_files_that_hold_no_certificate_or_no_key_are_named(certs: tuple[TestCA, Issued, Issued],
                                                           tmp_path: Path) -> None:
    ca, client, _ = certs
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert refused(BROKER_TLS_CA_FILE=str(garbage)) == f"BROKER_TLS_CA_FILE={garbage}: holds no PEM certificate"
    assert refused(BROKER_TLS_CA_FILE=str(client.key)) == (
        f"BROKER_TLS_CA_FILE={client.key}: holds no PEM certificate")
    assert refused(BROKER_TLS_CERT_FILE=str(client.key), BROKER_TLS_KEY_FILE=str(client.key)) == (
        f"BROKER_TLS_CERT_FILE={client.key}: holds no PEM certificate")
    assert refused(BROKER_TLS_CERT_FILE=str(client.cert), BROKER_TLS_KEY_FILE=str(garbage)) == (
        f"BROKER_TLS_KEY_FILE={garbage}: holds no PEM private key")


def test_a_key_that_is_not_the_certificates_is_named(certs: tuple[TestCA, Issued, Issued]) -> None:
    _, client, other = certs
    assert refused(BROKER_TLS_CERT_FILE=str(client.cert), BROKER_TLS_KEY_FILE=str(other.key)) == (
        f"BROKER_TLS_KEY_FILE={other.key}: is not the key of BROKER_TLS_CERT_FILE={client.cert}")


def test_a_key_locked_with_a_passphrase_is_refused_without_asking_for_it(
        certs: tuple[TestCA, Issued, Issued], tmp_path: Path) -> None:
    _, client, _ = certs
    locked = locked_copy(client.key, tmp_path / "locked.key")
    assert refused(BROKER_TLS_CERT_FILE=str(client.cert), BROKER_TLS_KEY_FILE=str(locked)) == (
        f"BROKER_TLS_KEY_FILE={locked}: the key is locked with a passphrase, which the worker cannot give: "
        "use it unlocked, in a file only the worker can read")


def test_tls_settings_for_a_plain_broker_are_a_mistake(certs: tuple[TestCA, Issued, Issued]) -> None:
    ca, _, _ = certs
    for url in ("amqp://guest:guest@localhost:5672//", "amqp://a//;amqp://b//"):
        with pytest.raises(SettingsError) as error:
            Settings.from_env({"CELERY_BROKER_URL": url, "BROKER_TLS_CA_FILE": str(ca.cert)}, require_api=False)
        assert str(error.value) == (f"BROKER_TLS_CA_FILE={ca.cert}: TLS settings need an amqps:// "
                                    "CELERY_BROKER_URL (it is amqp://)")


def test_a_list_mixing_tls_and_plain_nodes_is_refused_without_its_password() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"CELERY_BROKER_URL": f"{TLS_URL};amqp://worker:{PASSWORD}@b//"}, require_api=False)
    assert str(error.value) == ("CELERY_BROKER_URL=amqps://worker:***@broker.example:5671/vh;amqp://worker:***@b//: "
                                "mixes amqps:// and other nodes: every node of the list takes TLS, or none does")


def test_paths_are_shown_and_a_keys_content_never(certs: tuple[TestCA, Issued, Issued]) -> None:
    ca, client, _ = certs
    settings = load(**mutual(ca, client))
    assert settings.broker_tls is not None
    described = settings.broker_tls.describe()
    assert described == (f"TLS on: the broker's certificate checked against the CAs of BROKER_TLS_CA_FILE={ca.cert} "
                         f"and its host name; client certificate BROKER_TLS_CERT_FILE={client.cert} (key "
                         f"BROKER_TLS_KEY_FILE={client.key}, never shown)")
    secret = [line for line in client.key.read_text().splitlines() if not line.startswith("-----")]
    assert secret and not any(line in described + repr(settings) for line in secret)
    assert PASSWORD not in repr(settings)


# --- the amqps transport ----------------------------------------------------------------------


class Recorder:
    """Stands in for py-amqp's connection: records the TLS options of each attempt; the hosts in
    ``down`` refuse the connection."""

    attempts: list[tuple[str, dict[str, Any]]] = []
    down: set[str] = set()

    def __init__(self, *, host: str, ssl: dict[str, Any], **options: Any) -> None:
        self.host = host
        Recorder.attempts.append((host, dict(ssl)))
        self.connected = False

    def connect(self) -> None:
        if self.host in Recorder.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.connected = True

    def close(self) -> None:
        self.connected = False

    def collect(self) -> None:
        self.connected = False


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    monkeypatch.setattr(tls.Transport, "Connection", Recorder)
    monkeypatch.setattr(Recorder, "attempts", [])
    monkeypatch.setattr(Recorder, "down", set())
    return Recorder


def test_amqps_connections_use_the_transport_that_checks_each_nodes_name() -> None:
    import worker.broker.connection  # noqa: F401  (registers it, as config.celeryconfig does)

    assert type(Connection("amqps://broker.example//").transport) is tls.Transport


def test_each_node_of_a_failover_list_is_checked_against_its_own_name(recorder: type[Recorder]) -> None:
    shared = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None, "ca_certs": "ca.pem"}
    recorder.down = {"127.0.0.1:5671"}
    connection = Connection("amqps://u:p@127.0.0.1:5671//;amqps://u:p@localhost:5672//", ssl=shared)

    connection.ensure_connection(max_retries=1)
    again = Connection("amqps://u:p@broker.example:5671//", ssl=shared)  # the same options, another connection
    again.ensure_connection(max_retries=0)

    names = [(host, options["server_hostname"]) for host, options in recorder.attempts]
    assert names == [("127.0.0.1:5671", "127.0.0.1"), ("127.0.0.1:5672", "localhost"),
                     ("broker.example:5671", "broker.example")]
    assert shared == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None, "ca_certs": "ca.pem"}
    assert connection.hostname == "localhost"  # as the URL writes it, for the next attempt too


def test_an_amqps_connection_given_no_options_still_checks_the_name(recorder: type[Recorder]) -> None:
    Connection("amqps://u:p@broker.example:5671//").ensure_connection(max_retries=0)
    assert recorder.attempts == [("broker.example:5671", {"server_hostname": "broker.example"})]
