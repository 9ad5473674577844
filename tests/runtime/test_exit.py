"""Exit: nothing of ours runs once `LLM.close()` returns, so interpreter exit cannot crash.

The cause of the exit-134 crash ("terminate called without an active exception", a few runs in a
hundred at PP >= 2): the stage watcher, a daemon thread, outlived `close()` by up to one poll
interval. It held the last references to the engine, so when it ended during interpreter
finalization it freed the engine's tensors there, and Python ended that thread inside torch's
tensor deallocation. `bench/exit_check.py` runs 50 PP2 and 50 PP3 `generate` processes and
counts zero exits; this test checks the invariant that rules the crash out.
"""

from __future__ import annotations

import threading

import pytest

from pipesplit import LLM, SamplingParams


@pytest.mark.parametrize("pp,partition", [(2, None), (3, "1,2,2")])
def test_no_thread_outlives_close(tiny_moe_checkpoints, pp, partition):
    before = set(threading.enumerate())
    llm = LLM(str(tiny_moe_checkpoints["deepseek_v3"]), pp=pp, partition=partition, mem_budget_gib=0.02, threads=1,
              log=False)
    during = set(threading.enumerate()) - before
    assert any(t.name == "stage-watch" for t in during)  # the watcher this test is about is running
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4
    llm.close()
    left = [t.name for t in set(threading.enumerate()) - before]
    assert left == [], f"threads still running after close(): {left}"
