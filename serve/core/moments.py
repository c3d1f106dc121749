"""When did it happen: a stream's retained history scored block by block, as plain objects and functions.

The LLM replica holds each stream's history as KV blocks with their frame times (one block per appended chunk: the
window, then the offloaded blocks when ``kv.policy`` is ``offload``). A moment search scores those blocks for a query
on the LLM side (:func:`score_blocks`, over :class:`cache.kv.LLMEngine`) and turns the scores into moments
(:func:`rank_moments`): a pts range, a score, and the chunk thumbnail the stream's host kept for that time.

Two scores, chosen per request (``method``):

* ``yes_no`` (default): P(yes) / (P(yes) + P(no)) of the first answer token to the query with only the stream's
  sinks and that block as context -- the yes/no scorer of watches, per block. Cost: one question prefill per block
  (batched, a batch per step of the step loop), so N blocks cost about N question prefills; at most
  ``serve.timeline.max_scored_blocks`` blocks per search (beyond that the retrieval score shortlists them).
  Adjacent blocks at or above ``threshold`` merge into one moment (from its first block's first frame to its last
  block's last frame), so a moment covers an event's onset even when it lasts several blocks.
* ``retrieval``: the score offloaded-KV retrieval ranks blocks by (the question's mean query against the block's
  mean key, layer-normalised). Cost: one forward of the question alone plus one inner product per block -- about
  one question prefill however long the history; coarser (a block's mean key stands for all its tokens).
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.core.fleet import Targets
from stream.errors import RequestError

Method = Literal["yes_no", "retrieval"]


class MomentsRequest(BaseModel):
    """Search one stream's retained history for when something happened."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(..., min_length=1, description="A yes/no question (yes_no) or a description (retrieval).",
                       examples=["Is there a red square?"])
    top_k: int = Field(5, ge=1, description="Moments returned, best first.")
    since: float | None = Field(None, description="Only blocks with frames at or after this pts (s).")
    until: float | None = Field(None, description="Only blocks with frames at or before this pts (s).")
    method: Method = Field("yes_no", description="yes_no: the yes/no scorer per block; retrieval: the KV retrieval "
                           "score per block (cheaper, coarser).")
    threshold: float = Field(0.5, ge=0, le=1, description="yes_no: adjacent blocks scoring at least this merge "
                             "into one moment.")

    @model_validator(mode="after")
    def _range(self) -> "MomentsRequest":
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"since={self.since} is after until={self.until}. Fix: swap them")
        return self


class FleetMomentsRequest(MomentsRequest, Targets):
    """Search many streams' histories at once (moments of every stream, ranked together)."""


class BlockQuery(BaseModel):
    """What the LLM stage scores: the query, the method, the time range and how many blocks at most."""

    query: str
    method: Method
    since: float | None = None
    until: float | None = None
    max_blocks: int = Field(256, ge=1)


class ScoredBlock(BaseModel):
    """One block of the history with its score (``None``: it left the history while being scored)."""

    block_id: int
    tokens: int
    pts_start: float | None
    pts_end: float | None
    offloaded: bool
    score: float | None


class BlockScan(BaseModel):
    """The LLM stage's answer to a :class:`BlockQuery`."""

    method: Method
    blocks: list[ScoredBlock] = Field(default_factory=list, description="The scored blocks, in stream order.")
    candidates: int = Field(0, description="Blocks of the history in the time range.")
    shortlisted: int = Field(0, description="Candidates left out by the retrieval shortlist (over max_blocks).")
    ms: float = 0.0


class ThumbRef(BaseModel):
    """A chunk thumbnail kept by the stream's host (one ~160 px JPEG per chunk, a bounded ring)."""

    id: int
    pts_start: float
    pts_end: float
    url: str = Field(..., description="GET it for the JPEG (404 once the ring dropped it).")


class Moment(BaseModel):
    """A stretch of a stream's history that matches a query."""

    stream_id: str
    pts_start: float | None = Field(..., description="First frame time of the moment's first block (s).")
    pts_end: float | None = Field(..., description="Last frame time of its last block (s).")
    score: float = Field(..., description="The best block's score (yes_no: a probability; retrieval: a cosine).")
    blocks: int = Field(1, description="Blocks merged into the moment.")
    best_block: int
    best_pts: float | None = Field(None, description="First frame time of the best block.")
    query: str
    method: Method
    found_at: float = Field(default_factory=time.time, description="Unix time of the search.")
    thumbnail: ThumbRef | None = None


class MomentsResult(BaseModel):
    """One stream's moments for a query."""

    stream_id: str
    query: str
    method: Method
    moments: list[Moment]
    scored_blocks: int = Field(..., description="Blocks scored.")
    candidates: int = Field(..., description="Blocks of the history in the time range.")
    shortlisted: int = Field(0, description="Candidates the retrieval shortlist left out.")
    ms: float


