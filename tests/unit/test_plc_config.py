"""Unit tests for the PLC outputs without sockets: the Modbus register image, OPC UA and MQTT settings checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pymodbus.constants import ExcCodes

from simulators import plc_bridge
from simulators.plc import modbus as mb
from simulators.plc.mqtt import MqttConfig, MqttConfigError, MqttOutput, read_credentials, topics
from simulators.plc.opcua import (
    OpcUaConfig,
    OpcUaConfigError,
    check_config,
    check_password,
    hash_password,
    load_users,
)
from simulators.plc.results import ResultModel
from simulators.plc.synthetic import make_verdict


def image_after(n: int, cameras: list[str] | None = None) -> mb.RegisterImage:
    model = ResultModel(cameras or [])
    img = mb.RegisterImage(cameras)
    for seq in range(n):
        model.on_verdict(make_verdict("cam1", 70_000 + seq, class_index=3), "new")
    img.apply(model.flush())
    return img


class TestRegisterImage:
    """RegisterImage lays results out in the documented holding-register map."""

    def test_layout(self) -> None:
        """Total at 0-1 (high word first), camera block at 16 with counter, seq, decision, class, confidence."""
        img = image_after(70_001)
        r = img.regs
        assert (r[0] << 16 | r[1]) == 70_001 and r[0] == 1  # needs the high word
        b = img.base("cam1")
        assert b == 16
        assert (r[b + 1] << 16 | r[b + 2]) == 70_001
        assert (r[b + 3] << 16 | r[b + 4]) == 140_000
        assert r[b + mb.CAM_DECISION] == 2 and r[b + mb.CAM_CLASS] == 3
        assert 5000 <= r[b + mb.CAM_CONFIDENCE] <= 10000
        assert r[b] & mb.BIT_NEW_RESULT and r[b] & mb.BIT_READY
        assert (r[mb.HR_MAP_VERSION], r[mb.HR_CAMERA_BLOCK], r[mb.HR_FIRST_CAMERA]) == (1, 16, 16)

    def test_configured_order_first(self) -> None:
        """--camera order fixes the blocks; unknown cameras follow in first-seen order."""
        img = image_after(1, ["camB", "cam1"])
        assert img.base("camB") == 16 and img.base("cam1") == 32

    def test_writes(self) -> None:
        """Only ack registers take writes, and only values up to the counter's low word."""
        img = image_after(5)
        ack = 16 + mb.CAM_ACK
        assert img.check_write(0, [1]) is ExcCodes.ILLEGAL_ADDRESS
        assert img.check_write(16 + mb.CAM_DECISION, [1]) is ExcCodes.ILLEGAL_ADDRESS
        assert img.check_write(32 + mb.CAM_ACK, [0]) is ExcCodes.ILLEGAL_ADDRESS  # no camera in slot 1
        assert img.check_write(ack, [6]) is ExcCodes.ILLEGAL_VALUE  # ahead of the counter
        assert img.check_write(ack, [3]) is None  # behind: fine, the new-result bit stays
        assert img.regs[16] & mb.BIT_NEW_RESULT
        assert img.check_write(ack, [5]) is None
        assert not img.regs[16] & mb.BIT_NEW_RESULT
        assert dict(img.rejected) == {"read_only": 2, "no_camera": 1, "bad_ack": 1}

    def test_exception_counter(self) -> None:
        """Exceptions are counted into registers 6-7."""
        img = mb.RegisterImage()
        for _ in range(3):
            img.count_exception()
        assert img.regs[6:8] == [0, 3]

    def test_bad_endpoint(self) -> None:
        """HOST:PORT is required."""
        with pytest.raises(ValueError):
            mb.ModbusOutput("localhost")


class TestOpcUaSettings:
    """The OPC UA output refuses unsafe or incomplete security settings."""

    def test_none_only_on_loopback(self) -> None:
        """None is fine on 127.0.0.1 and ::1, refused on any other address."""
        assert check_config(OpcUaConfig("opc.tcp://127.0.0.1:4840")) == "none"
        assert check_config(OpcUaConfig("opc.tcp://[::1]:4840")) == "none"
        with pytest.raises(OpcUaConfigError, match="loopback"):
            check_config(OpcUaConfig("opc.tcp://0.0.0.0:4840"))
        with pytest.raises(OpcUaConfigError, match="loopback"):
            check_config(OpcUaConfig("opc.tcp://10.0.0.5:4840", security="none"))

    def test_sign_encrypt_needs_everything(self, tmp_path: Path) -> None:
        """A certificate alone is not enough: key, trust dir and users are required too."""
        with pytest.raises(OpcUaConfigError, match=r"--opcua-key.*--opcua-trust-dir.*--opcua-users"):
            check_config(OpcUaConfig("opc.tcp://10.0.0.5:4840", cert=tmp_path / "c.der"))

    def test_bad_url(self) -> None:
        """Only opc.tcp://HOST:PORT."""
        with pytest.raises(OpcUaConfigError):
            check_config(OpcUaConfig("http://127.0.0.1:4840"))

    def test_passwords_and_users_file(self, tmp_path: Path) -> None:
        """Hashes verify only the right password; the users file must be 0600 and well formed."""
        h = hash_password("s3cret", iterations=1000)
        assert check_password("s3cret", h) and not check_password("other", h) and not check_password("x", "junk")
        users = tmp_path / "users"
        users.write_text(f"# comment\nop:operator:{h}\n")
        users.chmod(0o644)
        with pytest.raises(OpcUaConfigError, match="chmod 600"):
            load_users(users)
        users.chmod(0o600)
        assert load_users(users)["op"].role == "operator"
        users.write_text(f"op:admin:{h}\n")
        with pytest.raises(OpcUaConfigError, match="expected"):
            load_users(users)


