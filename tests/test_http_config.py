"""`rankserve serve` settings (flags > RANKSERVE_* env > defaults) and the `rankserve adapters` dispatch."""

from __future__ import annotations

import json

import pytest

from server.cli import build_parser, main
from server.common.config import Settings, settings_from

BRIEF_FLAGS = ["--model", "--served-model-name", "--store", "--host", "--port", "--api-key", "--admin-key", "--device",
               "--dtype", "--max-queue", "--max-running", "--max-batch-tokens", "--max-slots", "--max-rank",
               "--max-upload-bytes", "--max-body-bytes", "--request-timeout", "--drain-timeout", "--rate-limit",
               "--merge", "--demo-adapters", "--log-level", "--kv-cache-bytes", "--kv-block-size",
               "--gpu-memory-utilization", "--cpu-cache-bytes", "--slot-wait"]


def parse(*argv: str, env: dict | None = None) -> Settings:
    return settings_from(build_parser().parse_args(["serve", *argv]), env=env or {})


def test_every_documented_flag_exists(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in BRIEF_FLAGS:
        assert flag in text, flag


def test_defaults_without_flags_or_env():
    s = parse()
    assert s == Settings() and s.base_name == "smollm2" and s.api_keys == ()


def test_env_fills_in_and_flags_win():
    env = {"RANKSERVE_MODEL": "tiny-llama", "RANKSERVE_PORT": "9001", "RANKSERVE_MERGE": "false",
           "RANKSERVE_RATE_LIMIT": "2.5", "RANKSERVE_API_KEYS": "a:t1, b:t2", "RANKSERVE_API_KEY": "c",
           "RANKSERVE_ADMIN_KEY": "root", "RANKSERVE_SERVED_MODEL_NAME": "tiny"}
    s = parse(env=env)
    assert (s.model, s.port, s.merge, s.rate_limit, s.base_name) == ("tiny-llama", 9001, False, 2.5, "tiny")
    assert s.api_keys == ("a:t1", "b:t2", "c") and s.admin_keys == ("root",)
    s = parse("--port", "9002", "--api-key", "x:t9", "--api-key", "y", "--model", "tiny-bert", env=env)
    assert (s.port, s.model, s.api_keys) == (9002, "tiny-bert", ("x:t9", "y"))
    assert s.merge is False  # not given as a flag: the env value stands
    e = s.engine_config()
    assert not e.merge_single_adapter and e.max_queue == s.max_queue and e.request_timeout_s == s.request_timeout
    assert parse("--merge", env=env).merge is True and parse().merge is True  # merge mode is on by default
    assert parse("--no-merge").merge is False


@pytest.mark.parametrize("argv, env, needle", [
    (["--max-queue", "0"], {}, "--max-queue"),
    (["--request-timeout", "-1"], {}, "--request-timeout"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--kv-block-size", "0"], {}, "--kv-block-size"),
    (["--kv-cache-bytes", "-1"], {}, "--kv-cache-bytes"),
    (["--gpu-memory-utilization", "1.5"], {}, "--gpu-memory-utilization"),
    (["--slot-wait", "0"], {}, "--slot-wait"),
    (["--loader-processes", "-1"], {}, "--loader-processes"),
    ([], {"RANKSERVE_PORT": "eighty"}, "RANKSERVE_PORT"),
    ([], {"RANKSERVE_DEMO_ADAPTERS": "maybe"}, "RANKSERVE_DEMO_ADAPTERS"),
])
def test_bad_values_name_the_setting(argv, env, needle):
    with pytest.raises(ValueError, match=needle):
        parse(*argv, env=env)


def test_engine_sizes_reach_the_engine_config_from_flags_and_env():
    env = {"RANKSERVE_KV_CACHE_BYTES": "1048576", "RANKSERVE_CPU_CACHE_BYTES": "4096", "RANKSERVE_SLOT_WAIT": "2.5"}
    e = parse("--kv-block-size", "32", "--gpu-memory-utilization", "0.5", env=env).engine_config()
    assert (e.kv_cache_bytes, e.cpu_cache_bytes, e.slot_wait_s, e.kv_block_size, e.gpu_memory_utilization) == (
        1 << 20, 4096, 2.5, 32, 0.5)
    d = parse().engine_config()
    assert d.kv_cache_bytes == 0 and d.cpu_cache_bytes == 0  # sized from the machine at start-up
    assert d.loader_processes == 1 and parse(env={"RANKSERVE_LOADER_PROCESSES": "0"}).engine_config().loader_processes == 0


def test_bad_flag_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-slots", "0"])
    assert e.value.code == 2 and "--max-slots" in capsys.readouterr().err


def test_adapters_subcommand_dispatches_to_the_store_cli(tmp_path, tiny_llama, capsys):
    from adapters_store.synth import random_adapter

    path = tmp_path / "a.safetensors"
    random_adapter(tiny_llama, "lora", 2, seed=1).save(path)
    assert main(["adapters", "push", "cli-one", str(path), "--store", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--store", str(tmp_path / "store"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == ["cli-one"]
