"""gist_sketch: sketched coordinates converge to the exact ones, and a new target needs no pass over the pool."""

import json

import dagster as dg
import duckdb
import numpy as np
import pytest
import safetensors.numpy
import torch

from gist_assets.config import RunConfigError, check_run_config
from gist_assets.run import launch, run_all, with_storage
from gist_core.gradients import (
    SideBySide,
    basis_projection,
    block_features,
    full_gradients,
    projected_gradients,
    trainable_linears,
)
from gist_core.projection import BlockProjector, sketch_projector
from gist_core.spectral import build_basis
from gist_demo import synthetic
from small_config import SMALL, TINY, two_file_pool
from test_gradients import _examples, _llama, _perturb_lora


@pytest.mark.parametrize("kind", ["countsketch", "rademacher"])
def test_sketched_coordinates_converge_to_exact_as_d_grows(kind):
    """A small real Llama + LoRA: z = g V_k exactly vs s (P^T V_k) with s = g P from the sketch pass."""
    model = _llama(4)
    _perturb_lora(model)
    layout, _ = trainable_linears(model)
    targets, candidates = _examples(12, 97, seed=1), _examples(40, 97, seed=2)
    G, _ = full_gradients(model, targets)
    g, _ = full_gradients(model, candidates)
    V = build_basis(G, k=6)[0].V
    exact = g.astype(np.float64) @ V
    # The sketch pass (the candidate_sketches asset's call) gives g P.
    projector = sketch_projector(layout, 64, 0, kind)
    if kind == "rademacher":
        projector = BlockProjector(layout, 64, seed=0, chunk_rows=300)  # chunks that split blocks, too
    s, _, _, _ = block_features(model, candidates, projector.add_block, 64)
    np.testing.assert_allclose(s, g @ projector.dense().double().numpy(), rtol=1e-4, atol=1e-5)
    errors = {}
    for d in (16, 256, 2048):
        per_seed = []
        for seed in range(3):
            projector = sketch_projector(layout, d, seed, kind)
            P = projector.dense().double().numpy()
            s = g @ P
            PV = projector.project_columns(V)
            np.testing.assert_allclose(PV, P.T @ V, rtol=1e-4, atol=1e-6)  # P^T V, block by block
            per_seed.append(np.linalg.norm(s @ PV - exact) / np.linalg.norm(exact))
        errors[d] = float(np.mean(per_seed))
    assert errors[16] > errors[256] > errors[2048], errors
    # JL: the error falls like 1/sqrt(d) (a 128x larger d: ~11x smaller).
    assert errors[16] / errors[2048] > 8 and errors[2048] < 0.2, errors


def test_one_pass_gives_the_exact_features_and_the_sketches_of_two_passes():
    """SideBySide: the basis projection and the sketch from one backward equal each from its own pass."""
    model = _llama(4)
    _perturb_lora(model)
    layout, _ = trainable_linears(model)
    candidates = _examples(30, 97, seed=2)
    V = torch.from_numpy(build_basis(full_gradients(model, _examples(12, 97, seed=1))[0], k=6)[0].V).float()
    projector = sketch_projector(layout, 256, 0, "countsketch")
    z, z_norms, z_losses, _ = projected_gradients(model, candidates, V)
    s, _, _, _ = block_features(model, candidates, projector.add_block, 256)
    together = SideBySide([(basis_projection(layout, V), 6), (projector.add_block, 256)])
    z_cols, s_cols = together.columns
    both, norms, losses, stats = block_features(model, candidates, together.add_block, together.width)
    assert together.width == 262 and both.shape == (30, 262)
    projection_seconds = together.part_seconds()
    assert all(t > 0 for t in projection_seconds) and sum(projection_seconds) < stats.seconds
    np.testing.assert_array_equal(both[:, z_cols], z)
    np.testing.assert_array_equal(both[:, s_cols], s)
    np.testing.assert_array_equal(norms, z_norms)
    np.testing.assert_array_equal(losses, z_losses)


