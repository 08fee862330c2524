"""The bridge's MQTT output against a locked-down mosquitto: TLS from a test CA, no anonymous clients, passwords."""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulators.plc.synthetic import SyntheticAgent
from tests.conftest import free_port
from tests.integration import test_plc_outputs
from tests.integration.test_plc_outputs import LOCAL, MOSQUITTO, Bridge, port_open, wait_for

pytestmark = pytest.mark.integration
bridges = test_plc_outputs.bridges  # the same fixture: bridges a test starts, killed at teardown

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
BRIDGE_USER, BRIDGE_PASSWORD = "tdn-bridge", "bridge-s3cret"
PLANT_USER, PLANT_PASSWORD = "historian", "historian-s3cret"  # the independent subscriber's own account
BRIDGE_STATUS = "tdn/line1/bridge/status"
_SUB_IDS = itertools.count()


# --- a test PKI (cryptography) ---


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA that signed the broker's certificate, a rogue CA of the same name, the broker's pair."""

    ca: Path
    rogue_ca: Path
    server_cert: Path
    server_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TinyDefectNet tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(cn), _name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(tmp: Path) -> Pki:
    """A CA, a broker certificate it signs for 127.0.0.1/localhost, and an unrelated CA with the same name."""
    d = tmp / "pki"
    d.mkdir()
    ca_key, ca = _make_ca("TDN test CA")
    _, rogue = _make_ca("TDN test CA")  # same subject, different key: only the signature tells them apart
    key = ec.generate_private_key(ec.SECP256R1())
    server = (_builder(_name("mosquitto"), ca.subject, key.public_key())
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_key_usage(cert_sign=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCAL)),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    key_path = d / "server.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Pki(ca=_write_pem(d / "ca.pem", ca), rogue_ca=_write_pem(d / "rogue-ca.pem", rogue),
               server_cert=_write_pem(d / "server.pem", server), server_key=key_path)


# --- mosquitto with TLS only, no anonymous access ---


class SecureBroker:
    """mosquitto on a free loopback port: one TLS listener, `allow_anonymous false`, a mosquitto_passwd file."""

    def __init__(self, tmp: Path, pki: Pki, *, start: bool = True) -> None:
        self.pki = pki
        self.port = free_port()
        self.dir = tmp / "mosquitto"
        self.dir.mkdir()
        passwd = self.dir / "passwd"
        assert Path(MOSQUITTO_PASSWD).exists(), "mosquitto_passwd is missing (Debian package mosquitto)"
        for i, (user, password) in enumerate([(BRIDGE_USER, BRIDGE_PASSWORD), (PLANT_USER, PLANT_PASSWORD)]):
            made = subprocess.run([MOSQUITTO_PASSWD, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                                  capture_output=True, text=True, timeout=30)
            assert made.returncode == 0, f"mosquitto_passwd failed: {made.stdout} {made.stderr}"
        passwd.chmod(0o600)
        self.log = self.dir / "log"
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {LOCAL}\n"
                        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
                        f"allow_anonymous false\npassword_file {passwd}\npersistence false\n"
                        f"log_dest file {self.log}\nlog_type all\nconnection_messages true\n"
                        # As root mosquitto would switch to its own user, which cannot read files in tmp_path.
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.conf = conf
        self.stderr = self.dir / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=err)
        proc = self.proc
        wait_for(lambda: port_open(self.port) or proc.poll() is not None, 10, "mosquitto to listen")
        assert proc.poll() is None, f"mosquitto exited: {self.stderr.read_text()} {self.log_text()}"

    @property
    def url(self) -> str:
        return f"mqtts://{LOCAL}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class TlsSubscriber:
    """mosquitto_sub over TLS with its own account, at QoS 1; a thread collects (qos, topic, payload) lines."""

    def __init__(self, broker: SecureBroker, topic: str) -> None:
        self.broker = broker
        self.client_id = f"plant-{next(_SUB_IDS)}"
        self.stderr = broker.dir / f"{self.client_id}.err"
        cmd = [MOSQUITTO_SUB, "-h", LOCAL, "-p", str(broker.port), "--cafile", str(broker.pki.ca),
               "-u", PLANT_USER, "-P", PLANT_PASSWORD, "-i", self.client_id, "-t", topic, "-q", "1", "-F", "%q %t %p"]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[tuple[int, str, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            qos, topic, payload = line.rstrip("\n").split(" ", 2)
            self.lines.append((int(qos), topic, payload))

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto_sub exited {self.proc.returncode}: {self.stderr.read_text()}")

    def wait_subscribed(self) -> None:
        """Until the broker logs our SUBSCRIBE: from then on nothing published is missed."""

        def subscribed() -> bool:
            self._alive()
            return f"Received SUBSCRIBE from {self.client_id}" in self.broker.log_text()

        wait_for(subscribed, 15, f"{self.client_id} subscribed")

    def got(self, topic: str) -> list[dict[str, Any]]:
        """Payloads received on this topic, as JSON; fails at once if mosquitto_sub has exited."""
        self._alive()
        return [json.loads(p) for _, t, p in list(self.lines) if t == topic]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One test PKI for the module (keys are cheap, but there is no reason to make them per test)."""
    return make_pki(tmp_path_factory.mktemp("mqtt-security"))


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """A locked-down mosquitto for the test, killed after it."""
    b = SecureBroker(tmp_path, pki)
    yield b
    b.stop()