class FleetMoments(BaseModel):
    """Moments of many streams, ranked together; a stream that failed says why in ``errors``."""

    query: str
    method: Method
    moments: list[Moment]
    streams: list[MomentsResult] = Field(default_factory=list, description="Each stream's own result (its moments "
                                         "left out: they are in `moments` when they made the top_k).")
    errors: dict[str, str] = Field(default_factory=dict, description="stream id -> why it has no moments.")
    ms: float


def choice_token_ids(tokenizer: Any, choice: str) -> list[int]:
    """The first token of each spelling ``c``, ``" c"``, ``C``, ``" C"`` of a choice (what the yes/no scorer sums)."""
    spellings = (choice, " " + choice, choice.capitalize(), " " + choice.capitalize())
    return sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in spellings})


def score_blocks(stage: Any, stream_id: str, query: BlockQuery) -> BlockScan:
    """Score a stream's retained blocks on an LLM stage (:class:`serve.core.stages.LLMStage`: its adapter and
    engine); the stream's context is unchanged afterwards."""
    t0 = time.perf_counter()
    try:
        question = stage.adapter.question_embeds(query.query)  # [Lq, d]
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    engine = stage.engine
    blocks = engine.blocks(stream_id, query.since, query.until)
    candidates, shortlisted = len(blocks), 0
    if query.method == "retrieval" or not blocks:
        scored = engine.block_relevance(stream_id, question, blocks)
    else:
        if len(blocks) > query.max_blocks:  # the cheap score picks which blocks get the yes/no scorer
            ranked = engine.block_relevance(stream_id, question, blocks)
            best = sorted(ranked, key=lambda s: -(s.score if s.score is not None else float("-inf")))
            keep = {s.block.block_id for s in best[:query.max_blocks]}
            blocks = [b for b in blocks if b.block_id in keep]
            shortlisted = candidates - len(blocks)
        yes_no = [choice_token_ids(stage.adapter.tokenizer, c) for c in ("yes", "no")]
        scored = engine.block_choices(stream_id, question, blocks, yes_no)
    return BlockScan(method=query.method, candidates=candidates, shortlisted=shortlisted,
                     ms=(time.perf_counter() - t0) * 1000,
                     blocks=[ScoredBlock(block_id=s.block.block_id, tokens=s.block.tokens,
                                         pts_start=s.block.pts_start, pts_end=s.block.pts_end,
                                         offloaded=s.block.offloaded, score=s.score) for s in scored])


def rank_moments(stream_id: str, request: MomentsRequest, scan: BlockScan) -> list[Moment]:
    """The top ``request.top_k`` moments of a scan, best first. yes_no: consecutive blocks (adjacent block ids)
    scoring at least ``threshold`` merge into one moment; retrieval: one moment per block."""
    runs: list[list[ScoredBlock]] = []
    for b in sorted((b for b in scan.blocks if b.score is not None), key=lambda b: b.block_id):
        hit = scan.method == "yes_no" and (b.score or 0.0) >= request.threshold
        last = runs[-1] if runs else None
        if hit and last is not None and last[-1].block_id + 1 == b.block_id and (last[-1].score or 0.0) >= \
                request.threshold:
            last.append(b)
        else:
            runs.append([b])
    moments = []
    for run in runs:
        best = max(run, key=lambda b: b.score or 0.0)
        starts = [b.pts_start for b in run if b.pts_start is not None]
        ends = [b.pts_end for b in run if b.pts_end is not None]
        moments.append(Moment(stream_id=stream_id, pts_start=min(starts) if starts else None,
                              pts_end=max(ends) if ends else None, score=float(best.score or 0.0), blocks=len(run),
                              best_block=best.block_id, best_pts=best.pts_start, query=request.query,
                              method=scan.method))
    moments.sort(key=lambda m: (-m.score, m.pts_start if m.pts_start is not None else 0.0))
    return moments[:request.top_k]


class _MomentsStage:
    """An LLM stage with :func:`score_blocks` as its ``score_blocks`` method (every other attribute is the stage's)."""

    def __init__(self, stage: Any) -> None:
        self._stage = stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def score_blocks(self, stream_id: str, query: BlockQuery) -> BlockScan:
        return score_blocks(self._stage, stream_id, query)


def with_moments(stage: Any) -> Any:
    """``stage`` itself when it has a ``score_blocks`` method, else the stage with :func:`score_blocks` added."""
    return stage if hasattr(stage, "score_blocks") else _MomentsStage(stage)
