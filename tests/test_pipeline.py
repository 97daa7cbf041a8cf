"""The whole asset graph on a small embedded default, checked against an obviously-right computation."""

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import torch
from dagster import AssetCheckKey, AssetKey

from gist_assets.definitions import make_resources
from gist_assets.scores import candidate_scores
from gist_core.data import encode_messages, encode_prompt_completion
from gist_core.gradients import reference_gradients
from gist_core.selection import selection_size
from gist_resources import ComputeResource
from small_config import SMALL


def _db(root):
    return duckdb.connect(str(root / "gist.duckdb"), read_only=True)


def test_graph_outputs(small_run):
    root, out = small_run["root"], small_run["out"]
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet")
    assert pool.height == 240 and pool["candidate_id"].n_unique() == 240
    assert len(small_run["shards"]) == pool["shard"].n_unique() >= 8
    targets = sorted(out["selections"])
    assert targets == ["arithmetic_sums", "geography", "word_reversal"]
    with _db(root) as db:
        rows = db.execute(
            "SELECT target, method, count(*), count(DISTINCT candidate_id) FROM candidate_scores "
            "WHERE method = 'gist' GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
        n_scored = rows[0][2]
        assert [r[0] for r in rows] == targets
        assert all(r[1] == "gist" and r[2] == r[3] == n_scored for r in rows)  # one row per candidate
        ranks = db.execute(
            "SELECT target, method, min(rank), max(rank), count(DISTINCT rank), count(*) "
            "FROM candidate_scores GROUP BY 1, 2"
        ).fetchall()
        assert len(ranks) == 3 * 5  # targets x (gist, gist_sketch, random, less, representation)
        assert all(r[2] == 1 and r[3] == r[4] == r[5] == n_scored for r in ranks)
        sel_counts = db.execute("SELECT target, method, budget, count(*) FROM selections GROUP BY 1, 2, 3").fetchall()
        evaluations = db.execute("SELECT target, method, budget, seed FROM evaluations").fetchall()
    expected = {"p0.05": selection_size(n_scored, fraction=0.05), "p0.1": selection_size(n_scored, fraction=0.1)}
    assert len(sel_counts) == 15 * 2 and all(r[3] == expected[r[2]] for r in sel_counts)
    methods = ("gist", "gist_sketch", "random", "less", "representation")
    assert sorted(evaluations, key=str) == sorted(
        [(t, m, b, s) for t in targets for m in methods for b in expected for s in (0, 1)]
        + [(t, "full_pool", None, s) for t in targets for s in (0, 1)]
        + [(t, "base", None, None) for t in targets],
        key=str,
    )
    originals = set(pool["original"].to_list())
    for per_budget in out["selections"].values():
        assert sorted(per_budget) == sorted(expected)
        for budget, manifest in per_budget.items():
            assert not Path(manifest["files"]["jsonl"]).is_absolute()  # relative to the storage root
            lines = open(root / manifest["files"]["jsonl"], encoding="utf-8").read().splitlines()
            assert len(lines) == expected[budget] == manifest["selected"]
            assert all(line in originals for line in lines)  # exported in the pool's own format
            assert all("messages" in json.loads(line) for line in lines)
            assert sum(manifest["counts_per_source"].values()) == expected[budget]
            assert set(manifest["basis"]) == {"epoch_1", "epoch_2"}
            assert len(manifest["checkpoints"]) == 2
        # A bigger budget is the smaller one and more (the same ranking, cut later).
        small, big = (pl.read_parquet(root / per_budget[b]["files"]["parquet"]) for b in ("p0.05", "p0.1"))
        assert big["candidate_id"].head(small.height).to_list() == small["candidate_id"].to_list()


def test_scores_match_plain_computation(small_run, tmp_path):
    """Batch-size-1 loss.backward() gradients, torch.linalg.svd, explicit projection and cosine; and the
    opt-in variant gist_fullspace, scored on a copy of the root: the cosine of g to V_k t in gradient space."""
    root = small_run["root"]
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("candidate_shards", list(small_run["shards"]))
        result = dg.materialize(
            [candidate_scores],
            instance=instance,
            resources=make_resources(str(copy)),
            run_config={"ops": {"candidate_scores": {"config": {"methods": ["gist_fullspace"]}}}},
        )
        assert result.success
    fullspace = {}
    ref = json.loads((root / "models" / "model_ref.json").read_text())
    warm = json.loads((root / "warmup" / "manifest.json").read_text())
    compute = ComputeResource()
    tok = compute.load_tokenizer(str(root / ref["path"]))  # manifests hold root-relative paths
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet")
    targets = pl.read_parquet(root / "targets" / "target_sets.parquet").filter(pl.col("split") == "basis")
    cand_enc = [encode_messages(tok, json.loads(m), ref["max_length"]) for m in pool["messages"]]
    keep = [i for i, e in enumerate(cand_enc) if e.n_label_tokens > 0]
    ids = [pool["candidate_id"][i] for i in keep]
    weights = np.array([c["avg_lr"] for c in warm["checkpoints"]])
    weights = weights / weights.sum()
    k = SMALL["ops"]["spectral_basis"]["config"]["k"]
    names = ["arithmetic_sums", "geography", "word_reversal"]
    totals = {t: 0.0 for t in names}
    totals_full = {t: 0.0 for t in names}
    for w, ckpt in zip(weights, warm["checkpoints"], strict=False):
        model = compute.load_model(str(root / ref["path"]), str(root / ckpt["dir"]))
        g = torch.from_numpy(reference_gradients(model, [cand_enc[i] for i in keep])).double()  # every target's
        for target in names:
            rows = targets.filter(pl.col("target") == target).sort("example_id")
            t_enc = [
                encode_prompt_completion(tok, p, c, ref["max_length"])
                for p, c in zip(rows["prompt"], rows["completion"], strict=False)
            ]
            subtasks = np.array(rows["subtask"].to_list())
            G = torch.from_numpy(reference_gradients(model, t_enc)).double()
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            V = Vh[:k].T
            Z = U[:, :k] * S[:k]
            z = g @ V
            dirs = torch.stack([Z[torch.from_numpy(subtasks == s)].mean(0) for s in sorted(set(subtasks))])
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
            totals[target] = totals[target] + w * ((z / z.norm(dim=1, keepdim=True)) @ dirs.T)
            u = V @ dirs.T  # the subtask directions in gradient space (unit columns)
            totals_full[target] = totals_full[target] + w * ((g / g.norm(dim=1, keepdim=True)) @ (u / u.norm(dim=0)))
    with _db(root) as db:
        for target in names:
            total, total_full = totals[target], totals_full[target]
            expected = total.max(dim=1).values.numpy()
            fullspace[target] = total_full.max(dim=1).values.numpy()
            got = dict(
                db.execute(
                    "SELECT candidate_id, score FROM candidate_scores WHERE target = ? AND method = 'gist'", [target]
                ).fetchall()
            )
            np.testing.assert_allclose([got[i] for i in ids], expected, atol=1e-4)
            order = sorted(range(len(ids)), key=lambda j: (-expected[j], ids[j]))
            n_sel = selection_size(len(ids), fraction=0.1)
            chosen = [
                r[0]
                for r in db.execute(
                    "SELECT candidate_id FROM selections WHERE target = ? "
                    "AND method = 'gist' AND budget = 'p0.1' ORDER BY rank",
                    [target],
                ).fetchall()
            ]
            assert chosen == [ids[j] for j in order[:n_sel]]
    with _db(copy) as db:
        for target, expected in fullspace.items():
            got = dict(
                db.execute(
                    "SELECT candidate_id, score FROM candidate_scores WHERE target = ? AND method = 'gist_fullspace'",
                    [target],
                ).fetchall()
            )
            np.testing.assert_allclose([got[i] for i in ids], expected, atol=1e-4)


def test_sketch_scores_match_plain_computation(small_run):
    """gist_sketch: bs=1 gradients times a dense P are the stored sketches; SVD of the bs=1 target gradients,
    z = s (P^T V_k), cosine, checkpoint weights and max give the stored scores."""
    from safetensors.numpy import load_file

    from gist_assets.sketches import sketch_rows
    from gist_core.gradients import trainable_linears
    from gist_core.projection import sketch_projector

    root = small_run["root"]
    ref = json.loads((root / "models" / "model_ref.json").read_text())
    warm = json.loads((root / "warmup" / "manifest.json").read_text())
    compute = ComputeResource()
    model_dir = str(root / "models" / "base_model")  # manifests hold paths relative to the root
    tok = compute.load_tokenizer(model_dir)
    shards = sorted(small_run["shards"])
    folders = [root / "features_gist_sketch" / s for s in shards]
    meta = json.loads((folders[0] / "meta.json").read_text())
    proj = meta["projection"]
    sketches = [load_file(str(f / "features.safetensors")) for f in folders]
    ids = pl.concat([pl.read_parquet(f / "candidates.parquet").filter(pl.col("included")) for f in folders])[
        "candidate_id"
    ]
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet").filter(pl.col("shard") == shards[0])
    first = [encode_messages(tok, json.loads(m), ref["max_length"]) for m in pool["messages"]]
    targets = pl.read_parquet(root / "targets" / "target_sets.parquet").filter(pl.col("split") == "basis")
    weights = np.array([c["avg_lr"] for c in warm["checkpoints"]])
    weights = weights / weights.sum()
    k = SMALL["ops"]["spectral_basis"]["config"]["k"]
    totals = {}
    for w, ckpt in zip(weights, warm["checkpoints"], strict=False):
        model = compute.load_model(model_dir, str(root / ckpt["dir"]))
        P = sketch_projector(trainable_linears(model)[0], proj["dim"], proj["seed"], proj["kind"]).dense().double()
        g = torch.from_numpy(reference_gradients(model, first)).double()
        want = (g @ P).numpy()
        assert sketches[0][ckpt["name"]].dtype == np.float16  # stored packed (pack_rows)
        got = sketch_rows(sketches[0], ckpt["name"])
        # Packed rows keep each entry to 2^-11 of the row's largest.
        assert (np.abs(got - want) <= 1e-3 * np.abs(want).max(axis=1, keepdims=True) + 1e-7).all()
        s = torch.from_numpy(np.concatenate([sketch_rows(x, ckpt["name"]) for x in sketches])).double()
        for target in ["arithmetic_sums", "geography", "word_reversal"]:
            rows = targets.filter(pl.col("target") == target).sort("example_id")
            t_enc = [
                encode_prompt_completion(tok, p, c, ref["max_length"])
                for p, c in zip(rows["prompt"], rows["completion"], strict=False)
            ]
            subtasks = np.array(rows["subtask"].to_list())
            U, S, Vh = torch.linalg.svd(
                torch.from_numpy(reference_gradients(model, t_enc)).double(), full_matrices=False
            )
            Z, z = U[:, :k] * S[:k], s @ (P.T @ Vh[:k].T)
            dirs = torch.stack([Z[torch.from_numpy(subtasks == t)].mean(0) for t in sorted(set(subtasks))])
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
            totals[target] = totals.get(target, 0) + w * ((z / z.norm(dim=1, keepdim=True)) @ dirs.T)
    with _db(root) as db:
        for target, total in totals.items():
            got = dict(
                db.execute(
                    "SELECT candidate_id, score FROM candidate_scores WHERE target = ? AND method = 'gist_sketch'",
                    [target],
                ).fetchall()
            )
            assert len(got) == len(ids)
            np.testing.assert_allclose([got[i] for i in ids], total.max(dim=1).values.numpy(), atol=1e-4)


def test_checks_passed(small_run):
    instance = small_run["instance"]
    for asset, check in [
        ("spectral_basis", "basis_columns_orthonormal"),
        ("candidate_scores", "scores_valid"),
        ("baseline_scores", "scores_valid"),
        ("selected_subset", "selection_size_as_configured"),
    ]:
        key = AssetCheckKey(AssetKey(asset), check)
        summary = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert summary.status.value == "SUCCEEDED", (asset, check, summary.status)


def test_selection_metadata_reads_per_budget_with_one_histogram_per_target(small_run):
    """What the asset page shows: per target and budget the size, source mix and top rows; per target one
    score histogram with every budget's cut on it (the exact method only)."""
    event = small_run["instance"].get_latest_materialization_event(AssetKey("selected_subset"))
    meta = event.asset_materialization.metadata
    for target in ["arithmetic_sums", "geography", "word_reversal"]:
        assert meta[f"{target}/histogram"].value.startswith(f"**{target}: scores**")
        assert "data:image/png;base64," in meta[f"{target}/histogram"].value
        for budget in ["p0.05", "p0.1"]:
            assert meta[f"{target}/{budget}/selected"].value > 0
            assert "| source | selected |" in meta[f"{target}/{budget}/source_mix"].value
            assert "| selection_rank |" in meta[f"{target}/{budget}/top"].value
        assert not any(k.startswith(f"{target}/p") and k.endswith("histogram") for k in meta)
    assert "arithmetic_sums/gist_sketch/p0.05/selected" in meta and "arithmetic_sums/gist_sketch/histogram" not in meta


def test_less_features_match_plain_computation(small_run):
    """LESS candidate features: bs=1 gradients, Adam direction from the saved state, dense projection."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    from gist_core.gradients import trainable_linears
    from gist_core.projection import BlockProjector

    root = small_run["root"]
    ref = json.loads((root / "models" / "model_ref.json").read_text())
    shard = sorted(small_run["shards"])[0]
    folder = root / "features_less" / shard
    meta = json.loads((folder / "meta.json").read_text())
    features = load_file(str(folder / "features.safetensors"))
    side = pl.read_parquet(folder / "candidates.parquet").filter(pl.col("included"))
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet").filter(pl.col("shard") == shard)
    assert side["candidate_id"].to_list() == pool["candidate_id"].to_list()
    compute = ComputeResource()
    tok = compute.load_tokenizer(str(root / ref["path"]))  # manifests hold root-relative paths
    enc = [encode_messages(tok, json.loads(m), ref["max_length"]) for m in pool["messages"]]
    proj = meta["projection"]
    for ckpt in meta["checkpoints"]:
        ckpt_dir = root / "warmup" / ckpt
        info = json.loads((ckpt_dir / "checkpoint_info.json").read_text())
        model = compute.load_model(str(root / ref["path"]), str(ckpt_dir))
        g = torch.from_numpy(reference_gradients(model, enc)).double()
        state = load_torch(str(ckpt_dir / "optimizer_state.safetensors"))  # {"<param>::exp_avg": tensor, ...}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        m = torch.cat([state[f"{n}::exp_avg"].flatten() for n in names]).double()
        v = torch.cat([state[f"{n}::exp_avg_sq"].flatten() for n in names]).double()
        b1, b2 = info["betas"]
        direction = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g**2 + info["adam_eps"])
        layout, _ = trainable_linears(model)
        P = BlockProjector(layout, proj["dim"], proj["seed"], proj["kind"]).dense().double()
        np.testing.assert_allclose(features[ckpt], (direction @ P).numpy(), rtol=1e-3, atol=1e-4)
        assert float(v.abs().sum()) > 0  # real moments, not an empty state


def test_exports_load_as_trl_conversations(small_run):
    """Every selection's chat export loads with `datasets` and is in TRL's conversational format."""
    from datasets import load_dataset

    root = small_run["root"]
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet")
    pool_messages = dict(zip(pool["candidate_id"], pool["messages"], strict=False))
    files = sorted(root.glob("selections/*/*/*/selection.messages.jsonl"))
    assert len(files) == 3 * 5 * 2  # targets x methods (gist, gist_sketch, random, less, representation) x budgets
    for path in files:
        rows = load_dataset("json", data_files=str(path), split="train")
        parquet = pl.read_parquet(path.with_name("selection.parquet"))
        assert rows.num_rows == parquet.height > 0
        assert {"messages", "score", "selection_rank", "source", "budget"} <= set(parquet.columns)
        assert parquet["budget"].unique().to_list() == [path.parent.name]
        assert rows["id"] == parquet["candidate_id"].to_list()  # same order: best first
        for row, msgs in zip(rows, parquet["messages"].to_list(), strict=False):
            messages = row["messages"]
            assert isinstance(messages, list) and messages[-1]["role"] == "assistant"
            assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in messages)
            assert messages == msgs == json.loads(pool_messages[row["id"]])[: len(messages)]
