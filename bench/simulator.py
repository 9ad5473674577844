"""Simulated vs measured: SmolLM2 on this CPU, several splits at PP2 and PP3, two workloads.

1. `pipesplit profile` (the real runtime's layers, batches, scheduler and gloo transfers, and its
   calibration against the engine, at PP1 and with co-running stages, on a workload of its own)
   on this machine, once per thread count the runs use (the engine gives each stage cores // pp
   threads);
2. for each split, the real engine (`pipesplit.LLM`) runs each workload: all requests at once, and
   Poisson arrivals at a rate every split sustains (`LOAD`); every request produces exactly its
   output length (EOS ignored); `--rounds` times (default 2: the splits in order, then in
   reverse), the rounds' mean counting;
3. `planner.simulator.simulate` runs the same requests (same token ids, same arrival times) with
   the profile, and the errors of output throughput and TTFT p50 are reported, with whether the
   simulator orders the splits (by throughput and TTFT, per PP and workload) as the measurements
   do, in all and for the pairs of splits whose rounds do not overlap; the summary also gives the
   errors of the pieces alone (the calibration's scales and oversubscribed slowdown set to 1, the
   co-run microbenchmark), and the errors with the VM's speed drift taken out: a fixed piece of
   work (`profile.reference_timer`) is timed while profiling (which rescales its calibration runs
   by it) and before and after each split's runs, and the simulation of a split scaled by the mean
   of the two over the profile's timing (this VM's speed moved by 10-15% within half an hour on 2026-12-07, and the same
   2-thread GEMM ran at 90-133 GFLOPS within 18 seconds that evening).

    .venv/bin/python bench/simulator.py              # the full run (~15-20 minutes on 2 cores)
    .venv/bin/python bench/simulator.py --quick      # two splits, small workloads: a smoke run
    .venv/bin/python bench/simulator.py --pool bench/results/simulator-zen3-s1[1-4].json
        # measures nothing: the files' rounds pooled, pair by pair (a sign-flip test), against the
        # current simulator's order of the splits (bench/results/simulator-pooled.json)
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipesplit import LLM, SamplingParams  # noqa: E402
from pipesplit.planner.simulator import (  # noqa: E402
    PipelineConfig,
    MeasuredRun,
    Profile,
    ProfileCosts,
    RequestTimes,
    SimResult,
    Workload,
    calibrated,
    simulate,
    summarize,
)
from pipesplit.runtime.dtype import cpu_info  # noqa: E402
from pipesplit.runtime.loader import resolve_model  # noqa: E402
from pipesplit.runtime.profile import profile_model, reference_timer  # noqa: E402

SPLITS = {2: [(15, 15), (6, 24), (24, 6), (10, 20)], 3: [(10, 10, 10), (4, 13, 13), (20, 5, 5), (5, 5, 20)]}
QUICK_SPLITS = {2: [(6, 24), (24, 6)]}


# Poisson arrivals at a rate every split sustains: LOAD x the request rate of the slowest split
# running the all-at-once requests, as the profile simulates it. Until 2026-12-07 the rate was a
# fixed 4 requests/s, which on 2-core float32 machines (1.1-1.7 requests/s) was an overload: a
# queue that grew for the whole run, whose TTFT amplified every small error of a step's cost
# (on a Zen 3 that day, a 12% higher prefill scale moved one split's TTFT p50 by 37%).
LOAD = 0.8


def workloads(quick: bool, rate: float | None = None) -> dict[str, Workload]:
    """The two workloads; the Poisson one at `rate` requests/s (None: the all-at-once one alone)."""
    n = 8 if quick else 20
    loads = {"all-at-once": Workload(n, (32, 128), (16, 32), None, seed=1)}
    if rate is not None:
        loads["poisson"] = Workload(n, (32, 128), (16, 32), rate, seed=2)
    return loads


def sustained_rate(splits: dict, profiles: dict, cores: int, burst: Workload) -> float:
    """LOAD x the slowest split's simulated request rate on `burst` (all requests at once)."""
    spec = resolve_model("smollm2").spec
    rates = []
    for pp, parts in splits.items():
        costs = ProfileCosts(profiles[max(1, cores // pp)], spec)
        for partition in parts:
            # a pool that holds every request whole, as the engine's do for these workloads
            capacity = burst.requests * (burst.prompt_len[1] + burst.output_len[1])
            run = simulate(spec, partition, capacity, costs, burst)
            rates.append(burst.requests / run.makespan)
    return round(LOAD * min(rates), 2)


def run_real(llm: LLM, workload: Workload) -> tuple[list[RequestTimes], float, float]:
    """The workload through the engine with its arrival times; per-request times and the span."""
    draws = workload.draw(llm.spec.vocab_size)
    lock = threading.Lock()
    first: dict[int, float] = {}
    done: dict[int, RequestTimes] = {}
    arrived: dict[int, float] = {}
    all_done = threading.Event()

    def on_output(req_id_box: list, n_out: int):
        def cb(out) -> None:
            now = time.perf_counter()
            with lock:
                rid = out.req_id
                if out.token_ids and rid not in first:
                    first[rid] = now
                if out.finished:
                    done[rid] = RequestTimes(arrived[rid], first[rid], now, len(out.token_ids))
                    if len(done) == len(draws):
                        all_done.set()
        return cb

    t0 = time.perf_counter()
    for t, prompt, n_out in draws:
        delay = t0 + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            rid = llm.engine.submit(prompt, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True),
                                    on_output([], n_out))
            arrived[rid] = time.perf_counter()
    while not all_done.wait(0.2):
        llm.engine.raise_if_dead()
    end = max(r.finished for r in done.values())
    return list(done.values()), min(arrived.values()), end


def drift_corrected(profile: Profile, drift: float) -> Profile:
    """The profile with every stage's compute scaled by the VM's speed drift (now over then)."""
    return dataclasses.replace(profile, prefill_scale=profile.prefill_scale * drift,
                               decode_scale=profile.decode_scale * drift)


def pieces_only(profile: Profile) -> Profile:
    """The profile without its calibration against the engine: scales and oversubscribed slowdown 1,
    the co-run slowdown of the microbenchmark."""
    measurements = (profile.meta or {}).get("measurements", {})
    old = measurements.get("corun_calibration")  # before 2026-12-08: one run, the microbenchmark inside
    corun = measurements.get("corun_microbenchmark",
                             old.get("microbenchmark_slowdown") if isinstance(old, dict) else None)
    return dataclasses.replace(profile, prefill_scale=1.0, decode_scale=1.0, oversubscribed_slowdown=1.0,
                               corun_slowdown=profile.corun_slowdown if corun is None else corun)


def mean_result(runs: list[SimResult]) -> SimResult:
    """The rounds' mean of each measured metric (the first round's counts otherwise)."""
    metrics = ("output_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "makespan")
    return dataclasses.replace(runs[0], **{k: statistics.fmean(getattr(r, k) for r in runs) for k in metrics})


def compare_row(pp, partition, name, measured, simulated, uncalibrated=None, drifted=None) -> dict:
    """One split and workload: the measurement against the simulation, against the simulation
    with the pieces alone (the profile's prefill and decode scales set to 1) and against the
    simulation with the VM's speed drift since profiling taken out, where given."""
    row = {"pp": pp, "partition": list(partition), "workload": name,
           "measured": measured.to_json(), "simulated": simulated.to_json()}
    others = {"uncalibrated": uncalibrated, "drift_corrected": drifted}
    for label, result in others.items():
        if result is not None:
            row[f"simulated_{label}"] = result.to_json()
    for key in ("output_tokens_per_s", "ttft_p50", "tpot_p50"):
        m, s = getattr(measured, key), getattr(simulated, key)
        row[f"error_{key}"] = (s - m) / m
        for label, result in others.items():
            if result is not None:
                row[f"error_{label}_{key}"] = (getattr(result, key) - m) / m
    print(f"PP{pp} {','.join(map(str, partition)):>8} {name:<11} tok/s measured "
          f"{measured.output_tokens_per_s:7.1f} simulated {simulated.output_tokens_per_s:7.1f} "
          f"({row['error_output_tokens_per_s']:+.1%}); TTFT p50 {measured.ttft_p50 * 1e3:7.1f} / "
          f"{simulated.ttft_p50 * 1e3:7.1f} ms ({row['error_ttft_p50']:+.1%}); TPOT p50 "
          f"{measured.tpot_p50 * 1e3:6.1f} / {simulated.tpot_p50 * 1e3:6.1f} ms", flush=True)
    return row


# The metrics whose order is checked, and which way is better (sort key sign: higher throughput,
# lower TTFT first).
ORDERED_METRICS = {"output_tokens_per_s": -1, "ttft_p50": 1}


def rounds_of(row: dict) -> list[dict]:
    """A row's measured rounds (older files: the one measurement)."""
    return row.get("rounds") or [row["measured"]]


def summarize_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Median and max absolute errors, and whether the simulator orders each group's splits
    (by throughput and by TTFT p50, per PP and workload) as the measurements do."""
    summary = {}
    for key in ("output_tokens_per_s", "ttft_p50", "tpot_p50"):
        errs = [abs(r[f"error_{key}"]) for r in rows]
        summary[key] = {"median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}
        for label in ("uncalibrated", "drift_corrected"):
            if all(f"error_{label}_{key}" in r for r in rows):
                errs = [abs(r[f"error_{label}_{key}"]) for r in rows]
                summary[key][label] = {"median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}
    orders = []
    for pp, name in dict.fromkeys((r["pp"], r["workload"]) for r in rows):
        group = [r for r in rows if r["pp"] == pp and r["workload"] == name]
        for metric, sign in ORDERED_METRICS.items():
            rank = lambda which: [r["partition"] for r in  # noqa: E731
                                  sorted(group, key=lambda r: sign * r[which][metric])]
            orders.append({"pp": pp, "workload": name, "by": metric, "measured": rank("measured"),
                           "simulated": rank("simulated"), "same": rank("measured") == rank("simulated"),
                           **separated_pairs(group, metric)})
    return summary, orders


def separated_pairs(group: list[dict], metric: str) -> dict:
    """The pairs of splits whose measured rounds do not overlap on `metric` (every round of one
    beats every round of the other), and how many of them the simulator orders the same way. Weak
    evidence with few rounds: two rounds each of two equal splits fail to overlap one time in
    three (`pooled_orders` tests pairs over several files)."""
    spans = {tuple(r["partition"]): [x[metric] for x in rounds_of(r)] for r in group}
    separated = agreeing = 0
    for a, b in itertools.combinations(group, 2):
        (lo_a, hi_a), (lo_b, hi_b) = ((min(v), max(v)) for v in (spans[tuple(a["partition"])],
                                                                    spans[tuple(b["partition"])]))
        if hi_a < lo_b or hi_b < lo_a:
            separated += 1
            measured = a["measured"][metric] - b["measured"][metric]
            simulated = a["simulated"][metric] - b["simulated"][metric]
            agreeing += measured * simulated > 0
    return {"separated_pairs": separated, "separated_pairs_ordered_alike": agreeing}


def recalibrated(profile: Profile, spec, capacities: dict[tuple[int, ...], int]) -> Profile:
    """The profile's calibration recomputed from its stored engine runs with the current simulator
    (a profile without stored runs stays as it is). Files of before 2026-12-07 hold one run, with
    its split's stages co-running, and neither its workload nor its settings: those are rebuilt;
    files of 2026-12-07 hold one run alone, later ones a list of them (and since 2026-12-08 two runs
    for each slowdown)."""
    from pipesplit.runtime import profile as profiler

    measurements = (profile.meta or {}).get("measurements", {})

    def stored(key: str) -> list[dict]:  # one run (a dict) in older files, a list since
        docs = measurements.get(key) or []
        return [docs] if isinstance(docs, dict) else docs

    runs = stored("calibration")
    if not runs:
        return profile
    if "workload" not in runs[0]:
        partition = tuple(runs[0]["partition"])
        capacity = capacities.get(partition) or max(capacities.values())
        workload = profiler._calibration_workload(capacity, spec.max_position_embeddings)
        runs = [{**runs[0], "max_total_num_tokens": capacity, "config": {}, "workload": dataclasses.asdict(workload)}]
    together, over = stored("corun_calibration"), stored("oversubscribed_calibration")
    return calibrated(spec, pieces_only(profile), [MeasuredRun.from_json(doc) for doc in runs],
                      [MeasuredRun.from_json(doc) for doc in together], [MeasuredRun.from_json(doc) for doc in over])


def resimulated(doc: dict) -> dict:
    """A results document with its simulated side recomputed by the current simulator (same
    profiles and their stored calibration steps, same workloads), e.g. after a simulator change;
    the measurements stay as they were."""
    from pipesplit.planner.spec import load_spec

    doc = dict(doc)
    spec = load_spec("smollm2")
    loads = {k: Workload.from_json(w) for k, w in doc["workloads"].items()}
    cores = doc["machine"]["cpus"]
    capacities = {tuple(r["partition"]): r["measured"]["max_total_num_tokens"] for r in doc["rows"]}
    profiles = {int(t): recalibrated(Profile.from_json(p), spec, capacities) for t, p in doc["profiles"].items()}
    for t, p in profiles.items():
        print(f"profile of {t} thread(s): scales {p.prefill_scale:.3f} prefill, {p.decode_scale:.3f} decode, "
              f"co-run slowdown {p.corun_slowdown:.3f}, oversubscribed {p.oversubscribed_slowdown:.3f}", file=sys.stderr)
    rows = []
    for old in doc["rows"]:
        pp, partition = old["pp"], tuple(old["partition"])
        profile = profiles[max(1, cores // pp)]
        m = old["measured"]
        measured = SimResult(**{**m, "partition": partition, "stage_busy": tuple(m["stage_busy"])})
        variants = [profile, pieces_only(profile)]
        if "drift" in old:
            variants.append(drift_corrected(profile, statistics.fmean(old["drift"])))
        results = [simulate(spec, partition, m["max_total_num_tokens"], ProfileCosts(p, spec), loads[old["workload"]],
                            PipelineConfig(**old.get("config", {}))) for p in variants]
        row = compare_row(pp, partition, old["workload"], measured, *results)
        rows.append({**row, **{k: old[k] for k in ("config", "rounds", "drift", "drift_before_after") if k in old}})
    doc["summary"], doc["orders"] = summarize_rows(rows)
    doc["rows"] = rows
    doc["profiles"] = {str(t): p.to_json() for t, p in profiles.items()}
    return doc


def resimulate(path: str) -> int:
    """Rewrites a results file with its simulated side recomputed (`resimulated`)."""
    doc = resimulated(json.loads(Path(path).read_text()))
    print(json.dumps({"summary": doc["summary"], "orders": doc["orders"]}, indent=1))
    Path(path).write_text(json.dumps(doc, indent=1))
    return 0


# A pair of splits has a measured order where its rounds' sign-flip p-value is below ALPHA.
ALPHA = 0.05


def sign_flip_p_value(diffs: list[float]) -> float:
    """Two-sided exact p-value of the paired sign-flip (permutation) test that `diffs` centre on
    zero: the share of the 2^n patterns of signs whose |sum| reaches the observed |sum|. Counted
    by meeting in the middle (the signed sums of each half, one half sorted), so that 40 rounds
    cost 2^20 sums rather than 2^40."""
    observed = abs(sum(diffs))
    if observed <= 1e-12 * sum(abs(d) for d in diffs):
        return 1.0
    observed -= 1e-12 * observed  # a pattern that only rounding separates from the observed one counts

    def signed_sums(values: list[float]) -> list[float]:
        sums = [0.0]
        for v in values:
            sums = [s + v for s in sums] + [s - v for s in sums]
        return sums

    half = len(diffs) // 2
    right = sorted(signed_sums(diffs[half:]))
    reached = sum(len(right) - bisect.bisect_left(right, observed - a) + bisect.bisect_right(right, -observed - a)
                  for a in signed_sums(diffs[:half]))
    return reached / 2 ** len(diffs)


def pooled_orders(docs: list[dict]) -> dict:
    """Whether the simulator orders the splits as the measurements do, over several results files
    of the same bench on one machine: for each PP, workload, metric (throughput, TTFT p50) and
    pair of splits, the log ratios of their rounds (round r of one against round r of the other in
    the same file: the same sweep over the splits, minutes apart), the exact sign-flip p-value of
    those ratios, and the simulated log ratio (the files' mean); a pair has a measured order where
    p < ALPHA. Two rounds cannot separate a pair by themselves (their smallest p-value is 0.5, and
    two rounds of two equal splits fail to overlap one time in three), hence the pooling."""
    pairs, rankings = [], []
    for pp, name in dict.fromkeys((r["pp"], r["workload"]) for doc in docs for r in doc["rows"]):
        splits: dict[tuple, dict[int, dict]] = {}  # partition -> {file index: row}
        for i, doc in enumerate(docs):
            for r in doc["rows"]:
                if (r["pp"], r["workload"]) == (pp, name):
                    splits.setdefault(tuple(r["partition"]), {})[i] = r
        for metric in ORDERED_METRICS:
            for a, b in itertools.combinations(splits, 2):
                files = [i for i in splits[a] if i in splits[b]]
                ratios = [math.log(x[metric] / y[metric]) for i in files
                          for x, y in zip(rounds_of(splits[a][i]), rounds_of(splits[b][i]))]
                measured = statistics.fmean(ratios)
                simulated = statistics.fmean(math.log(splits[a][i]["simulated"][metric] / splits[b][i]["simulated"][metric])
                                             for i in files)
                p = sign_flip_p_value(ratios)
                pairs.append({"pp": pp, "workload": name, "by": metric, "splits": [list(a), list(b)],
                              "rounds": len(ratios), "measured_log_ratio": measured, "p_value": p,
                              "measured_order": p < ALPHA, "simulated_log_ratio": simulated,
                              "ordered_alike": measured * simulated > 0})
            ranking = {side: pooled_ranking(splits, side, metric) for side in ("measured", "simulated")}
            # each file's own rankings against the pooled measured one: how often one run orders
            # the whole group as all of them do, measured and simulated
            alone = [{side: pooled_ranking({s: {i: rows[i]} for s, rows in splits.items()}, side, metric)
                      for side in ("measured", "simulated")} for i in range(len(docs))
                     if all(i in rows for rows in splits.values())]
            rankings.append({"pp": pp, "workload": name, "by": metric, **ranking,
                             "runs": len(alone),
                             **{f"runs_{side}_as_pooled": sum(r[side] == ranking["measured"] for r in alone)
                                for side in ("measured", "simulated")}})
    ordered = [p for p in pairs if p["measured_order"]]
    summary = {"files": len(docs), "pairs": len(pairs), "alpha": ALPHA, "measured_orders": len(ordered),
               "measured_orders_simulated_alike": sum(p["ordered_alike"] for p in ordered),
               "groups": len(rankings), "groups_ranked_alike": sum(r["measured"] == r["simulated"] for r in rankings),
               **{key: sum(r[key] for r in rankings) for key in ("runs", "runs_measured_as_pooled",
                                                                 "runs_simulated_as_pooled")}}
    return {"summary": summary, "pairs": pairs, "rankings": rankings}


def pooled_ranking(splits: dict[tuple, dict[int, dict]], side: str, metric: str) -> list[list[int]]:
    """The splits best first by `metric` (higher throughput, lower TTFT), each scored by the mean
    over files of its log value less the mean log value of the file's splits."""
    files = set.intersection(*(set(rows) for rows in splits.values()))
    centre = {i: statistics.fmean(math.log(rows[i][side][metric]) for rows in splits.values()) for i in files}
    score = {s: statistics.fmean(math.log(rows[i][side][metric]) - centre[i] for i in files) for s, rows in splits.items()}
    return [list(s) for s in sorted(score, key=lambda s: score[s] * ORDERED_METRICS[metric])]


def pool(paths: list[str], out: str) -> int:
    """`pooled_orders` over the files (each resimulated in memory by the current simulator), printed
    and written to `out`."""
    try:
        docs = [json.loads(Path(p).read_text()) for p in paths]
        kinds = {(d["machine"]["cpus"], d["dtype"]) for d in docs}
        cpus = {d["machine"]["cpu"] for d in docs if "cpu" in d["machine"]}  # recorded since 2026-12-08
        rows = {frozenset((r["pp"], r["workload"], tuple(r["partition"])) for r in d["rows"]) for d in docs}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: --pool takes results files of bench/simulator.py ({e!r}); give such files", file=sys.stderr)
        return 2
    if len(kinds) > 1 or len(cpus) > 1 or len(rows) > 1:
        print(f"error: the files mix CPUs, cores and dtypes {sorted(cpus)} {sorted(kinds)} or splits and "
              "workloads; pool the results of one machine, dtype and set of splits", file=sys.stderr)
        return 2
    result = pooled_orders([resimulated(d) for d in docs])
    for p in result["pairs"]:
        a, b = (",".join(map(str, s)) for s in p["splits"])
        verdict = ("alike" if p["ordered_alike"] else "OPPOSITE") if p["measured_order"] else "no measured order"
        print(f"PP{p['pp']} {p['workload']:<11} {p['by']:<19} {a:>8} vs {b:<8} measured "
              f"{math.exp(p['measured_log_ratio']) - 1:+6.1%} (p {p['p_value']:.3f}, {p['rounds']} rounds) "
              f"simulated {math.exp(p['simulated_log_ratio']) - 1:+6.1%}  {verdict}")
    print(json.dumps(result["summary"], indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"files": paths, **result}, indent=1))
    return 0


def cpu_identity() -> str:
    """The CPU's model name, family and model (a model name alone, "AMD EPYC", does not tell a
    Zen 3 from a Zen 4)."""
    info = cpu_info()
    return (f"{info.get('model name') or platform.processor()} "
            f"(family {info.get('cpu family', '?')}, model {info.get('model', '?')})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", help="engine and profile dtype")
    ap.add_argument("--repeats", type=int, default=5, help="profile repeats")
    ap.add_argument("--rounds", type=int, default=2, help="measured runs of each split and workload (their mean counts)")
    ap.add_argument("--poisson-rate", type=float, help=f"requests/s (default: {LOAD} x the slowest split's "
                    "simulated all-at-once rate; 4.0 until 2026-12-07)")
    ap.add_argument("--out", help="results file (default bench/results/simulator.json; with --pool "
                    "bench/results/simulator-pooled.json)")
    ap.add_argument("--resimulate", metavar="FILE", help="recompute the simulated side of FILE, measure nothing")
    ap.add_argument("--pool", metavar="FILE", nargs="+", help="measure nothing: whether the current simulator "
                    "orders the splits as the rounds of these results files do, pooled (written to --out)")
    args = ap.parse_args()
    if args.resimulate:
        return resimulate(args.resimulate)
    if args.pool:
        return pool(args.pool, args.out or "bench/results/simulator-pooled.json")
    started = time.perf_counter()
    splits = QUICK_SPLITS if args.quick else SPLITS
    cores = os.cpu_count() or 1

    profiles = {}
    for pp in splits:
        threads = max(1, cores // pp)
        if threads not in profiles:
            print(f"profiling smollm2 with {threads} thread(s)", file=sys.stderr, flush=True)
            profiles[threads] = profile_model("smollm2", "cpu", args.dtype, threads, args.repeats, calibrate=True)
    profile_seconds = time.perf_counter() - started
    rate = args.poisson_rate or sustained_rate(splits, profiles, cores, workloads(args.quick)["all-at-once"])
    loads = workloads(args.quick, rate)
    print(f"Poisson arrivals at {rate} requests/s", file=sys.stderr, flush=True)

    # Each split's engine runs the workloads once per round; rounds go over the splits forwards,
    # then backwards, ..., so that a slow spell of the VM does not fall on neighbouring splits
    # only; the row compares the rounds' mean with the simulator and keeps each round.
    order = [(pp, tuple(partition)) for pp, parts in splits.items() for partition in parts]
    reference_seconds = reference_timer("smollm2", args.dtype)
    measured_runs: dict[tuple, list[SimResult]] = {}
    configs, capacities, brackets = {}, {}, {}
    for round_ in range(args.rounds):
        for pp, partition in (order if round_ % 2 == 0 else order[::-1]):
            reference = profiles[max(1, cores // pp)].meta["reference_seconds"]
            before = reference_seconds() / reference
            llm = LLM("smollm2", pp=pp, partition=list(partition), dtype=args.dtype, log=False)
            try:
                llm.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
                capacities[pp, partition] = capacity = llm.max_total_num_tokens
                configs[pp, partition] = PipelineConfig.of(llm.engine.scheduler_config)
                for name, workload in loads.items():
                    times, start, end = run_real(llm, workload)
                    run = summarize(partition, capacity, times, start, end, [0.0] * pp, 0, 0)
                    measured_runs.setdefault((pp, partition, name), []).append(run)
                    print(f"round {round_ + 1} PP{pp} {','.join(map(str, partition)):>8} {name:<11} "
                          f"{run.output_tokens_per_s:7.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                llm.close()
            after = reference_seconds() / reference
            brackets.setdefault((pp, partition), []).append([before, after])
            print(f"  VM speed drift before / after: {before:.3f} / {after:.3f}",
                  file=sys.stderr, flush=True)

    rows = []
    spec = resolve_model("smollm2").spec
    for pp, partition in order:
        profile = profiles[max(1, cores // pp)]
        for name, workload in loads.items():
            runs = measured_runs[pp, partition, name]
            measured = mean_result(runs)
            drift = statistics.fmean(itertools.chain.from_iterable(brackets[pp, partition]))
            simulated, uncalibrated, drifted = (
                simulate(spec, partition, capacities[pp, partition], ProfileCosts(p, spec), workload,
                         configs[pp, partition])
                for p in (profile, pieces_only(profile), drift_corrected(profile, drift)))
            row = compare_row(pp, partition, name, measured, simulated, uncalibrated, drifted)
            row["config"] = dataclasses.asdict(configs[pp, partition])
            row["rounds"] = [r.to_json() for r in runs]
            row["drift"] = [statistics.fmean(b) for b in brackets[pp, partition]]  # per round
            row["drift_before_after"] = brackets[pp, partition]
            rows.append(row)

    summary, orders = summarize_rows(rows)
    doc = {
        "machine": {"cpus": cores, "cpu": cpu_identity(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "dtype": args.dtype,
        "profile_seconds": round(profile_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "workloads": {k: vars(w) for k, w in loads.items()},
        "summary": summary,
        "orders": orders,
        "rows": rows,
        "profiles": {str(t): p.to_json() for t, p in profiles.items()},
    }
    print(json.dumps({"summary": summary, "orders": orders, "total_seconds": doc["total_seconds"]}, indent=1))
    out = Path(args.out or "bench/results/simulator.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
