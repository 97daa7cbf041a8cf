"""The Kubernetes code location: the k8s executor, a GPU request on every gradient step, valid configs."""

import json
from pathlib import Path

import yaml
from dagster._core.instance.config import dagster_instance_config

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {
    "warmup_checkpoint",
    "target_gradients",
    "candidate_features",
    "less_candidate_features",
    "representation_features",
    "selection_evaluation",
}
DUCKDB_WRITERS = {"candidate_scores", "baseline_scores", "selected_subset", "selection_evaluation"}


def test_definitions_load_with_the_kubernetes_executor_and_gpu_requests():
    from gist_assets.k8s_definitions import defs

    for job in ["prepare_job", "features_job", "select_job", "compare_job", "refresh_job"]:
        assert defs.resolve_job_def(job).executor_def.name == "k8s"

    for name in GPU_STEPS:
        tags = defs.resolve_assets_def(name).op.tags
        k8s = json.loads(tags["dagster-k8s/config"])
        assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
    for name in DUCKDB_WRITERS:
        assert defs.resolve_assets_def(name).op.pool == "duckdb_writer", name
    fan_out = defs.resolve_job_def("parallel_features_job").graph.node_named("shard_gradient_pass")
    assert "nvidia.com/gpu" in fan_out.definition.tags["dagster-k8s/config"]
    assert fan_out.definition.pool == "gpu"


def test_shipped_instance_and_helm_configs_are_valid():
    config = dagster_instance_config(str(REPO / "deploy" / "k8s"), "dagster.yaml")
    assert config[0]["run_launcher"]["class"] == "K8sRunLauncher"
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "gist_assets.k8s_definitions"]
    assert {"name": "GIST_STORAGE_ROOT", "value": "/data/gist"} in deployment["env"]
