"""`pipesplit plan / models / gpus` through cli.main, as a user runs them."""

from __future__ import annotations

import json

import pytest

from pipesplit.cli import main

PLAN_KEYS = {"model", "architecture", "num_layers", "params_total", "weight_bytes_total", "kv_bytes_per_token_per_layer", "plans"}
PLAN_ENTRY_KEYS = {"strategy", "target", "partition", "max_total_num_tokens", "fits", "binding_stage", "stages"}
STAGE_KEYS = {
    "stage", "gpu", "capacity_bytes", "usable_bytes", "layers", "embedding", "lm_head", "mtp", "weight_bytes", "kv_tokens",
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract(capsys):
    code, out, _ = run(capsys, "plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--json")
    assert code == 0
    doc = json.loads(out)
    assert PLAN_KEYS <= doc.keys()
    assert doc["model"] == "deepseek-v3" and doc["num_layers"] == 61
    assert doc["kv_bytes_per_token_per_layer"] == 576 * 2
    (plan,) = doc["plans"]
    assert PLAN_ENTRY_KEYS <= plan.keys()
    assert plan["strategy"] == "max-kv" and plan["target"] == "pipesplit" and plan["fits"]
    assert sum(plan["partition"]) == 61 and len(plan["stages"]) == 8
    for stage in plan["stages"]:
        assert STAGE_KEYS <= stage.keys()
    assert plan["stages"][0]["layers"] == [0, plan["partition"][0]]
    assert plan["max_total_num_tokens"] == min(s["kv_tokens"] for s in plan["stages"])


def test_compare_json_has_one_plan_per_strategy(capsys):
    code, out, _ = run(capsys, "plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--compare", "--json")
    assert code == 0
    plans = {p["strategy"]: p for p in json.loads(out)["plans"]}
    assert set(plans) == {"sglang-legacy", "remainder-first", "remainder-last", "vllm", "min-weights", "max-kv", "balanced"}
    assert plans["sglang-legacy"]["partition"] == [7, 7, 7, 7, 7, 7, 7, 12]
    assert not plans["sglang-legacy"]["fits"] and plans["sglang-legacy"]["binding_stage"] == 7
    assert all(plans["max-kv"]["max_total_num_tokens"] >= p["max_total_num_tokens"] for p in plans.values())


def test_compare_table_rows(capsys):
    code, out, _ = run(capsys, "plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--compare")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
            ("sglang-legacy", "remainder-first", "remainder-last", "vllm", "min-weights", "max-kv")}
    assert len(rows) == 6
    assert "7,7,7,7,7,7,7,12" in rows["sglang-legacy"] and "does not fit (stage 7)" in rows["sglang-legacy"]
    assert "8,8,8,8,8,7,7,7" in rows["remainder-first"]
    assert "binding stage" in out


def test_compare_gain_over_legacy(capsys):
    """The last column is each row's max_total_num_tokens over sglang-legacy's, and max-kv's split gains
    (published in the README: 9,171 -> 16,995 tokens, 1.853x)."""
    code, out, _ = run(capsys, "plan", "llama-3.1-70b-instruct", "--pp", "8", "--gpu", "L4", "--compare")
    assert code == 0
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 4 and cells[-1].endswith("x") and cells[2].replace(",", "").isdigit():
            rows[cells[0]] = (int(cells[2].replace(",", "")), float(cells[3].rstrip("x")))
    legacy_tokens = rows["sglang-legacy"][0]
    for tokens, gain in rows.values():
        assert gain == pytest.approx(tokens / legacy_tokens, abs=5e-4)
    assert rows["max-kv"][0] == max(tokens for tokens, _ in rows.values())
    assert (legacy_tokens, rows["max-kv"][0]) == (9_171, 16_995)


