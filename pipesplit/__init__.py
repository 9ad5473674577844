"""pipesplit: pipeline-parallel LLM inference with a balanced, memory-aware layer split.

The planner (`spec`, `costs`, `hardware`, `partition`, `plan`) is pure Python and imports
without torch. The runtime (`LLM`, `SamplingParams`) is imported lazily, on first use.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from pipesplit.engine import LLM

        return LLM
    if name == "SamplingParams":
        from pipesplit.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipesplit' has no attribute {name!r}")
