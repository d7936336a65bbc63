"""Peak memory of the chunked cross-entropy's forward and backward against the same function over all rows at once,
each in a fresh process: ``python -m benchmarks.loss [--batch 8] [--seq 1024] [--vocab 65536]``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_LOSS_PROBE = """
import json, resource, sys, time, torch
from omnitok.model.loss import LossConfig, lm_loss
from omnitok.tokenizers.layout import TokenLayout
rows, vocab, chunk = (int(a) for a in sys.argv[1:4])
layout = TokenLayout(text_vocab_size=vocab - 64)
torch.manual_seed(0)
logits = torch.randn(1, rows, layout.vocab_size, dtype=torch.bfloat16).requires_grad_()
labels = torch.randint(0, layout.text_vocab_size, (1, rows))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
loss, _ = lm_loss(logits, labels, layout, LossConfig(chunk_rows=chunk))
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - base) / 1024, "seconds": seconds, "loss": loss.item()}))
"""


def run(args: argparse.Namespace) -> dict:
    """Peak memory of the loss's forward and backward beyond the bf16 logits themselves: chunked cross-entropy vs
    the same function over all rows at once (the memory profile of the version before chunking, which kept a full
    fp32 copy), each in a fresh process (peak resident set)."""
    rows = args.batch * args.seq
    results = {}
    for name, chunk in (("whole", rows), ("chunked", args.chunk)):
        out = subprocess.run([sys.executable, "-c", _LOSS_PROBE, str(rows), str(args.vocab), str(chunk)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mb = rows * (args.vocab // 64 * 64 + 64) * 2 / 2**20
    ratio = results["chunked"]["extra_mb"] / results["whole"]["extra_mb"]
    c, w = results["chunked"], results["whole"]
    print(f"loss on bf16 logits {args.batch}x{args.seq}x{args.vocab} ({logits_mb:.0f} MB): peak extra memory "
          f"chunked ({args.chunk} rows) {c['extra_mb']:.0f} MB, whole {w['extra_mb']:.0f} MB -> ratio {ratio:.2f}; "
          f"time {c['seconds']:.2f} s vs {w['seconds']:.2f} s; loss {c['loss']:.6f} vs {w['loss']:.6f}")
    return {**results, "ratio": ratio}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=1024)
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