def test_human_output_has_a_row_per_stage(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--pp", "4", "--gpu", "4090")
    assert code == 0
    stage_rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(stage_rows) == 4
    assert "embed" in stage_rows[0] and "head" in stage_rows[-1] and "[" in stage_rows[0]


@pytest.mark.parametrize("engine, var", [("sglang", "SGLANG_PP_LAYER_PARTITION"), ("vllm", "VLLM_PP_LAYER_PARTITION")])
def test_env_line(capsys, engine, var):
    code, out, _ = run(capsys, "plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--strategy", "remainder-first", "--env", engine)
    assert code == 0
    assert out == f"{var}=8,8,8,8,8,7,7,7\n"


def test_explicit_partition(capsys):
    code, out, _ = run(capsys, "plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--partition", "7,7,8,8,8,8,8,7", "--json")
    (plan,) = json.loads(out)["plans"]
    assert code == 0 and plan["strategy"] == "explicit" and plan["partition"] == [7, 7, 8, 8, 8, 8, 8, 7]


def test_mixed_devices_and_sglang_target(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "RTX5070Ti,5090", "--target", "sglang", "--json")
    (plan,) = json.loads(out)["plans"]
    assert code == 0 and [s["gpu"] for s in plan["stages"]] == ["RTX-5070-Ti", "RTX-5090"]
    assert plan["partition"][0] < plan["partition"][1]  # the 16 GB card gets fewer layers


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "deepseek-v3", "--pp", "8", "--gpu", "H200", "--partition", "8,8,8"], "partition 8,8,8 has 3 entries but --pp is 8"),
        (["plan", "deepseek-v3", "--pp", "3", "--gpu", "H200", "--partition", "8,8,8"], "partition 8,8,8 sums to 24 but the model has 61 layers; give 3 numbers that sum to 61"),
        (["plan", "deepseek-v3", "--pp", "8", "--gpu", "V100"], "unknown GPU 'V100'"),
        (["plan", "no-such-model", "--pp", "2", "--gpu", "H100"], "no model 'no-such-model'"),
        (["plan", "llama-3.1-8b", "--pp", "33", "--gpu", "H100"], "--pp 33 is more than the model's 32 layers"),
        (["plan", "llama-3.1-8b", "--pp", "4", "--gpu", "H100,H100,A100-40GB"], "--gpu lists 3 devices but --pp is 4; give 1 or 4"),
        (["plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--engine", "trtllm"], "unknown engine 'trtllm'"),
        (["plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--strategy", "fast"], "unknown strategy 'fast'"),
        (["plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--kv-dtype", "int3"], "kv dtype 'int3'"),
        (["plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--mem-fraction", "1.5"], "--mem-fraction"),
        (["plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--reserve", "-1"], "--reserve"),
        (["plan", "llama-3.1-8b", "--pp", "2"], "--gpu NAME"),
        (["plan", "llama-3.1-70b-instruct", "--pp", "2", "--gpu", "L4"], "does not fit"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("pipesplit: error: ") and err.count("\n") == 1
    assert message in err


def test_does_not_fit_names_the_stage_and_the_shortfall(capsys):
    code, _, err = run(capsys, "plan", "llama-3.1-70b-instruct", "--pp", "2", "--gpu", "L4")
    assert code == 2 and "stage 1" in err and "lacks" in err and "GiB" in err


def test_malformed_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "plan", str(bad), "--pp", "2", "--gpu", "H100")
    assert code == 2 and err.count("\n") == 1


def test_models_and_gpus(capsys):
    code, out, _ = run(capsys, "models", "--json")
    names = [m["name"] for m in json.loads(out)]
    assert code == 0 and "deepseek-v3" in names and "llama-3.1-8b" in names
    code, out, _ = run(capsys, "gpus", "--json")
    gpus = {g["name"]: g for g in json.loads(out)}
    assert code == 0 and gpus["H200"]["memory_mib"] == 143771
    code, out, _ = run(capsys, "gpus")
    assert code == 0 and "RTX-5070-Ti" in out
