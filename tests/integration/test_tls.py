"""TLS to the broker, against RabbitMQ nodes of the test's own that take AMQP over mutual TLS only.

Each node's TLS listener requires a client certificate signed by a CA the test makes
(``ssl_options.verify = verify_peer``, ``fail_if_no_peer_cert = true``) and its plain listener is
off, so nothing here passes without TLS and the client certificate. A real worker delivers over
``amqps://`` (every event delivered or dead-lettered); the health check, ``python -m worker.dlq
count`` and ``netcore-activity check`` work over it; a missing client certificate, a CA that did
not sign the broker's certificate, and a host name the certificate does not name are each refused
with one line that says so (a worker at start-up in about a second); and a worker fails over from
a node whose certificate names 127.0.0.1 to one whose certificate names only localhost, each
checked against its own name.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue

from config.settings import Settings, redact_url
from tests.harness import (
    ROOT,
    TEST_BROKER_PASSWORD,
    TEST_BROKER_USER,
    QueueSet,
    WorkerProcess,
    all_delivered,
    event,
    event_id_of,
    free_port,
    running_worker,
    undelivered,
)
from tests.integration.command_support import COMMAND, command_env
from tests.integration.conftest import API_KEY, assert_no_secrets, require_rabbitmq
from tests.integration.test_metrics import scrape_until
from tests.rabbitmq_node import RabbitNode, RabbitNodes, TLSListener
from tests.tls_certs import Issued, TestCA, need_openssl
from worker.broker.connection import connect
from worker.broker.publisher import Outgoing, Publisher
from worker.events import jsonutil
from worker.ops import health
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(300)

#: Seconds a command, a delivery or a worker's refusal may take.
DEADLINE = 90.0


@dataclass(frozen=True)
class PKI:
    """The test's certificates: its CA, another CA, the brokers' and the clients'."""

    ca: TestCA
    #: A CA that signed nothing the brokers present.
    other: TestCA
    #: A broker certificate naming 127.0.0.1 only, and one naming localhost only.
    by_address: Issued
    by_name: Issued
    #: The worker's client certificate (signed by ``ca``), and one signed by ``other``.
    client: Issued
    stranger: Issued

    def settings(self, *, ca: Path | None = None, client: Issued | None = None) -> dict[str, str]:
        """The TLS settings of a worker: ``ca`` (default: the test's CA) and ``client``, if any."""
        env = {"BROKER_TLS_CA_FILE": str(ca or self.ca.cert)}
        if client is not None:
            env.update(BROKER_TLS_CERT_FILE=str(client.cert), BROKER_TLS_KEY_FILE=str(client.key))
        return env

    def secrets(self) -> list[str]:
        """What the private keys hold (their base64 lines), which no output may show."""
        keys = (self.client.key, self.stranger.key)
        return [line for key in keys for line in key.read_text().splitlines() if not line.startswith("-----")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    need_openssl()
    directory = tmp_path_factory.mktemp("pki")
    ca, other = TestCA.create(directory / "ca"), TestCA.create(directory / "other", name="another CA")
    return PKI(ca=ca, other=other,
               by_address=ca.issue("broker-by-address", ips=("127.0.0.1",), server=True),
               by_name=ca.issue("broker-by-name", dns=("localhost",), server=True),
               client=ca.issue("worker", client=True), stranger=other.issue("stranger", client=True))


@pytest.fixture(scope="module")
def node(pki: PKI) -> Iterator[RabbitNode]:
    """A node of this module's own, AMQP over mutual TLS only; its certificate names 127.0.0.1."""
    require_rabbitmq()
    with RabbitNodes(user=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD) as nodes:
        yield nodes.start_node(tls=TLSListener(pki.by_address.cert, pki.by_address.key, pki.ca.cert))


def run(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=DEADLINE)


#: The commands an operator runs against the broker (each reads the settings of its environment).
HEALTH = (str(COMMAND), "health", "--timeout", "10")
DLQ_COUNT = (sys.executable, "-m", "worker.dlq", "count", "--json")
CHECK = (str(COMMAND), "check", "--timeout", "10")


def publish(settings: Settings, payloads: Sequence[Any]) -> None:
    """Publish each payload as a producer would, over TLS with the settings' options, confirmed."""
    publisher = Publisher(settings.broker_url, declare=[Queue(settings.queue, durable=True)],
                          ssl=settings.broker_ssl())
    try:
        for start in range(0, len(payloads), 1000):
            publisher.publish([Outgoing(settings.queue, jsonutil.dumps(p)) for p in payloads[start:start + 1000]])
    finally:
        publisher.close()


def dead_letter_ids(settings: Settings, count: int) -> list[str | None]:
    """The event ids of the first ``count`` dead letters, read as they arrive and left in the queue
    (never acknowledged: closing the connection hands them back)."""
    ids: list[str | None] = []
    with connect(settings.broker_url, ssl=settings.broker_ssl()) as connection:
        channel = connection.channel()
        channel.basic_consume(settings.dead_letter_queue,
                              callback=lambda message: ids.append(event_id_of(jsonutil.loads(message.body)["event"])))
        deadline = time.monotonic() + DEADLINE
        while len(ids) < count and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=deadline - time.monotonic())
            except socket.timeout:
                break
    return ids


