"""Agent settings: pydantic-settings with the TDN_ prefix, a .env file and --config FILE, validated once."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent.errors import ConfigError
from protocol import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, MAX_TOPIC_BYTES

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "tinydefectnet.keras"
# The largest message the SPEC allows: topic, a 64 KiB header and a 16 MiB payload. The default reads them all.
MAX_FRAME_MESSAGE = MAX_TOPIC_BYTES + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES
# tcp://host:* lets ZeroMQ choose a free port (tests, benchmarks); the agent logs the port it bound.
_ENDPOINT_RE = re.compile(r"^(tcp://[^\s:]+:(\d{1,5}|\*)|ipc://\S+|inproc://\S+)$")


def default_state_dir() -> Path:
    """systemd's StateDirectory ($STATE_DIRECTORY) when run as the unit, else ~/.cache/tdn."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path.home() / ".cache" / "tdn"


def default_artifacts_dir() -> Path:
    """Where `tdn export` writes and the agent reads artifacts by default, as the agent's settings resolve it."""
    if os.environ.get("TDN_ARTIFACTS_DIR"):
        return Path(os.environ["TDN_ARTIFACTS_DIR"])
    state = os.environ.get("TDN_STATE_DIR")
    return (Path(state) if state else default_state_dir()) / "artifacts"


def default_profile_path() -> Path:
    """Where `tdn tune` writes and the agent reads the tuning profile by default, as the settings resolve it."""
    if os.environ.get("TDN_PROFILE_PATH"):
        return Path(os.environ["TDN_PROFILE_PATH"])
    state = os.environ.get("TDN_STATE_DIR")
    return (Path(state) if state else default_state_dir()) / "profile.json"


