"""bench/gpu_check runs end to end without CUDA (--cpu: small shapes, CUDA-only stages skipped) and writes
its whole report into one folder."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check"), "--cpu", "--out", str(out),
                        "--models", "smollm2-135m"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("env.json", "tests_gpu.log", "kernels.log", "serving.json", "serving.md", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    env = json.loads((out / "env.json").read_text())
    assert env["mode"] == "cpu" and env["peaks"]["flops"] > 0
    assert "skipped" in (out / "tests_gpu.log").read_text()  # the gpu tests were collected, and skipped here
    kernels = (out / "kernels.log").read_text()
    if importlib.util.find_spec("triton") is not None:
        assert " passed" in kernels  # the interpreted kernels ran against the reference
    else:
        assert "skipped" in kernels
    serving = json.loads((out / "serving.json").read_text())["smollm2-135m"]
    for config in ("base", "distinct", "merged"):
        for metric in ("tok_s", "ttft_p50_s", "itl_p50_s", "itl_p99_s"):
            assert serving[config][metric]["measured"] > 0 and serving[config][metric]["floor"] > 0
    assert serving["merged"]["merged"] is True  # the one-adapter run was really served merged
    assert serving["cold_load_p50_s"]["measured"] > 0
    assert "ALL OK" in (out / "summary.md").read_text()