def worker_name(worker: WorkerProcess) -> str:
    """The node name the worker's ``--hostname`` option gives (what the health check asks for)."""
    assert worker.process is not None
    option = next(arg for arg in worker.process.args if str(arg).startswith("--hostname="))
    return health.worker_name(str(option).split("=", 1)[1])


@dataclass(frozen=True)
class Sent:
    """The ids of the events a test sent: valid ones, and invalid ones (to be dead-lettered)."""

    valid: list[str]
    invalid: list[str]


def send(settings: Settings, *, valid: int, invalid: int) -> Sent:
    """Publish ``invalid`` events the worker must dead-letter, then ``valid`` ones, over TLS."""
    sent = Sent([f"tls-{n}" for n in range(valid)], [f"tls-invalid-{n}" for n in range(invalid)])
    publish(settings, [event(i, activity_source="WEB") for i in sent.invalid] +
            [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent.valid)])
    return sent


def assert_accounted(sent: Sent, settings: Settings, sandbox: Sandbox, worker: WorkerProcess) -> None:
    """Wait until every valid event is delivered and every invalid one dead-lettered: the ledger."""
    wanted = set(sent.valid)
    assert sandbox.wait_until(all_delivered(wanted), timeout=DEADLINE), (
        f"{len(undelivered(sandbox, wanted))} events not delivered; the worker's log:\n" + worker.log()[-3000:])
    dead = dead_letter_ids(settings, len(sent.invalid))
    assert sorted(dead) == sorted(sent.invalid)
    assert {event_id_of(e) for e in sandbox.accepted()} == wanted  # delivered + dead-lettered == sent


def test_a_worker_delivers_over_mutual_tls_and_the_commands_work_over_it(
        node: RabbitNode, pki: PKI, sandbox: Sandbox, tmp_path: Path) -> None:
    """Every connection of the worker over TLS: Celery's, the ingest's hand-offs, the upload
    threads' retries (the API fails three uploads), the queue readings of its metrics."""
    port = free_port()
    queues = QueueSet(broker_url=node.url)
    env = command_env(queues, sandbox, API_KEY, METRICS_PORT=str(port), UPLOAD_RETRY_BACKOFF="0.2",
                      **pki.settings(client=pki.client))
    settings = Settings.from_env(env)
    sent = send(settings, valid=2000, invalid=20)
    sandbox.add_fault(status=500, count=3)
    with running_worker(env, tmp_path / "worker.log") as worker:
        assert_accounted(sent, settings, sandbox, worker)
        readings = scrape_until(port, lambda scrape: bool(scrape.labels("upload_queue_ready")), timeout=DEADLINE)
        probe = run((*HEALTH, "--hostname", worker_name(worker)), env)
        count = run(DLQ_COUNT, env)

    assert sum(1 for request in sandbox.requests() if request.status == 500) == 3  # retried, then delivered
    assert readings.labels("upload_queue_ready") == [{"account": "default"}], "no queue reading over TLS"
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.startswith(f"ok: worker {worker_name(worker)} answered; queue ")
    assert count.returncode == 0, count.stderr
    counted = json.loads(count.stdout)
    assert counted["total"] == 20 and counted["by_reason"] == {"invalid": 20}
    assert f"Connected to amqps://{TEST_BROKER_USER}:**@127.0.0.1:{node.tls_port}//" in worker.log()
    assert_no_secrets(worker.log() + probe.stdout + probe.stderr + count.stdout + count.stderr, API_KEY)
    shown = worker.log() + probe.stdout + probe.stderr + count.stderr
    assert not any(line in shown for line in pki.secrets()), "a private key's content was shown"
    print("\nover mutual TLS: 2020 events sent, 2000 delivered, 20 dead-lettered")


