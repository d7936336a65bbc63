"""`omnitok serve` under load: N concurrent clients on loopback against a model (the demo's instruction-tuned one by
default), throughput with continuous batching vs the same requests one at a time, p50 / p95 latency, time to first
token, requests lost: ``python -m benchmarks.serve [--model omnitok-demo/sft/export] [--clients 8]``.

Each client sends its share of a fixed mix (pictures, sounds, captions asked for in chat, streamed so that the first
content chunk times the first token); the sequential baseline is the same requests, in the same order, by one client.
Both runs hit the same server process, so the model, the settings and the machine are the same; the ratio of the two
throughputs is what continuous batching buys."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REQUESTS = ["Draw a red circle.", "Could you show me a small blue square?", "Play a rising chirp.",
            "Paint a yellow triangle.", "Play a low tone.", "Show me a green circle."]


async def one(client, url: str, text: str, seed: int, max_tokens: int) -> dict:
    """One streamed chat request: latency, time to its first content chunk (text, or a whole decoded picture or
    sound: the server's metrics time the first token), the pictures and sounds it got."""
    body = {"messages": [{"role": "user", "content": text}], "seed": seed, "stream": True, "max_tokens": max_tokens}
    start = time.perf_counter()
    first, images, sounds, finish = None, 0, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                content = choice["delta"].get("content")
                if content and first is None:
                    first = time.perf_counter() - start
                if isinstance(content, list):
                    images += sum(p["type"] == "image_url" for p in content)
                    sounds += sum(p["type"] == "audio" for p in content)
                finish = choice.get("finish_reason") or finish
    except Exception:  # a lost request, counted
        return {"ok": False}
    return {"ok": finish is not None, "latency": time.perf_counter() - start, "ttft": first or 0.0,
            "images": images, "sounds": sounds}


async def load(url: str, jobs: list[tuple[str, int]], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []

    async def client_loop(client):
        while not queue.empty():
            text, seed = queue.get_nowait()
            results.append(await one(client, url, text, seed, max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results, time.perf_counter() - start


def server_counts(url: str) -> dict[str, float]:
    """The server's own counters: tokens generated, and time to first token (sum, count)."""
    import httpx

    return {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
            if not line.startswith("#")}


def summary(name: str, results: list[dict], seconds: float, before: dict, after: dict) -> dict:
    done = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in done) or [0.0]
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = delta["omnitok_tokens_generated_total"]
    ttft = delta["omnitok_time_to_first_token_seconds_sum"] / max(delta["omnitok_time_to_first_token_seconds_count"], 1)
    out = {"requests": len(results), "lost": len(results) - len(done), "seconds": seconds,
           "tokens_per_s": tokens / seconds, "images_per_s": sum(r["images"] for r in done) / seconds,
           "sounds_per_s": sum(r["sounds"] for r in done) / seconds,
           "p50_latency": statistics.median(lat), "p95_latency": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
           "p50_first_content": statistics.median([r["ttft"] for r in done] or [0.0]), "mean_ttft": ttft,
           "tokens_per_pass": tokens / max(delta["omnitok_forward_passes_total"], 1),
           "drafts_accepted": delta["omnitok_sjd_accepted_total"] / max(delta["omnitok_sjd_drafts_total"], 1)}
    print(f"{name:<12} {out['requests']} requests in {seconds:6.1f} s: {out['tokens_per_s']:7.1f} tokens/s, "
          f"{out['images_per_s']:.2f} images/s, {out['sounds_per_s']:.2f} sounds/s, latency p50 "
          f"{out['p50_latency']:.2f} s p95 {out['p95_latency']:.2f} s, first token {ttft:.3f} s (mean, server), "
          f"first content p50 {out['p50_first_content']:.2f} s, lost {out['lost']}; "
          f"{out['tokens_per_pass']:.2f} tokens per forward pass, {out['drafts_accepted']:.0%} of SJD drafts accepted",
          flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from test_serve_api import running_server  # the tests' way to start a real server process

    jobs = [(REQUESTS[i % len(REQUESTS)], i) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp, running_server(
            args.model, Path(tmp), "--max-rows", str(args.clients), "--max-new-tokens", str(args.max_tokens),
            *args.settings) as (url, _):
        asyncio.run(load(url, jobs[: args.clients], args.clients, args.max_tokens))  # warm-up
        out = {}
        for name, clients in (("sequential", 1), (f"{args.clients} clients", args.clients)):
            before = server_counts(url)
            results, seconds = asyncio.run(load(url, jobs, clients, args.max_tokens))
            out[name] = summary(name, results, seconds, before, server_counts(url))
        ratio = out[f"{args.clients} clients"]["tokens_per_s"] / out["sequential"]["tokens_per_s"]
        print(f"continuous batching / one at a time: {ratio:.2f}x tokens/s (goal >= 3 at 8 clients)")
        out["ratio"] = ratio
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("omnitok-demo/sft/export"),
                        help="a served model (default: the demo's instruction-tuned export)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("settings", nargs="*", help="sampling settings for the server, e.g. image.guidance=3")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model directory; run `omnitok demo` first or give --model")
    run(args)


if __name__ == "__main__":
    main()
