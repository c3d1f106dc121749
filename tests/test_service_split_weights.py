"""Half the weights per replica: a vision-only and an LLM-only adapter (stream.models.loading.load_adapter_part)
hold disjoint parts of the model, and a stream served by the two halves answers exactly what the whole model does.
Random weights (tiny models built from configs)."""
from __future__ import annotations

import pytest
import torch

from serve.core.messages import text_of
from serve.core.flow import DirectTransport, StageFlow
from serve.core.options import StreamOptions
from serve.deploy.replicas import parameter_bytes as stage_bytes
from serve.core.stages import LLMStage, VisionStage
from stream.frames import FrameBatch
from stream.models.loading import load_adapter_part, parameter_bytes
from tests.media import moving_square

import numpy as np


@pytest.fixture(params=["tiny_llava_dir", "tiny_smolvlm_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def _options() -> StreamOptions:
    return StreamOptions.parse({"cacher": {"enabled": False}, "pruner": {"enabled": False},
                                "sampler": {"fps": 1.0, "frames_per_chunk": 2}})


def _answer(vision_adapter, llm_adapter, options) -> str:
    vision, llm = VisionStage(vision_adapter, options), LLMStage(llm_adapter, options)
    flow = StageFlow(DirectTransport(vision, llm))
    flow.open("s", options)
    for start in (0, 2):
        rgb = np.stack([moving_square(5 * i, 96, 72) for i in range(start, start + 2)])
        flow.encode_append("s", FrameBatch(rgb=rgb, pts=np.arange(start, start + 2, dtype=float),
                                           indices=np.arange(start, start + 2)))
    return text_of(llm.ask("s", "What is happening?", 6))


def test_each_replica_holds_only_its_half_and_answers_match_the_whole_model(model_dir):
    full = load_adapter_part(model_dir, part="full")
    vision = load_adapter_part(model_dir, part="vision")
    llm = load_adapter_part(model_dir, part="llm")
    whole, v, lm = parameter_bytes(full.model), parameter_bytes(vision.model), parameter_bytes(llm.model)
    assert vision.split == "vision" and llm.split == "llm"
    assert v < whole and lm < whole
    assert whole <= v + lm <= whole + 4096  # disjoint halves (a few loose tensors such as image_newline on both)
    assert not any(p.is_meta for p in vision.vision_layers.parameters())
    assert all(p.is_meta for n, p in llm.model.named_parameters() if "vision" in n)
    opts = _options()
    assert _answer(vision, llm, opts) == _answer(full, full, opts)
    assert stage_bytes(VisionStage(vision, opts)) == v  # what /health reports for the replica


def test_bad_part_is_a_config_error(tiny_llava_dir):
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match="part='both'"):
        load_adapter_part(tiny_llava_dir, part="both")


def test_tokens_cross_processes_as_cpu_tensors():
    from serve.core.messages import EncodedChunk
    from serve.deploy.replicas import to_cpu

    class OtherDevice(torch.Tensor):
        """Stands in for a tensor on another device: .cpu() yields a plain CPU tensor (simulated device)."""

        def cpu(self, *a, **k):
            return torch.Tensor.cpu(self).as_subclass(torch.Tensor) * 1

    embeds = torch.ones(3, 4).as_subclass(OtherDevice)
    chunk = EncodedChunk("s", embeds, [1, 2], [0.0, 1.0], {"tokens_kept": 3})
    moved = to_cpu(chunk)
    assert type(moved.embeds) is torch.Tensor and moved.embeds.device.type == "cpu"
    assert torch.equal(moved.embeds, torch.ones(3, 4)) and moved.tokens_per_frame == [1, 2]
    if torch.cuda.is_available():  # the real thing where a GPU exists
        on_gpu = EncodedChunk("s", torch.ones(3, 4, device="cuda"), [1, 2], [0.0, 1.0])
        assert to_cpu(on_gpu).embeds.device.type == "cpu"