def test_check_says_tls_is_on_with_which_files_and_reaches_the_broker(
        node: RabbitNode, pki: PKI, sandbox: Sandbox) -> None:
    queues = QueueSet(broker_url=node.url)
    env = command_env(queues, sandbox, API_KEY, **pki.settings(client=pki.client))

    done = run(CHECK, env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"settings: broker TLS on: the broker's certificate checked against the CAs of BROKER_TLS_CA_FILE="
            f"{pki.ca.cert} and its host name; client certificate BROKER_TLS_CERT_FILE={pki.client.cert} (key "
            f"BROKER_TLS_KEY_FILE={pki.client.key}, never shown)") in done.stdout
    assert f"broker: {redact_url(node.url)} answered: RabbitMQ 3." in done.stdout
    assert not any(line in done.stdout + done.stderr for line in pki.secrets())
    assert TEST_BROKER_PASSWORD not in done.stdout + done.stderr


def test_without_a_ca_file_the_systems_cas_are_used(node: RabbitNode, pki: PKI, sandbox: Sandbox) -> None:
    """No BROKER_TLS_CA_FILE: the broker's certificate is checked against the system's CAs
    (OpenSSL's store, which SSL_CERT_FILE names here), not against nothing, nor against a bundle
    of our own choosing."""
    queues = QueueSet(broker_url=node.url)
    env = command_env(queues, sandbox, API_KEY, BROKER_TLS_CERT_FILE=str(pki.client.cert),
                      BROKER_TLS_KEY_FILE=str(pki.client.key))
    env.pop("SSL_CERT_FILE", None)

    system = run(CHECK, {**env, "SSL_CERT_FILE": str(pki.ca.cert)})
    untrusted = run(CHECK, env)

    assert system.returncode == 0, system.stdout + system.stderr
    assert "checked against the system's CAs (BROKER_TLS_CA_FILE not set)" in system.stdout
    assert untrusted.returncode == 1
    assert "is not trusted (self-signed certificate in certificate chain) by the system's CAs" in untrusted.stderr


