"""One run-config shape for every job: checked up front, with short messages naming the file and key."""

import dagster as dg
import pytest

from gist_assets.config import (
    ASSET_CONFIGS,
    CONFIG_NODES,
    RunConfigError,
    check_run_config,
    effective_config,
    for_assets,
    load_run_config,
)
from gist_assets.definitions import ASSETS, JOB_ASSETS, PARTITIONED_JOBS, defs
from gist_assets.run import main, plan_stage, with_storage
from small_config import SMALL


def test_every_configurable_asset_is_in_the_shape():
    """ASSET_CONFIGS is the file's shape: it must name exactly the assets that take config (by the node that
    computes them where that is a multi-asset)."""
    takes_config = {a.op.name for a in ASSETS if getattr(a.op.config_schema.as_field().config_type, "fields", None)}
    assert takes_config == {CONFIG_NODES.get(name, name) for name in ASSET_CONFIGS}


@pytest.mark.parametrize(
    "text, message",
    [
        ("ops: [1, 2", "not valid YAML"),
        (
            "ops:\n  spectral_basis:\n    config:\n      kk: 3\n",
            "ops.spectral_basis.config: unknown keys ['kk']; valid: ['energy', 'eps', 'k', 'memory_budget_mb']",
        ),
        ("ops:\n  selected_subst: {config: {n: 3}}\n", "ops: unknown asset names ['selected_subst']"),
        (
            "ops:\n  warmup_checkpoint: {config: {fraction: 1.5}}\n",
            "ops.warmup_checkpoint.config.fraction: Input should be less than or equal to 1 (got 1.5)",
        ),
        ("ops:\n  selected_subset: {config: {strategy: best}}\n", "ops.selected_subset.config.strategy"),
        ("opps: {}\n", "unknown top-level keys ['opps']"),
        ("- a\n- b\n", "a run config is a mapping"),
    ],
)
def test_bad_config_files_are_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as err:
        load_run_config(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)