class TestMqttSettings:
    """MQTT credentials come from a private file, never from the url."""

    def test_credentials_file(self, tmp_path: Path) -> None:
        """Two lines, mode 0600."""
        f = tmp_path / "cred"
        f.write_text("user\npass\n")
        f.chmod(0o640)
        with pytest.raises(MqttConfigError, match="chmod 600"):
            read_credentials(f)
        f.chmod(0o600)
        assert read_credentials(f) == ("user", "pass")
        f.write_text("user\n")
        with pytest.raises(MqttConfigError, match="password line"):
            read_credentials(f)

    def test_url_checks(self) -> None:
        """Credentials in the url, other schemes and TLS files without mqtts:// are refused."""
        with pytest.raises(MqttConfigError, match="never in the url"):
            MqttOutput(MqttConfig("mqtt://u:p@127.0.0.1:1883"))
        with pytest.raises(MqttConfigError, match="expected"):
            MqttOutput(MqttConfig("tcp://127.0.0.1:1883"))
        with pytest.raises(MqttConfigError, match="mqtts"):
            MqttOutput(MqttConfig("mqtt://127.0.0.1:1883", ca_file=Path("/etc/ssl/certs/ca-certificates.crt")))
        assert MqttOutput(MqttConfig("mqtts://127.0.0.1")).port == 8883

    def test_client_key_must_be_private(self, tmp_path: Path) -> None:
        """A client key readable by group/other is refused, naming the file and the chmod that fixes it."""
        cert, key = tmp_path / "client.crt", tmp_path / "client.key"
        cert.write_text("not checked before the key\n")
        key.write_text("-----BEGIN PRIVATE KEY-----\n")
        key.chmod(0o644)
        with pytest.raises(MqttConfigError, match=f"--mqtt-key {key} has mode 0644; run: chmod 600"):
            MqttOutput(MqttConfig("mqtts://127.0.0.1", cert_file=cert, key_file=key))
        key.chmod(0o600)
        with pytest.raises(MqttConfigError, match="MQTT TLS files"):  # private now: on to the PEM check
            MqttOutput(MqttConfig("mqtts://127.0.0.1", cert_file=cert, key_file=key))

    def test_topics(self) -> None:
        """The documented topic tree."""
        assert topics("line7", "cam1") == {"bridge_status": "tdn/line7/bridge/status",
                                           "verdict": "tdn/line7/cam1/verdict", "status": "tdn/line7/cam1/status"}


class TestBridgeSettings:
    """The outputs' TDN_BRIDGE_* settings: read from the environment and all listed in the env example."""

    def test_env_example_lists_every_setting(self) -> None:
        """Every TDN_BRIDGE_ name the bridge reads appears as a #KEY= line of systemd/plc-bridge.env.example."""
        root = Path(__file__).resolve().parents[2]
        source = (root / "simulators" / "plc_bridge.py").read_text()
        names = set(re.findall(r'"(TDN_BRIDGE_[A-Z_]+)"', source))
        names |= {plc_bridge.env_name(flag) for flag, *_ in plc_bridge.OUTPUT_OPTIONS}
        example = (root / "systemd" / "plc-bridge.env.example").read_text()
        listed = set(re.findall(r"^#?(TDN_BRIDGE_[A-Z_]+)=", example, re.M))
        assert len(names) >= 15 and names == listed

    def test_env_sets_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An env setting becomes the flag's default; a flag still wins."""
        monkeypatch.setenv("TDN_BRIDGE_MODBUS_ENDPOINT", "127.0.0.1:5020")
        monkeypatch.setenv("TDN_BRIDGE_LINE_ID", "line9")
        args = plc_bridge.build_parser().parse_args(["--line-id", "line3"])
        assert args.modbus_endpoint == "127.0.0.1:5020" and args.line_id == "line3"
        assert args.opcua_endpoint is None and args.mqtt_url is None
        assert args.mqtt_buffer == 100_000 and args.opcua_ack_queue == 0

    def test_bad_numeric_setting_is_a_usage_error(self, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
        """A non-integer TDN_BRIDGE_MQTT_BUFFER exits with a usage error naming the option, not a traceback."""
        monkeypatch.setenv("TDN_BRIDGE_MQTT_BUFFER", "lots")
        with pytest.raises(SystemExit) as exc:
            plc_bridge.build_parser().parse_args([])
        assert exc.value.code == 2 and "--mqtt-buffer" in capsys.readouterr().err

    def test_outputs_log_with_time_level_and_source(self) -> None:
        """The bridge configures logging: an output's warning reaches stderr as one timestamped, named line."""
        import subprocess
        import sys

        root = Path(__file__).resolve().parents[2]
        # Port 1 on loopback refuses at once: the MQTT output logs that it cannot connect, then the bridge exits.
        run = subprocess.run([sys.executable, "-m", "simulators.plc_bridge", "--endpoint", "tcp://127.0.0.1:1",
                              "--mqtt-url", "mqtt://127.0.0.1:1", "--timeout", "1.5", "--quiet",
                              "--log-level", "WARNING"], cwd=root, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        line = next(ln for ln in run.stderr.splitlines() if "tdn.plc.mqtt" in ln)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING tdn\.plc\.mqtt: MQTT broker 127\.0\.0\.1:1 "
                        r"cannot connect", line), line
