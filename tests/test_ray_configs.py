"""The shipped Ray configs, linted without a cluster: configs/ray-serve.yaml (a Ray Serve config) and
deploy/kuberay-rayservice.yaml (a KubeRay RayService).

- Serve configs validate against Ray Serve's own schema (ray.serve.schema.ServeDeploySchema, what `serve deploy`
  checks), name our builder and deployment, and their xlora-serve config loads; the builder builds the app.
- The RayService validates against RAYSERVICE_SCHEMA below: the fields of KubeRay's ray.io/v1 RayService CRD that
  this manifest uses, written for this test (KubeRay's full CRD is not vendored). Its serveConfigV2 is a Serve
  config as above, and the GPU setting holds together: one GPU per replica, a GPU per worker pod.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from server.ray_app import DEPLOYMENT, PROJECT_ROOT, build_app
from server.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if "applications" in (yaml.safe_load(p.read_text()) or {})
)
RAYSERVICE = ROOT / "deploy" / "kuberay-rayservice.yaml"

_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "resources": {
            "type": "object",
            "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
            "additionalProperties": False,
        },
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
    "additionalProperties": False,
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {
        "type": "object",
        "required": ["containers"],
        "properties": {
            "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
            "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "tolerations": {"type": "array", "items": {"type": "object"}},
        },
        "additionalProperties": False,
    }},
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay: strings only
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE},
                            "additionalProperties": False,
                        },
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["groupName", "rayStartParams", "template"],
                            "properties": {
                                "groupName": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 0},
                                "minReplicas": {"type": "integer", "minimum": 0},
                                "maxReplicas": {"type": "integer", "minimum": 1},
                                "rayStartParams": _START_PARAMS,
                                "template": _POD_TEMPLATE,
                            },
                            "additionalProperties": False,
                        }},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
}


def _check_serve_config(config: dict, where: str) -> dict:
    """Ray Serve's own validation, then what our application needs; returns the deployment's settings."""
    ServeDeploySchema.model_validate(config)  # raises naming the field
    (app,) = config["applications"]
    assert app["import_path"] == "server.ray_app:build_app", where
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT, where
    # Serve's schema lets unknown keys through (a misspelt option would be silently ignored): refuse them here.
    unknown = set(deployment) - set(DeploymentSchema.model_fields)
    assert not unknown, f"{where}: unknown deployment option(s) {unknown}"
    autoscaling = deployment["autoscaling_config"]
    AutoscalingConfig.model_validate(autoscaling)
    assert autoscaling["min_replicas"] <= autoscaling["initial_replicas"] <= autoscaling["max_replicas"], where
    assert autoscaling["target_ongoing_requests"] > 0, where
    return deployment


def test_there_is_a_serve_config():
    assert [p.name for p in SERVE_CONFIGS] == ["ray-serve.yaml"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_config_validates_and_builds(path):
    config = yaml.safe_load(path.read_text())
    deployment = _check_serve_config(config, str(path))
    args = config["applications"][0]["args"]
    settings = load_settings(PROJECT_ROOT / args["config"])  # the config it serves loads
    assert deployment["ray_actor_options"]["num_cpus"] >= 1
    app = build_app(args)  # the builder Serve calls (binds the deployment; no cluster needed)
    assert app._bound_deployment.name == DEPLOYMENT
    (bound_settings,) = app._bound_deployment.init_args  # what each replica is constructed with
    assert bound_settings.model_dump() == settings.model_dump()


def test_serve_schema_rejects_a_bad_config():
    # Guards the test above: the schema really checks (a misspelt key, a bad replica count).
    config = yaml.safe_load(SERVE_CONFIGS[0].read_text())
    config["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = -1
    with pytest.raises(Exception, match="min_replicas"):
        _check_serve_config(config, "test")
    config = yaml.safe_load(SERVE_CONFIGS[0].read_text())
    config["applications"][0]["deployments"][0]["num_replica"] = 2
    with pytest.raises(AssertionError, match="num_replica"):
        _check_serve_config(config, "test")
    with pytest.raises(ValueError, match="args must be"):
        build_app({"configuration": "configs/default.yaml"})


def test_rayservice_manifest():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    jsonschema.validate(manifest, RAYSERVICE_SCHEMA)
    spec = manifest["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the version the tests ran
    deployment = _check_serve_config(yaml.safe_load(spec["serveConfigV2"]), "serveConfigV2")
    assert deployment["ray_actor_options"]["num_gpus"] == 1  # one GPU per replica
    serve_app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    assert serve_app["args"]["config"] == "/app/configs/gpu-mistral-7b.yaml"  # the GPU config, in the image
    load_settings(ROOT / "configs" / "gpu-mistral-7b.yaml")
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["nvidia.com/gpu"] == "1", group["groupName"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/models" in mounts  # where configs/gpu-mistral-7b.yaml finds the base model and experts
        assert {e["name"] for e in container["env"]} == {"XLORA_API_KEY", "XLORA_ADMIN_TOKEN"}
        assert all("valueFrom" in e for e in container["env"])  # from a Secret, never inline
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the GPU-less head


def test_rayservice_schema_rejects_a_bad_manifest():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, RAYSERVICE_SCHEMA)
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePolicy"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, RAYSERVICE_SCHEMA)
