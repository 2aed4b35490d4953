"""Settings: the one place that reads environment variables.

``Config.from_env(os.environ)`` is called by ``create_app()`` and ``gunicorn.conf.py`` at start-up,
never at import time. Every variable is validated and a bad value stops start-up with a message
that names the variable. Tests build a ``Config`` directly or with ``Config.from_mapping``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from common.modelfolder import LegacyGraph

MIB = 1024 * 1024
#: Decompression-bomb limit: images whose header states more pixels are refused undecoded.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_LEGACY = LegacyGraph()  # the legacy-graph defaults have one owner: common/modelfolder.py


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


def _int(lo: int | None = None):
    def parse(raw: str) -> int:
        value = int(raw)
        if lo is not None and value < lo:
            raise ValueError(f"must be >= {lo}")
        return value
    return parse


def _float(lo: float = 0.0, lo_open: bool = True):
    def parse(raw: str) -> float:
        value = float(raw)
        if value < lo or (lo_open and value == lo):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo}")
        return value
    return parse


def _optional(parse: Callable[[str], Any]):
    return lambda raw: None if raw.strip() == "" else parse(raw)


def _size(raw: str) -> tuple[int, int]:
    """'299' or '299x299' or '224,224' -> (height, width)."""
    parts = [p for p in raw.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError("expected N or HxW")
    h, w = (int(p) for p in parts)
    if h < 1 or w < 1:
        raise ValueError("must be positive")
    return h, w


def _host_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip().lower() for p in raw.replace(";", ",").split(",") if p.strip())
    for item in items:
        if "/" in item:
            ipaddress.ip_network(item, strict=False)  # raises ValueError when malformed
    return items


def _origins(raw: str) -> tuple[str, ...]:
    """``https://a.example,http://localhost:3000``: scheme://host[:port] each, no path, no
    ``*`` (an allowlist is what CORS_ORIGINS is)."""
    items = tuple(p.strip().rstrip("/") for p in raw.split(",") if p.strip())
    for item in items:
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", item):
            raise ValueError(f"{item!r} is not an origin (scheme://host[:port]; no '*')")
    return items


def _api_keys(raw: str) -> str:
    """API_KEYS, checked (``common.keys.parse_inline``) and kept as given. A malformed entry
    raises ``KeyConfigError`` (a ValueError naming the entry, never a key); the field is
    ``secret``, so ``Config.from_env`` does not quote its value either."""
    from common.keys import parse_inline
    parse_inline(raw)
    return raw


def _networks(raw: str) -> tuple[str, ...]:
    """Addresses or networks (``10.0.0.0/8``, ``127.0.0.1``), comma-separated."""
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    for item in items:
        ipaddress.ip_network(item, strict=False)  # raises ValueError when malformed
    return items


def _level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("expected debug, info, warning, error or critical")
    return value


def _precision(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("fp32", "bf16"):
        raise ValueError("expected fp32 or bf16")
    return value


RUNTIMES = ("tensorflow", "onnx", "auto")


def _runtime(raw: str) -> str:
    value = raw.strip().lower()
    if value not in RUNTIMES:
        raise ValueError("expected tensorflow, onnx or auto")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _auto(parse: Callable[[str], Any]):
    """``auto`` (any case) or empty -> None (sized to the machine), else ``parse``."""
    return lambda raw: None if raw.strip().lower() in ("", "auto") else parse(raw)


def _feedback_dir(raw: str) -> str | None:
    """A folder, or ``off`` (any case) for no feedback at all."""
    return None if raw.strip().lower() == "off" else raw


def _grpc_port(raw: str) -> int | None:
    """A port for the gRPC server, or ``0`` / ``off`` (any case) for none."""
    if raw.strip().lower() in ("0", "off"):
        return None
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a port 1..65535, or 0 / off for no gRPC server")
    return value


def _score(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:  # refuses nan
        raise ValueError("must be in (0, 1]")
    return value


def env(name: str, parse: Callable[[str], Any] = str, *, secret: bool = False, **kwargs):
    """A config field read from environment variable ``name`` and parsed with ``parse``;
    ``secret``: its value is never quoted in an error."""
    return field(metadata={"env": name, "parse": parse, "secret": secret}, **kwargs)


@dataclass(frozen=True)
class Config:
    """Every setting of the service; field metadata names its environment variable."""

    model_path: str = env("MODEL_PATH", default="tf_files/demo")
    labels_path: str | None = env("LABELS_PATH", _optional(str), default=None)
    input_layer: str = env("INPUT_LAYER", default=_LEGACY.input_layer)
    output_layer: str = env("OUTPUT_LAYER", default=_LEGACY.output_layer)
    input_size: tuple[int, int] | None = env("INPUT_SIZE", _optional(_size), default=None)
    input_mean: float = env("INPUT_MEAN", float, default=_LEGACY.input_mean)
    input_std: float = env("INPUT_STD", _float(), default=_LEGACY.input_std)
    host: str = env("HOST", default="127.0.0.1")
    port: int = env("PORT", _int(0), default=8000)
    temp_dir: str = env("TEMP_DIR", default="temp")
    temp_max_files: int = env("TEMP_MAX_FILES", _int(1), default=1000)
    temp_max_mb: float = env("TEMP_MAX_MB", _float(), default=512.0)
    max_upload_mb: float = env("MAX_UPLOAD_MB", _float(), default=16.0)
    max_image_pixels: int = env("MAX_IMAGE_PIXELS", _int(1),
                                default=DEFAULT_MAX_IMAGE_PIXELS)
    decode_memory_mb: float = env("DECODE_MEMORY_MB", _float(), default=512.0)
    bodies_in_flight: int | None = env("BODIES_IN_FLIGHT", _optional(_int(1)), default=None)
    header_timeout: float = env("HEADER_TIMEOUT", _float(), default=5.0)
    send_timeout: float = env("SEND_TIMEOUT", _float(), default=10.0)
    allowed_hosts: tuple[str, ...] = env("ALLOWED_HOSTS", _host_list, default=())
    max_url_length: int = env("MAX_URL_LENGTH", _int(16), default=2048)
    url_fetch_timeout: float = env("URL_FETCH_TIMEOUT", _float(), default=10.0)
    url_connect_timeout: float = env("URL_CONNECT_TIMEOUT", _float(), default=3.0)
    url_max_redirects: int = env("URL_MAX_REDIRECTS", _int(0), default=3)
    url_allow_hosts: tuple[str, ...] = env("URL_ALLOW_HOSTS", _host_list, default=())
    top_k: int | None = env("TOP_K", _optional(_int(1)), default=None)
    workers: int | None = env("WORKERS", _auto(_int(1)), default=None)
    runtime_threads: int | None = env("RUNTIME_THREADS", _auto(_int(1)), default=None)
    runtime_threads_alone: int | None = env("RUNTIME_THREADS_ALONE", _auto(_int(0)),
                                            default=None)
    threads: int = env("THREADS", _int(1), default=64)
    max_requests: int = env("MAX_REQUESTS", _int(0), default=0)
    model_repository: str | None = env("MODEL_REPOSITORY", _optional(str), default=None)
    model_config: str | None = env("MODEL_CONFIG", _optional(str), default=None)
    default_model: str | None = env("DEFAULT_MODEL", _optional(str), default=None)
    model_poll_seconds: float = env("MODEL_POLL_SECONDS", _float(0.0, lo_open=False),
                                    default=2.0)
    max_images_per_request: int = env("MAX_IMAGES_PER_REQUEST", _int(1), default=8)
    batch_max_size: int = env("BATCH_MAX_SIZE", _int(1), default=8)
    batch_max_wait_ms: float = env("BATCH_MAX_WAIT_MS", _float(0.0, lo_open=False), default=0.0)
    batch_queue_size: int | None = env("BATCH_QUEUE_SIZE", _optional(_int(1)), default=None)
    queue_memory_mb: float = env("QUEUE_MEMORY_MB", _float(), default=256.0)
    queue_max_wait_ms: float = env("QUEUE_MAX_WAIT_MS", _float(0.0, lo_open=False),
                                   default=1200.0)
    max_refusals_per_second: float = env("MAX_REFUSALS_PER_SECOND", _float(0.0, lo_open=False),
                                         default=100.0)
    request_nice: int = env("REQUEST_NICE", _int(0), default=10)
    load_nice: int = env("LOAD_NICE", _int(0), default=10)
    request_timeout: float = env("REQUEST_TIMEOUT", _float(), default=15.0)
    model_hang_timeout: float = env("MODEL_HANG_TIMEOUT", _float(0.0, lo_open=False),
                                    default=120.0)
    upload_timeout: float = env("UPLOAD_TIMEOUT", _float(), default=10.0)
    upload_min_rate_kb: float = env("UPLOAD_MIN_RATE_KB", _float(), default=16.0)
    tf_intra_op_threads: int = env("TF_INTRA_OP_THREADS", _int(0), default=0)
    tf_inter_op_threads: int = env("TF_INTER_OP_THREADS", _int(0), default=0)
    precision: str = env("PRECISION", _precision, default="fp32")
    runtime: str = env("RUNTIME", _runtime, default="auto")
    onnx_intra_op_threads: int = env("ONNX_INTRA_OP_THREADS", _int(0), default=0)
    onnx_inter_op_threads: int = env("ONNX_INTER_OP_THREADS", _int(0), default=0)
    onnx_spinning: bool = env("ONNX_SPINNING", _bool, default=False)
    malloc_arena_max: int = env("MALLOC_ARENA_MAX", _int(1), default=2)
    log_level: str = env("LOG_LEVEL", _level, default="info")
    metrics_dir: str | None = env("PROMETHEUS_MULTIPROC_DIR", _optional(str), default=None)
    exit_on_load_failure: bool = env("EXIT_ON_LOAD_FAILURE", _bool, default=True)
    feedback_dir: str | None = env("FEEDBACK_DIR", _feedback_dir, default="feedback")
    feedback_new_labels: bool = env("FEEDBACK_NEW_LABELS", _bool, default=False)
    feedback_max_files: int = env("FEEDBACK_MAX_FILES", _int(1), default=10000)
    feedback_max_mb: float = env("FEEDBACK_MAX_MB", _float(), default=1024.0)
    review_below_score: float | None = env("REVIEW_BELOW_SCORE", _optional(_score),
                                           default=None)
    # -- gRPC (README "gRPC"): each worker serves the port (SO_REUSEPORT) ----------------
    grpc_port: int | None = env("GRPC_PORT", _grpc_port, default=8500)
    grpc_max_workers: int | None = env("GRPC_MAX_WORKERS", _auto(_int(1)), default=None)
    grpc_tfserving: bool | None = env("GRPC_TFSERVING", _auto(_bool), default=None)
    # -- access (README "Access control"): off unless keys are set --------------------------
    api_keys: str | None = env("API_KEYS", _optional(_api_keys), default=None, secret=True)
    api_keys_file: str | None = env("API_KEYS_FILE", _optional(str), default=None)
    metrics_auth: bool = env("METRICS_AUTH", _bool, default=False)
    cors_origins: tuple[str, ...] = env("CORS_ORIGINS", _origins, default=())
    trusted_proxies: tuple[str, ...] = env("TRUSTED_PROXIES", _networks, default=())
    fair_share: bool = env("FAIR_SHARE", _bool, default=True)
    audit_log: str | None = env("AUDIT_LOG", _optional(str), default="-")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def body_slots(self) -> int:
        """BODIES_IN_FLIGHT, or by default all request threads but an eighth (at least 2),
        which stay free for probes and requests without a body."""
        if self.bodies_in_flight is not None:
            return self.bodies_in_flight
        return max(1, self.threads - max(2, self.threads // 8))

    @property
    def max_body_bytes(self) -> int:
        """The largest request body (or gRPC message) taken: the upload limit and 64 KiB of
        room for framing (multipart, a protocol's JSON header or protobuf fields)."""
        return self.max_upload_bytes + 64 * 1024

    @property
    def grpc_threads(self) -> int:
        """GRPC_MAX_WORKERS, or by default THREADS (as many calls as HTTP requests): RPCs a
        worker takes at once, each on a thread of its own while it waits for its batch (one
        more is refused RESOURCE_EXHAUSTED by gRPC). gRPC holds each received message in
        memory, so a worker's gRPC messages stay within ``grpc_threads * max_body_bytes``, as
        HTTP bodies within BODIES_IN_FLIGHT of them. (A quarter of THREADS refused calls that
        admission would have taken: 64 clients on 2 workers, docs/BENCHMARKS.md.)"""
        if self.grpc_max_workers is not None:
            return self.grpc_max_workers
        return self.threads

    def queue_limit(self, image_bytes: int) -> int:
        """Most admitted images whose batch has not started, for a model whose input tensor
        takes ``image_bytes`` an image: BATCH_QUEUE_SIZE, or by default as many as fit in
        QUEUE_MEMORY_MB (at least one full batch)."""
        if self.batch_queue_size is not None:
            return self.batch_queue_size
        return max(self.batch_max_size, int(self.queue_memory_mb * MIB) // max(1, image_bytes))

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * MIB)

    @property
    def temp_max_bytes(self) -> int:
        return int(self.temp_max_mb * MIB)

    @property
    def feedback_max_bytes(self) -> int:
        return int(self.feedback_max_mb * MIB)

    @property
    def legacy_graph(self) -> LegacyGraph:
        """How to call a frozen graph: ``INPUT_LAYER``, ``OUTPUT_LAYER``, ``INPUT_MEAN``,
        ``INPUT_STD``, ``INPUT_SIZE``."""
        return LegacyGraph(input_layer=self.input_layer, output_layer=self.output_layer,
                           input_mean=self.input_mean, input_std=self.input_std,
                           input_size=self.input_size)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Config":
        """Read every field's variable from ``environ``; unset or empty means the default."""
        values = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            raw = environ.get(name)
            if raw is None or (raw.strip() == "" and f.default is not None):
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except (TypeError, ValueError) as exc:
                shown = name if f.metadata.get("secret") else f"{name}={raw!r}"
                raise ConfigError(f"{shown} is invalid: {exc}") from None
        return cls(**values)

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> "Config":
        """Defaults plus ``overrides`` keyed by field name (as tests pass them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**dict(overrides))