def test_yaml_errors_give_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ops:\n  spectral_basis:\n    config: {k: [}\n")
    with pytest.raises(RunConfigError, match=rf"^{path}:3:\d+: not valid YAML"):
        load_run_config(str(path))


def test_cli_prints_one_line_and_exits_2_without_traceback(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config error:" in err and "missing.yaml: no such file" in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("ops: {spectral_basis: {config: {k: 0}}}")
    assert main(["--config", str(tmp_path / "bad.yaml"), "--root", str(tmp_path / "root")]) == 2
    assert "ops.spectral_basis.config.k: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()  # refused before anything ran


def test_one_file_is_valid_for_every_unpartitioned_job_and_dagster_rejects_a_typo():
    full = {**SMALL, "resources": {"compute": {"config": {"max_batch_size": 8}}}}
    for job in JOB_ASSETS:
        if job not in PARTITIONED_JOBS:
            assert dg.validate_run_config(defs.resolve_job_def(job), full) is not None, job
    typo = {"ops": {"spectral_basis": {"config": {"kk": 3}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="kk"):
        dg.validate_run_config(defs.resolve_job_def("select_job"), typo)


def test_fallback_config_and_defaults_are_filled_in():
    cfg = {"ops": {"selected_subset": {"config": {"fraction": 0.2}}}}
    assert effective_config(cfg, "baseline_selections")["fraction"] == 0.2
    assert effective_config(cfg, "spectral_basis") == {"k": 16, "energy": None, "eps": 1e-8, "memory_budget_mb": 256}
    check_run_config(cfg)


def test_the_sketches_config_reaches_the_pass_step_of_the_shard_jobs():
    """A file names candidate_sketches; the partitioned features_job takes it under the step that computes it
    (candidate_gradient_pass), Dagster accepts that, and a run's recorded config reads back as the file's."""
    file_config = {"ops": {"candidate_sketches": {"config": {"dim": 256}}}}
    job_config = for_assets(file_config, JOB_ASSETS["features_job"])
    assert job_config == {"ops": {"candidate_gradient_pass": {"config": {"dim": 256}}}}
    assert dg.validate_run_config(defs.resolve_job_def("features_job"), job_config) is not None
    with pytest.raises(dg.DagsterInvalidConfigError, match="candidate_sketches"):
        dg.validate_run_config(defs.resolve_job_def("features_job"), file_config)
    recorded = effective_config(job_config, "candidate_sketches")
    assert (
        recorded
        == effective_config(file_config, "candidate_sketches")
        == {
            "dim": 256,
            "projection": "countsketch",
            "seed": 0,
        }
    )


def test_deprecated_percentage_still_selects_and_warns():
    """`percentage` (the old name of `fraction`) works for one release, through Dagster's own config
    processing, which fills fraction's default in beside it."""
    from gist_assets.config import SelectionConfig

    seen = {}

    @dg.asset
    def budget(config: SelectionConfig) -> None:
        seen.update(config.model_dump())

    with pytest.warns(FutureWarning, match="percentage is deprecated.*rename it to fraction"):
        result = dg.materialize([budget], run_config={"ops": {"budget": {"config": {"percentage": 0.2}}}})
    assert result.success
    assert seen["fraction"] == 0.2 and seen["percentage"] is None
    with pytest.warns(FutureWarning):
        assert effective_config(
            {"ops": {"selected_subset": {"config": {"percentage": [0.01, 0.1]}}}}, "baseline_selections"
        )["fraction"] == [0.01, 0.1]
    with pytest.raises(RunConfigError, match="percentage=0.2 and fraction=0.1 are both set"):
        check_run_config({"ops": {"selected_subset": {"config": {"percentage": 0.2, "fraction": 0.1}}}})


def test_resources_from_the_file_are_kept_and_the_storage_root_added(tmp_path):
    cfg = with_storage({"resources": {"score_store": {"config": {"lock_timeout_s": 5}}}}, str(tmp_path))
    assert cfg["resources"]["score_store"]["config"] == {"lock_timeout_s": 5, "database": str(tmp_path / "gist.duckdb")}
    assert cfg["resources"]["storage"]["config"]["root"] == str(tmp_path)


def test_plan_after_a_full_run_is_empty_and_force_takes_everything(small_run):
    config = with_storage(SMALL, str(small_run["root"]))
    instance = small_run["instance"]
    for job in ("prepare_job", "select_job"):
        assert plan_stage(instance, job, config).run == []
        forced = plan_stage(instance, job, config, force=True)
        assert forced.run == JOB_ASSETS[job] and set(forced.reasons.values()) == {"--force"}
    shard = small_run["shards"][0]
    assert plan_stage(instance, "features_job", config, partition=shard).run == []
    changed = {"ops": {**SMALL["ops"], "spectral_basis": {"config": {"k": 4}}}}
    plan = plan_stage(instance, "prepare_job", with_storage(changed, str(small_run["root"])))
    assert plan.run == ["spectral_basis"] and plan.reasons["spectral_basis"] == "config changed: k 8 -> 4"


def test_a_run_launched_from_the_ui_used_the_same_resources_as_the_cli(monkeypatch, tmp_path):
    """The UI records no storage root (the code location's default); the CLI records the root it resolved. On
    the default root they are the same resources, so the CLI does not recompute what the UI made."""
    from gist_assets.run import _config_change

    monkeypatch.setenv("GIST_STORAGE_ROOT", str(tmp_path / "root"))
    from_ui: dict = {"ops": {}}
    cli = with_storage({}, str(tmp_path / "root"))
    assert _config_change("candidate_features", from_ui, cli) is None
    assert _config_change("candidate_features", from_ui, with_storage({}, str(tmp_path / "other"))) == (
        "resource config changed"
    )
    smaller_batches = {**cli, "resources": {**cli["resources"], "compute": {"config": {"max_batch_size": 4}}}}
    assert _config_change("candidate_features", from_ui, smaller_batches) == "resource config changed"