def test_features_and_sketches_of_a_shard_come_from_one_gradient_pass(tiny_graph, monkeypatch):
    """Materialized together (features_job), candidate_features and candidate_sketches of a shard share one
    backward per checkpoint, and store what each stores when it runs alone."""
    import gist_assets.features as features_module
    from gist_assets.run import materialize

    root, home, config = tiny_graph()  # the exact path: features of every shard, no sketches yet
    passes = []

    def counted(model, encoded, add_block, width, **kwargs):
        passes.append(width)
        return block_features(model, encoded, add_block, width, **kwargs)

    monkeypatch.setattr(features_module, "block_features", counted)
    read = lambda kind, shard: safetensors.numpy.load_file(root / kind / shard / "features.safetensors")  # noqa: E731
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        shard = sorted(instance.get_dynamic_partitions("candidate_shards"))[0]
        n_ckpts = len(json.loads((root / "warmup" / "manifest.json").read_text())["checkpoints"])
        alone = {"features": read("features", shard)}
        materialize(["candidate_sketches"], config, instance, str(root), partition=shard)
        alone["features_gist_sketch"] = read("features_gist_sketch", shard)
        assert len(passes) == n_ckpts  # the sketches alone: one pass per checkpoint
        passes.clear()
        versions = {a: _data_version(instance, a, shard) for a in ("candidate_features", "candidate_sketches")}
        materialize(["candidate_features", "candidate_sketches"], config, instance, str(root), partition=shard)
        assert len(passes) == n_ckpts and all(w > 16384 for w in passes)  # both from one pass per checkpoint
        for kind, before in alone.items():
            after = read(kind, shard)
            assert after.keys() == before.keys()
            for name in before:
                np.testing.assert_array_equal(after[name], before[name], err_msg=f"{kind} {name}")
        assert {a: _data_version(instance, a, shard) for a in versions} == versions
        # Each asset records what its own pass would cost: the shared pass less the other one's projection.
        timings = {
            kind: json.loads((root / kind / shard / "meta.json").read_text())["timings"]
            for kind in ("features", "features_gist_sketch")
        }
        for ckpt, t in timings["features"].items():
            s = timings["features_gist_sketch"][ckpt]
            assert t["pass_seconds"] == s["pass_seconds"] and t["pass_shared_with"] == ["sketches"]
            assert t["seconds"] == pytest.approx(t["pass_seconds"] - s["projection_seconds"])
            assert s["seconds"] == pytest.approx(s["pass_seconds"] - t["projection_seconds"])
            assert 0 < s["projection_seconds"] < s["seconds"] < s["pass_seconds"]


def _data_version(instance, asset: str, shard: str) -> str:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[shard]), limit=1
    ).records
    assert records
    return records[0].event_log_entry.asset_materialization.tags["dagster/data_version"]


def test_unknown_scoring_method_is_refused_by_name():
    with pytest.raises(RunConfigError, match=r"ops\.candidate_scores\.config\.methods.*gist_sketch"):
        check_run_config({"ops": {"candidate_scores": {"config": {"methods": ["gist", "sketch"]}}}})
    with pytest.raises(RunConfigError, match=r"ops\.candidate_sketches\.config\.dim"):
        check_run_config({"ops": {"candidate_sketches": {"config": {"dim": 0}}}})


def _materializations(instance, asset: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records)


def _gradient_work(instance) -> tuple[list[str], list[str]]:
    """(computed, carried over) of the last target_gradients materialization: ckpt/target names."""
    event = instance.get_latest_materialization_event(dg.AssetKey("target_gradients"))
    meta = event.asset_materialization.metadata
    return meta["computed"].value, meta["carried_over"].value


