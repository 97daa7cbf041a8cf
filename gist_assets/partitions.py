"""Candidate shards: dynamic partitions, one per fixed-size slice of each candidate file.

A shard key is built from its file and its index within the file, so a new
file adds new keys and leaves every existing shard (and its features) alone.
"""

import hashlib
import re

import dagster as dg

# The name on its own: candidate_shards.name is typed Optional.
CANDIDATE_SHARDS = "candidate_shards"
candidate_shards = dg.DynamicPartitionsDefinition(name=CANDIDATE_SHARDS)


def shard_keys_for_files(files: list[str]) -> dict[str, str]:
    """A readable, unique key prefix per file: its stem, plus a path hash when stems collide."""
    stems: dict[str, list[str]] = {}
    for f in files:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f.rsplit("/", 1)[-1].split(".")[0])
        stems.setdefault(stem, []).append(f)
    prefix = {}
    for stem, group in stems.items():
        for f in group:
            prefix[f] = stem if len(group) == 1 else f"{stem}_{hashlib.sha1(f.encode()).hexdigest()[:6]}"
    return prefix
