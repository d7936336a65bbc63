"""Document-isolated packing against plain packing: ``omnitok pretrain`` tokens/s with ``data.isolate_documents`` on
and off, the same config and shards, in one run (isolation adds position ids and a block-diagonal causal mask):
``python -m benchmarks.packing [--config configs/pretrain-tiny-cpu.yaml] [--steps 40] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.pretrain import arguments, measure, synthetic_run_dir


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_run_dir(root)
        rates = {}
        for rep in range(args.repeats):  # alternated, so drift on a shared machine hits both
            for isolate in (True, False):
                _, rate, _ = measure(root, f"{isolate}-{rep}", args.config, args.steps,
                                     [*args.overrides, f"data.isolate_documents={str(isolate).lower()}"])
                rates.setdefault(isolate, []).append(rate)
    best = {k: max(v) for k, v in rates.items()}
    print(f"packing, best of {args.repeats} alternated runs: isolated {best[True]:.0f} tokens/s, plain "
          f"{best[False]:.0f} tokens/s, ratio {best[True] / best[False]:.3f}")
    return {"isolated": best[True], "plain": best[False], "ratio": best[True] / best[False]}


def main(argv: list[str] | None = None) -> dict:
    parser = arguments("python -m benchmarks.packing", __doc__)
    parser.add_argument("--repeats", type=int, default=2)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
