"""One gradient pass for the exact features and the sketches, against a pass for each.

``candidate_gradient_pass`` projects each backward onto the targets' bases (candidate_features)
and into the sketch (candidate_sketches) side by side. The baseline is what ran before: the
same shards, checkpoints, batches and projections, as two passes, one per asset. Both
variants go through ``gist_assets.features.compute_shard`` (the asset's own code, writing
the asset's files) on the embedded default after its prepare stage; they alternate over
repeats, and each variant's outputs are checked equal to the other's, byte for byte.

    .venv/bin/python benchmarks/bench_shared_pass.py             # the embedded default (8 shards), ~3 min
    .venv/bin/python benchmarks/bench_shared_pass.py --quick     # the tests' small config, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    BackgroundLoad,
    add_wait_quiet,
    interleaved,
    machine_line,
    median,
    spread,
    table,
    wait_for_quiet,
)

sys.path.insert(0, str(REPO / "tests"))
from small_config import SMALL  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tests' small config instead of the embedded default")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="parent of the temporary storage root")
    add_wait_quiet(p)
    args = p.parse_args(argv)

    import dagster as dg
    import torch

    from gist_assets.config import CandidateSketchesConfig
    from gist_assets.features import compute_shard
    from gist_assets.run import run_stage, with_storage
    from gist_resources import ArtifactStore, ComputeResource

    print(f"# bench_shared_pass: {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    run_config = {"ops": {k: v for k, v in SMALL["ops"].items() if k != "selection_evaluation"}} if args.quick else {}
    print(f"run config: {'the small test config' if args.quick else 'embedded default'}", flush=True)
    log = logging.getLogger("bench_shared_pass")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, dg.instance_for_test() as instance:
        root = str(Path(tmp) / "gist_root")
        with open(Path(tmp) / "dagster.log", "w") as dagster_log, contextlib.redirect_stderr(dagster_log):
            run_stage(instance, "prepare_job", with_storage(run_config, root), False, lambda s: None, set())
        storage, compute, sketch = ArtifactStore(root=root), ComputeResource(), CandidateSketchesConfig()
        shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
        n_ckpts = len(storage.read_warmup()["checkpoints"])
        outputs: dict[str, dict[str, bytes]] = {}

        def stored() -> dict[str, bytes]:
            return {
                f"{kind}/{s}": (storage.features_location(kind, s) / "features.safetensors").read_bytes()
                for kind in ("gist", "gist_sketch")
                for s in shards
            }

        def two_passes() -> None:
            for s in shards:
                list(compute_shard(storage, compute, s, log, features=True))
                list(compute_shard(storage, compute, s, log, features=False, sketch=sketch))
            outputs["two passes"] = stored()

        def one_pass() -> None:
            for s in shards:
                list(compute_shard(storage, compute, s, log, features=True, sketch=sketch))
            outputs["one pass"] = stored()

        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        with BackgroundLoad() as bg:
            times = interleaved({"two passes": two_passes, "one pass": one_pass}, args.repeats, log=print)
        same = outputs["two passes"] == outputs["one pass"]
    rows = [
        {"variant": name, "median s": f"{median(ts):.1f}", "spread": spread(ts), "repeats": len(ts)}
        for name, ts in times.items()
    ]
    print(f"\n{len(shards)} shards x {n_ckpts} checkpoints; exact features and sketches (d={sketch.dim})")
    print(table(rows))
    print(f"outputs of the two variants identical, byte for byte: {same}")
    print(f"other processes used {bg.value:.2f} CPUs on average during the runs")
    ratio = median(times["two passes"]) / median(times["one pass"])
    print(f"\nRATIOS\n  two passes / one pass = {ratio:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
