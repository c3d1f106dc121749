"""Multi-node placement: a head without GPUs plus a node with one (fake) GPU; the encoder and LLM replicas, which
ask for GPU fractions in the config, must land on the GPU node while the ingress may stay on the head.

Uses ``ray.cluster_utils.Cluster`` (two raylets on this machine) and the stage doubles, to keep it small.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from serve.app import LLM, VISION, build_app  # noqa: E402
from serve.client import StcClient  # noqa: E402
from serve.config import ServiceConfig  # noqa: E402
from tests.rtsp_server import free_port  # noqa: E402
from tests.service_doubles import fake_stage_factory, frames  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    gpu_node = c.add_node(num_cpus=2, num_gpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c, gpu_node
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def test_encoder_and_llm_replicas_land_on_the_gpu_node(cluster):
    c, gpu_node = cluster
    port = free_port()
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 2}, "serve": {
        "http": {"port": port, "proxy_location": "HeadOnly"},
        "ingress": {"num_cpus": 0.1},
        "vision": {"num_cpus": 0.1, "num_gpus": 0.5},
        "llm": {"num_cpus": 0.1, "num_gpus": 0.5},
        "ingest": {"num_cpus": 0},
    }})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, fake_stage_factory), name="stc", route_prefix="/")
    for kind in (VISION, LLM):
        info = serve.get_deployment_handle(kind, app_name="stc").where.remote().result()
        assert info["node_id"] == gpu_node.node_id, f"{kind} replica placed on {info['node_id']}"
        assert info["gpu_ids"] != [], f"{kind} replica got no GPU id"
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0)  # both halves of the GPU are taken
    # the path works across nodes: ingress (head) -> stream actor -> replicas on the GPU node
    client = StcClient(f"http://127.0.0.1:{port}")
    sid = client.create_stream()["stream_id"]
    rgb, pts = frames(4)
    client.push_frames(sid, rgb, pts, encoding="raw")
    deadline = time.time() + 30
    text = ""
    while time.time() < deadline and not text.startswith("frames=4"):
        text, _ = client.ask_text(sid, "q", wait_s=10)
    assert text == "frames=4 last=0.30"
    assert np.isclose(client.stats(sid)["kv_bytes"], 4 * 64)