class AgentSettings(BaseSettings):
    """Every setting of `tdn agent`; environment variables are TDN_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TDN_", env_file=".env", extra="forbid", validate_default=True)

    frames_endpoint: str = Field("tcp://127.0.0.1:5555", description="PULL socket cameras PUSH frames to (bind)")
    publish_endpoint: str = Field(
        "tcp://127.0.0.1:5556", description="PUB socket for verdicts, explanations, heartbeats (bind)"
    )
    agent_id: str = Field("agent1", description="id in heartbeats and verdicts ([A-Za-z0-9_.-]{1,64})")
    model_path: Path = Field(DEFAULT_MODEL, description="the .keras model; its .json model card sits beside it")
    backend: str = Field(
        "auto", description="inference runtime: auto (tuned profile, else a short probe), tensorflow, zendnn, litert, "
        "openvino; or backend:precision, e.g. litert:int8"
    )
    precision: str = Field(
        "auto", description="auto (fastest variant passing the accuracy gate), fp32, bf16 (openvino), int8 (litert, "
        "openvino; built by `tdn export`)"
    )
    threads: int = Field(
        0, ge=0, le=256, description="runtime threads of each inference worker (0: auto; tensorflow/zendnn: all "
        "cores, litert/openvino: cores / workers)"
    )
    workers: int = Field(
        0, ge=0, le=64, description="inference workers, each running its own batches on its own runtime instance "
        "(0: auto; litert/openvino: one single-threaded worker per core, or 1 when threads is set; "
        "tensorflow/zendnn: 1)"
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="exported artifacts and the tuning profile ($STATE_DIRECTORY under systemd, else ~/.cache/tdn)",
    )
    artifacts_dir: Path | None = Field(None, description="artifacts of `tdn export` (default: <state_dir>/artifacts)")
    export_data: Path | None = Field(
        None, description="labelled images of the model's classes that calibrate and gate bf16/int8 when `auto` "
        "exports on the first start (default: the folder the model card says it was trained from, if it is there; "
        "without one, fp32 only)"
    )
    profile_path: Path | None = Field(
        None, description="profile of `tdn tune`, used when backend is auto (default: <state_dir>/profile.json)"
    )
    # ZenDNN knobs: only variables the installed plugin reads (agent/backends/ZENDNN.md); unset = library default.
    zendnn_conv_weight_cache: Literal[0, 1] | None = Field(
        None, description="zendnn: ZENDNNL_CONV_WEIGHT_CACHE, 1 keeps reordered conv weights (default), 0 redoes them"
    )
    zendnn_lru_cache_capacity: int | None = Field(
        None, ge=1, le=1_000_000, description="zendnn: ZENDNNL_LRU_CACHE_CAPACITY, cached blocked MatMul weights"
    )
    zendnn_primitive_cache_capacity: int | None = Field(
        None, ge=0, le=1_000_000,
        description="zendnn: ONEDNN_PRIMITIVE_CACHE_CAPACITY of the plugin's oneDNN (~10 per warmed batch size)",
    )
    zendnn_kmp_affinity: str | None = Field(
        None, description="zendnn: KMP_AFFINITY of the plugin's OpenMP, e.g. granularity=fine,compact,1,0"
    )
    zendnn_kmp_blocktime: int | None = Field(
        None, ge=0, le=10_000, description="zendnn: KMP_BLOCKTIME, ms OpenMP threads spin after work (AMD: 1)"
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="largest micro-batch")
    # 0: an idle backend takes whatever waits at once, and frames arriving during a batch form the next one (a
    # partial batch never starts while another runs). Measured on a 2-core Zen 5 (`tdn bench stream`): p50 at
    # 25% load 5.7 -> 1.3 ms against 2000 us, with the same verdicts/s at 100-150%.
    max_queue_delay_us: int = Field(
        0, ge=0, le=10_000_000,
        description="an idle backend starts a partial batch once its oldest frame waited this long (0: at once)"
    )
    queue_cap: int = Field(64, ge=1, le=100_000, description="accepted frames waiting for a batch, at most")
    shed_deadline_ms: float = Field(
        250.0, gt=0, le=600_000, description="a frame older than this (capture to batch) is shed, not inferred"
    )
    # 2, not 1: with RCVHWM 1 a CurveZMQ camera connection stalled (tests/integration/test_failover.py, curve:
    # no verdicts from one agent in 20 s; plain TCP ran). Each connection's queue adds to the frames in flight.
    rcvhwm: int = Field(
        2, ge=1, le=100_000, description="ZeroMQ receive high-water mark of each camera connection (frames)"
    )
    sndhwm: int = Field(10_000, ge=1, le=1_000_000, description="ZeroMQ send high-water mark of the PUB socket")
    max_frame_bytes: int = Field(
        MAX_FRAME_MESSAGE, ge=1024, le=MAX_FRAME_MESSAGE,
        description="largest frame message read; larger ones are answered rejected/oversized (the heartbeat says it)",
    )
    # libzmq bounds each message part, not a message's parts (agent/memguard.py says why): past this growth over
    # the resident set at READY, the frame connection filling memory is dropped. It covers 10 cameras of 16 MiB
    # frames with their queues, and keeps native TensorFlow (~760 MiB) under the unit's MemoryHigh=1536M.
    memory_guard_mb: int = Field(
        512, ge=0, le=1_048_576,
        description="RSS growth over READY (MiB) past which the frame connection filling memory is dropped (0: off)",
    )
    seq_window: int = Field(
        4096, ge=1, le=1_000_000, description="seqs remembered per camera: a repeat within them is duplicate_seq"
    )
    # Decision thresholds: unset, the model card's values (chosen on its validation split) apply.
    # NoDecode: the environment carries the list as comma-separated text, which _split parses.
    pass_classes: Annotated[list[str] | None, NoDecode] = Field(
        None, description="classes that may be decided pass (default: the card's pass classes)"
    )
    pass_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="pass only when the calibrated pass probability is at least this"
    )
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="a defect class below this calibrated confidence is decided review"
    )
    ood_threshold: float | None = Field(
        None, ge=0.0, description="out-of-distribution score above which a frame is decided review"
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="seconds between heartbeats")
    # 1: after a restart, verdicts published before the line's bridge has reconnected would go nowhere (PUB keeps
    # no history); the bridge reconnects within ZeroMQ's reconnect interval, long before the model is loaded.
    ready_subscribers: int = Field(
        1, ge=0, le=1000,
        description="hold READY (frames unread) until this many heartbeat subscribers came, or ready_wait_s (0: off)",
    )
    ready_wait_s: float = Field(
        10.0, gt=0, le=3600, description="the longest READY waits for ready_subscribers; then it serves anyway"
    )
    explain_interval_s: float = Field(
        5.0, ge=0, le=86_400, description="seconds between explanation snapshots (0: off)"
    )
    explain_budget: float = Field(
        0.05, gt=0, le=1,
        description="share of one core the explainer may use; reviews beyond it wait (64 at most, then dropped)",
    )
    explain_dir: Path | None = Field(None, description="also write snapshot PNGs here (optional)")
    explain_keep: int = Field(200, ge=1, le=1_000_000, description="snapshot files kept in explain_dir")
    shutdown_timeout_s: float = Field(5.0, gt=0, le=300, description="drain bound on SIGTERM")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_json: bool | None = Field(None, description="JSON log lines (default: when stderr is not a TTY)")
    # --- CurveZMQ (see `tdn keygen`); keys are read from files, never taken from flags or logged ---
    curve_enabled: bool = Field(False, description="CurveZMQ on both sockets: encrypted, cameras allow-listed")
    curve_server_secret: Path = Field(
        Path("/etc/tdn/curve/agent.key_secret"), description="the agent's secret key file (mode 0600, tdn keygen)"
    )
    curve_allow_dir: Path = Field(
        Path("/etc/tdn/curve/allowed"), description="directory of allowed client public keys (*.key)"
    )
    curve_require_subscribers: bool = Field(
        False, description="the PUB socket also admits only allow-listed keys (else any key, still encrypted)"
    )
    # --- the control channel (SPEC 12): run-time thresholds, authenticated by a token file ---
    control_endpoint: str | None = Field(
        None, description="REP socket for operator commands, e.g. tcp://127.0.0.1:5557 (bind; unset: off)"
    )
    control_token_file: Path | None = Field(
        None, description="file holding the control token (mode 0600, `tdn keygen --token FILE`); needed with "
        "control_endpoint"
    )
    # --- /metrics, /healthz, /readyz ---
    metrics_addr: str = Field("127.0.0.1", description="listen address of the metrics/health HTTP server")
    metrics_port: int = Field(9108, ge=0, le=65535, description="its port (0: off)")

    @field_validator("frames_endpoint", "publish_endpoint", "control_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not _ENDPOINT_RE.match(v):
            raise ValueError(f"{v!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///run/tdn/f")
        return v

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", v):
            raise ValueError(f"{v!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
        return v

    @field_validator("pass_classes", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        # Environment variables carry lists as comma-separated text.
        if isinstance(v, str) and not v.strip().startswith("["):
            return [c.strip() for c in v.split(",") if c.strip()]
        return v

    @model_validator(mode="after")
    def _backend(self) -> AgentSettings:
        from agent.backends import PRECISIONS, SPELLINGS, SUPPORTED, parse

        if self.backend not in SPELLINGS:
            raise ValueError(f"backend {self.backend!r}: choose one of {', '.join(SPELLINGS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        name, named = parse(self.backend)
        if named is not None:
            if self.precision not in ("auto", named):
                raise ValueError(f"backend {self.backend} names precision {named}, precision says {self.precision}")
            self.backend, self.precision = name, named
        if name != "auto" and self.precision not in ("auto", *SUPPORTED[name]):
            runs = " or ".join(SUPPORTED[name])
            others = [n for n, ps in SUPPORTED.items() if self.precision in ps]
            raise ValueError(f"precision {self.precision} needs backend {' or '.join(others)}; {name} runs {runs}")
        return self

    @model_validator(mode="after")
    def _card(self) -> AgentSettings:
        # The class names are the model's: checked against its card here, so a typo fails at start-up.
        if self.pass_classes is not None and self.model_path.is_file():
            from agent.card import read

            try:
                classes = read(self.model_path).classes
            except Exception as exc:  # a bad card is reported as such, once the model is loaded
                raise ValueError(str(exc)) from None
            bad = [c for c in self.pass_classes if c not in classes]
            if bad:
                raise ValueError(f"pass_classes: unknown class {bad[0]!r}; the model has: {', '.join(classes)}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        if self.queue_cap < self.max_batch_size:
            raise ValueError(f"queue_cap ({self.queue_cap}) must be >= max_batch_size ({self.max_batch_size})")
        if self.frames_endpoint == self.publish_endpoint and not self.frames_endpoint.endswith(":*"):
            raise ValueError("frames_endpoint and publish_endpoint must differ")
        if not self.model_path.is_file():
            raise ValueError(f"model_path: {self.model_path} does not exist")
        if self.export_data is not None and not self.export_data.is_dir():
            raise ValueError(f"export_data: {self.export_data} is not a folder")
        if self.artifacts_dir is None:
            self.artifacts_dir = self.state_dir / "artifacts"
        if self.profile_path is None:
            self.profile_path = self.state_dir / "profile.json"
        return self

    @model_validator(mode="after")
    def _curve(self) -> AgentSettings:
        # Checked here so a bad key file fails at start-up, before the model loads; the ConfigError it
        # raises is not a ValueError, so it leaves pydantic as the one-line message it is.
        if self.curve_enabled:
            from agent.security import check_settings

            check_settings(True, self.curve_server_secret, self.curve_allow_dir)
        return self

    @model_validator(mode="after")
    def _control(self) -> AgentSettings:
        from agent.control import ThresholdStore

        ThresholdStore(self.state_dir).load()  # thresholds an operator set at run time: checked before the model
        if self.control_endpoint is None:
            return self
        if self.control_token_file is None:
            raise ValueError("control_endpoint is set: control_token_file must name the token file "
                             "(make one with `tdn keygen --token FILE`)")
        from agent.security import load_token

        load_token(self.control_token_file)
        if self.control_endpoint in (self.frames_endpoint, self.publish_endpoint) and \
                not self.control_endpoint.endswith(":*"):
            raise ValueError("control_endpoint must differ from frames_endpoint and publish_endpoint")
        return self

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Compiled batch sizes: powers of two below max_batch_size, and max_batch_size itself."""
        sizes = [1 << i for i in range(16) if (1 << i) < self.max_batch_size]
        return (*sizes, self.max_batch_size)


def describe() -> list[tuple[str, str, str]]:
    """(env var, default, description) of every setting, for --help and the README."""
    rows = []
    for name, f in AgentSettings.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default  # type: ignore[call-arg]
        if isinstance(default, Path):
            default = os.path.relpath(default) if default.is_absolute() and default == DEFAULT_MODEL else default
        rows.append((f"TDN_{name.upper()}", json.dumps(default, default=str), f.description or ""))
    return rows


def load(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from (lowest first) defaults, .env, environment, --config FILE (JSON or KEY=VALUE), overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(f"bad setting {where}: {err['msg']}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a JSON object")
        return {k.lower().removeprefix("tdn_"): v for k, v in data.items()}
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"config file {path}:{n}: expected KEY=VALUE")
        k, v = line.split("=", 1)
        out[k.strip().lower().removeprefix("tdn_")] = v.strip().strip('"')
    return out
