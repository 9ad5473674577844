"""Launching stage processes: the CLI, two torchrun "nodes" on loopback, and a stage that dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runtime.test_engine import hf_greedy

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = [3, 14, 15, 92, 65, 35]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipesplit(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipesplit", *args]


def test_generate_json_contract(tiny_checkpoints):
    folder = str(tiny_checkpoints["llama"])
    run = subprocess.run(
        _pipesplit("generate", folder, "--pp", "3", "--partition", "2,2,1", "--prompt-ids", ",".join(map(str, PROMPT)),
                   "--max-tokens", "6", "--mem-budget", "0.01", "--dtype", "float32", "--json"),
        capture_output=True, text=True, env=ENV, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["outputs"][0]["token_ids"] == hf_greedy(folder, [PROMPT], [6])[0]
    assert [s["layers"] for s in report["stages"]] == [[0, 2], [2, 4], [4, 5]]
    assert [(s["embedding"], s["lm_head"]) for s in report["stages"]] == [(True, False), (False, False), (False, True)]
    assert report["max_total_num_tokens"] == min(s["kv_tokens"] for s in report["stages"])
    assert all(s["param_bytes"] > 0 for s in report["stages"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pp", "9"], "--pp 9"),
        (["--partition", "2,2"], "partition"),
        (["--pp", "2", "--partition", "4,4"], "sums to 8"),
    ],
)
def test_bad_runtime_input_is_one_line(tiny_checkpoints, args, message):
    run = subprocess.run(
        _pipesplit("generate", str(tiny_checkpoints["llama"]), "--prompt-ids", "1,2", *args),
        capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipesplit: error:") and message in lines[0], run.stderr


def test_unknown_model_is_one_line():
    run = subprocess.run(_pipesplit("generate", "no-such-model", "hi"), capture_output=True, text=True, env=ENV, timeout=60)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def test_killing_a_stage_mid_generation_ends_the_command_naming_it(tiny_checkpoints):
    folder = str(tiny_checkpoints["llama"])
    prompts = []
    for i in range(128):
        prompts += ["--prompt-ids", ",".join(str((i * 7 + j) % 256) for j in range(20))]
    proc = subprocess.Popen(
        _pipesplit("generate", folder, "--pp", "3", *prompts, "--max-tokens", "230", "--threads", "1", "--mem-budget", "0.02"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    # Start-up prints the agreed capacity once every stage is loaded; generation follows at once.
    line = proc.stderr.readline()
    assert "max_total_num_tokens" in line, line
    time.sleep(1.0)
    assert proc.poll() is None, "generation finished before the stage could be killed"
    stages = _children(proc.pid)
    assert len(stages) == 2
    os.kill(stages[-1], signal.SIGKILL)  # rank 2, the last stage
    killed_at = time.monotonic()
    try:
        proc.wait(timeout=15)
    finally:
        proc.kill()
    assert time.monotonic() - killed_at < 10
    err = proc.stderr.read()
    assert proc.returncode not in (0, None)
    assert "stage 2" in err and "SIGKILL" in err, err
    for pid in stages:  # nothing left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_two_torchrun_nodes_on_loopback(tiny_checkpoints):
    folder = str(tiny_checkpoints["qwen2"])
    port = str(_free_port())
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "-m", "pipesplit", "generate", folder, "--pp", "2", "--prompt-ids", ",".join(map(str, PROMPT)),
              "--max-tokens", "7", "--mem-budget", "0.01", "--dtype", "float32", "--json"]
    nodes = [
        subprocess.Popen([torchrun, "--node-rank", str(rank), *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    report = json.loads(outs[0][0])
    assert report["outputs"][0]["token_ids"] == hf_greedy(folder, [PROMPT], [7])[0]
    assert [s["layers"] for s in report["stages"]] == [[0, 2], [2, 4]] or len(report["stages"]) == 2


def test_a_stage_that_fails_to_load_is_named_and_nothing_hangs(tiny_checkpoints, tmp_path):
    """The last stage's layer is missing from the checkpoint: only that stage notices."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["llama_tied"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    started = time.monotonic()
    run = subprocess.run(
        _pipesplit("generate", str(folder), "--pp", "2", "--partition", "3,1", "--prompt-ids", "1,2", "--mem-budget", "0.01"),
        capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert run.returncode not in (0, None)
    assert time.monotonic() - started < 60
    assert "stage 1" in run.stderr and "model.layers.3.mlp.down_proj.weight" in run.stderr, run.stderr
