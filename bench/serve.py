"""
bench/serve.py: serve.py under N concurrent streaming clients, batched against one-at-a-time.

    OMP_NUM_THREADS=1 python bench/serve.py                       # N = 1 2 4 8 16, 64 tokens each
    python bench/serve.py --clients 1 8 --tokens 128 --preset tiny

For each engine (--max-batch 1, the one-at-a-time FIFO, and --max-batch 16, continuous
batching) a real `python serve.py` process (and its engine process, unless --single-process)
is started on loopback with a random-weight model of --preset (a 512-token tokenizer trained
on the test fixture, so nothing is downloaded). N clients then each stream one /v1/completions answer of exactly
--tokens tokens at once (a base checkpoint, sampled with a fixed seed per client, so no
answer stops early; checked through usage). Reported per N: aggregate tokens/s (all
tokens / wall time of the round), time to first token p50/p95, and the gap between a
client's consecutive tokens p50/p95, and the slowest GET /health during the round (the
product's bound is 1 s). Nothing is sent before all clients are connected.

Both servers run for the whole benchmark and the rounds alternate between them
(engine 1, engine N, engine 1, ...), --repeat times per client count, and the median
round is reported: on a shared machine whose load drifts, measuring one engine first
and the other minutes later would compare the load, not the engines.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_checkpoint(folder: Path, preset: str, sequence_len: int, tokenizer: str | None = None) -> Path:
    import dataclasses
    import torch
    import gpt
    import common
    from tok import Tokenizer
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        lines = [l for l in (ROOT / "tests/fixtures/german.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
        tok = Tokenizer.train(lines * 3, vocab_size=512, show_progress=False)
    config = gpt.preset(preset, tok.vocab_size, sequence_len)
    torch.manual_seed(0)
    model = gpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    state = dict(model=model.state_dict(), model_config=dataclasses.asdict(config), tokenizer_json=tok.to_json(),
                 kind="base", step=1, tokens=0)
    return common.save_checkpoint(folder, 1, state, keep_last=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch: int, tokens: int, log, flags=()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--device", "cpu",
                             "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "64",
                             "--max-tokens", str(tokens), "--log-level", "warning", *flags],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("error: serve.py did not start")


def client(port: int, seed: int, tokens: int, go: threading.Barrier, out: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": f"Es war einmal ein Schnack Nummer {seed}", "max_tokens": tokens, "temperature": 1.0,
                       "top_k": 0, "seed": seed, "stream": True, "stream_options": {"include_usage": True}})
    go.wait()
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    times, usage = [], None
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        elif event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
    conn.close()
    out.update(start=start, times=times, end=time.perf_counter(), tokens=usage["completion_tokens"] if usage else 0)


def percentile(values, q):
    """The q-quantile, interpolated between neighbours (numpy's default): p50 of two values is their mean."""
    if not values:
        return float("nan")
    values, x = sorted(values), q * (len(values) - 1)
    low = int(x)
    return values[low] + (values[min(low + 1, len(values) - 1)] - values[low]) * (x - low)


def round_of(port: int, n: int, tokens: int) -> dict:
    results = [{} for _ in range(n)]
    go = threading.Barrier(n)
    threads = [threading.Thread(target=client, args=(port, 1000 + i, tokens, go, results[i])) for i in range(n)]
    done, slowest = threading.Event(), [0.0]

    def watch_health():  # the server must stay responsive while it generates
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not done.is_set():
            start = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            slowest[0] = max(slowest[0], time.perf_counter() - start)
            done.wait(0.05)
        conn.close()

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    short = sum(r["tokens"] < tokens for r in results)
    return dict(n=n, tok_s=total / wall, ttft50=percentile(ttft, .5), ttft95=percentile(ttft, .95),
                gap50=percentile(gaps, .5), gap95=percentile(gaps, .95), short=short, health=slowest[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--tokens", type=int, default=64, help="per client (default %(default)s)")
    p.add_argument("--preset", default="tiny", help="gpt.py preset of the random model (default %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="--max-batch of the batched engine (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="rounds per engine and client count; the median is "
                                                         "reported (default %(default)s)")
    p.add_argument("--single-process", action="store_true", help="run both servers with --single-process (the model "
                                                                   "in serve.py's process, as before the engine process)")
    p.add_argument("--tokenizer", help="a tokenizer folder (e.g. the demo's, 8,192 tokens): the random model gets its "
                                       "vocabulary (default: 512 tokens trained on the test fixture)")
    args = p.parse_args()
    if args.batch < 2:
        p.error("--batch must be at least 2: the table compares the batched engine with one at a time")
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    checkpoint = make_checkpoint(folder, args.preset, sequence_len=512, tokenizer=args.tokenizer)
    engines = (1, args.batch)
    servers = {}
    try:
        for max_batch in engines:
            servers[max_batch] = start_server(checkpoint, max_batch, args.tokens, open(folder / f"serve_{max_batch}.log", "w"),
                                              ["--single-process"] * args.single_process)
            round_of(servers[max_batch][1], 2, 8)  # warm-up
        rounds = {}
        for n in args.clients:
            for _ in range(args.repeat):
                for max_batch in engines:  # alternating, so both see the same machine
                    r = round_of(servers[max_batch][1], n, args.tokens)
                    rounds.setdefault((max_batch, n), []).append(r)
                    print(f"--max-batch {max_batch:2d}  N={n:2d}  {r['tok_s']:7.1f} tok/s  ttft p50 "
                          f"{r['ttft50']*1e3:6.0f} ms p95 {r['ttft95']*1e3:6.0f} ms  token gap p50 {r['gap50']*1e3:5.1f} "
                          f"ms p95 {r['gap95']*1e3:5.1f} ms  /health max {r['health']*1e3:4.0f} ms"
                          + (f"  ({r['short']} answers short)" if r["short"] else ""), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    table = {key: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for key, rs in rounds.items()}  # median round
    print("\n| N | one-at-a-time tok/s | batched tok/s | speed-up | TTFT p50/p95 (1) | TTFT p50/p95 (batched) "
          "| token gap p50/p95 (1) | token gap p50/p95 (batched) | slowest /health (1 / batched) |\n"
          + "|---:|---:|---:|---:|---|---|---|---|---|")
    for n in args.clients:
        a, b = table[1, n], table[args.batch, n]
        ms = lambda x, y: f"{x*1e3:.0f} / {y*1e3:.0f} ms"
        print(f"| {n} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {b['tok_s'] / a['tok_s']:.1f}x | {ms(a['ttft50'], a['ttft95'])} "
              f"| {ms(b['ttft50'], b['ttft95'])} | {ms(a['gap50'], a['gap95'])} | {ms(b['gap50'], b['gap95'])} "
              f"| {ms(a['health'], b['health'])} |")


if __name__ == "__main__":
    main()