#: Each refusal: the TLS settings (given the PKI), whether the URL names the broker by another name
#: than its certificate, and what the one line must say.
REFUSALS = {
    "no client certificate": (lambda pki: pki.settings(), False,
                              ["client certificate", "set BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE"]),
    "a client certificate of another CA": (lambda pki: pki.settings(client=pki.stranger), False,
                                           ["client certificate", "BROKER_TLS_CERT_FILE={stranger}"]),
    "a CA that did not sign the broker's certificate": (
        lambda pki: pki.settings(ca=pki.other.cert, client=pki.client), False,
        ["TLS: the certificate of the broker at 127.0.0.1:{port} is not trusted (self-signed certificate in "
         "certificate chain) by the CAs of BROKER_TLS_CA_FILE={other}"]),
    "a host name the certificate does not name": (
        lambda pki: pki.settings(client=pki.client), True,
        ["TLS: the certificate of the broker at localhost:{port} does not name the host the URL gives "
         "(Hostname mismatch, certificate is not valid for 'localhost'): name the broker in CELERY_BROKER_URL as "
         "its certificate does"]),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_tls_refusals_are_one_line_saying_what_to_change(node: RabbitNode, pki: PKI, sandbox: Sandbox,
                                                         refusal: str) -> None:
    settings, by_name, expected = REFUSALS[refusal]
    url = node.url.replace("@127.0.0.1:", "@localhost:") if by_name else node.url
    queues = QueueSet(broker_url=url)
    env = command_env(queues, sandbox, API_KEY, **settings(pki))
    wanted = [text.format(port=node.tls_port, stranger=pki.stranger.cert, other=pki.other.cert) for text in expected]

    for argv in (HEALTH, DLQ_COUNT, CHECK):
        done = run(argv, env)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1, f"{argv}: {done.stdout}{done.stderr}"
        assert len(lines) == 1, f"{argv}: not one line:\n{done.stderr}"
        assert all(text in lines[0] for text in wanted), f"{argv}: {lines[0]}"
        assert TEST_BROKER_PASSWORD not in done.stdout + done.stderr


def test_a_worker_the_broker_refuses_stops_at_start_with_one_line(node: RabbitNode, pki: PKI, sandbox: Sandbox) -> None:
    """A TLS refusal cannot mend by trying again: the worker stops at once, saying why, instead of
    spending its start-up's 30 tries (minutes) on it."""
    queues = QueueSet(broker_url=node.url)
    env = command_env(queues, sandbox, API_KEY, **pki.settings(ca=pki.other.cert, client=pki.client))

    started = time.monotonic()
    done = run((str(COMMAND), "worker", "--without-gossip", "--without-mingle"), env)
    took = time.monotonic() - started

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == (
        f"netcore-activity-worker: TLS: the certificate of the broker at 127.0.0.1:{node.tls_port} is not trusted "
        f"(self-signed certificate in certificate chain) by the CAs of BROKER_TLS_CA_FILE={pki.other.cert}")
    assert took < 30, f"the worker took {took:.1f} s to give up"
    print(f"\nrefused at start-up in {took:.1f} s")


def test_a_worker_fails_over_between_tls_nodes_checking_each_against_its_own_name(
        rabbit_nodes: RabbitNodes, pki: PKI, sandbox: Sandbox, tmp_path: Path) -> None:
    """Node A's certificate names 127.0.0.1 only, node B's localhost only (the same listener
    address). kombu alone would check B against A's name (it writes the first node's name into the
    shared options) or against 127.0.0.1 (it connects there for localhost): B would be refused."""
    first = rabbit_nodes.start_node(tls=TLSListener(pki.by_address.cert, pki.by_address.key, pki.ca.cert))
    second = rabbit_nodes.start_node(tls=TLSListener(pki.by_name.cert, pki.by_name.key, pki.ca.cert,
                                                     host="localhost"))
    env = command_env(QueueSet(broker_url=f"{first.url};{second.url}"), sandbox, API_KEY,
                      **pki.settings(client=pki.client))
    settings = Settings.from_env(env)
    shared = settings.broker_ssl()  # one options dict, as Celery's broker_use_ssl is one

    with connect(f"{first.url};{second.url}", ssl=shared, retries=0) as one, \
            connect(f"{second.url};{first.url}", ssl=shared, retries=0) as other:
        reached = [one.host, other.host]
    assert reached == [f"127.0.0.1:{first.tls_port}", f"localhost:{second.tls_port}"]
    assert shared == settings.broker_ssl(), "the shared TLS options were changed"

    first.stop()  # from now on every connection fails over to the second node: Celery's and the worker's own
    sent = send(settings, valid=500, invalid=5)
    with running_worker(env, tmp_path / "worker.log") as worker:
        assert_accounted(sent, settings, sandbox, worker)
        probe = run((*HEALTH, "--hostname", worker_name(worker)), env)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert f"Connected to amqps://{TEST_BROKER_USER}:**@localhost:{second.tls_port}//" in worker.log()
    print("\nfailed over to the node named localhost: 505 events sent, 500 delivered, 5 dead-lettered")
