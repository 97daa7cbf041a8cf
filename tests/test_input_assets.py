"""Asset-level tests of the inputs (candidate_pool, target_sets, base_model) on a real Dagster instance."""

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from gist_assets.definitions import make_resources
from gist_assets.inputs import candidate_pool, target_sets
from gist_assets.model import base_model

FIXTURES = Path(__file__).parent / "fixtures"
LESS_DIR = FIXTURES / "less_eval"
CUSTOM_TARGET = FIXTURES / "custom_target.jsonl"
TINY_MODEL = {"vocab_size": 300, "hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "pretrain_steps": 5}


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _materialize(assets, root, instance, ops: dict, **kw):
    return dg.materialize(
        assets,
        instance=instance,
        resources=make_resources(str(root)),
        run_config={"ops": {name: {"config": cfg} for name, cfg in ops.items()}},
        **kw,
    )


def _meta(result, node: str) -> dict:
    mats = result.asset_materializations_for_node(node)
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


def _failure_text(result) -> str:
    """Every message in the failed steps' error chains (Dagster wraps the asset's exception)."""
    assert not result.success
    texts = []
    for ev in result.get_step_failure_events():
        err = ev.step_failure_data.error
        while err is not None:
            texts.append(err.message)
            err = err.cause
    assert texts, "no step failure event"
    return "\n".join(texts)


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def _conv(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ------------------------------------------------------------------ candidate_pool


@pytest.fixture
def candidate_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = {
        "alpha": _write_jsonl(
            data / "alpha.jsonl",
            [
                _conv("Capital of France?", "Paris"),
                _conv("2 + 2?", "4"),
                {**_conv("Say hi.", "Hi!"), "id": "alpha-own-id"},
            ],
        ),
        "beta": _write_jsonl(
            data / "beta.jsonl",
            [
                {"prompt": "  Capital of   France?", "completion": "Paris "},  # duplicate of alpha line 1
                {"prompt": "Largest planet?", "completion": "Jupiter"},
                '{"prompt": "broken',  # line 3: malformed JSON
                {"prompt": "Color of the sky?", "completion": "Blue"},
            ],
        ),
        "gamma": _write_jsonl(
            data / "gamma.jsonl",
            [
                {"instruction": "Translate to English.", "input": "Bonjour", "output": "Hello"},
                {"instruction": "Name a prime.", "output": "7"},
            ],
        ),
    }
    return {"glob": str(data / "*.jsonl"), "files": files}


def test_candidate_pool_from_user_files(tmp_path, instance, candidate_files):
    root = tmp_path / "root"
    cfg = {"paths": [candidate_files["glob"]], "on_bad_record": "skip", "shard_size": 2}
    result = _materialize([candidate_pool], root, instance, {"candidate_pool": cfg})
    assert result.success
    meta = _meta(result, "candidate_pool")
    assert meta["rows"] == 7
    assert meta["files"] == 3
    assert meta["duplicates_dropped"] == 1
    assert meta["records_skipped"] == 1
    beta = candidate_files["files"]["beta"]
    assert f"{beta}:3" in meta["skip_reasons"] and "malformed JSON" in meta["skip_reasons"]
    assert meta["shards"] == meta["new_shards"] == 4

    pool_file = root / "pool" / "candidate_pool.parquet"
    assert meta["path"] == str(pool_file)
    pool = pl.read_parquet(pool_file)
    assert {"candidate_id", "source", "shard", "file", "line", "format", "messages", "original"} <= set(pool.columns)
    assert pool.height == 7 and pool["candidate_id"].n_unique() == 7
    assert "alpha-own-id" in pool["candidate_id"].to_list()
    by_format = dict(pool.group_by("format").agg(pl.len()).iter_rows())
    assert by_format == {"messages": 3, "prompt_completion": 2, "alpaca": 2}
    assert dict(pool.group_by("source").agg(pl.len()).iter_rows()) == {"alpha": 3, "beta": 2, "gamma": 2}
    # The duplicate (a reformatted copy of alpha line 1, read later) is gone; beta keeps lines 2 and 4.
    assert sorted(pool.filter(pl.col("source") == "beta")["line"].to_list()) == [2, 4]
    # `original` is the record as read, for export unchanged.
    gamma_lines = candidate_files["files"]["gamma"].read_text().splitlines()
    assert [json.loads(o) for o in pool.filter(pl.col("source") == "gamma").sort("line")["original"]] == [
        json.loads(x) for x in gamma_lines
    ]
    shards = dict(pool.group_by("shard").agg(pl.len()).iter_rows())
    assert shards == {"alpha-0000": 2, "alpha-0001": 1, "beta-0000": 2, "gamma-0000": 2}
    assert sorted(instance.get_dynamic_partitions("candidate_shards")) == sorted(pool["shard"].unique())

    # Remove a file: its shard leaves the dynamic partitions, the others stay exactly as they were.
    candidate_files["files"]["gamma"].unlink()
    result = _materialize([candidate_pool], root, instance, {"candidate_pool": cfg})
    assert result.success
    meta = _meta(result, "candidate_pool")
    assert meta["rows"] == 5 and meta["shards"] == 3 and meta["new_shards"] == 0
    after = pl.read_parquet(pool_file)
    assert sorted(instance.get_dynamic_partitions("candidate_shards")) == ["alpha-0000", "alpha-0001", "beta-0000"]
    cols = ["candidate_id", "shard", "source", "messages"]
    assert (
        after.select(cols)
        .sort("candidate_id")
        .equals(pool.filter(pl.col("source") != "gamma").select(cols).sort("candidate_id"))
    )


def test_candidate_pool_bad_record_fails_naming_file_and_line(tmp_path, instance, candidate_files):
    root = tmp_path / "root"
    result = _materialize(
        [candidate_pool],
        root,
        instance,
        {"candidate_pool": {"paths": [candidate_files["glob"]], "shard_size": 2}},
        raise_on_error=False,
    )
    text = _failure_text(result)
    assert f"{candidate_files['files']['beta']}:3" in text, text
    assert "on_bad_record" in text  # says how to get past it
    assert not (root / "pool" / "candidate_pool.parquet").exists()
    assert instance.get_dynamic_partitions("candidate_shards") == []


# ------------------------------------------------------------------ target_sets

TARGETS = [
    {"name": "mmlu", "format": "mmlu", "path": str(LESS_DIR)},
    {"name": "bbh", "format": "bbh", "path": str(LESS_DIR)},
    {"name": "tydiqa", "format": "tydiqa", "path": str(LESS_DIR)},
    {"name": "custom", "format": "jsonl", "path": str(CUSTOM_TARGET)},
]
EXPECTED_COUNTS = {
    ("mmlu", "abstract_algebra"): 5,
    ("mmlu", "high_school_biology"): 5,
    ("bbh", "boolean_expressions"): 3,
    ("bbh", "date_understanding"): 3,
    ("tydiqa", "english"): 1,
    ("tydiqa", "finnish"): 1,
    ("custom", "arithmetic"): 2,
    ("custom", "default"): 1,
}


def test_target_sets_less_and_jsonl(tmp_path, instance):
    frames = []
    for run in ("first", "second"):
        root = tmp_path / run
        result = _materialize([target_sets], root, instance, {"target_sets": {"targets": TARGETS}})
        assert result.success
        meta = _meta(result, "target_sets")
        df = pl.read_parquet(root / "targets" / "target_sets.parquet")
        frames.append(df)
        assert meta["targets"] == ["mmlu", "bbh", "tydiqa", "custom"]
        assert meta["examples"] == df.height == sum(EXPECTED_COUNTS.values())
        assert meta["heldout"] == int((df["split"] == "heldout").sum())

    df = frames[0]
    assert {"target", "subtask", "prompt", "completion", "example_id", "split"} <= set(df.columns)
    counts = {(t, s): n for t, s, n in df.group_by("target", "subtask").agg(pl.len()).iter_rows()}
    assert counts == EXPECTED_COUNTS
    assert df["example_id"].n_unique() == df.height
    assert set(df["split"]) == {"basis", "heldout"}
    basis = {(t, s) for t, s in df.filter(pl.col("split") == "basis").select("target", "subtask").iter_rows()}
    # Every subtask of >= 2 examples keeps a basis example; tydiqa (one example per language) holds out
    # one language whole, so that every target has a held-out example.
    assert basis == set(EXPECTED_COUNTS) - {("tydiqa", "english")} or basis == set(EXPECTED_COUNTS) - {
        ("tydiqa", "finnish")
    }
    per_target = df.group_by("target", "split").agg(pl.len()).pivot(on="split", index="target", values="len")
    assert per_target.filter((pl.col("basis") < 1) | (pl.col("heldout") < 1)).height == 0, per_target
    assert int(df.filter((pl.col("target") == "tydiqa") & (pl.col("split") == "heldout")).height) == 1
    # Prompts are in Tulu chat format, including the custom JSONL (apply_chat_format defaults on).
    assert all(p.startswith("<|user|>\n") and "<|assistant|>\n" in p for p in df["prompt"])
    # Same seed and inputs: the same split, example for example.
    key = ["example_id", "split"]
    assert frames[0].select(key).sort("example_id").equals(frames[1].select(key).sort("example_id"))
    assert frames[0].equals(frames[1])


def test_target_name_escaping_the_root_is_refused(tmp_path, instance):
    root = tmp_path / "root"
    before = _files_under(tmp_path)
    bad = [{"name": "../evil", "format": "jsonl", "path": str(CUSTOM_TARGET)}]
    result = _materialize([target_sets], root, instance, {"target_sets": {"targets": bad}}, raise_on_error=False)
    text = _failure_text(result)
    assert "'../evil'" in text and "storage root" in text, text
    assert not (tmp_path / "evil").exists()
    written = _files_under(tmp_path) - before
    assert all(w == "root" or w.startswith("root/") for w in written), written
    assert not (root / "targets" / "target_sets.parquet").exists()


# ------------------------------------------------------------------ base_model


def _train_embedded(root: Path, instance, model: dict = TINY_MODEL) -> dg.ExecuteInProcessResult:
    result = _materialize(
        [candidate_pool, base_model],
        root,
        instance,
        {"candidate_pool": {"embedded_pool_size": 200}, "base_model": model},
    )
    assert result.success
    return result


def _pretrain_logs(instance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id) if "pretrain step" in e.user_message]


@pytest.mark.slow
def test_base_model_embedded_and_configured(tmp_path, instance, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("GIST_MODEL_CACHE", "off")  # both roots pretrain: the determinism is what is checked
    first, second = tmp_path / "first", tmp_path / "second"
    result = _train_embedded(first, instance)
    meta = _meta(result, "base_model")
    assert meta["model_cache"] == "off" and _pretrain_logs(instance, result)
    _train_embedded(second, instance)
    model_dir = first / "models" / "base_model"
    assert meta["embedded"] is True and meta["model"] == str(model_dir)
    ref = json.loads((first / "models" / "model_ref.json").read_text())
    assert ref["path"] == "models/base_model" and ref["embedded"] is True  # relative to the storage root

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert len(tok) <= 300 and model.config.vocab_size == len(tok) == ref["vocab_size"]
    for special in ("<|user|>", "<|assistant|>"):
        assert special in tok.additional_special_tokens
        ids = tok(f"x {special} y", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(special) in ids  # one token, never split

    # Same config and seed in a second root: the same weights, bit for bit.
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert weights
    for name in weights:
        a, b = load_file(str(model_dir / name)), load_file(str(second / "models" / "base_model" / name))
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a)
    assert (model_dir / "tokenizer.json").read_bytes() == (
        second / "models" / "base_model" / "tokenizer.json"
    ).read_bytes()

    # A configured model: only a pointer is written, nothing is trained.
    third = tmp_path / "third"
    result = _materialize([base_model], third, instance, {"base_model": {"model_name_or_path": str(model_dir)}})
    assert result.success
    meta = _meta(result, "base_model")
    assert meta["embedded"] is False and meta["model"] == str(model_dir)
    ref = json.loads((third / "models" / "model_ref.json").read_text())
    assert ref["path"] == str(model_dir) and ref["embedded"] is False and ref["vocab_size"] == len(tok)
    assert not (third / "models" / "base_model").exists()
    assert not (third / "pool").exists()

    # A model path that does not exist fails, naming it.
    missing = tmp_path / "no_such_model"
    fourth = tmp_path / "fourth"
    result = _materialize(
        [base_model], fourth, instance, {"base_model": {"model_name_or_path": str(missing)}}, raise_on_error=False
    )
    assert str(missing) in _failure_text(result)
    assert not (fourth / "models" / "model_ref.json").exists()


def test_shipped_default_model_is_current():
    """The model in gist_demo/default_model/ was built by today's settings, corpus and training code."""
    from gist_assets.config import BaseModelConfig
    from gist_assets.model import embedded_model_settings
    from gist_demo import tiny_model

    spec, settings = embedded_model_settings(BaseModelConfig())
    key = tiny_model.embedded_model_key(spec, *settings)
    shipped = json.loads((tiny_model.SHIPPED_MODEL_DIR / "pretraining.json").read_text())
    assert shipped["key"] == key, (
        "the default embedded model's settings, corpus or training code changed: run `make default-model` and "
        "commit gist_demo/default_model/"
    )
    assert len(shipped["pretrain_losses"]) == BaseModelConfig().pretrain_steps


def test_default_embedded_model_comes_from_the_package(tmp_path, instance, monkeypatch):
    from gist_demo import tiny_model

    monkeypatch.setenv("GIST_MODEL_CACHE", "off")
    result = _materialize([base_model], tmp_path, instance, {})
    meta = _meta(result, "base_model")
    assert meta["made"] == "shipped with the package" and not _pretrain_logs(instance, result)
    got, shipped = tmp_path / "models" / "base_model", tiny_model.SHIPPED_MODEL_DIR
    for name in ("tokenizer.json", "config.json"):
        assert (got / name).read_bytes() == (shipped / name).read_bytes(), name
    assert meta["pretrain_final_loss"] == json.loads((shipped / "pretraining.json").read_text())["pretrain_losses"][-1]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "models" / "base_model" / "model.safetensors"))
    b = load_file(str(tiny_model.SHIPPED_MODEL_DIR / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_embedded_model_cache(tmp_path, instance, monkeypatch):
    """A second storage root with the same settings copies the cached model instead of pretraining again;
    a changed setting is a new entry; a damaged entry is rebuilt."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GIST_MODEL_CACHE", str(cache))
    first = _train_embedded(tmp_path / "first", instance)
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 1 and _pretrain_logs(instance, first)
    entry = cache / entries[0]
    assert _meta(first, "base_model")["model_cache"] == str(entry)

    second = _train_embedded(tmp_path / "second", instance)
    assert not _pretrain_logs(instance, second)  # nothing trained
    assert _meta(first, "base_model")["made"] == "pretrained on this machine"
    assert _meta(second, "base_model")["made"] == "pretrained on this machine, copied from the cache"
    a_meta, b_meta = _meta(first, "base_model"), _meta(second, "base_model")
    for key in ("parameters", "vocab_size", "pretrain_final_loss", "model_cache"):
        assert a_meta[key] == b_meta[key], key
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        a = (tmp_path / "first" / "models" / "base_model" / name).read_bytes()
        assert a == (tmp_path / "second" / "models" / "base_model" / name).read_bytes(), name
    ref = json.loads((tmp_path / "second" / "models" / "model_ref.json").read_text())
    assert ref["path"] == "models/base_model"  # the copy under the root is what the graph reads

    third = _train_embedded(tmp_path / "third", instance, {**TINY_MODEL, "pretrain_steps": 6})
    assert len(_pretrain_logs(instance, third)) == 1  # "step 6/6"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2

    (entry / "model.safetensors").unlink()  # a damaged entry is built again, not copied
    fourth = _train_embedded(tmp_path / "fourth", instance)
    assert _pretrain_logs(instance, fourth) and (entry / "model.safetensors").is_file()


def test_the_cli_sees_edited_input_files(tmp_path, instance):
    """An edited, added or removed pool or target file makes its input asset stale for the CLI's plan (Dagster
    cannot see those files); the other input stays up to date."""
    import shutil

    from gist_assets.run import materialize, plan_stage, with_storage

    less = tmp_path / "less"
    shutil.copytree(LESS_DIR, less)
    (tmp_path / "pool").mkdir()
    pool = _write_jsonl(
        tmp_path / "pool" / "mine_data.jsonl",
        [
            {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(4)
        ],
    )
    targets = [{**t, "path": str(less)} if t["path"] == str(LESS_DIR) else t for t in TARGETS]
    ops = {
        "candidate_pool": {"config": {"paths": [str(tmp_path / "pool" / "*.jsonl")]}},
        "target_sets": {"config": {"targets": targets}},
    }
    config = with_storage({"ops": ops}, str(tmp_path / "root"))
    materialize(["candidate_pool", "target_sets"], config, instance, str(tmp_path / "root"))

    def reasons() -> dict:
        plan = plan_stage(instance, "prepare_job", config)
        return {name: plan.reasons.get(name, "up to date") for name in ("candidate_pool", "target_sets")}

    assert reasons() == {"candidate_pool": "up to date", "target_sets": "up to date"}
    with open(pool, "a", encoding="utf-8") as fh:
        turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        fh.write(json.dumps({"id": "new", "messages": turns}) + "\n")
    assert reasons() == {"candidate_pool": f"input files changed: {pool}", "target_sets": "up to date"}
    materialize(["candidate_pool"], config, instance, str(tmp_path / "root"))
    edited = sorted(p for p in less.rglob("*") if p.is_file())[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert reasons() == {"candidate_pool": "up to date", "target_sets": f"input files changed: {edited}"}
    pool.unlink()
    assert "does not exist" in reasons()["candidate_pool"] or "matched no files" in reasons()["candidate_pool"]
