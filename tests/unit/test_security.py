"""Tests for CurveZMQ key files, the keygen command and the ZAP key policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq
import zmq.auth

from agent import config, security
from agent.cli import main
from agent.errors import ConfigError
from simulators.common import CurveKeyError, curve_client_keys


class TestSecretFile:
    """A secret key file is refused unless it is a regular file only its owner can access."""

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
    def test_group_or_other_access_refused(self, tmp_path: Path, mode: int) -> None:
        """Any group/other permission bit is a one-line error naming the file and the fix."""
        _, secret = security.make_keypair(tmp_path, "agent")
        secret.chmod(mode)
        with pytest.raises(ConfigError) as err:
            security.load_secret(secret)
        msg = str(err.value)
        assert "\n" not in msg and str(secret) in msg and "chmod 600" in msg

    def test_owner_only_accepted(self, tmp_path: Path) -> None:
        """Mode 0600 (and 0400) loads both keys."""
        _, secret = security.make_keypair(tmp_path, "agent")
        for mode in (0o600, 0o400):
            secret.chmod(mode)
            public, sec = security.load_secret(secret)
            assert len(public) == len(sec) == 40

    def test_missing_and_public_files(self, tmp_path: Path) -> None:
        """A missing file, a directory and a public-only file are refused with a clear reason."""
        public, _ = security.make_keypair(tmp_path, "agent")
        with pytest.raises(ConfigError, match="does not exist"):
            security.load_secret(tmp_path / "nope.key_secret")
        with pytest.raises(ConfigError, match="not a regular file"):
            security.load_secret(tmp_path)
        public.chmod(0o600)
        with pytest.raises(ConfigError, match="no secret-key"):
            security.load_secret(public)


class TestKeygen:
    """`tdn keygen` writes a public and a private file and never overwrites."""

    def test_files_and_modes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The secret file is 0600 and loads; the public one is 0644; the output never prints the secret."""
        out = tmp_path / "keys"
        assert main(["keygen", "--out", str(out), "--name", "cam1"]) == 0
        secret = out / "cam1.key_secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        assert (out / "cam1.key").stat().st_mode & 0o777 == 0o644
        assert out.stat().st_mode & 0o777 == 0o700
        _, sec = zmq.auth.load_certificate(secret)
        assert sec is not None and sec.decode() not in capsys.readouterr().out

    def test_no_overwrite(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A second keygen with the same name fails and leaves the first key intact."""
        assert main(["keygen", "--out", str(tmp_path), "--name", "agent"]) == 0
        before = (tmp_path / "agent.key_secret").read_bytes()
        assert main(["keygen", "--out", str(tmp_path), "--name", "agent"]) == 1
        assert "already exists" in capsys.readouterr().err
        assert (tmp_path / "agent.key_secret").read_bytes() == before

    def test_bad_name(self, tmp_path: Path) -> None:
        """A name that could escape the directory is refused."""
        assert main(["keygen", "--out", str(tmp_path), "--name", "../x"]) == 1
        assert not list(tmp_path.iterdir())


class TestSettings:
    """curve_enabled validates the key files when settings load, before any model work."""

    def test_readable_secret_is_a_config_error(self, tmp_path: Path) -> None:
        """A group-readable secret makes config.load raise one line, not a pydantic dump."""
        model = tmp_path / "m.keras"
        model.write_bytes(b"")
        _, secret = security.make_keypair(tmp_path, "agent")
        (tmp_path / "allowed").mkdir()
        secret.chmod(0o640)
        with pytest.raises(ConfigError) as err:
            config.load(model_path=str(model), curve_enabled="true", curve_server_secret=str(secret),
                        curve_allow_dir=str(tmp_path / "allowed"))
        assert "\n" not in str(err.value) and "0640" in str(err.value)

    def test_missing_allow_dir(self, tmp_path: Path) -> None:
        """The allow-list directory must exist."""
        _, secret = security.make_keypair(tmp_path, "agent")
        with pytest.raises(ConfigError, match="curve_allow_dir"):
            security.check_settings(True, secret, tmp_path / "none")

    def test_off_checks_nothing(self, tmp_path: Path) -> None:
        """With CURVE off the (default) paths need not exist."""
        security.check_settings(False, tmp_path / "none", tmp_path / "none")


class TestClientKeys:
    """The simulators' --curve-secret / --curve-server-key loading."""

    def test_loaded_and_ephemeral(self, tmp_path: Path) -> None:
        """A secret file gives its own keys; without one an ephemeral pair is made."""
        server, _ = security.make_keypair(tmp_path / "a", "agent")
        _, cam = security.make_keypair(tmp_path / "c", "cam")
        pub, sec, srv = curve_client_keys(cam, server)
        assert (pub, sec) == zmq.auth.load_certificate(cam)
        assert srv == zmq.auth.load_certificate(server)[0]
        eph = curve_client_keys(None, server)
        assert eph[0] != pub and eph[2] == srv

    def test_readable_secret_refused(self, tmp_path: Path) -> None:
        """The simulators refuse a group-readable secret too."""
        server, _ = security.make_keypair(tmp_path / "a", "agent")
        _, cam = security.make_keypair(tmp_path / "c", "cam")
        os.chmod(cam, 0o644)
        with pytest.raises(CurveKeyError, match="chmod 600"):
            curve_client_keys(cam, server)


class TestSimulatorOptions:
    """The camera and bridge command lines take key files only, in a sensible combination."""

    def test_secret_without_server_key(self, tmp_path: Path) -> None:
        """--curve-secret alone is a usage error (exit 2) for both simulators."""
        from simulators import camera, plc_bridge

        _, cam = security.make_keypair(tmp_path, "cam")
        for main_ in (camera.main, plc_bridge.main):
            with pytest.raises(SystemExit) as err:
                main_(["--curve-secret", str(cam)])
            assert err.value.code == 2

    def test_readable_secret_is_a_usage_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A group-readable secret stops the camera before it connects, naming the fix."""
        from simulators import camera

        server, _ = security.make_keypair(tmp_path / "a", "agent")
        _, cam = security.make_keypair(tmp_path / "c", "cam")
        cam.chmod(0o640)
        with pytest.raises(SystemExit):
            camera.main(["--curve-secret", str(cam), "--curve-server-key", str(server), "--count", "1"])
        assert "chmod 600" in capsys.readouterr().err


class TestKeyPolicy:
    """The ZAP callback: allow-list per domain, denials reported."""

    def test_allow_list_and_any(self) -> None:
        """Listed keys pass, others are denied and reported; a None list admits every key."""
        denied: list[tuple[str, bytes]] = []
        listed = security._KeyPolicy({b"k1"}, lambda d, k: denied.append((d, k)))
        assert listed.callback("tdn-frames", b"k1") and not listed.callback("tdn-frames", b"k2")
        assert denied == [("tdn-frames", b"k2")]
        assert security._KeyPolicy(None, lambda d, k: denied.append((d, k))).callback("tdn-publish", b"x")
        assert len(denied) == 1