@pytest.mark.slow
def test_new_target_gets_sketch_scores_without_a_pass_over_the_pool(tmp_path):
    paths = synthetic.write_targets(tmp_path / "targets")
    spec = lambda name: {"name": name, "format": "jsonl", "path": str(paths[name])}  # noqa: E731
    ops = {**SMALL["ops"], "candidate_pool": two_file_pool(tmp_path / "input")}  # 4 shards
    first = {"ops": {**ops, "target_sets": {"config": {"targets": [spec("arithmetic_sums"), spec("word_reversal")]}}}}
    second = {
        "ops": {
            **ops,
            "target_sets": {"config": {"targets": [spec("arithmetic_sums"), spec("word_reversal"), spec("geography")]}},
            "candidate_scores": {"config": {"methods": ["gist_sketch"]}},
        }
    }
    root = str(tmp_path / "root")
    with dg.instance_for_test() as instance:
        run_all(first, root, instance=instance, log=lambda _: None)
        grads = tmp_path / "root" / "target_gradients"
        ckpts = [c["name"] for c in json.loads((grads / "manifest.json").read_text())["checkpoints"]]
        first_bytes = {c: (grads / c / "arithmetic_sums.npy").read_bytes() for c in ckpts}
        n_features, n_sketches = (_materializations(instance, a) for a in ("candidate_features", "candidate_sketches"))
        n_shards = len(instance.get_dynamic_partitions("candidate_shards"))
        assert n_features == n_sketches == n_shards  # one per shard
        out = run_all(second, root, instance=instance, log=lambda _: None)
        report = out["report"]
        # The new target's exact gradients and basis are computed; nothing runs over the pool.
        assert report["target_gradients"].startswith("recomputed") and report["spectral_basis"].startswith("recomputed")
        assert report["candidate_scores"].startswith("recomputed")
        shard_rows = {k: v for k, v in report.items() if k.startswith(("candidate_features[", "candidate_sketches["))}
        assert len(shard_rows) == 2 * n_shards
        assert all(v.startswith("skipped") for k, v in shard_rows.items() if k.startswith("candidate_features"))
        assert all(v.startswith("up to date") for k, v in shard_rows.items() if k.startswith("candidate_sketches"))
        assert _materializations(instance, "candidate_features") == n_features
        assert _materializations(instance, "candidate_sketches") == n_sketches
        assert set(out["selections_by_method"]["gist_sketch"]) == {"arithmetic_sums", "geography", "word_reversal"}
        # Only the new target's gradients were computed; the others' were carried over unchanged.
        assert _gradient_work(instance) == (
            [f"{c}/geography" for c in ckpts],
            [f"{c}/{t}" for c in ckpts for t in ("arithmetic_sums", "word_reversal")],
        )
        assert all((grads / c / "arithmetic_sums.npy").read_bytes() == first_bytes[c] for c in ckpts)

        # A target whose examples change is computed again; the others are still carried over.
        lines = paths["word_reversal"].read_text().splitlines()
        paths["word_reversal"].write_text("\n".join(lines[:-1]) + "\n")
        third = run_all(second, root, instance=instance, log=lambda _: None)["report"]
        assert third["target_sets"].startswith("recomputed") and "input files changed" in third["target_sets"]
        assert _gradient_work(instance) == (
            [f"{c}/word_reversal" for c in ckpts],
            [f"{c}/{t}" for c in ckpts for t in ("arithmetic_sums", "geography")],
        )
        n = json.loads((grads / "manifest.json").read_text())["targets"]["word_reversal"]["n"]
        assert np.load(grads / ckpts[0] / "word_reversal.npy", mmap_mode="r").shape[0] == n
        # --force (the recompute tag) computes every target afresh, to the same bytes.
        launch(instance, "prepare_job", ["target_gradients"], with_storage(second, root), recompute=True)
        assert _gradient_work(instance) == ([f"{c}/{t}" for c in ckpts for t in sorted(paths)], [])
        assert all((grads / c / "arithmetic_sums.npy").read_bytes() == first_bytes[c] for c in ckpts)
    with duckdb.connect(str(tmp_path / "root" / "gist.duckdb"), read_only=True) as db:
        counts = dict(
            db.execute("SELECT method || '/' || target, count(*) FROM candidate_scores GROUP BY 1").fetchall()
        )
        n = counts["gist_sketch/arithmetic_sums"]
        assert n > 100 and counts["gist_sketch/geography"] == counts["gist_sketch/word_reversal"] == n
        assert "gist/geography" not in counts  # exact GIST was not asked for the new target
        assert (
            db.execute(
                "SELECT count(*) FROM selections WHERE target = 'geography' AND method = 'gist_sketch'"
            ).fetchone()[0]
            > 0
        )


