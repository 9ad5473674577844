"""The per-stage load progress bar: shown on a terminal, never in pipes or with --json."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios

import pytest

from tests.runtime.test_launch import ENV, PROMPT, _pipesplit

pytestmark = pytest.mark.slow


def _run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Runs the CLI with stderr on a pseudo-terminal; returns (exit code, stdout, terminal text)."""
    leader, follower = pty.openpty()
    # a real terminal has a size; tqdm draws nothing on a 0-column one
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(_pipesplit(*args), stdout=subprocess.PIPE, stderr=follower, env=ENV, text=True)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    out = proc.stdout.read()
    return proc.wait(120), out, seen.decode(errors="replace")


def _generate(folder, *extra: str, pp: int = 2) -> list[str]:
    return ["generate", str(folder), "--pp", str(pp), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "2",
            "--mem-budget", "0.01", *extra]


def test_each_stage_shows_a_load_bar_on_a_terminal(tiny_checkpoints):
    code, _, terminal = _run_with_terminal_stderr(*_generate(tiny_checkpoints["llama"]))
    assert code == 0, terminal
    assert "stage 0/2 layers 0-2" in terminal and "stage 1/2 layers 3-4" in terminal, terminal
    assert "%|" in terminal  # a tqdm bar, not just the start-up report


def test_no_bar_with_json_or_without_a_terminal(tiny_checkpoints):
    code, out, terminal = _run_with_terminal_stderr(*_generate(tiny_checkpoints["llama"], "--json", pp=1))
    assert code == 0 and out.startswith("{"), terminal
    assert "stage 0/1" not in terminal and "%|" not in terminal, terminal
    piped = subprocess.run(_pipesplit(*_generate(tiny_checkpoints["llama"], pp=1)), capture_output=True, text=True,
                           env=ENV, timeout=120)
    assert piped.returncode == 0 and "%|" not in piped.stderr, piped.stderr

