"""The load-test tooling: the runner's summaries from Locust's CSVs and the server's metrics (fast), the soak's
RSS fit, and (slow) `loadtests/run` end to end on tiny-llama. Locust itself only ever runs in its own
process: importing it here would monkey-patch this process's sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import runner, soak

ROOT = Path(__file__).resolve().parents[1]

STATS = """Type,Name,Request Count,Failure Count,50%,90%,99%
POST,/v1/completions,10,1,200,400,900
POST,/v1/classify,5,0,50,80,90
TTFT,time to first token,4,0,30,60,70
ITL,inter-token latency,40,0,5,9,12
REJECTED,REJECTED 429,3,0,0,0,0
,Aggregated,62,1,40,300,800
"""
FAILURES = "Method,Name,Error,Occurrences\nPOST,/v1/completions,500: boom,1\n"
EXCEPTIONS = "Count,Message,Traceback,Nodes\n2,KeyError: 'x',tb,local\n"


def write_csvs(prefix: Path, exceptions: str = "Count,Message,Traceback,Nodes\n") -> None:
    Path(f"{prefix}_stats.csv").write_text(STATS)
    Path(f"{prefix}_failures.csv").write_text(FAILURES)
    Path(f"{prefix}_exceptions.csv").write_text(exceptions)


def test_client_view_separates_requests_rejections_and_synthetic_entries(tmp_path):
    prefix = tmp_path / "lt"
    write_csvs(prefix)
    view = runner.client_view(prefix, wall=5.0)
    assert view["requests"] == 15  # TTFT/ITL/REJECTED entries are not HTTP requests
    assert view["rejected"] == {"REJECTED 429": 3} and view["completed"] == 12
    assert view["failures"] == 1 and view["failures_by_kind"] == {"POST /v1/completions: 500: boom": 1}
    assert view["requests_per_second"] == 3.0
    assert view["ttft_seconds"] == {"50": 0.03, "90": 0.06, "99": 0.07}
    assert view["completion_e2e_seconds"]["99"] == 0.9
    write_csvs(prefix, EXCEPTIONS)
    assert runner.client_view(prefix, wall=5.0)["failures"] == 3  # a task that raised is a failure too


def test_server_view_counts_increases_by_label():
    before = {"rankserve_requests_total{endpoint=/v1/completions,status=200}": 10.0,
              "rankserve_adapter_load_duration_seconds_sum{source=disk}": 1.0,
              "rankserve_adapter_load_duration_seconds_count{source=disk}": 2.0}
    after = {"rankserve_requests_total{endpoint=/v1/completions,status=200}": 15.0,
             "rankserve_requests_total{endpoint=/v1/completions,status=503}": 2.0,
             "rankserve_requests_total{endpoint=/v1/adapters/{adapter_id},status=200}": 1.0,
             "rankserve_requests_rejected_total{reason=queue_full}": 4.0,
             "rankserve_requests_cancelled_total{}": 1.0,
             "rankserve_adapter_load_duration_seconds_sum{source=disk}": 2.0,
             "rankserve_adapter_load_duration_seconds_count{source=disk}": 6.0,
             "rankserve_adapter_load_duration_seconds_sum{source=cpu}": 0.1,
             "rankserve_adapter_load_duration_seconds_count{source=cpu}": 2.0}
    view = runner.server_view(before, after)
    assert view["status_counts"] == {"200": 6, "503": 2} and view["status_5xx"] == 2
    assert view["rejected_by_reason"] == {"queue_full": 4} and view["cancelled"] == 1
    assert view["adapter_loads_by_source"] == {"disk": 4, "cpu": 2}
    assert view["adapter_load_mean_seconds"] == {"disk": 0.25, "cpu": 0.05}


def test_rss_slope_is_the_least_squares_fit():
    flat = [(t, 500.0) for t in range(0, 600, 5)]
    assert soak.slope_mib_per_min(flat) == 0.0
    leak = [(t, 500.0 + 0.1 * t) for t in range(0, 600, 5)]  # 0.1 MiB/s = 6 MiB/min
    assert soak.slope_mib_per_min(leak) == pytest.approx(6.0)
    figures = soak.rss_figures([(0, 400.0), (300, 520.0), (600, 520.0)] + [(t, 520.0) for t in range(310, 600, 10)])
    assert figures["first_mib"] == 400.0 and figures["peak_mib"] == 520.0
    assert figures["slope_second_half_mib_per_min"] == 0.0 and figures["slope_mib_per_min"] > 0
    assert soak.slope_mib_per_min([(0, 1.0)]) is None


@pytest.mark.slow
def test_loadtests_run_end_to_end_on_tiny_llama(tmp_path):
    out = tmp_path / "lt"
    proc = subprocess.run([str(ROOT / "loadtests/run"), "--model", "tiny-llama", "--adapters", "6", "--duration",
                           "8", "--users", "3", "--spawn-rate", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["server"]["status_5xx"] == 0
    assert summary["completed"] > 10 and summary["generated_tokens_per_second"] > 0
    assert set(json.loads((out / "manifest.json").read_text())["generate"]) == {f"lt-gen-{i:04d}" for i in range(6)}
    assert (out / "summary.md").read_text().startswith("# Load test summary")
    assert (out / "plot.png").stat().st_size > 10_000
    assert "Command: `loadtests/run --model tiny-llama" in (out / "summary.md").read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
