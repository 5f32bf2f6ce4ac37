"""Settings: the server's (one frozen dataclass, filled from `rankserve serve` flags, then `RANKSERVE_*` env
vars, then defaults; flags win) and the engine's (``EngineConfig``, derived from them).

Every ``Settings`` field maps to a flag `--field-name` and an env var `RANKSERVE_FIELD_NAME`. List-valued
keys (`--api-key`, `--admin-key`, repeatable) also read the plural env vars `RANKSERVE_API_KEYS` and
`RANKSERVE_ADMIN_KEYS`: comma-separated `KEY` or `KEY:TENANT` entries. Sizes given as 0 are taken from the
machine at start-up (the KV cache from free memory, as vLLM's ``gpu_memory_utilization``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any

from server.common.auth import parse_key

MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    attention: str = "auto"  # auto | dense | paged | flashinfer (server.model.attention)
    max_batch_tokens: int = 512  # tokens per step (decodes + prefill chunks)
    max_running: int = 32
    max_queue: int = 256
    max_model_len: int = 2048  # prompt + max_tokens; capped by the base's max positions
    kv_cache_bytes: int = 0  # 0 = from free memory (model.kvcache.kv_budget_bytes)
    kv_block_size: int = 16
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory weights + slots + KV cache may fill
    max_slots: int = 32  # device adapter slots
    max_rank: int = 64
    cpu_cache_bytes: int = 0  # CPU tier of adapters; 0 = a share of the host's available memory
    request_timeout_s: float = 600.0  # default deadline when the request sets none
    slot_wait_s: float = 30.0  # longest wait for a free adapter slot before 503
    hang_timeout_s: float = 120.0  # a step longer than this marks the engine unhealthy
    merge_single_adapter: bool = False
    async_adapter_loads: bool = True  # read adapters from the store on loader threads, not the engine thread
    loader_processes: int = 0  # >0: loader threads hand cold loads to this many processes (load_process)
    seed: int = 0


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"
    served_model_name: str | None = None  # the base's id in /v1/models and `model`; default: the --model value
    store: str = "adapters"
    store_cache: str = ""  # object store only: the local blob cache directory ("" = under RANKSERVE_CACHE)
    store_cache_bytes: int = 0  # object store only: the blob cache's bound; 0 = 4 GiB
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # inference keys, each "KEY" or "KEY:TENANT"
    admin_keys: tuple[str, ...] = ()  # admin keys (upload, delete), same syntax; no tenant = global admin
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    max_queue: int = 256
    max_running: int = 32
    max_batch_tokens: int = 512
    max_slots: int = 32
    max_rank: int = 64
    max_model_len: int = 2048
    kv_cache_bytes: int = 0  # 0 = sized from free memory
    kv_block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_cache_bytes: int = 0  # 0 = sized from the host's available memory
    loader_processes: int = 1  # cold adapter loads in this many separate processes (0 = loader threads only)
    slot_wait: float = 30.0  # seconds a request waits for a free adapter slot before 503
    max_upload_bytes: int = 256 * MiB
    max_body_bytes: int = 2 * MiB  # JSON request bodies
    request_timeout: float = 600.0  # seconds from arrival to the last token
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    stream_write_timeout: float = 30.0  # a streaming client that reads nothing this long is cut off
    header_timeout: float = 10.0  # a request head (line + headers) must arrive within this
    body_timeout: float = 30.0  # longest wait for the next piece of a request body or upload (408)
    limit_concurrency: int = 2048  # open connections + in-flight requests before 503 (uvicorn's limit)
    hang_timeout: float = 120.0  # one engine step longer than this: the engine is hung (health 503)
    unhealthy_exit_after: float = 2.0  # dead or hung engine: exit 1 this many seconds later; < 0 = never
    rate_limit: float = 0.0  # requests per second per key (token bucket); 0 = off
    rate_burst: int = 0  # bucket size; 0 = max(1, rate_limit)
    bad_key_rate: float = 1.0  # failed-key attempts per second per client address once the burst is used; 0 = off
    bad_key_burst: int = 20
    tenant_max_adapters: int = 0  # adapters one tenant may store; 0 = unlimited (public adapters never count)
    tenant_max_bytes: int = 0  # bytes of adapters one tenant may store; 0 = unlimited
    merge: bool = True  # fold the single running adapter into W0 (merge mode); --no-merge turns it off
    adapter_root: str | None = None  # POST /v1/load_lora_adapter reads only under this directory; None = refused
    demo_adapters: bool = False
    log_level: str = "info"

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        return EngineConfig(device=self.device, dtype=self.dtype, attention=self.attention,
                            max_batch_tokens=self.max_batch_tokens,
                            max_running=self.max_running, max_queue=self.max_queue,
                            max_model_len=self.max_model_len, kv_cache_bytes=self.kv_cache_bytes,
                            kv_block_size=self.kv_block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                            max_slots=self.max_slots, max_rank=self.max_rank, cpu_cache_bytes=self.cpu_cache_bytes,
                            loader_processes=self.loader_processes,
                            request_timeout_s=self.request_timeout, slot_wait_s=self.slot_wait,
                            merge_single_adapter=self.merge, hang_timeout_s=self.hang_timeout)


_HELP = {
    "model": "smollm2 | minilm | tiny-llama | tiny-bert | a local Hugging Face directory",
    "served_model_name": "the base model's id in the API (default: the --model value)",
    "store": "adapter store: a directory, or s3://BUCKET/PREFIX (endpoint and credentials from the AWS variables)",
    "store_cache": "s3 stores: the local blob cache directory (default: under $RANKSERVE_CACHE)",
    "store_cache_bytes": "s3 stores: the blob cache's size bound in bytes (0 = 4 GiB)",
    "api_keys": "inference key, KEY or KEY:TENANT (repeatable; env RANKSERVE_API_KEYS, comma-separated)",
    "admin_keys": "admin key for uploads and deletes, KEY or KEY:TENANT (repeatable; env RANKSERVE_ADMIN_KEYS)",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)",
    "attention": "auto | dense | paged | flashinfer: attention over the paged KV cache (auto: flashinfer on CUDA "
                 "when installed, else paged; dense is the padded reference)",
    "max_queue": "waiting requests before 429",
    "max_running": "requests in the running batch",
    "max_batch_tokens": "tokens per engine step",
    "max_slots": "device adapter slots",
    "max_rank": "largest adapter rank accepted",
    "max_model_len": "prompt + max_tokens limit (capped by the base model)",
    "kv_cache_bytes": "KV cache size in bytes; 0 = from free memory (CUDA: up to --gpu-memory-utilization of the "
                      "device; CPU: 1/8 of available memory), never more than max-running full-length sequences",
    "kv_block_size": "tokens per KV cache block",
    "gpu_memory_utilization": "CUDA: share of device memory that weights, adapter slots and the KV cache may fill",
    "cpu_cache_bytes": "bytes of adapters kept in host memory (the CPU tier); 0 = 1/8 of available memory",
    "loader_processes": "read, check and pack cold adapters in this many worker processes instead of threads of the "
                        "server's own interpreter (local-directory stores; 0 = threads only)",
    "slot_wait": "seconds a request waits for a free adapter slot before 503",
    "max_upload_bytes": "adapter upload cap, enforced while streaming (413)",
    "max_body_bytes": "JSON request body cap (413)",
    "request_timeout": "seconds before a request fails with 504",
    "drain_timeout": "seconds in-flight requests get to finish after SIGTERM",
    "stream_write_timeout": "seconds a stream may wait on a client that reads nothing before the request is "
                            "aborted",
    "header_timeout": "seconds a client has to send a request's line and headers (slow clients are closed)",
    "body_timeout": "seconds the server waits for the next piece of a request body or upload before 408",
    "limit_concurrency": "concurrent connections and requests before the server answers 503",
    "hang_timeout": "seconds one engine step may run before the engine counts as hung (health 503)",
    "unhealthy_exit_after": "seconds after the engine dies or hangs before the process exits 1 so its "
                            "supervisor restarts it (requests get an error first); negative = never exit",
    "rate_limit": "requests per second per API key (0 = off)",
    "rate_burst": "rate-limit bucket size (default max(1, rate))",
    "bad_key_rate": "failed API-key attempts per second allowed per client address after --bad-key-burst; "
                    "beyond it 429 before any key is compared (0 = off)",
    "bad_key_burst": "failed API-key attempts per client address before --bad-key-rate applies",
    "tenant_max_adapters": "adapters one tenant may store (403 tenant_quota_exceeded beyond it); 0 = unlimited",
    "tenant_max_bytes": "bytes of adapters one tenant may store (507 tenant_quota_exceeded beyond it); 0 = unlimited",
    "merge": "fold the adapter into the base weights while it is the only one running (default on; "
             "--no-merge turns it off)",
    "adapter_root": "directory under which POST /v1/load_lora_adapter (vLLM's route, admin keys) may read "
                    "adapters from server paths; unset = the route is refused",
    "demo_adapters": "put two synthetic demo adapters into the store at start if absent",
    "log_level": "debug | info | warning | error",
}
_LISTS = {"api_keys": "api_key", "admin_keys": "admin_key"}  # field -> singular flag / env name


def _flag(name: str) -> str:
    return "--" + _LISTS.get(name, name).replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        if f.name in _LISTS:
            p.add_argument(_flag(f.name), dest=f.name, action="append", default=None, help=_HELP[f.name])
        elif f.type == "bool":
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, help=_HELP.get(f.name))


def _split_keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _from_env(f, env: dict[str, str]) -> Any:
    if f.name in _LISTS:
        keys = []
        for var in ("RANKSERVE_" + f.name.upper(), "RANKSERVE_" + _LISTS[f.name].upper()):
            keys += _split_keys(env.get(var, ""))
        return tuple(keys) if keys else None
    raw = env.get("RANKSERVE_" + f.name.upper())
    if raw is None or raw == "":
        return None
    if f.type == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"RANKSERVE_{f.name.upper()}={raw!r}: expected true/false")
    kind = {"int": int, "float": float}.get(str(f.type), str)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"RANKSERVE_{f.name.upper()}={raw!r}: expected {kind.__name__}") from None


def settings_from(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Settings:
    """Flags win over env vars, env vars over defaults; then the values are checked."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        flag = getattr(args, f.name, None) if args is not None else None
        if f.name in _LISTS and flag is not None:
            flag = tuple(k for v in flag for k in _split_keys(v))
        value = flag if flag is not None else _from_env(f, env)
        if value is not None:
            values[f.name] = value
    s = Settings(**values)
    check(s)
    return s