@pytest.fixture
def late_broker(tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """The same broker, configured on its port but started by the test when it wants (killed after it)."""
    b = SecureBroker(tmp_path, pki, start=False)
    yield b
    b.stop()


@pytest.fixture
def subscribers() -> Iterator[list[TlsSubscriber]]:
    """TLS subscribers a test starts, terminated at teardown."""
    started: list[TlsSubscriber] = []
    yield started
    for s in started:
        s.close()


@pytest.fixture
def synth() -> Iterator[SyntheticAgent]:
    """A synthetic agent (ZeroMQ PUB + heartbeats): the bridge needs a live agent only to have verdicts to send."""
    agent = SyntheticAgent(f"tcp://{LOCAL}:{free_port()}")
    yield agent
    agent.close()


def credentials(tmp: Path, password: str = BRIDGE_PASSWORD, mode: int = 0o600) -> Path:
    """A --mqtt-credentials file: username line, password line."""
    path = tmp / "mqtt-credentials"
    path.write_text(f"{BRIDGE_USER}\n{password}\n")
    path.chmod(mode)
    return path


def mqtt_bridge(tmp: Path, endpoint: str, broker: SecureBroker, creds: Path, ca: Path | None, *extra: str) -> Bridge:
    """The bridge with only its MQTT output, over mqtts:// with these credentials and CA (None: no --mqtt-ca)."""
    args = ["--mqtt-url", broker.url, "--mqtt-credentials", str(creds), *extra]
    if ca is not None:
        args += ["--mqtt-ca", str(ca)]
    return Bridge(tmp, endpoint, *args, opcua=False, modbus=False)


def no_agent() -> str:
    """An endpoint nothing listens on: these bridges need no verdicts, and must not find someone else's agent."""
    return f"tcp://{LOCAL}:{free_port()}"


def bridge_log(bridge: Bridge) -> str:
    return bridge.log.read_text(errors="replace")


class TestBrokerIsLockedDown:
    """The broker these tests use really demands TLS and a password (so the bridge tests below mean something)."""

    @pytest.mark.hang_guard(60)
    def test_anonymous_and_plaintext_clients_refused(self, secure_broker: SecureBroker) -> None:
        """mosquitto_sub without a username, or without TLS, cannot subscribe; with both it can."""
        base = [MOSQUITTO_SUB, "-h", LOCAL, "-p", str(secure_broker.port), "-t", "tdn/#", "-C", "1", "-W", "2"]
        tls = ["--cafile", str(secure_broker.pki.ca)]
        anonymous = subprocess.run([*base, *tls], capture_output=True, text=True, timeout=20)
        assert anonymous.returncode != 0 and "not authori" in anonymous.stderr.lower(), anonymous.stderr
        plaintext = subprocess.run([*base, "-u", PLANT_USER, "-P", PLANT_PASSWORD], capture_output=True, text=True,
                                   timeout=20)
        assert plaintext.returncode != 0
        # -W 2 with nothing published: a timeout exit (27), after a successful connection and subscription.
        ok = subprocess.run([*base, *tls, "-u", PLANT_USER, "-P", PLANT_PASSWORD], capture_output=True, text=True,
                            timeout=20)
        assert ok.returncode == 27, ok.stderr
        assert f"u'{PLANT_USER}'" in secure_broker.log_text()


class TestTlsWithCredentials:
    """The bridge over mqtts:// with the test CA and a credentials file publishes what a plant client reads."""

    @pytest.mark.hang_guard(120)
    def test_verdicts_and_statuses_reach_a_tls_subscriber(self, secure_broker: SecureBroker, synth: SyntheticAgent,
                                                          bridges: list[Bridge], subscribers: list[TlsSubscriber],
                                                          tmp_path: Path) -> None:
        """20 verdicts go out over TLS as user tdn-bridge; mosquitto_sub (TLS, own account) gets them and statuses."""
        sub = TlsSubscriber(secure_broker, "tdn/line1/#")
        subscribers.append(sub)
        sub.wait_subscribed()
        ready = tmp_path / "bridge.ready"
        bridge = mqtt_bridge(tmp_path, synth.endpoint, secure_broker, credentials(tmp_path), secure_broker.pki.ca,
                             "--ready-file", str(ready))
        bridges.append(bridge)
        wait_for(lambda: sub.got(BRIDGE_STATUS), 20, "the bridge's retained status over TLS")
        wait_for(lambda: ready.exists(), 20, "the bridge to hear the synthetic agent")
        for seq in range(20):
            synth.send("cam1", seq)
        topic = "tdn/line1/cam1/verdict"
        wait_for(lambda: len(sub.got(topic)) >= 20, 20, "20 verdicts at the TLS subscriber")
        verdicts = sub.got(topic)
        assert [v["seq"] for v in verdicts] == list(range(20))
        assert {q for q, t, _ in sub.lines if t == topic} == {1}
        assert verdicts[3]["camera_id"] == "cam1" and verdicts[3]["decision"] == "divert"
        status = wait_for(lambda: sub.got("tdn/line1/cam1/status"), 10, "camera status")
        assert status[-1]["fail_safe"] is False
        wait_for(lambda: sub.got(BRIDGE_STATUS)[-1].get("agents_up") == 1, 10, "bridge status with the agent up")
        # The broker saw the bridge log in with the username from the credentials file.
        assert re.search(rf"as tdn-bridge-line1 \(.*u'{BRIDGE_USER}'\)", secure_broker.log_text())
        synth.beating.clear()  # a silent agent: the bridge's drain at stop ends at once
        report = bridge.stop()
        mqtt = report["outputs"]["mqtt"]
        assert mqtt["sent"] == 20 and mqtt["acked"] == 20 and mqtt["dropped"] == 0
        assert mqtt["connects"] == 1 and mqtt["refused"] == 0 and mqtt["connect_errors"] == 0
        wait_for(lambda: sub.got(BRIDGE_STATUS)[-1]["state"] == "offline", 10, "offline status after the stop")


class TestBrokerLate:
    """The plant broker comes up after the bridge: the bridge retries, logs why, and then tells the current state."""

    @pytest.mark.hang_guard(120)
    def test_buffered_verdicts_and_a_current_retained_status(self, late_broker: SecureBroker, synth: SyntheticAgent,
                                                             bridges: list[Bridge], subscribers: list[TlsSubscriber],
                                                             tmp_path: Path) -> None:
        """10 verdicts sent while the broker is down are acknowledged over TLS later; the retained status says 10."""
        ready = tmp_path / "bridge.ready"
        bridge = mqtt_bridge(tmp_path, synth.endpoint, late_broker, credentials(tmp_path), late_broker.pki.ca,
                             "--ready-file", str(ready))
        bridges.append(bridge)
        wait_for(lambda: ready.exists(), 20, "the bridge to hear the synthetic agent")
        for seq in range(10):  # the bridge's total goes up, its state (ready, 1 agent) does not
            synth.send("cam1", seq)
        wait_for(lambda: "cannot connect" in bridge_log(bridge), 20, "the refused TCP connection logged")
        late_broker.start()
        wait_for(lambda: f"u'{BRIDGE_USER}'" in late_broker.log_text(), 30, "the bridge's retry reaching the broker")
        # A subscriber that comes afterwards gets what the broker retained: it must be the state now, not a status
        # queued while the broker was away (paho sends those after the ones published on connect).
        sub = TlsSubscriber(late_broker, "tdn/line1/+/status")
        subscribers.append(sub)
        status = wait_for(lambda: sub.got(BRIDGE_STATUS), 10, "the retained bridge status")
        assert status[-1]["state"] == "ready" and status[-1]["total"] == 10, status
        cam = wait_for(lambda: sub.got("tdn/line1/cam1/status"), 10, "the retained camera status")
        assert cam[-1]["fail_safe"] is False and cam[-1]["counter"] == 10, cam
        synth.beating.clear()
        report = bridge.stop()
        mqtt = report["outputs"]["mqtt"]
        assert mqtt["sent"] == 10 and mqtt["acked"] == 10 and mqtt["dropped"] == 0 and mqtt["connects"] == 1
        assert mqtt["connect_errors"] >= 1 and "Connection refused" in mqtt["last_error"]
        assert "Traceback" not in bridge_log(bridge)


class TestWrongPassword:
    """A wrong password is a refusal the bridge logs and counts, retried with backoff, never a traceback."""

    @pytest.mark.hang_guard(120)
    def test_refused_logged_and_counted(self, secure_broker: SecureBroker, bridges: list[Bridge],
                                        subscribers: list[TlsSubscriber], tmp_path: Path) -> None:
        """The CONNACK refusal is logged (naming the broker and the fix) and counted; nothing is published."""
        sub = TlsSubscriber(secure_broker, "tdn/#")
        subscribers.append(sub)
        sub.wait_subscribed()
        bridge = mqtt_bridge(tmp_path, no_agent(), secure_broker, credentials(tmp_path, "not-the-password"),
                             secure_broker.pki.ca)
        bridges.append(bridge)
        wait_for(lambda: bridge_log(bridge).count("refused the connection") >= 2, 20,
                 "two refusals logged (the first try and a retry)")
        stopping = time.monotonic()
        report = bridge.stop()
        assert time.monotonic() - stopping < 10  # the retry loop does not hold the stop up
        log = bridge_log(bridge)
        assert "Traceback" not in log, log
        refusals = [line for line in log.splitlines() if "refused the connection" in line]
        assert f"{LOCAL}:{secure_broker.port}" in refusals[0] and "Not authorized" in refusals[0], refusals
        assert "--mqtt-credentials" in refusals[0]
        assert len(refusals) <= 6, refusals  # backoff from 1 s: a few tries, not a spin
        mqtt = report["outputs"]["mqtt"]
        assert mqtt["connects"] == 0 and mqtt["refused"] == len(refusals) and mqtt["connect_errors"] == 0
        assert "Not authorized" in mqtt["last_error"]
        assert "not authorised" in secure_broker.log_text().lower()
        assert sub.got(BRIDGE_STATUS) == []  # not even the last will: the broker never accepted the session


class TestUntrustedCa:
    """A broker certificate the bridge's CA did not sign is a logged, counted TLS error, not a silent retry loop."""

    @pytest.mark.hang_guard(120)
    @pytest.mark.parametrize("ca", ["rogue", "system"])
    def test_certificate_refused(self, ca: str, secure_broker: SecureBroker, bridges: list[Bridge],
                                 subscribers: list[TlsSubscriber], tmp_path: Path) -> None:
        """A rogue CA of the same name, or the system bundle (no --mqtt-ca), fails verification: logged, counted."""
        sub = TlsSubscriber(secure_broker, "tdn/#")
        subscribers.append(sub)
        sub.wait_subscribed()
        bridge = mqtt_bridge(tmp_path, no_agent(), secure_broker, credentials(tmp_path),
                             secure_broker.pki.rogue_ca if ca == "rogue" else None)
        bridges.append(bridge)
        wait_for(lambda: "certificate verify failed" in bridge_log(bridge), 20, "the TLS failure logged")
        stopping = time.monotonic()
        report = bridge.stop()
        assert time.monotonic() - stopping < 10
        log = bridge_log(bridge)
        assert "Traceback" not in log, log
        failures = [line for line in log.splitlines() if "certificate verify failed" in line]
        assert f"{LOCAL}:{secure_broker.port}" in failures[0], failures
        assert len(failures) <= 6, failures
        mqtt = report["outputs"]["mqtt"]
        assert mqtt["connects"] == 0 and mqtt["refused"] == 0 and mqtt["connect_errors"] == len(failures)
        assert "certificate verify failed" in mqtt["last_error"]
        assert sub.got(BRIDGE_STATUS) == []


class TestUnsafeFiles:
    """Unsafe or missing secret files stop the bridge at start-up with one line naming the file and the fix."""

    @pytest.mark.hang_guard(60)
    def test_group_readable_credentials(self, secure_broker: SecureBroker, tmp_path: Path) -> None:
        """A 0640 credentials file: exit 2, one error naming the file and `chmod 600`, and no connection attempt."""
        creds = credentials(tmp_path, mode=0o640)
        out = subprocess.run([sys.executable, "-m", "simulators.plc_bridge", "--endpoint", no_agent(), "--quiet",
                              "--timeout", "5", "--mqtt-url", secure_broker.url, "--mqtt-credentials", str(creds),
                              "--mqtt-ca", str(secure_broker.pki.ca)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and str(creds) in errors[0] and f"chmod 600 {creds}" in errors[0], out.stderr
        assert "Traceback" not in out.stderr
        assert "tdn-bridge-line1" not in secure_broker.log_text()

    @pytest.mark.hang_guard(60)
    def test_missing_ca_file(self, secure_broker: SecureBroker, tmp_path: Path) -> None:
        """A --mqtt-ca that does not exist: exit 2 with one error naming the file, not a bare errno."""
        missing = tmp_path / "no-such-ca.pem"
        out = subprocess.run([sys.executable, "-m", "simulators.plc_bridge", "--endpoint", no_agent(), "--quiet",
                              "--timeout", "5", "--mqtt-url", secure_broker.url, "--mqtt-credentials",
                              str(credentials(tmp_path)), "--mqtt-ca", str(missing)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2, out.stderr
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and str(missing) in errors[0], out.stderr
        assert "Traceback" not in out.stderr
