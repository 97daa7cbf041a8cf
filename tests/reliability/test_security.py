"""Reliability matrix, security: no unpickling, no remote code by default, a local-only UI, and every path
the pipeline writes stays under the storage root."""

import ast
import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest
import torch

from gist_assets.config import RunConfigError, check_run_config
from gist_resources import ArtifactStore, ComputeResource
from reliability_util import files_under, fresh_instance, materialize, user_error, warnings_logged

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gist_core", "gist_resources", "gist_assets")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_deserialization(source: str, filename: str = "<source>") -> list[str]:
    """Places in Python source that could unpickle data or run a model's code; empty means clean."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                problems.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Name) and node.id in PICKLE_MODULES:
            problems.append(f"{where}: uses {node.id}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name.endswith(("read_pickle", "to_pickle")) or name.split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where}: {name}(...)")
            if name in ("torch.load", "load") and not _is_const(kw.get("weights_only"), True):
                if name == "torch.load" or "weights_only" in kw:
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and not _is_const(kw.get("allow_pickle"), False):
                problems.append(f"{where}: np.load without allow_pickle=False")
            if "allow_pickle" in kw and not _is_const(kw["allow_pickle"], False):
                problems.append(f"{where}: allow_pickle is not False")
            if name.endswith(".from_pretrained") and not name.startswith("PeftModel"):
                if "trust_remote_code" not in kw or not _is_const(kw.get("local_files_only"), True):
                    problems.append(f"{where}: {name} without trust_remote_code=... and local_files_only=True")
    return problems


def test_scanner_catches_the_unsafe_patterns():
    bad = (
        "import pickle\nimport torch, numpy as np\nfrom transformers import AutoModel\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x.npy')\n"
        "np.load('x.npy', allow_pickle=True)\nAutoModel.from_pretrained('m')\n"
    )
    found = unsafe_deserialization(bad)
    assert len(found) == 7, found
    good = (
        "import torch, numpy as np\ntorch.load('x', weights_only=True)\nnp.load('x', allow_pickle=False)\n"
        "np.save('x', a, allow_pickle=False)\n"
        "AutoModel.from_pretrained('m', local_files_only=True, trust_remote_code=flag)\n"
    )
    assert unsafe_deserialization(good) == []


def test_no_pickle_in_project_sources():
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        problems += unsafe_deserialization(text, str(path.relative_to(REPO)))
        problems += [f"{path.relative_to(REPO)}: allow_pickle=True" for _ in range(text.count("allow_pickle=True"))]
    assert problems == []


@pytest.fixture
def fake_loaders(tmp_path, monkeypatch):
    """Record the keyword arguments the project passes to transformers' loaders."""
    import transformers

    calls = []

    class Tok:
        pad_token_id, eos_token = 0, "</s>"

    def fake(kind, result):
        def from_pretrained(path, **kwargs):
            calls.append((kind, path, kwargs))
            return result()

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", Tok))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", fake("model", lambda: torch.nn.Linear(1, 1))
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return str(model), calls


def test_trust_remote_code_is_off_by_default(fake_loaders, recwarn):
    path, calls = fake_loaders
    compute = ComputeResource(device="cpu")
    assert ComputeResource.model_fields["trust_remote_code"].default is False
    compute.load_tokenizer(path)
    compute.load_model(path)
    assert [c[0] for c in calls] == ["tokenizer", "model"]
    assert all(c[2]["trust_remote_code"] is False and c[2]["local_files_only"] is True for c in calls)
    assert not [w for w in recwarn if "trust_remote_code" in str(w.message)]


def test_trust_remote_code_on_is_passed_through_with_a_warning(fake_loaders):
    path, calls = fake_loaders
    compute = ComputeResource(device="cpu", trust_remote_code=True)
    with pytest.warns(UserWarning, match="trust_remote_code is on .* will run"):
        compute.load_tokenizer(path)
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        compute.load_model(path)
    assert all(c[2]["trust_remote_code"] is True for c in calls)


