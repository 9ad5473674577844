"""pipesplit: pipeline-parallel LLM inference with a balanced, memory-aware layer split.

The planner (`pipesplit.planner`) is pure Python and imports without torch; the runtime
(`pipesplit.runtime`: `LLM`, `SamplingParams`) is imported lazily, on first use.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from pipesplit.runtime.engine import LLM

        return LLM
    if name == "SamplingParams":
        from pipesplit.runtime.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipesplit' has no attribute {name!r}")
