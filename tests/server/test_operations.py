"""Operations: `serve` binds loopback unless told otherwise, a taken port is one clear line, and the
API key is compared in constant time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from tests.server.test_faults import ENV, serve_args, wait_ready  # noqa: E402

pytestmark = pytest.mark.slow


def listening_addresses(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp and tcp6 (hex, as the kernel writes them)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_serve_binds_loopback_by_default_and_a_taken_port_is_one_line(long_context_model):
    args = serve_args(long_context_model)
    server = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        url = wait_ready(server)
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 or ::
        started = time.monotonic()
        taken = subprocess.run([sys.executable, *[str(port) if a == "0" else a for a in args]], capture_output=True,
                               text=True, env=ENV, timeout=120)
        assert time.monotonic() - started < 30  # refused before the model loads
        assert taken.returncode == 2
        lines = taken.stderr.strip().splitlines()
        assert len(lines) == 1, taken.stderr
        assert lines[0].startswith(f"pipesplit: error: cannot listen on 127.0.0.1:{port}")
        assert "--port" in lines[0]
    finally:
        server.kill()


def test_api_key_is_compared_in_constant_time(monkeypatch):
    """Every key check goes through hmac.compare_digest, whose time does not depend on where the
    bytes first differ; a wrong key, a missing header and the right key are all answered."""
    import hmac

    from fastapi.testclient import TestClient

    from pipesplit.server import app as app_module

    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", recording)

    async def inner(scope, receive, send):
        from starlette.responses import PlainTextResponse

        await PlainTextResponse("inner")(scope, receive, send)

    client = TestClient(app_module.BearerAuth(inner, "s3cret"))
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).text == "inner"
    for headers in ({"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3creX"}, {}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health").text == "inner"  # probes need no key
    assert calls == [(b"Bearer s3cret", b"Bearer s3cret"), (b"Bearer s3cre", b"Bearer s3cret"),
                     (b"Bearer s3creX", b"Bearer s3cret"), (b"", b"Bearer s3cret")]
