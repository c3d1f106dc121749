"""Spatio-temporal token pruning of projected visual tokens, before they enter the LLM.

One call per chunk: ``StreamPruner(config).select(embeds [F,T,d], positions [T,2], pts, attention) -> PruneResult``
(keep mask ``[F, T]`` + per-frame counts). Pure scoring/budget functions live in ``pruner.scoring``,
``pruner.budget``; policies are looked up by name in ``pruner.policies``.
"""
from pruner.config import PrunerConfig
from pruner.policies import Policy, PolicyContext, available_policies, get_policy
from pruner.stream import PruneResult, StreamPruner

__all__ = [
    "Policy",
    "PolicyContext",
    "PruneResult",
    "PrunerConfig",
    "StreamPruner",
    "available_policies",
    "get_policy",
]
