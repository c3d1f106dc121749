"""Spatio-temporal token pruning of projected visual tokens, before they enter the LLM.

One call per chunk: ``StreamPruner(config).select(embeds [F,T,d], positions [T,2], pts, attention) -> PruneResult``
(keep mask ``[F, T]`` + per-frame counts). Pure scoring/budget functions live in ``pruner.scoring``,
``pruner.budget`` and ``pruner.attention``; policies are looked up by name in ``pruner.policies``.
"""
from pruner.attention import attention_received, scores_to_tokens
from pruner.config import PrunerConfig
from pruner.policies import Policy, PolicyContext, available_policies, get_policy
from pruner.stream import PruneResult, StreamPruner

__all__ = [
    "Policy",
    "PolicyContext",
    "PruneResult",
    "PrunerConfig",
    "StreamPruner",
    "attention_received",
    "available_policies",
    "get_policy",
    "scores_to_tokens",
]
