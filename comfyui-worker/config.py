"""Worker configuration, read once from the environment and validated before anything starts.

Every setting has one environment variable; a bad value stops the worker at start with a message
that names the variable, instead of failing jobs later. The Redis password is kept out of the
object's repr so it cannot reach a log line by accident.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ACCOUNT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
HERE = Path(__file__).resolve().parent
DEFAULT_VRAM_TABLE = HERE / "vram_table.json"

QUEUE_SOURCES = ("redis", "http")
QUEUE_MODES = ("fifo", "priority", "round_robin")
VRAM_CHECK_MODES = ("auto", "on", "off")
OUTPUT_DELIVERY_MODES = ("exchange", "local")
OUTPUT_VERIFY_MODES = ("checksum", "size")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """Raised with every problem found, each naming the variable to fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Config:
    """All settings of one worker; see README.md for each variable's meaning and default."""

    worker_id: str = "worker-1"
    queue_source: str = "redis"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_password: str = field(default="", repr=False)
    redis_db: int = 0
    queue_mode: str = "fifo"
    queue_manager_url: str = "http://127.0.0.1:3000"
    queue_manager_timeout: float = 30.0
    comfyui_url: str = "http://127.0.0.1:8188"
    comfyui_timeout: float = 900.0
    job_timeout: float = 1800.0
    interrupt_grace: float = 30.0
    shutdown_grace: float = 60.0
    queue_poll_interval: float = 5.0
    http_poll_interval: float = 2.0
    comfyui_poll_interval: float = 2.0
    cancel_check_interval: float = 1.0
    heartbeat_interval: float = 15.0
    heartbeat_ttl: int = 60
    queue_manager_job_timeout: float = 3600.0
    backoff_max: float = 30.0
    gpu_index: int = 0
    vram_check: str = "auto"
    vram_margin_mb: int = 1024
    vram_default_mb: int = 4096
    vram_table: str = str(DEFAULT_VRAM_TABLE)
    vram_free_wait: float = 10.0
    vram_backoff: float = 15.0
    vram_backoff_max: float = 120.0
    outputs_dir: str = "/outputs"
    comfyui_output_dir: str = ""
    inputs_dir: str = "/inputs"
    output_delivery: str = "local"
    exchange_url: str = ""
    exchange_token: str = field(default="", repr=False)
    exchange_timeout: float = 60.0
    delivery_timeout: float = 300.0
    output_retain: bool = False
    output_verify: str = "checksum"
    output_max_file_bytes: int = 4 << 30
    output_max_job_bytes: int = 16 << 30
    input_max_job_bytes: int = 2 << 30
    staging_dir: str = "/staging"
    staging_host_dir: str = ""
    comfyui_input_dir: str = ""
    max_job_bytes: int = 16 * 1024 * 1024
    max_attempts: int = 3
    orphan_grace: float = 30.0
    orphan_check_interval: float = 10.0
    max_infra_failures: int = 3
    gpu_required: bool = False
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0
    comfyui_start: bool = False
    comfyui_dir: str = "/opt/ComfyUI"
    comfyui_python: str = sys.executable
    comfyui_args: tuple[str, ...] = ()
    comfyui_extra_model_paths: str = ""
    comfyui_start_timeout: float = 300.0
    health_file: str = "/tmp/comfyui-worker.health"
    health_interval: float = 5.0
    log_format: str = "text"
    log_level: str = "INFO"
    worker_user: str = ""

    @property
    def comfyui_host_port(self) -> tuple[str, int]:
        """Host and port of COMFYUI_URL, used to start a managed ComfyUI on the same address."""
        parts = urlsplit(self.comfyui_url)
        return parts.hostname or "127.0.0.1", parts.port or 8188

    @property
    def comfyui_inputs(self) -> str:
        """ComfyUI's --input-directory: each job's inputs go to a folder of its own inside."""
        return self.comfyui_input_dir or os.path.join(self.staging_dir, "inputs")

    @property
    def collect_root(self) -> str:
        """Where a job's outputs are gathered: the shared outputs tree, or this worker's staging."""
        if self.output_delivery == "local":
            return self.outputs_dir
        return os.path.join(self.staging_dir, "outputs")

    def host_path(self, path: str) -> str:
        """A staging path as the GPU host's admin finds it (STAGING_HOST_DIR), for messages."""
        if (
            self.staging_host_dir
            and os.path.commonpath([self.staging_dir, path]) == self.staging_dir
        ):
            return os.path.join(self.staging_host_dir, os.path.relpath(path, self.staging_dir))
        return path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read and validate; raises ConfigError listing every bad variable at once."""
        reader = _Reader(os.environ if env is None else env)
        d = cls()
        password = reader.secret("REDIS_PASSWORD")
        token = reader.secret("FILE_EXCHANGE_TOKEN")
        cfg = cls(
            worker_id=reader.match(
                "WORKER_ID", d.worker_id, WORKER_ID_RE, "1-64 of A-Z a-z 0-9 _ . -"
            ),
            queue_source=reader.choice("QUEUE_SOURCE", d.queue_source, QUEUE_SOURCES),
            redis_host=reader.str("REDIS_HOST", d.redis_host)
            or reader.problem("REDIS_HOST", "empty"),
            redis_port=reader.int("REDIS_PORT", d.redis_port, 1, 65535),
            redis_password=password,
            redis_db=reader.int("REDIS_DB", d.redis_db, 0, 1_000_000),
            queue_mode=reader.choice("QUEUE_MODE", d.queue_mode, QUEUE_MODES),
            queue_manager_url=reader.url("QUEUE_MANAGER_URL", d.queue_manager_url),
            queue_manager_timeout=reader.float("QUEUE_MANAGER_TIMEOUT", d.queue_manager_timeout),
            comfyui_url=reader.url("COMFYUI_URL", d.comfyui_url),
            comfyui_timeout=reader.float("COMFYUI_TIMEOUT", d.comfyui_timeout),
            job_timeout=reader.float("WORKER_JOB_TIMEOUT", d.job_timeout),
            interrupt_grace=reader.float("WORKER_INTERRUPT_GRACE", d.interrupt_grace),
            shutdown_grace=reader.float("WORKER_SHUTDOWN_GRACE", d.shutdown_grace, minimum=0),
            queue_poll_interval=reader.float("QUEUE_POLL_INTERVAL", d.queue_poll_interval),
            http_poll_interval=reader.float("HTTP_POLL_INTERVAL", d.http_poll_interval),
            comfyui_poll_interval=reader.float("COMFYUI_POLL_INTERVAL", d.comfyui_poll_interval),
            cancel_check_interval=reader.float("CANCEL_CHECK_INTERVAL", d.cancel_check_interval),
            heartbeat_interval=reader.float("HEARTBEAT_INTERVAL", d.heartbeat_interval),
            heartbeat_ttl=reader.int("HEARTBEAT_TTL", d.heartbeat_ttl, 1, 86400),
            queue_manager_job_timeout=reader.float("JOB_TIMEOUT", d.queue_manager_job_timeout),
            backoff_max=reader.float("BACKOFF_MAX", d.backoff_max),
            gpu_index=reader.int("GPU_INDEX", d.gpu_index, 0, 63),
            vram_check=reader.choice("VRAM_CHECK", d.vram_check, VRAM_CHECK_MODES),
            vram_margin_mb=reader.int("VRAM_MARGIN_MB", d.vram_margin_mb, 0, 10_000_000),
            vram_default_mb=reader.int("VRAM_DEFAULT_MB", d.vram_default_mb, 0, 10_000_000),
            vram_table=reader.str("VRAM_MODEL_TABLE", d.vram_table),
            vram_free_wait=reader.float("VRAM_FREE_WAIT", d.vram_free_wait, minimum=0),
            vram_backoff=reader.float("VRAM_BACKOFF", d.vram_backoff),
            vram_backoff_max=reader.float("VRAM_BACKOFF_MAX", d.vram_backoff_max),
            outputs_dir=reader.abspath("OUTPUTS_DIR", d.outputs_dir),
            comfyui_output_dir=reader.abspath("COMFYUI_OUTPUT_DIR", d.comfyui_output_dir, True),
            inputs_dir=reader.abspath("INPUTS_DIR", d.inputs_dir),
            output_delivery=reader.choice(
                "OUTPUT_DELIVERY", d.output_delivery, OUTPUT_DELIVERY_MODES
            ),
            exchange_url=reader.url("FILE_EXCHANGE_URL", "")
            if reader.raw("FILE_EXCHANGE_URL")
            else "",
            exchange_token=token,
            exchange_timeout=reader.float("FILE_EXCHANGE_TIMEOUT", d.exchange_timeout),
            delivery_timeout=reader.float("OUTPUT_DELIVERY_TIMEOUT", d.delivery_timeout),
            output_retain=reader.bool("OUTPUT_RETAIN", d.output_retain),
            output_verify=reader.choice("OUTPUT_VERIFY", d.output_verify, OUTPUT_VERIFY_MODES),
            output_max_file_bytes=reader.int(
                "OUTPUT_MAX_FILE_BYTES", d.output_max_file_bytes, 1, 1 << 50
            ),
            output_max_job_bytes=reader.int(
                "OUTPUT_MAX_JOB_BYTES", d.output_max_job_bytes, 1, 1 << 50
            ),
            input_max_job_bytes=reader.int(
                "INPUT_MAX_JOB_BYTES", d.input_max_job_bytes, 1, 1 << 50
            ),
            staging_dir=reader.abspath("STAGING_DIR", d.staging_dir),
            staging_host_dir=reader.abspath("STAGING_HOST_DIR", "", True),
            comfyui_input_dir=reader.abspath("COMFYUI_INPUT_DIR", "", True),
            max_job_bytes=reader.int("WORKER_MAX_JOB_BYTES", d.max_job_bytes, 1024, 1 << 31),
            max_attempts=reader.int("WORKER_MAX_ATTEMPTS", d.max_attempts, 1, 100),
            orphan_grace=reader.float("ORPHAN_GRACE", d.orphan_grace, minimum=0),
            orphan_check_interval=reader.float("ORPHAN_CHECK_INTERVAL", d.orphan_check_interval),
            max_infra_failures=reader.int(
                "WORKER_MAX_INFRA_FAILURES", d.max_infra_failures, 1, 1000
            ),
            gpu_required=reader.bool("GPU_REQUIRED", d.gpu_required),
            metrics_address=reader.str("METRICS_ADDRESS", d.metrics_address)
            or reader.problem("METRICS_ADDRESS", "empty"),
            metrics_port=reader.int("METRICS_PORT", d.metrics_port, 0, 65535),
            comfyui_start=reader.bool("COMFYUI_START", d.comfyui_start),
            comfyui_dir=reader.str("COMFYUI_DIR", d.comfyui_dir),
            comfyui_python=reader.str("COMFYUI_PYTHON", d.comfyui_python),
            comfyui_args=reader.args("COMFYUI_ARGS"),
            comfyui_extra_model_paths=reader.str("COMFYUI_EXTRA_MODEL_PATHS", ""),
            comfyui_start_timeout=reader.float("COMFYUI_START_TIMEOUT", d.comfyui_start_timeout),
            health_file=reader.abspath("HEALTH_FILE", d.health_file),
            health_interval=reader.float("HEALTH_INTERVAL", d.health_interval),
            log_format=reader.choice("LOG_FORMAT", d.log_format, LOG_FORMATS),
            log_level=reader.choice(
                "LOG_LEVEL", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True
            ),
            worker_user=reader.account("WORKER_USER"),
        )
        if not reader.problems:
            reader.problems.extend(_consistency(cfg))
        if reader.problems:
            raise ConfigError(reader.problems)
        return cfg


def _consistency(cfg: Config) -> list[str]:
    """Cross-variable rules from CONTRACTS.md §4; each message names the variables involved."""
    problems = []
    if cfg.job_timeout < cfg.comfyui_timeout:
        problems.append(
            f"WORKER_JOB_TIMEOUT ({cfg.job_timeout:g}) must be >= COMFYUI_TIMEOUT "
            f"({cfg.comfyui_timeout:g}): a single ComfyUI call may not outlive its job"
        )
    if cfg.job_timeout + cfg.interrupt_grace >= cfg.queue_manager_job_timeout:
        problems.append(
            "WORKER_JOB_TIMEOUT + WORKER_INTERRUPT_GRACE "
            f"({cfg.job_timeout + cfg.interrupt_grace:g})"
            f" must be < JOB_TIMEOUT ({cfg.queue_manager_job_timeout:g}, the queue-manager's "
            "stale-job timeout), or the queue-manager fails jobs that are still running"
        )
    if cfg.heartbeat_interval * 2 > cfg.heartbeat_ttl:
        problems.append(
            f"HEARTBEAT_INTERVAL ({cfg.heartbeat_interval:g}) must be at most half of "
            f"HEARTBEAT_TTL ({cfg.heartbeat_ttl}) so one missed beat does not expire the key"
        )
    if cfg.output_delivery == "exchange":
        if not cfg.exchange_url:
            problems.append(
                "FILE_EXCHANGE_URL: required with OUTPUT_DELIVERY=exchange (the app server's "
                "file exchange, e.g. http://<tailnet address>:8288); OUTPUT_DELIVERY=local keeps "
                "inputs and outputs on this host's disk"
            )
        if not cfg.exchange_token:
            problems.append(
                "FILE_EXCHANGE_TOKEN_FILE: required with OUTPUT_DELIVERY=exchange (a file holding "
                "the exchange's token)"
            )
    # The worker empties ComfyUI's input folder at start and after each job: it must hold
    # nothing else.
    others = {
        "COMFYUI_OUTPUT_DIR": cfg.comfyui_output_dir,
        "OUTPUTS_DIR"
        if cfg.output_delivery == "local"
        else "STAGING_DIR/outputs": cfg.collect_root,
    }
    if cfg.output_delivery == "local":
        others["INPUTS_DIR"] = cfg.inputs_dir
    for name, folder in others.items():
        if folder and _nested(cfg.comfyui_inputs, folder):
            problems.append(
                f"COMFYUI_INPUT_DIR ({cfg.comfyui_inputs}) and {name} ({folder}) must not be the "
                "same folder or one inside the other: the worker empties ComfyUI's input folder"
            )
    if cfg.output_max_file_bytes > cfg.output_max_job_bytes:
        problems.append("OUTPUT_MAX_FILE_BYTES must be <= OUTPUT_MAX_JOB_BYTES")
    if cfg.vram_backoff > cfg.vram_backoff_max:
        problems.append("VRAM_BACKOFF must be <= VRAM_BACKOFF_MAX")
    if cfg.comfyui_start:
        host, _ = cfg.comfyui_host_port
        if not _is_loopback(host):
            problems.append(
                f"COMFYUI_URL host {host!r} must be a loopback address when COMFYUI_START=true "
                "(ComfyUI is never exposed beyond the container)"
            )
        if not Path(cfg.comfyui_dir, "main.py").is_file():
            problems.append(f"COMFYUI_DIR ({cfg.comfyui_dir}) has no main.py")
    return problems


def _nested(a: str, b: str) -> bool:
    """True when two folders are the same or one lies inside the other."""
    common = os.path.commonpath([os.path.normpath(a), os.path.normpath(b)])
    return common in (os.path.normpath(a), os.path.normpath(b))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Parses one variable at a time and collects problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def problem(self, name: str, why: str) -> str:
        self.problems.append(f"{name}: {why}")
        return ""

    def str(self, name: str, default: str) -> str:
        value = self.env.get(name)
        return default if value is None else value.strip()

    def secret(self, name: str) -> str:
        """NAME, or else the contents of the file that NAME_FILE names."""
        value = self.str(name, "")
        path = self.str(f"{name}_FILE", "")
        if path and not value:
            try:
                value = Path(path).read_text().strip()
            except OSError as exc:
                self.problem(f"{name}_FILE", f"cannot read {path}: {exc.strerror}")
        return value

    def account(self, name: str) -> str:
        """An account name; unset is "", set but empty is a problem (the image sets it)."""
        value = self.env.get(name)
        if value is None:
            return ""
        value = value.strip()
        if not ACCOUNT_RE.match(value):
            return self.problem(
                name,
                f"{value!r} is not an account name (the one the worker becomes when started as "
                "root: the image's is comfy)",
            )
        return value

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self.problem(name, f"{value!r} is not an integer")
            return default
        if not lo <= number <= hi:
            self.problem(name, f"{number} is outside {lo}..{hi}")
            return default
        return number

    def float(self, name: str, default: float, minimum: float = 0.001) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            self.problem(name, f"{value!r} is not a number of seconds")
            return default
        if not number >= minimum or number == float("inf"):
            self.problem(name, f"{value} must be a finite number >= {minimum:g}")
            return default
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.problem(name, f"{value!r} is not a boolean (true/false)")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        if value not in choices:
            self.problem(name, f"{value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def match(self, name: str, default: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if not pattern.match(value):
            self.problem(name, f"{value!r} must be {what}")
            return default
        return value

    def url(self, name: str, default: str) -> str:
        value = self.raw(name) or default
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            self.problem(name, f"{value!r} has an invalid port")
            return default
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(name, f"{value!r} must be an http:// or https:// URL with a host")
            return default
        return value.rstrip("/")

    def abspath(self, name: str, default: str, allow_empty: bool = False) -> str:
        value = self.str(name, default)
        if not value and allow_empty:
            return ""
        if not os.path.isabs(value) or "\0" in value:
            self.problem(name, f"{value!r} must be an absolute path")
            return default
        return os.path.normpath(value)

    def args(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            self.problem(name, f"cannot be split into arguments: {exc}")
            return ()


# ---- the check of an environment file, for the play on the controller ----------------------

# Secrets the worker reads from NAME or from the file that NAME_FILE names; their values never
# reach the check's output.
SECRET_VARIABLES = ("REDIS_PASSWORD", "FILE_EXCHANGE_TOKEN")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
ON_THE_HOST = "(a file on the GPU host)"


def read_env_file(text: str) -> tuple[dict[str, str], list[str]]:
    """NAME=VALUE lines read as Compose's env_file reads simple values.

    Blank lines and lines starting with # are skipped, `export ` is allowed, a value may be
    quoted ('...' literally, "..." with \\n \\t \\" \\\\ escapes), and an unquoted value ends at
    ` #`. A later line wins. Variable substitution and values spanning lines are not read: a
    line that is not NAME=VALUE is reported by its number, never by its text, which could be
    part of a secret.
    """
    env: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        name, equals, value = stripped.partition("=")
        name = name.strip()
        if not equals or not ENV_NAME_RE.match(name):
            problems.append(f"line {number} is not NAME=VALUE (a value with a line break?)")
            continue
        value = value.lstrip()
        if value[:1] in ("'", '"'):
            unquoted = _unquote(value)
            if unquoted is None:
                problems.append(f"line {number}: a quoted value does not end on its line")
                continue
            value = unquoted
        else:
            value = value.split(" #", 1)[0].rstrip()
        env[name] = value
    return env, problems


def _unquote(value: str) -> str | None:
    """The text between a value's opening quote and its closing one; None when unclosed."""
    quote, out, i = value[0], [], 1
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
    while i < len(value):
        char = value[i]
        if char == quote:
            return "".join(out)
        if quote == '"' and char == "\\" and i + 1 < len(value):
            following = value[i + 1]
            out.append(escapes.get(following, "\\" + following))
            i += 2
            continue
        out.append(char)
        i += 1
    return None


def check_env(env: Mapping[str, str]) -> list[str]:
    """Every problem the worker would report at start with this environment, except those
    about files on the GPU host: secrets given as NAME_FILE are taken as present, and
    COMFYUI_DIR is not looked for here. Secret values are replaced by ***."""
    mapping = dict(env)
    for name in SECRET_VARIABLES:
        if not mapping.get(name, "").strip() and mapping.get(f"{name}_FILE", "").strip():
            mapping[name] = ON_THE_HOST
            del mapping[f"{name}_FILE"]
    try:
        Config.from_env(mapping)
    except ConfigError as exc:
        problems = [
            p for p in exc.problems if not (p.startswith("COMFYUI_DIR (") and "main.py" in p)
        ]
    else:
        problems = []
    return [_redact(p, env) for p in problems]


def _redact(text: str, env: Mapping[str, str]) -> str:
    for name in SECRET_VARIABLES:
        secret = env.get(name, "").strip()
        if secret:
            text = text.replace(secret, "***")
    return text


def main(argv: list[str] | None = None) -> int:
    """`python3 config.py --check ENVFILE`: 0 when the worker accepts the file, else 2 with
    every problem, one a line, each naming its variable."""
    parser = argparse.ArgumentParser(
        prog="config.py",
        description="Check an environment file (the project's .env) as the worker checks its "
        "environment at start, without its files on the GPU host. Standard library only.",
    )
    parser.add_argument(
        "--check", metavar="ENVFILE", required=True, help="the file to check; - reads stdin"
    )
    args = parser.parse_args(argv)
    try:
        text = sys.stdin.read() if args.check == "-" else Path(args.check).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{args.check}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
        return 2
    env, problems = read_env_file(text)
    problems = [_redact(p, env) for p in problems] + check_env(env)
    name = "standard input" if args.check == "-" else args.check
    if problems:
        print(f"{name}: the worker would refuse this configuration:")
        for problem in problems:
            print(f"  {problem}")
        return 2
    print(f"{name}: the worker accepts this configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
