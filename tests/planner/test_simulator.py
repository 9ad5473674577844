"""The pipeline simulator, its step costs and the speed objectives, against references worked out by hand."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass

import pytest

from pipesplit.cli import main
from pipesplit.errors import UserError
from pipesplit.planner.costs import cost_model
from pipesplit.planner.hardware import find_gpu
from pipesplit.planner.objectives import compositions, num_compositions, score, search
from pipesplit.planner.plan import Plan, StagePlan
from pipesplit.planner.simulator import (
    Linear,
    MeasuredRun,
    PipelineConfig,
    Profile,
    ProfileCosts,
    RooflineCosts,
    StepShape,
    Workload,
    calibrated,
    calibration_scales,
    fit_corun_slowdown,
    has_prefill,
    parse_range,
    percentile,
    simulate,
)
from pipesplit.planner.spec import load_spec

SMOL = load_spec("smollm2")


@dataclass(frozen=True)
class ConstantCosts:
    """Every stage step takes `stage` seconds per layer-free stage plus `per_layer` per layer."""

    stage: float = 0.010
    per_layer: float = 0.0
    hop: float = 0.001
    schedule: float = 0.002

    def stage_seconds(self, stage, layers, first, last, shape):
        return self.stage + self.per_layer * (layers[1] - layers[0])

    def transfer_seconds(self, num_bytes):
        return self.hop

    def schedule_seconds(self, shape):
        return self.schedule

    def activation_bytes(self, shape):
        return shape.tokens

    def slowdown(self, computing, stages):
        return 1.0


def test_one_request_one_token_takes_every_hop_once():
    costs = ConstantCosts()
    r = simulate(SMOL, (10, 10, 10), 10_000, costs, Workload(1, (100, 100), (1, 1)))
    # rank 0 schedules and runs stage 0, two hand-offs, stages 1 and 2, the reply
    expected = costs.schedule + 3 * costs.stage + 3 * costs.hop
    assert r.ttft_p50 == pytest.approx(expected) and r.makespan == pytest.approx(expected)
    assert r.steps == 1 and math.isnan(r.tpot_p50)


def test_chunked_prefill_takes_one_round_trip_per_chunk():
    costs = ConstantCosts()
    r = simulate(SMOL, (15, 15), 10_000, costs, Workload(1, (1000, 1000), (1, 1)), PipelineConfig(chunked_prefill_size=256))
    chunks = math.ceil(1000 / 256)  # a request's next chunk waits for its previous one
    assert r.steps == chunks
    assert r.ttft_p50 == pytest.approx(chunks * (costs.schedule + 2 * costs.stage + 2 * costs.hop))


def test_decode_throughput_is_the_bottleneck_stage_rate():
    """P micro-batches in flight keep every stage busy: one micro-batch of N/P tokens per bottleneck step."""
    costs = ConstantCosts(stage=0.001, per_layer=0.001, hop=0.0, schedule=0.0)
    n, out = 32, 200
    partition = (6, 12, 6, 6)
    r = simulate(SMOL, partition, 100_000, costs, Workload(n, (4, 4), (out, out)), PipelineConfig(max_running_requests=n))
    bottleneck = costs.stage + costs.per_layer * max(partition)
    assert r.output_tokens_per_s == pytest.approx((n / len(partition)) / bottleneck, rel=0.03)
    assert r.stage_busy[1] == pytest.approx(1.0, abs=0.03) and r.stage_busy[0] < 0.6


def test_deterministic_for_a_seed_and_different_for_another():
    costs = ConstantCosts(per_layer=0.0005)
    w = Workload(12, (20, 80), (5, 20), rate=50.0, seed=3)
    a = simulate(SMOL, (20, 10), 10_000, costs, w)
    assert a == simulate(SMOL, (20, 10), 10_000, costs, w)
    assert a != simulate(SMOL, (20, 10), 10_000, costs, Workload(12, (20, 80), (5, 20), rate=50.0, seed=4))


def test_a_small_pool_preempts_and_still_finishes_every_request():
    costs = ConstantCosts()
    w = Workload(8, (30, 30), (40, 40))
    r = simulate(SMOL, (15, 15), 200, costs, w)
    assert r.preemptions > 0
    assert r.output_tokens_per_s * r.makespan == pytest.approx(8 * 40)
    with pytest.raises(UserError, match="shorten --prompt-len"):
        simulate(SMOL, (15, 15), 20, costs, w)


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("text, expected", [("128", (128, 128)), ("64-256", (64, 256))])
def test_parse_range(text, expected):
    assert parse_range(text, "--prompt-len") == expected


@pytest.mark.parametrize("text", ["0", "5-3", "a-b", "1-2-3"])
def test_parse_range_rejects(text):
    with pytest.raises(UserError, match="--prompt-len"):
        parse_range(text, "--prompt-len")


# -- step costs ---------------------------------------------------------------------------------------------------
def test_roofline_decode_reads_the_weights_and_prefill_does_the_flops():
    spec = load_spec("llama-3.1-8b")
    gpu = find_gpu("H100")
    costs = RooflineCosts(spec, (gpu,))
    cost = cost_model(spec)
    e = costs.efficiency
    decode = StepShape(tokens=1, seqs=1, attention=100, context=100, samples=0)
    one_layer = costs.stage_seconds(0, (0, 1), False, False, decode) - e.stage_overhead_s - e.layer_overhead_s
    moved = cost.layer_weight_bytes[0] + 100 * cost.kv_bytes_per_token_per_layer + 2 * spec.hidden_size * 2
    assert one_layer == pytest.approx(moved / (gpu.bandwidth_gbs * 1e9 * e.bandwidth))
    t = 8192
    prefill = StepShape(tokens=t, seqs=1, attention=t * (t + 1) // 2, context=t, samples=0)
    one_layer = costs.stage_seconds(0, (0, 1), False, False, prefill) - e.stage_overhead_s - e.layer_overhead_s
    flops = cost.layer_flops_per_token[0] * t + 2 * spec.num_attention_heads * 2 * spec.head_dim * t * (t + 1) // 2
    assert one_layer == pytest.approx(flops / (gpu.bf16_tflops * 1e12 * e.compute))


def test_roofline_moe_reads_only_the_experts_some_token_routes_to():
    from pipesplit.planner.costs import layer_tensors

    spec = load_spec("qwen3-30b-a3b")
    gpu = find_gpu("H100")
    costs = RooflineCosts(spec, (gpu,))
    e, moe = costs.efficiency, spec.moe
    tensors = layer_tensors(spec, 0)
    experts = sum(t.nbytes for t in tensors if ".experts." in t.name)
    others = sum(t.nbytes for t in tensors) - experts
    kv = cost_model(spec).kv_bytes_per_token_per_layer
    one = StepShape(1, 1, 1, 1, 0)  # one token reads exactly top_k experts
    moved = others + experts * moe.num_experts_per_tok / moe.num_experts + kv + 2 * spec.hidden_size * 2
    got = costs.stage_seconds(0, (0, 1), False, False, one) - e.stage_overhead_s - e.layer_overhead_s
    assert got == pytest.approx(moved / (gpu.bandwidth_gbs * 1e9 * e.bandwidth))
    many = StepShape(4096, 64, 64, 64, 0)  # 4096 tokens touch every expert, and do the FLOPs
    assert costs.stage_seconds(0, (0, 1), False, False, many) > 3 * costs.stage_seconds(0, (0, 1), False, False, one)


def test_profile_costs_sum_the_fitted_pieces_and_round_trip_json(tmp_path):
    profile = Profile("tiny", "cpu", "float32", 1, SMOL.hidden_size, 4, {"dense": Linear(base=1e-3, per_token=1e-5)},
                      embedding=Linear(base=1e-4), head=Linear(base=2e-3, per_sample=1e-4),
                      stage_step=Linear(base=5e-5), schedule=Linear(base=3e-5, per_seq=1e-6),
                      transfer_latency=1e-4, transfer_per_byte=1e-9)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json()))
    costs = ProfileCosts(Profile.from_json(json.loads(path.read_text())), SMOL)
    shape = StepShape(tokens=10, seqs=2, attention=50, context=40, samples=2)
    assert costs.stage_seconds(0, (0, 5), True, False, shape) == pytest.approx(5e-5 + 5 * (1e-3 + 1e-4) + 1e-4)
    assert costs.stage_seconds(1, (5, 30), False, True, shape) == pytest.approx(5e-5 + 25 * 1.1e-3 + 2e-3 + 2e-4)
    assert costs.transfer_seconds(costs.activation_bytes(shape)) == pytest.approx(1e-4 + 10 * 576 * 4 * 1e-9)
    with pytest.raises(UserError, match="moe"):
        ProfileCosts(profile, load_spec("qwen3-30b-a3b"))


def _tiny_profile(**changes) -> Profile:
    pieces = Profile("tiny", "cpu", "float32", 1, SMOL.hidden_size, 4, {"dense": Linear(base=1e-3, per_token=1e-5)},
                     embedding=Linear(base=1e-4), head=Linear(base=2e-3, per_sample=1e-4),
                     stage_step=Linear(base=5e-5), schedule=Linear(base=3e-5), transfer_latency=1e-4,
                     transfer_per_byte=1e-9, meta={"cpu_count": 2})
    return dataclasses.replace(pieces, **changes)


def test_calibration_scales_stretch_a_steps_decode_view_and_its_prefill_chunk_apart():
    pieces = _tiny_profile()
    doc = {**pieces.to_json(), "prefill_scale": 1.5, "decode_scale": 0.8}
    calibrated = Profile.from_json(json.loads(json.dumps(doc)))
    prefill = StepShape(tokens=300, seqs=3, attention=5000, context=300, samples=3)
    mixed = StepShape(tokens=40, seqs=9, attention=900, context=600, samples=9)  # 8 decodes and a chunk
    decode = StepShape(tokens=8, seqs=8, attention=800, context=800, samples=8)
    for shape in (prefill, mixed, decode):
        # stage 1 holds all 30 layers and the head: by hand, the step as if each sequence decoded
        # one token, and the 1e-5 per layer and token that the chunk's other tokens add
        view = 5e-5 + 30 * (1e-3 + 1e-5 * shape.seqs) + 2e-3 + 1e-4 * shape.samples
        added = 30 * 1e-5 * (shape.tokens - shape.seqs)
        assert ProfileCosts(pieces, SMOL).stage_seconds(1, (0, 30), False, True, shape) == pytest.approx(view + added)
        got = ProfileCosts(calibrated, SMOL).stage_seconds(1, (0, 30), False, True, shape)
        assert got == pytest.approx(0.8 * view + 1.5 * added)
    assert ProfileCosts(calibrated, SMOL).schedule_seconds(decode) == ProfileCosts(pieces, SMOL).schedule_seconds(decode)
    old = {k: v for k, v in pieces.to_json().items() if not k.endswith("_scale")}  # written before calibration
    assert Profile.from_json(old).prefill_scale == Profile.from_json(old).decode_scale == 1.0
    with pytest.raises(UserError, match="decode_scale"):
        Profile.from_json({**doc, "decode_scale": 0})


def _engine_like_run(profile: Profile, partition, workload: Workload) -> MeasuredRun:
    """What an engine whose steps cost exactly what `profile` charges would have measured."""
    steps = []
    simulate(SMOL, partition, 100_000, ProfileCosts(profile, SMOL), workload, PipelineConfig(),
             on_step=lambda shape, seconds: steps.append((shape, list(seconds))))
    return MeasuredRun(tuple(partition), 100_000, PipelineConfig(), workload, steps, 0.0)


def test_calibration_recovers_the_scales_and_the_slowdowns_an_engine_ran_at():
    workload = Workload(16, (48, 320), (24, 48), seed=7)
    truth = _tiny_profile(prefill_scale=1.6, decode_scale=0.9, corun_slowdown=1.3)
    alone = _engine_like_run(truth, (30,), workload)
    assert any(has_prefill(s) for s, _ in alone.steps) and any(not has_prefill(s) for s, _ in alone.steps)
    assert MeasuredRun.from_json(json.loads(json.dumps(alone.to_json()))) == alone
    pieces = _tiny_profile()
    assert calibration_scales(SMOL, pieces, [alone]) == pytest.approx((1.6, 0.9))
    # over several runs: the sums of all their steps (a second workload at other scales pulls
    # the fit towards its own, weighted by its seconds)
    other = dataclasses.replace(workload, seed=8)
    assert calibration_scales(SMOL, pieces, [alone, _engine_like_run(truth, (30,), other)]) == pytest.approx((1.6, 0.9))
    slower = _engine_like_run(_tiny_profile(prefill_scale=2.0, decode_scale=1.1), (30,), other)
    prefill, decode = calibration_scales(SMOL, pieces, [alone, slower])
    assert 1.6 < prefill < 2.0 and 0.9 < decode < 1.1
    # a run on a machine that had slowed by 25% since the pieces were timed, rescaled by that drift
    drifted = dataclasses.replace(alone, steps=[(shape, [1.25 * t for t in seconds]) for shape, seconds in alone.steps])
    assert calibration_scales(SMOL, pieces, [drifted]) == pytest.approx((2.0, 1.125))
    rescaled = MeasuredRun.from_json(json.loads(json.dumps(drifted.rescaled(1.25).to_json())))
    assert rescaled.drift == 1.25 and calibration_scales(SMOL, pieces, [rescaled]) == pytest.approx((1.6, 0.9))
    scaled = _tiny_profile(prefill_scale=1.6, decode_scale=0.9)
    together = _engine_like_run(truth, (15, 15), workload)  # two stages, one core each: they co-run
    assert fit_corun_slowdown(SMOL, scaled, [together]) == pytest.approx(1.3, abs=0.01)
    assert fit_corun_slowdown(SMOL, truth, [_engine_like_run(_tiny_profile(prefill_scale=1.6, decode_scale=0.9,
                                                                               corun_slowdown=1.0), (15, 15),
                                                             workload)]) == 1.0  # no slower than alone
    # over two runs, the sums of both: one at 1.3 and one at 1.5 give a value between them
    other_together = _engine_like_run(dataclasses.replace(truth, corun_slowdown=1.5), (15, 15), other)
    assert 1.3 < fit_corun_slowdown(SMOL, scaled, [together, other_together]) < 1.5
    # three one-thread stages on two cores, whose every step took 1.25x what sharing the cores explains
    over = _engine_like_run(dataclasses.replace(truth, oversubscribed_slowdown=1.25), (10, 10, 10), workload)
    fitted = calibrated(SMOL, pieces, [alone], [together], [over])
    assert (fitted.prefill_scale, fitted.decode_scale) == pytest.approx((1.6, 0.9))
    assert fitted.corun_slowdown == pytest.approx(1.3, abs=0.01)
    assert fitted.oversubscribed_slowdown == pytest.approx(1.25, abs=0.01)
    empty = MeasuredRun((30,), 100_000, PipelineConfig(), workload, [], 0.0)
    assert calibration_scales(SMOL, pieces, [dataclasses.replace(empty, workload=Workload(1, (4, 4), (1, 1)))]) \
        == (1.0, 1.0)  # nothing measured: the pieces stand


# -- objectives ----------------------------------------------------------------------------------------------------
def test_compositions_are_every_contiguous_split():
    for layers, stages in [(6, 1), (6, 2), (7, 3), (8, 4)]:
        got = list(compositions(layers, stages))
        cuts = itertools.combinations(range(1, layers), stages - 1)
        expected = sorted(tuple(b - a for a, b in zip((0, *c), (*c, layers))) for c in cuts)
        assert got == expected and len(got) == num_compositions(layers, stages)


def _plan(partition, tokens=1000) -> Plan:
    stages = tuple(StagePlan(s, "x", 0, 0, (0, 0), s == 0, s == len(partition) - 1, False, 0, tokens)
                   for s in range(len(partition)))
    return Plan("m", "explicit", "pipesplit", tuple(partition), tokens, True, 0, stages)


def _evaluator(costs, workload, capacity_of):
    def evaluate(partition):
        capacity = capacity_of(partition)
        if capacity < 1:
            return None
        try:
            return _plan(partition, capacity), simulate(SMOL, partition, capacity, costs, workload)
        except UserError:
            return None
    return evaluate


@pytest.mark.parametrize("objective", ["max-throughput", "min-ttft"])
@pytest.mark.parametrize("stages", [2, 3])
def test_search_finds_the_brute_force_best(objective, stages):
    """Uneven per-layer costs and a capacity that rules some splits out: the search's pick is the
    best of every split simulated one by one."""
    costs = ConstantCosts(stage=0.002, per_layer=0.0007, hop=0.0003, schedule=0.004)
    w = Workload(4, (20, 60), (2, 6), rate=200.0, seed=1)
    capacity_of = lambda p: 0 if p[-1] > 20 else 5000  # noqa: E731 -- "the last stage holds at most 20 layers"
    found = search(objective, 30, stages, _evaluator(costs, w, capacity_of))
    assert found.method == "exhaustive" and found.evaluated == num_compositions(30, stages)
    brute = []
    for cuts in itertools.combinations(range(1, 30), stages - 1):
        p = tuple(b - a for a, b in zip((0, *cuts), (*cuts, 30)))
        if capacity_of(p):
            brute.append((score(objective, _plan(p, 5000), simulate(SMOL, p, 5000, costs, w)), p))
    best_score = max(s for s, _ in brute)
    assert score(objective, found.plan, found.result) == best_score
    assert found.plan.partition[-1] <= 20


def test_local_search_ends_at_a_local_optimum_no_worse_than_its_starts():
    costs = ConstantCosts(stage=0.002, per_layer=0.0007, hop=0.0003, schedule=0.004)
    w = Workload(6, (20, 60), (4, 12), seed=1)
    evaluate = _evaluator(costs, w, lambda p: 5000)
    starts = [(10, 10, 10), (8, 11, 11)]
    found = search("max-throughput", 30, 3, evaluate, starts=starts, exhaustive_limit=0)
    assert found.method == "local search" and found.evaluated < num_compositions(30, 3)
    best = score("max-throughput", found.plan, found.result)
    assert all(best >= score("max-throughput", *evaluate(s)) for s in starts)
    p = found.plan.partition
    for b, step in itertools.product(range(2), (1, -1)):
        q = list(p)
        q[b] += step
        q[b + 1] -= step
        if min(q) >= 1:
            assert score("max-throughput", *evaluate(tuple(q))) <= best
    # rank 0's scheduling work makes the first stage the heaviest: the best split gives it fewer layers
    assert p[0] < 10


# -- the commands ---------------------------------------------------------------------------------------------------
def test_simulate_command_json(capsys):
    code = main(["simulate", "smollm2", "--pp", "2", "--partition", "6,24", "--gpu", "L4", "--requests", "6",
                 "--prompt-len", "16-32", "--output-len", "4-8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["partition"] == [6, 24] and len(doc["stage_busy"]) == 2
    assert doc["output_tokens_per_s"] > 0 and doc["ttft_p50"] <= doc["ttft_p99"]


def test_simulate_table_names_the_costs(capsys):
    assert main(["simulate", "smollm2", "--pp", "3", "--gpu", "H100", "--link", "pcie", "--requests", "4",
                 "--rate", "10", "--output-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "roofline of H100-80GB TP1, link pcie" in out and "Poisson 10/s" in out and "stage busy" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "L4", "--prompt-len", "9-3"], "--prompt-len"),
    (["--gpu", "L4", "--link", "smoke"], "unknown --link"),
    (["--profile", "/nonexistent.json"], "pipesplit profile"),
    ([], "--profile FILE"),
    (["--gpu", "L4", "--rate", "0"], "--rate"),
    (["--gpu", "L4", "--micro-batches", "0"], "--micro-batches is 0"),
])
def test_simulate_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["simulate", "smollm2", "--pp", "2", "--requests", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_objective_picks_a_split_that_beats_the_strategies(capsys):
    argv = ["plan", "smollm2", "--pp", "2", "--gpu", "L4", "--requests", "8", "--prompt-len", "32-64",
            "--output-len", "8-16", "--compare", "--json"]
    assert main([*argv, "--objective", "max-throughput"]) == 0
    doc = json.loads(capsys.readouterr().out)
    results = {r["strategy"]: r for r in doc["simulation"]["results"]}
    assert doc["selected"] == "max-throughput" and doc["simulation"]["search"]["method"] == "exhaustive"
    best = results["max-throughput"]["output_tokens_per_s"]
    assert all(best >= r["output_tokens_per_s"] for r in results.values() if "output_tokens_per_s" in r)
    assert main([*argv, "--objective", "min-ttft"]) == 0
    doc = json.loads(capsys.readouterr().out)
    results = {r["strategy"]: r for r in doc["simulation"]["results"]}
    assert all(results["min-ttft"]["ttft_p50"] <= r["ttft_p50"] for r in results.values() if "ttft_p50" in r)


def test_plan_compare_with_a_workload_adds_simulated_columns(capsys):
    assert main(["plan", "smollm2", "--pp", "2", "--gpu", "L4", "--compare", "--requests", "4", "--output-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "output tok/s" in out and "TTFT p50 ms" in out


@pytest.mark.parametrize("argv, message", [
    (["--objective", "fastest"], "unknown objective"),
    (["--objective", "min-ttft", "--strategy", "vllm"], "drop --strategy"),
])
def test_plan_objective_bad_input(capsys, argv, message):
    assert main(["plan", "smollm2", "--pp", "2", "--gpu", "L4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_objective_needs_a_roofline_or_a_profile(capsys):
    assert main(["plan", "smollm2", "--pp", "2", "--gpu-mem", "24", "--objective", "max-throughput"]) == 2
    assert "--profile FILE" in capsys.readouterr().err


def test_pipelined_chunks_are_a_flow_shop():
    """Identical chunks: makespan = one chunk through every stage + (n - 1) bottleneck steps, whatever the
    order of the stages; chunks that grow (attention over the context) favour the heavy stages last."""
    from pipesplit.planner.simulator import chunk_pipeline_ttft

    costs = ConstantCosts(stage=0.0, per_layer=0.001, hop=0.0, schedule=0.0)
    n = 8
    for partition in [(10, 10, 10), (6, 12, 12), (12, 12, 6)]:
        expected = sum(partition) * 0.001 + (n - 1) * max(partition) * 0.001
        assert chunk_pipeline_ttft(SMOL, partition, costs, n * 100, 100) == pytest.approx(expected)
    growing = RooflineCosts(load_spec("llama-3.1-8b"), (find_gpu("H100"),) * 4)
    spec = growing.spec
    heavy_first = chunk_pipeline_ttft(spec, (9, 9, 7, 7), growing, 65536, 4096)
    heavy_last = chunk_pipeline_ttft(spec, (7, 7, 9, 9), growing, 65536, 4096)
    assert heavy_last < heavy_first
    # equal chunks and no per-step work on rank 0: the order no longer matters (up to the head, last)
    from pipesplit.planner.simulator import Efficiency

    ideal = dataclasses.replace(growing, efficiency=Efficiency(step_overhead_s=0.0))
    flat = [chunk_pipeline_ttft(spec, p, ideal, 65536, 4096, context_grows=False) for p in [(9, 9, 7, 7), (7, 7, 9, 9)]]
    assert flat[0] == pytest.approx(flat[1], rel=0.005)


@dataclass(frozen=True)
class SharedCore(ConstantCosts):
    """ConstantCosts on one core: k stages computing at once each go k times slower."""

    def slowdown(self, computing, stages):
        return float(computing)


def test_stages_computing_at_once_share_the_machine_moment_by_moment():
    # two one-chunk requests, a micro-batch each; every stage step 10 ms alone, no hand-off cost
    costs = SharedCore(stage=0.010, hop=0.0, schedule=0.0)
    config = PipelineConfig(max_batch_tokens=8, chunked_prefill_size=8)
    r = simulate(SMOL, (15, 15), 10_000, costs, Workload(2, (8, 8), (1, 1)), config)
    # stage 0 runs batch 1 alone (0-10 ms); then batch 2 on stage 0 and batch 1 on stage 1 at
    # half speed each (10-30 ms); batch 2 alone on stage 1 (30-40 ms)
    assert r.steps == 2 and r.makespan == pytest.approx(0.040)
    assert r.ttft_p50 == pytest.approx((0.030 + 0.040) / 2)
    assert r.stage_busy == pytest.approx((0.030 / 0.040, 0.030 / 0.040))
    alone = simulate(SMOL, (15, 15), 10_000, ConstantCosts(stage=0.010, hop=0.0, schedule=0.0),
                     Workload(2, (8, 8), (1, 1)), config)
    assert alone.makespan == pytest.approx(0.030)  # without sharing: 0-10, 10-20, 20-30 ms


def test_cpu_contention_is_the_co_run_slowdown_on_every_step_then_processor_sharing():
    def profile(cores, threads=1, corun=1.5, over=1.2):
        return Profile("m", "cpu", "float32", threads, 8, 4, {"dense": Linear(base=1e-3)}, Linear(), Linear(), Linear(),
                       Linear(), 0.0, 0.0, corun_slowdown=corun, oversubscribed_slowdown=over,
                       meta={"cpu_count": cores})

    two = ProfileCosts(profile(2), SMOL)
    # two stages on two cores: the co-run slowdown on every step, however many compute
    assert [two.slowdown(k, 2) for k in (0, 1, 2)] == pytest.approx([1.0, 1.5, 1.5])
    assert two.slowdown(1, 1) == 1.0  # one stage alone
    # four on two: every step 1.2x dearer, and processor sharing beyond two computing
    assert [two.slowdown(k, 4) for k in (0, 1, 2, 3, 4)] == pytest.approx([1.0, 1.2, 1.5 * 1.2, 1.5 * 1.5 * 1.2,
                                                                            1.5 * 2 * 1.2])
    wide = ProfileCosts(profile(16), SMOL)  # 16 one-core groups: 3 stages share a little bandwidth, no cores
    assert [wide.slowdown(k, 3) for k in (1, 3)] == pytest.approx([1 + 0.5 * 2 / 15] * 2)
    one_group = ProfileCosts(profile(2, threads=2), SMOL)  # a stage takes both cores: two take turns
    assert one_group.slowdown(2, 2) == pytest.approx(1.5 * 2 * 1.2)
    assert one_group.slowdown(1, 1) == 1.0
    gpu = dataclasses.replace(profile(2), device="cuda")
    assert ProfileCosts(gpu, SMOL).slowdown(3, 3) == 1.0
    assert RooflineCosts(SMOL, (find_gpu("H100"),) * 2).slowdown(2, 2) == 1.0
    with pytest.raises(UserError, match="oversubscribed_slowdown"):
        profile(2, over=0)


def test_cpu_stages_on_cores_of_their_own_pay_the_co_run_slowdown_on_every_step():
    """Two stages with a core each share memory bandwidth, caches and the host: the profile's
    corun_slowdown stretches every step of both, whether or not the other computes at that moment
    (the stage with 29 layers beside one with 1 as much as two even stages); one stage alone not."""
    base = Profile("m", "cpu", "float32", 1, 8, 4, {"dense": Linear(base=1e-3)}, Linear(), Linear(), Linear(),
                   Linear(), 0.0, 0.0, meta={"cpu_count": 2})
    slow = dataclasses.replace(base, corun_slowdown=1.5)
    w = Workload(24, (8, 8), (30, 30))
    for split in ((15, 15), (29, 1)):
        alone = simulate(SMOL, split, 10_000, ProfileCosts(base, SMOL), w)
        slowed = simulate(SMOL, split, 10_000, ProfileCosts(slow, SMOL), w)
        assert alone.output_tokens_per_s / slowed.output_tokens_per_s == pytest.approx(1.5)
        assert slowed.makespan == pytest.approx(1.5 * alone.makespan)
    one = simulate(SMOL, (30,), 10_000, ProfileCosts(base, SMOL), w)
    assert simulate(SMOL, (30,), 10_000, ProfileCosts(slow, SMOL), w).makespan == pytest.approx(one.makespan)
