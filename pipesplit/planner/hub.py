"""Hugging Face Hub ids (`Qwen/Qwen3-32B`) -> the config.json in the local Hugging Face cache.

The cache layout is huggingface_hub's: `<cache>/models--Org--Name/refs/<revision>` holds a commit
hash and `<cache>/models--Org--Name/snapshots/<commit>/config.json` the file. The cache folder is
HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
Only config.json is ever downloaded, and only when downloads are allowed (not HF_HUB_OFFLINE=1,
not --offline).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from pipesplit.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name


def hub_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where huggingface_hub keeps its model folders."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def offline(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def cached_config(repo_id: str, revision: str = "main", env: Mapping[str, str] = os.environ) -> Path | None:
    """The cached config.json of repo_id at revision (a branch, tag or commit), or None."""
    org, name = repo_id.split("/")
    folder = hub_cache_dir(env) / f"models--{org}--{name}"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif COMMIT.match(revision):
        commit = revision
    else:
        return None
    config = folder / "snapshots" / commit / "config.json"
    return config if config.is_file() else None


def _download(repo_id: str, revision: str, cache: Path) -> Path:
    """config.json through huggingface_hub (it knows tokens for gated repositories)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(
            f"{repo_id}: config.json is not in the Hugging Face cache ({cache}) and huggingface_hub is not "
            f"installed to fetch it; pip install huggingface_hub or give a config.json path"
        ) from None
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=str(cache)))
    except Exception as e:  # network, 401 on gated repos, 404: one line that says what to do
        raise UserError(
            f"{repo_id}: could not download config.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"check the id, log in with `huggingface-cli login` for gated models, or give a config.json path"
        ) from None


def hub_config_path(repo_id: str, revision: str = "main", allow_download: bool = True,
                    env: Mapping[str, str] = os.environ,
                    download: Callable[[str, str, Path], Path] = _download) -> Path:
    """The config.json of a Hub id: from the cache, else downloaded when allowed, else one clear error."""
    found = cached_config(repo_id, revision, env)
    if found is not None:
        return found
    cache = hub_cache_dir(env)
    if not allow_download or offline(env):
        why = "HF_HUB_OFFLINE=1" if offline(env) else "--offline"
        raise UserError(
            f"{repo_id}: no config.json in the Hugging Face cache ({cache}) and downloads are off ({why}); "
            f"fetch just that file with `huggingface-cli download {repo_id} config.json` or give a config.json path"
        )
    return download(repo_id, revision, cache)
