"""Service settings: validation with readable errors, the mapping to Ray Serve deployment options, the example
configs, and the application graph ``build_app`` produces (no Ray started)."""
from __future__ import annotations

from pathlib import Path

import pytest

from serve.core.config import ServiceConfig
from serve.core.settings import DeploymentSettings, ServeSettings
from stream.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"vision": {"num_replicas": 2, "autoscaling": {}}}, "both set"),
        ({"llm": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "max_replicas=2 is below min_replicas=3"),
        ({"llm": {"autoscaling": {"min_replicas": 0}}}, "llm.autoscaling.min_replicas: got 0"),
        ({"api_key": "k", "api_key_file": "/etc/hostname"}, "both set"),
        ({"api_key_file": "/no/such/key"}, "does not exist"),
        ({"media_root": "/no/such/dir"}, "is not a directory"),
        ({"http": {"port": 70000}}, "http.port: got 70000"),
        ({"ingest": {"drop_policy": "random"}}, "ingest.drop_policy: got 'random'"),
        ({"allowed_schemes": ["ftp"]}, "allowed_schemes.0: got 'ftp'"),
        ({"vision": {"gpus": 1}}, "vision.gpus: unknown key"),
    ],
)
def test_bad_settings_are_named_with_a_fix(data, fragment):
    with pytest.raises(ConfigError, match="Fix") as info:
        ServeSettings.parse(data, "serve")
    assert fragment in str(info.value)


def test_api_key_from_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("abc123\nignored\n")
    assert ServeSettings.parse({"api_key_file": str(key)}).resolved_api_key() == "abc123"
    assert ServeSettings.parse({"api_key": "xyz"}).resolved_api_key() == "xyz"
    assert ServeSettings().resolved_api_key() is None


def test_deployment_options_map_to_ray():
    fixed = DeploymentSettings.parse({"num_replicas": 3, "num_gpus": 0.5, "resources": {"encoder": 1}})
    assert fixed.deployment_options() == {
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5, "resources": {"encoder": 1.0}},
        "max_ongoing_requests": 256, "num_replicas": 3,
    }
    auto = DeploymentSettings.parse({"autoscaling": {"min_replicas": 2, "max_replicas": 5}})
    opts = auto.deployment_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 5
    assert auto.min_replicas == 2 and DeploymentSettings().min_replicas == 1


def test_check_fits_names_what_is_short():
    pytest.importorskip("ray")
    from serve.deploy.app import check_fits

    settings = ServeSettings.parse({"vision": {"num_cpus": 1, "num_gpus": 1}, "llm": {"num_cpus": 1}})
    assert settings.min_resources() == {"CPU": pytest.approx(2.2), "GPU": 1.0}
    check_fits(settings, {"CPU": 4.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"CPU: needs 2\.2, the Ray instance has 2; GPU: needs 1, the Ray instance has 0"):
        check_fits(settings, {"CPU": 2.0})
    assert ServeSettings().min_resources()["CPU"] <= 2.0  # the defaults fit a 2-CPU machine


def test_example_configs_load():
    cfg = ServiceConfig.load(REPO / "configs" / "serve.yaml")
    assert cfg.serve.llm.autoscaling is not None and cfg.serve.vision.num_replicas == 1
    import yaml

    ray_cfg = yaml.safe_load((REPO / "configs" / "ray_serve.yaml").read_text())
    app = ray_cfg["applications"][0]
    assert app["import_path"] == "serve.deploy.app:app_builder"
    assert (REPO / app["args"]["config"]).is_file()


def test_build_app_sizes_deployments_from_config():
    pytest.importorskip("ray")
    from serve.deploy.app import build_app

    cfg = ServiceConfig.parse({"serve": {
        "vision": {"num_replicas": 2, "num_gpus": 0.5},
        "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "num_gpus": 1},
    }})
    ingress = build_app(cfg)._bound_deployment
    vision, llm = ingress.init_args[1]._bound_deployment, ingress.init_args[2]._bound_deployment
    assert (ingress.name, vision.name, llm.name) == ("ingress", "vision", "llm")
    assert vision.num_replicas == 2 and vision.ray_actor_options["num_gpus"] == 0.5
    assert llm.ray_actor_options["num_gpus"] == 1
    assert llm._deployment_config.autoscaling_config.max_replicas == 3
    env = {"env_vars": {"MALLOC_ARENA_MAX": "2"}}  # serve.process.env: every replica (the ingress decodes pushes)
    assert vision.ray_actor_options["runtime_env"] == env and llm.ray_actor_options["runtime_env"] == env
    assert ingress.ray_actor_options["runtime_env"] == env
    bare = ServiceConfig.parse({"serve": {"process": {"env": {}}}})
    assert "runtime_env" not in build_app(bare)._bound_deployment.init_args[1]._bound_deployment.ray_actor_options


def test_process_settings_validate():
    with pytest.raises(ConfigError, match="process.ray_task_events: got 5"):
        ServeSettings.parse({"process": {"ray_task_events": 5}}, "serve")
    assert ServeSettings().process.runtime_env() == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    host = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}  # hosts: over env, theirs only
    assert ServeSettings().process.runtime_env(host=True) == {"env_vars": host}
    mine = ServeSettings.parse({"process": {"env": {}, "host_env": {"MALLOC_ARENA_MAX": "4"}}}, "serve").process
    assert mine.runtime_env() == {} and mine.runtime_env(host=True) == {"env_vars": {"MALLOC_ARENA_MAX": "4"}}