def test_trust_remote_code_on_is_in_the_run_log(small_run, tmp_path):
    model = str(small_run["root"] / "models" / "base_model")
    with fresh_instance() as instance, pytest.warns(UserWarning, match="trust_remote_code is on"):
        result = materialize(
            ["base_model"],
            tmp_path / "root",
            instance,
            {"base_model": {"model_name_or_path": model}},
            resources={"compute": ComputeResource(trust_remote_code=True)},
        )
        assert result.success, user_error(result)
        logged = warnings_logged(instance, result)
    assert any("trust_remote_code is on" in m and model in m for m in logged), logged


def test_make_ui_binds_to_localhost_by_default():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("UI_HOST", "PORT", "MAKEFLAGS")}
    out = subprocess.run(["make", "-n", "ui"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "dagster dev" in line]  # webserver and daemon
    assert len(lines) == 1, out
    assert " -h 127.0.0.1 " in f"{lines[0]} " and "0.0.0.0" not in lines[0], lines[0]


ESCAPING = ["../evil", "..", ".", "", "/etc/passwd", "a/b", "a\\b", "nul\x00byte", "../../../../tmp/x"]


@pytest.mark.parametrize("name", ESCAPING)
def test_storage_refuses_names_that_leave_the_root(tmp_path, name):
    storage = ArtifactStore(root=str(tmp_path / "root"))
    builders = [
        lambda: storage.basis_dir("epoch_1", name),
        lambda: storage.features_location("gist", name),
        lambda: storage.selection_dir(name, "gist"),
        lambda: storage.selection_dir("target", name),
        lambda: storage.preset_model_dir(name),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="storage root"):
            build()
    assert not (tmp_path / "root").exists()  # refusing creates nothing


def test_storage_refuses_a_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "basis").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the storage root"):
        ArtifactStore(root=str(root)).basis_dir("epoch_1", "V.npy")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "ABSOLUTE"])
def test_target_names_cannot_escape_the_root(tmp_path, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "abs_evil")
    target_file = tmp_path / "t.jsonl"
    target_file.write_text('{"prompt": "p", "completion": "c", "subtask": "s"}\n')
    before = files_under(tmp_path)
    with fresh_instance() as instance:
        result = materialize(
            ["target_sets"],
            tmp_path / "root",
            instance,
            {"target_sets": {"targets": [{"name": name, "format": "jsonl", "path": str(target_file)}]}},
        )
    msg = user_error(result)
    shown = repr(name) if len(name) <= 80 else repr(name[:80])  # the message shortens long names
    assert shown in msg and "storage root" in msg, msg
    written = files_under(tmp_path) - before
    assert all(w == "root" or w.startswith("root/") for w in written), written


def test_method_names_cannot_escape_the_root(custom_graph, tmp_path):
    """A method name is never taken from config, and one planted in the database never names a folder.

    (Shard keys: test_storage_refuses_names_that_leave_the_root builds their folders with bad keys.)
    """
    root = shutil.copytree(custom_graph["root"], tmp_path / "root")
    evil = "../../evil"
    with duckdb.connect(str(root / "gist.duckdb")) as db:
        db.execute("UPDATE score_sets SET method = ?, version = ? WHERE method = 'gist'", [evil, evil])
    before = files_under(tmp_path)
    with fresh_instance(custom_graph["shards"]) as instance:
        select = materialize(["baseline_selections"], root, instance, checks=False)
    assert "no baseline scores" in user_error(select)
    assert files_under(tmp_path) == before
    assert not (tmp_path.parent / "evil").exists()
    with pytest.raises(RunConfigError, match=r"unknown keys \['methods'\]"):
        check_run_config({"ops": {"selected_subset": {"config": {"methods": [evil]}}}})


def test_a_whole_run_writes_only_under_the_storage_root(custom_graph):
    """The custom graph ran with an empty working directory beside its root: both are as they were."""
    assert list(custom_graph["cwd"].iterdir()) == []
    assert sorted(p.name for p in custom_graph["base"].iterdir()) == ["cwd", "data", "root"]
    assert sorted(p.name for p in (custom_graph["base"] / "data").iterdir()) == [
        "mixed.jsonl",
        "mypool.jsonl",
        "single.jsonl",
    ]
