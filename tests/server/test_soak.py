"""A short run of bench/soak.py (the 10-minute soak is a benchmark): every check must hold."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_short_soak_passes_every_check(long_context_model, tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # dataclasses look their module up there
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    code = soak.main(["--seconds", "15", "--clients", "8", "--model", str(long_context_model), "--vocab", "256",
                      "--warmup", "5", "--rss-every", "1", "--out", str(out), "--", "--mem-budget", "0.05",
                      "--threads", "1", "--dtype", "float32"])  # float32 on every machine (bfloat16 is slow where not native)
    report = json.loads(out.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert report["checks"] and not failed, (failed, report["rss_bytes"], report["client"])
    assert code == 0
    client = report["client"]
    assert client["finished"] > 20 and client["abandoned"] > 0 and client["bad_requests"] > 0, client
