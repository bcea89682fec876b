"""bench/bench_verdicts.py runs to completion and its own bookkeeping check passes: a short run
of every phase (tiny load, so seconds), against real ``outcomewatch serve`` processes. Speed is
not asserted: the benchmark prints figures, it is not a test of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_verdict_benchmark_completes_and_counts_every_verdict_once() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_verdicts.py"), "--seconds", "1",
         "--parse-seconds", "0.1", "--spans", "100", "--in-flight", "2", "--trace-idle", "300ms",
         "--lookup-spans", "3000", "--live-traces", "100", "--drain-timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for mix in ("quiet", "typical", "heavy"):
        assert lines[mix].endswith("  OK"), result.stdout
    assert "; OK (" in lines["lookup"], result.stdout
    assert "RSS per live trace" in lines["live"], result.stdout


def test_the_soak_with_the_heavy_mix_completes_and_its_checks_pass() -> None:
    """A few seconds of bench/soak.py's rule-heavy mix with one kill -9 and restart: every
    check of soak_checks.py passes (exit code 0). No disk-full phase: it needs root."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--mix", "heavy", "--minutes", "0.1",
         "--rate", "20", "--traces", "2", "--workers", "2", "--kill-every", "3",
         "--trace-idle", "300ms"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if ":" in line}
    assert int(lines["kills"].split()[1]) >= 1, result.stdout
    assert "FAILED" not in lines["checks"] and "evidence OK" in lines["checks"], result.stdout