def check(s: Settings) -> None:
    problems = []
    for name in ("max_queue", "max_running", "max_batch_tokens", "max_slots", "max_rank", "max_model_len",
                 "max_upload_bytes", "max_body_bytes", "kv_block_size", "limit_concurrency"):
        if getattr(s, name) < 1:
            problems.append(f"{_flag(name)} must be positive, got {getattr(s, name)}")
    for name in ("port", "kv_cache_bytes", "cpu_cache_bytes", "store_cache_bytes", "tenant_max_adapters",
                 "tenant_max_bytes", "loader_processes"):
        # 0: any free port / sized from the machine / unlimited
        if getattr(s, name) < 0:
            problems.append(f"{_flag(name)} must be >= 0, got {getattr(s, name)}")
    if not 0 < s.gpu_memory_utilization <= 1:
        problems.append(f"--gpu-memory-utilization must be in (0, 1], got {s.gpu_memory_utilization}")
    for name in ("request_timeout", "drain_timeout", "hang_timeout", "stream_write_timeout", "slot_wait",
                 "header_timeout", "body_timeout"):
        if getattr(s, name) <= 0:
            problems.append(f"{_flag(name)} must be > 0 seconds, got {getattr(s, name)}")
    for spec in (*s.api_keys, *s.admin_keys):
        try:
            parse_key(spec, admin=False)
        except ValueError as e:
            problems.append(f"--api-key/--admin-key: {e}")
    if s.rate_limit < 0 or s.rate_burst < 0:
        problems.append("--rate-limit and --rate-burst must be >= 0")
    if s.bad_key_rate < 0 or s.bad_key_burst < 0:
        problems.append("--bad-key-rate and --bad-key-burst must be >= 0")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"--log-level {s.log_level!r} is not one of debug, info, warning, error")
    if problems:
        raise ValueError("; ".join(problems))


__all__ = ["EngineConfig", "Settings", "add_arguments", "settings_from"]
