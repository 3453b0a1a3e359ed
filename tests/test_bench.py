"""``hexa bench`` runs end to end at a tiny size and reports what it measured: every intent
applied, every command answered, the phases' figures present. The figures themselves are
never checked (a benchmark is not a timed test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

SMALL = [
    "--devices", "3", "--warmup", "1", "--commands", "5", "--rate", "50",
    "--intent-rtt-samples", "5", "--intents", "30",
    "--report-seconds", "0.5", "--reporters", "3", "--report-rate", "20",
]  # fmt: skip


def bench(*args: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "hexa.hub.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(json.loads(r.stdout))


def _assert_whole_hub_run(out: dict[str, Any]) -> None:
    assert out["connect"]["devices"] == 3
    assert out["rest_rtt_ms"]["n"] == 5 and out["rest_rtt_ms"]["failed"] == 0
    # the hub's own histogram saw the same 5 timed commands (not the warm-up one)
    served = out["rest_hub_side_share"]
    assert served["n"] == 5
    assert set(served) >= {"le_2ms", "le_10ms", "le_25ms", "le_50ms"}
    assert all(0 <= share <= 1 for name, share in served.items() if name != "n")
    assert out["mqtt_intent_rtt_ms"]["n"] == 5
    assert out["intents"] == {**out["intents"], "applied": 30, "not_applied": 0}
    assert out["acked_intents_per_s"] > 0
    reports = out["state_reports"]
    assert reports["sent"] > 0 and reports["ingested"] == reports["sent"]
    assert out["hub"]["rss_mb"] > 0


@pytest.mark.parametrize("setup", ["seed", "claim"])
def test_whole_hub_bench_on_the_embedded_broker(setup: str) -> None:
    """Devices written into the database (--seed) or provisioned and claimed through the API."""
    out = bench(*SMALL, *(["--seed"] if setup == "seed" else []))
    assert out["broker"] == "embedded"
    _assert_whole_hub_run(out)


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs the mosquitto binary")
def test_whole_hub_bench_on_mosquitto() -> None:
    out = bench(*SMALL, "--seed", "--broker", "mosquitto")
    assert out["broker"] == "mosquitto"
    _assert_whole_hub_run(out)


def test_connect_only_bench() -> None:
    out = bench("--devices", "5", "--seed", "--connect-only")
    assert out["connect"]["devices"] == 5 and out["connect"]["per_s"] > 0
    assert "rest_rtt_ms" not in out


def test_schedule_tick_bench() -> None:
    out = bench("--schedules", "20")
    assert out["fired"] == 20 and out["recorded_runs"] == 20


def test_ota_bench() -> None:
    out = bench(
        "--ota", "--devices", "5", "--ota-downloads", "2", "--ota-artifact-mib", "1",
        "--ota-spreads", "0",
    )  # fmt: skip
    assert [c["n"] for c in out["checks_ms"]] == [5] and out["checks_ms"][0]["failed"] == 0
    assert all(r["verified"] == 2 for r in out["downloads"]["rounds"])
