"""The planner imports without torch: `pipesplit plan` needs none of the runtime's dependencies."""

from __future__ import annotations

import subprocess
import sys

PLANNER_MODULES = ["spec", "costs", "hardware", "partition", "plan", "report", "simulator", "objectives", "simreport"]


def test_planner_imports_no_torch():
    modules = ", ".join(f"pipesplit.planner.{m}" for m in PLANNER_MODULES)
    code = (
        f"import sys, pipesplit, pipesplit.cli, {modules}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'transformers'))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the planner pulled in {out}"


def test_plan_command_runs_without_torch():
    """The plan CLI end to end in a process where torch cannot be imported at all."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'numpy'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pipesplit.cli import main\n"
        "sys.exit(main(['plan', 'deepseek-v3', '--pp', '8', '--gpu', 'H200', '--compare', '--json']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"max_total_num_tokens"' in proc.stdout