@pytest.mark.slow
def test_compare_with_the_sketch_alone_draws_random_from_the_sketched_candidates(tmp_path):
    """`--compare` with `methods: [gist_sketch]`: no candidate_features anywhere, the random baseline draws
    from the candidates gist_sketch scored, and the evaluation fine-tunes both methods' selections."""
    ops = {
        **TINY["ops"],
        "candidate_pool": two_file_pool(tmp_path / "input"),
        "candidate_scores": {"config": {"methods": ["gist_sketch"]}},
        "baseline_scores": {"config": {"methods": ["random"]}},
        "selection_evaluation": {"config": {"epochs": 1, "seeds": [0], "include_full_pool": False}},
    }
    root = tmp_path / "root"
    with dg.instance_for_test() as instance:
        run_all({"ops": ops}, str(root), instance=instance, log=lambda _: None, compare=True)
    assert not (root / "features").exists()  # no exact pass ran
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        ids = {
            method: {
                target: set(cids)
                for target, cids in db.execute(
                    "SELECT target, list(candidate_id) FROM candidate_scores WHERE method = ? GROUP BY target",
                    [method],
                ).fetchall()
            }
            for method in ("gist_sketch", "random")
        }
        evaluated = set(db.execute("SELECT DISTINCT target, method FROM evaluations").fetchall())
    targets = set(ids["gist_sketch"])
    assert len(targets) == 3 and ids["random"] == ids["gist_sketch"]
    assert all(len(c) > 100 for c in ids["random"].values())
    assert {(t, m) for t in targets for m in ("gist_sketch", "random", "base")} <= evaluated


def test_packed_rows_keep_each_entry_to_its_row_max_whatever_the_magnitude():
    """pack_rows: float16 rows scaled by their max: half the bytes, every entry within 2^-11 of its row's max
    (rows of 1e-9 do not flush to zero, as plain float16 would), zero rows and no rows come back as such."""
    from gist_core.projection import pack_rows, unpack_rows

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((50, 4096)).astype(np.float32) * np.logspace(-12, 3, 50, dtype=np.float32)[:, None]
    rows[7] = 0.0
    packed, scale = pack_rows(rows)
    assert packed.dtype == np.float16 and scale.dtype == np.float32 and packed.nbytes == rows.nbytes // 2
    back = unpack_rows(packed, scale)
    assert back.dtype == np.float32 and not back[7].any()
    bound = 2.0**-11 * np.abs(rows).max(axis=1, keepdims=True)
    assert (np.abs(back - rows) <= bound).all()
    assert np.count_nonzero(back[0]) > 0.99 * back.shape[1]  # the 1e-12 row survives
    assert np.count_nonzero(rows[0].astype(np.float16)) == 0  # which plain float16 loses
    empty, no_scale = pack_rows(np.zeros((0, 16), np.float32))
    assert empty.shape == (0, 16) and no_scale.shape == (0,)


def test_coordinates_from_packed_rows_equal_those_of_the_unpacked_rows():
    """sketched_coordinates on pack_rows' float16 rows and scales (the row scale applied after the product)
    equals the plain product of the unpacked rows, for every target's columns."""
    from gist_core.projection import pack_rows, sketched_coordinates, unpack_rows

    rng = np.random.default_rng(4)
    rows = rng.standard_normal((40, 512)).astype(np.float32) * np.logspace(-9, 2, 40, dtype=np.float32)[:, None]
    PV = rng.standard_normal((512, 7)).astype(np.float32)
    slices = {"a": (0, 3), "b": (3, 7)}
    packed, scale = pack_rows(rows)
    got = sketched_coordinates(packed, PV, slices, scale)
    unpacked = unpack_rows(packed, scale).astype(np.float64)
    plain = unpacked @ PV.astype(np.float64)
    bound = 1e-5 * (np.abs(unpacked) @ np.abs(PV.astype(np.float64)))  # float32 rounding of each dot product
    for name, (a, b) in slices.items():
        assert got[name].shape == (40, b - a)
        assert (np.abs(got[name] - plain[:, a:b]) <= bound[:, a:b]).all(), name
    # Unpacked float32 rows (shards written before packing) take the same call without a scale.
    exact = rows.astype(np.float64) @ PV.astype(np.float64)
    bound = 1e-5 * (np.abs(rows.astype(np.float64)) @ np.abs(PV.astype(np.float64)))
    assert (np.abs(sketched_coordinates(rows, PV, slices)["b"] - exact[:, 3:7]) <= bound[:, 3:7]).all()
