"""The runtime on torch: stage processes built from a planner `Plan`, the engine and its scheduler.

Hops from request to token: `engine` (`Engine.submit`) -> `scheduler` (a micro-batch) -> `stage`
(each stage's layers from `models/`, weights from `loader`) -> `sampler` on the last stage ->
token ids back to the engine.
"""
