"""Hub ids (`Qwen/Qwen3-32B`) read from a Hugging Face cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from pipesplit.cli import main
from pipesplit.errors import UserError
from pipesplit.planner import hub
from pipesplit.planner.spec import load_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def catalog_config(name: str) -> str:
    return (resources.files("pipesplit.planner") / "catalog" / f"{name}.json").read_text()


def put_in_cache(cache: Path, repo_id: str, text: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """models--Org--Name/snapshots/<commit>/config.json and refs/<ref>, as huggingface_hub writes them."""
    org, name = repo_id.split("/")
    folder = cache / f"models--{org}--{name}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(text)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot / "config.json"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_cache_dir_follows_the_environment(tmp_path):
    assert hub.hub_cache_dir({"HF_HUB_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    assert hub.hub_cache_dir({"HF_HOME": str(tmp_path)}) == tmp_path / "hub"
    assert hub.hub_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "huggingface" / "hub"
    assert hub.hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_hub_id_reads_the_cached_config_offline(hf_home):
    put_in_cache(hf_home, "Qwen/Qwen3-32B", catalog_config("qwen3-32b"))
    spec = load_spec("Qwen/Qwen3-32B")
    assert spec.name == "Qwen/Qwen3-32B"
    built_in = load_spec("qwen3-32b")
    assert (spec.num_layers, spec.hidden_size, spec.layer_types) == (built_in.num_layers, built_in.hidden_size,
                                                                     built_in.layer_types)


def test_refs_pick_the_snapshot(hf_home):
    put_in_cache(hf_home, "Org/Model", catalog_config("qwen3-8b"), commit="a" * 40)
    folder = hf_home / "models--Org--Model"
    newer = folder / "snapshots" / ("b" * 40)
    newer.mkdir()
    (newer / "config.json").write_text(catalog_config("llama-3.1-8b"))
    (folder / "refs" / "main").write_text("b" * 40)
    assert hub.cached_config("Org/Model", env={"HF_HOME": str(hf_home.parent)}) == newer / "config.json"
    assert hub.cached_config("Org/Model", "a" * 40, env={"HF_HOME": str(hf_home.parent)}).parent.name == "a" * 40
    assert load_spec("Org/Model").num_layers == 32


def test_offline_and_absent_is_one_line_naming_the_file(hf_home, capsys):
    code = main(["plan", "Qwen/Qwen3-32B", "--pp", "2", "--gpu", "H100"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert "Qwen/Qwen3-32B" in err and "config.json" in err and "HF_HUB_OFFLINE=1" in err
    assert "huggingface-cli download Qwen/Qwen3-32B config.json" in err


def test_online_downloads_only_config_json(hf_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked = []

    def fake_download(repo_id, revision, cache):
        asked.append((repo_id, revision, cache))
        return put_in_cache(cache, repo_id, catalog_config("gpt-oss-20b"))

    path = hub.hub_config_path("openai/gpt-oss-20b", download=fake_download)
    assert asked == [("openai/gpt-oss-20b", "main", hf_home)]
    assert json.loads(path.read_text())["num_hidden_layers"] == 24
    # cached now: no second download
    assert hub.hub_config_path("openai/gpt-oss-20b", download=fake_download) == path and len(asked) == 1


def test_offline_flag_forbids_downloads(hf_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_download(*args):
        raise AssertionError("must not download")

    with pytest.raises(UserError, match="--offline"):
        hub.hub_config_path("Org/Absent", allow_download=False, download=no_download)


def test_cli_plans_a_hub_id_with_its_launch_line(hf_home, capsys):
    put_in_cache(hf_home, "Qwen/Qwen3-32B", catalog_config("qwen3-32b"))
    code = main(["plan", "Qwen/Qwen3-32B", "--pp", "2", "--gpu", "H100", "--engine", "sglang"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "python -m sglang.launch_server --model-path Qwen/Qwen3-32B --tp-size 1 --pp-size 2" in out


def test_not_a_hub_id():
    assert hub.is_hub_id("Qwen/Qwen3-32B") and hub.is_hub_id("meta-llama/Llama-3.3-70B-Instruct")
    assert not hub.is_hub_id("qwen3-32b") and not hub.is_hub_id("a/b/c") and not hub.is_hub_id("../x")
