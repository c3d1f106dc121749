"""Stream affinity and the one stream flow without a cluster: rendezvous routing over fake replicas that guard their
state with incarnation tokens (serve.core.slots.StreamSlots), and the StageFlow on top (its one misroute policy).

A fake 'deployment' routes each call as StreamAffinityRouter does (consistent hashing of the stream id over the
live replicas). Killing a replica moves only its streams; a moved stream is refused (never created or read) and the
flow rebuilds it cold under a new token, counting the reset and the frames lost.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from serve.core.api import CapacityError, StreamMisroutedError
from serve.core.flow import LLM, VISION, StageFlow, started
from serve.core.messages import AnswerStats, text_of
from serve.core.slots import StreamSlots, rendezvous_pick, routing_key
from serve.deploy.routing import StreamAffinityRouter
from stream.errors import RequestError
from stream.frames import FrameBatch
from tests.service_doubles import FakeLLMStage, FakeVisionStage

class FakeReplica:
    """One stateful replica: a stage behind StreamSlots, answering like serve.deploy.replicas._StreamStage."""

    def __init__(self, name: str, stage, max_streams: int = 8) -> None:
        self.name, self.stage = name, stage
        self.slots = StreamSlots("fake", name, max_streams)

    def call(self, method: str, sid: str, token: str, *args):
        if method == "open":
            new, stale = self.slots.claim(sid, token)
            if stale is not None:
                self.stage.close(sid)
            if new:
                self.stage.open(sid, args[0])
            return self.name
        if method == "close":
            if self.slots.release(sid, token):
                self.stage.close(sid)
                return True
            return False
        self.slots.require(sid, token)
        return getattr(self.stage, method)(sid, *args)


class FakeCluster:
    """Transport over replica sets routed by rendezvous hashing over the live replicas."""

    def __init__(self, n: int = 3) -> None:
        self.sets = {VISION: {f"v{i}": FakeReplica(f"v{i}", FakeVisionStage()) for i in range(n)},
                     LLM: {f"l{i}": FakeReplica(f"l{i}", FakeLLMStage()) for i in range(n)}}

    def owner(self, kind: str, sid: str) -> FakeReplica:
        return self.sets[kind][rendezvous_pick(sid, self.sets[kind])]

    def call(self, kind, method, sid, token, *args):
        return self.owner(kind, sid).call(method, sid, token, *args)

    def stream(self, kind, method, sid, token, *args):
        return started(iter(self.call(kind, method, sid, token, *args)))


def _batch(start: int, n: int = 2) -> FrameBatch:
    return FrameBatch(rgb=np.full((n, 4, 4, 3), start, np.uint8), pts=np.arange(start, start + n, dtype=float),
                      indices=np.arange(start, start + n))


def test_rendezvous_is_stable_and_moves_only_the_lost_replicas_streams():
    members = [f"r{i}" for i in range(5)]
    ids = [f"s{i}" for i in range(400)]
    before = {s: rendezvous_pick(s, members) for s in ids}
    assert before == {s: rendezvous_pick(s, list(reversed(members))) for s in ids}  # order-free, deterministic
    assert len(set(before.values())) == 5 and max(list(before.values()).count(m) for m in members) < 130
    after = {s: rendezvous_pick(s, [m for m in members if m != "r2"]) for s in ids}
    moved = {s for s in ids if before[s] != after[s]}
    assert moved == {s for s in ids if before[s] == "r2"}  # only the dead replica's streams move
    with pytest.raises(ValueError):
        rendezvous_pick("s", [])


def test_router_sends_a_stream_only_to_its_owner_even_when_busy():
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}")) for i in range(4)]
    router = StreamAffinityRouter.__new__(StreamAffinityRouter)  # choose_replicas uses no router state

    def choose(args):
        return asyncio.run(router.choose_replicas(replicas, SimpleNamespace(args=args, kwargs={})))

    ranks = choose(["cam-7", "tok", "frames"])
    assert len(ranks) == 1 and len(ranks[0]) == 1  # one rank, one replica: no fallback to a less busy one
    assert ranks[0][0].replica_id.unique_id == rendezvous_pick("cam-7", [f"r{i}" for i in range(4)])
    assert choose([]) == [replicas]  # ping/where: any replica
    assert routing_key([3, "x"]) is None


def test_slots_refuse_other_incarnations_and_capacity():
    slots = StreamSlots("vision", "r0", max_streams=2)
    assert slots.claim("a", "t1") == (True, None)
    assert slots.claim("a", "t1") == (False, None)  # idempotent
    with pytest.raises(StreamMisroutedError, match="another incarnation"):
        slots.require("a", "t0")  # stale token of an earlier stream with the same id
    with pytest.raises(StreamMisroutedError, match="holds no state"):
        slots.require("b", "t1")
    assert slots.claim("a", "t2") == (True, "t1")  # a new incarnation replaces (and frees) the old one
    slots.claim("b", "t1")
    with pytest.raises(CapacityError, match="maximum of 2 streams"):
        slots.claim("c", "t1")
    assert not slots.release("a", "t1") and slots.release("a", "t2")
    assert slots.idle(ttl_s=60) == [] and [s for s, _ in slots.idle(ttl_s=-1)] == ["b"]


def test_flow_opens_rolls_back_and_reopens_cold_after_a_lost_replica():
    cluster = FakeCluster()
    flow = StageFlow(cluster)
    flow.open("s", None)
    flow.encode_append("s", _batch(0))
    lost = cluster.owner(VISION, "s")
    del cluster.sets[VISION][lost.name]  # the vision replica dies (its state with it)
    out = flow.encode_append("s", _batch(2))
    assert out.llm.llm_tokens == 2 and out.vision.tokens_kept == 2
    assert flow.resets == 1 and flow.frames_lost == 2 and flow.generation == {VISION: 1, LLM: 0}
    assert cluster.owner(VISION, "s").stage.streams["s"]["frames"] == 2  # cold: only the chunk after the loss
    assert cluster.owner(LLM, "s").stage.seen["s"] == [0.0, 1.0, 2.0, 3.0]  # the LLM kept its context
    flow.close("s")
    assert all(not r.slots.ids() for reps in cluster.sets.values() for r in reps.values())

    class FailingLLM(FakeLLMStage):
        def open(self, stream_id, options=None):
            raise RequestError("no room")

    cluster = FakeCluster(1)
    cluster.sets[LLM]["l0"].stage = FailingLLM()
    with pytest.raises(RequestError):
        StageFlow(cluster).open("t", None)
    assert cluster.sets[VISION]["v0"].slots.ids() == []  # the vision state was rolled back


def test_a_stale_incarnation_is_never_adopted():
    cluster = FakeCluster(1)
    old = StageFlow(cluster)
    old.open("s", None)
    old.encode_append("s", _batch(0))
    new = StageFlow(cluster)  # a new stream with the same id (the old one's actor died without closing)
    new.open("s", None)
    assert cluster.sets[VISION]["v0"].stage.streams["s"]["frames"] == 0  # fresh state, not the old one's
    with pytest.raises(StreamMisroutedError):
        cluster.call(VISION, "stats", "s", old.token(VISION))


def test_a_question_after_a_lost_llm_replica_reopens_the_llm_state_cold_once():
    cluster = FakeCluster()
    flow = StageFlow(cluster)
    flow.open("s", None)
    flow.encode_append("s", _batch(0))
    assert text_of(flow.ask("s", "what?", 8)) == "frames=2 last=1.00"
    del cluster.sets[LLM][cluster.owner(LLM, "s").name]  # the LLM replica dies with the stream's context
    items = list(flow.ask("s", "what?", 8))  # the same policy as a chunk's: reopen cold, retry once
    assert text_of(items) == "frames=0 last=none" and isinstance(items[-1], AnswerStats) and items[-1].done
    assert flow.resets == 1 and flow.frames_lost == 2 and flow.generation == {VISION: 0, LLM: 1}
