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

from tests.runtime.test_engine import check_stages_against_brute_force, hf_greedy

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
    assert report["outputs"][0]["finish_reason"] == "length" and report["outputs"][0]["prompt"] == PROMPT
    stages = report["stages"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 4], [4, 5]]
    assert [(s["embedding"], s["lm_head"]) for s in stages] == [(True, False), (False, False), (False, True)]
    check_stages_against_brute_force(folder, 3, "2,2,1", int(0.01 * (1 << 30)), report["partition"],
                                     [s["param_bytes"] for s in stages], [s["kv_tokens"] for s in stages],
                                     report["max_total_num_tokens"])


# -- every runtime CLI error: exit 2 and exactly one stderr line that says what to change ----------------
# (argv, the message); {llama}, {no_template}, {broken} and {busy_port} are filled in by `cli_errors`
CLI_ERRORS = [
    (["generate", "{llama}", "--prompt-ids", "1,2", "--pp", "9"], "--pp 9"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--partition", "2,2"], "partition"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--pp", "2", "--partition", "4,4"], "sums to 8"),
    (["generate", "no-such-model", "hi"], "no model 'no-such-model'"),
    (["generate", "{llama}"], "give a prompt"),
    (["generate", "{llama}", "--prompt-ids", "1,x"], "--prompt-ids '1,x'"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--mem-budget", "0.00001"], "raise --mem-budget"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--pp", "2", "--mem-budget", "0.00001"], "raise --mem-budget"),
    # SmolLM2's 134.5M float32 parameters (0.50 GiB) and, at PP1 on the CPU, the packed copy of its
    # tied head (49,152 x 576 x 4 bytes, 0.11 GiB)
    (["generate", "smollm2", "--prompt-ids", "1,2", "--mem-budget", "0.00001", "--dtype", "float32"],
     "stage 0 needs 0.61 GiB"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--mem-budget", "-1"], "--mem-budget is -1"),
    (["serve", "{llama}", "--port", "0", "--mem-budget", "0.00001"], "raise --mem-budget"),
    (["serve", "{llama}", "--port", "{busy_port}"], "cannot listen on 127.0.0.1:{busy_port}"),
    (["generate", "{llama}", "--prompt-ids", "1,2", "--device", "cuda"], "no CUDA device"),
    (["generate", "{no_template}", "--chat", "hi"], "no chat template"),
    # the checkpoint also misses a layer: failing on that would mean it loaded before checking the prompt
    (["generate", "{broken}", "--pp", "2", "hello"], "has no tokenizer files"),
    (["generate", "{llama}", "--prompt-ids", "1,256"], "token id 256 is outside the vocabulary"),
    (["generate", "{llama}", "--prompt-ids", ",".join(["1"] * 300)], "the prompt has 300 tokens"),
]


@pytest.fixture(scope="module")
def cli_errors(tiny_checkpoints, tiny_text_checkpoint, tmp_path_factory):
    """Runs every CLI_ERRORS command (four at a time): argv tuple -> CompletedProcess."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("cli_errors")
    broken = root / "broken"
    shutil.copytree(tiny_checkpoints["llama_tied"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        names = dict(llama=tiny_checkpoints["llama"], no_template=tiny_text_checkpoint, broken=broken,
                     busy_port=busy.getsockname()[1])

        def run(argv):
            filled = [a.format(**names) for a in argv]
            return subprocess.run(_pipesplit(*filled), capture_output=True, text=True, env=ENV, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            runs = dict(zip((tuple(a) for a, _ in CLI_ERRORS), pool.map(run, (a for a, _ in CLI_ERRORS))))
    return runs, names


@pytest.mark.slow  # 18 subprocesses, four at a time
@pytest.mark.parametrize("argv,message", CLI_ERRORS, ids=[" ".join(a)[:60] for a, _ in CLI_ERRORS])
def test_cli_error_is_one_line_with_exit_2(cli_errors, argv, message):
    import torch

    runs, names = cli_errors
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    run = runs[tuple(argv)]
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("pipesplit: error: ") and message.format(**names) in lines[0], lines[0]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
        found.extend(int(c) for c in text)
    return found


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


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
    stages = _children(proc.pid)
    assert len(stages) == 2
    # wait until the last stage is computing steps (its CPU time grows), not a fixed time
    ticks = _cpu_ticks(stages[-1])
    deadline = time.monotonic() + 30
    while _cpu_ticks(stages[-1]) < ticks + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "generation finished before the stage could be killed"
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
    stages = report["stages"]
    check_stages_against_brute_force(folder, 2, None, int(0.01 * (1 << 30)), report["partition"],
                                     [s["param_bytes"] for s in stages], [s["kv_tokens"] for s in stages],
                                     report["max_total_num_tokens"])
    assert [s["layers"] for s in stages] == [[0, report["partition"][0]], [report["partition"][0], 4]]


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
