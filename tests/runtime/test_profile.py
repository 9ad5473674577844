"""`pipesplit profile`: the fit recovers known coefficients, and a real profile of tiny checkpoints
has every layer kind the model has and loads into the simulator."""

from __future__ import annotations

import json
import os
import random

import pytest

from pipesplit.cli import main
from pipesplit.planner.simulator import Linear, MeasuredRun, ProfileCosts, StepShape, load_profile
from pipesplit.planner.spec import load_spec
from pipesplit.runtime import profile as profiler


def test_fit_recovers_the_coefficients_of_noisy_data():
    truth = Linear(base=2e-3, per_token=3e-5, per_attention=4e-8, per_context=5e-7)
    rng = random.Random(0)
    shapes = [StepShape(t, s, a, c, 0) for t, s, a, c in
              ((rng.randint(1, 512), rng.randint(1, 64), rng.randint(1, 10**6), rng.randint(1, 10**4)) for _ in range(60))]
    seconds = [truth(s) * rng.uniform(0.98, 1.02) for s in shapes]
    got = profiler.fit(shapes, seconds, ("base", "per_token", "per_seq", "per_attention", "per_context"))
    for name in ("base", "per_token", "per_attention", "per_context"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=0.1)
    assert got.per_seq < 1e-6  # absent from the data: (near) zero, never negative


def test_fit_never_returns_a_negative_coefficient():
    shapes = [StepShape(t, 1, 0, 0, 0) for t in (1, 2, 4, 8)]
    got = profiler.fit(shapes, [4e-3, 3e-3, 2e-3, 1e-3], ("base", "per_token"))  # time falls with tokens
    assert got.per_token == 0 and got.base > 0


def test_the_calibration_workload_fits_a_small_model():
    full = profiler._calibration_workload(100_000, 8192)
    assert (full.prompt_len, full.output_len) == (profiler.CALIBRATION_PROMPT, profiler.CALIBRATION_OUTPUT)
    small = profiler._calibration_workload(100_000, 128)
    assert small.prompt_len[1] + small.output_len[1] < 128
    tight = profiler._calibration_workload(16 * 40, 8192)
    assert tight.prompt_len[1] + tight.output_len[1] < 40


@pytest.fixture(scope="module")
def small_grids():
    """A smaller measurement grid: the test checks the plumbing, the bench the accuracy."""
    saved = profiler.DECODE, profiler.PREFILL, profiler.MIXED, profiler.TRANSFER_BYTES
    profiler.DECODE, profiler.PREFILL = [(1, 8), (4, 32), (8, 16)], [(8, 0), (16, 8), (32, 0)]
    profiler.MIXED, profiler.TRANSFER_BYTES = [(2, 8, 8)], [64, 65536]
    yield
    profiler.DECODE, profiler.PREFILL, profiler.MIXED, profiler.TRANSFER_BYTES = saved


@pytest.mark.parametrize("name, kinds", [("llama", {"dense"}), ("deepseek_v2", {"mla-dense", "mla-moe"})])
def test_profile_command_measures_every_layer_kind(tiny_checkpoints, tiny_moe_checkpoints, small_grids, tmp_path,
                                                   capsys, name, kinds):
    folder = {**tiny_checkpoints, **tiny_moe_checkpoints}[name]
    out = tmp_path / "profile.json"
    assert main(["profile", str(folder), "--threads", "1", "--repeats", "1", "--calibrate", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = load_profile(str(out))
    assert set(profile.layers) == kinds
    raw = json.loads(out.read_text())["meta"]["measurements"]
    assert all(row[-1] > 0 for rows in raw["layers"].values() for row in rows)
    assert profile.transfer_latency + profile.transfer_per_byte > 0
    assert profile.corun_slowdown >= 1.0  # measured beside a co-running process where cores allow
    costs = ProfileCosts(profile, load_spec(str(folder)))
    shape = StepShape(8, 8, 100, 100, 8)
    assert costs.stage_seconds(0, (0, 1), True, False, shape) > 0
    # the engine's own steps, both kinds, every stage timed, once per calibration seed: alone
    # (PP1), then as many one-thread stages as the cores hold
    layers = load_spec(str(folder)).num_layers
    groups = min(os.cpu_count() or 1, layers)
    assert len(raw["calibration"]) == len(profiler.CALIBRATION_SEEDS) >= 2
    seeds = len(profiler.CALIBRATION_SEEDS)
    runs = [(doc, 1) for doc in raw["calibration"]]
    if groups > 1:
        assert len(raw["corun_calibration"]) == seeds
        runs += [(doc, groups) for doc in raw["corun_calibration"]]
    # and one stage more than the cores (one thread each) where the model has the layers for it
    assert ("oversubscribed_calibration" in raw) == (groups + 1 <= layers)
    if groups + 1 <= layers:
        assert len(raw["oversubscribed_calibration"]) == seeds
        runs += [(doc, groups + 1) for doc in raw["oversubscribed_calibration"]]
        assert profile.oversubscribed_slowdown >= 1.0
    assert len({json.dumps(doc["workload"]) for doc, _ in runs[:2]}) == 2  # other requests
    # rescaled to the machine's speed when the pieces were timed (a reference timed around each)
    assert json.loads(out.read_text())["meta"]["reference_seconds"] > 0
    for doc, stages in runs:
        run = MeasuredRun.from_json(doc)
        assert len(run.partition) == stages and run.capacity > 0 and run.drift > 0
        assert any(s.tokens > s.seqs for s, _ in run.steps) and any(s.tokens == s.seqs for s, _ in run.steps)
        assert all(len(seconds) == stages and min(seconds) > 0 for _, seconds in run.steps)
    assert ("corun_calibration" in raw) == (groups > 1)
    if groups > 1:
        assert raw["corun_microbenchmark"] >= 1.0
    assert profile.prefill_scale > 0 and profile.decode_scale > 0
    assert profile.prefill_scale != 1.0 and profile.decode_scale != 1.0  # measured, not the default


def test_profile_without_calibrate_keeps_the_pieces(tiny_checkpoints, small_grids, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["profile", str(tiny_checkpoints["llama"]), "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    profile = load_profile(str(out))
    assert (profile.prefill_scale, profile.decode_scale) == (1.0, 1.0)
    assert "calibration" not in json.loads(out.read_text())["meta"]["measurements"]


def test_profile_bad_input(capsys):
    assert main(["profile", "smollm2", "--repeats", "0", "--out", "/tmp/never.json"]) == 2
    assert "--repeats" in capsys.readouterr().err
