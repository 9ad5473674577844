"""The planner: model spec, exact costs, devices, partition strategies and the plan.

Pure Python: nothing under this package imports torch (a test checks it), so `pipesplit plan`
runs without the runtime's dependencies.
"""
