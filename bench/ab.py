"""
Paired A/B of the chat and serving decode paths between this checkout and another one, on a
shared machine whose load drifts: both run side by side and take turns, block by block.

    git worktree add /tmp/base e74fc45        # or: git archive e74fc45 | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python bench/ab.py decode --base /tmp/base --rounds 10
    OMP_NUM_THREADS=1 python bench/ab.py serve --base /tmp/base --clients 8 --rounds 6

decode: one long-lived worker process per checkout, each with its own modules, models and
caches; the driver asks them for one block at a time, in turn (the order reversed every
round), so no block of one runs while the other's does, and a burst of load hits both alike.
Blocks: 20 decode steps on top of 128, 512 and 2,048 cached tokens (tiny preset, vocabulary
32,768, cache of L + 256, as bench/chat.py), 40 tokens of GPT.generate on the demo's shape
(tiny, vocabulary 8,192, context 256, a 100-token prompt), a 500-token prompt's first
token, and 20 steps of session.decode for 8 rows of 12 to 75 tokens in a 16-row cache
(bench/serve.py's model, as serve.py's batched engine decodes). Reported: medians of wall and CPU (process) time per token, and the median of the
paired ratios new/base. Each checkout decodes as its own chat does (GPT.decode if it has it,
else a forward of one token on the cache).

serve: serve.py processes for both checkouts and each --max-batch (default 1 and 16) at once, N
clients streaming --tokens tokens each from each server in turn, as bench/serve.py does for one checkout.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, sys, time
sys.path.insert(0, ".")
import torch, gpt
torch.set_grad_enabled(False)
new_api = hasattr(gpt.GPT, "decode")

def model_of(vocab, seq_len):
    torch.manual_seed(0)
    m = gpt.GPT(gpt.preset("tiny", vocab, seq_len)).eval()
    for p in m.parameters():
        p.normal_(0, 0.02)
    return m

big, demo = model_of(32768, 2048), model_of(8192, 256)
caches, logits = {}, {}
for L in (128, 512, 2048):
    caches[L] = big.new_kv_cache(1, max_len=L + 256)
    logits[L] = big(torch.randint(0, 32768, (1, L), generator=torch.Generator().manual_seed(L)), kv_cache=caches[L])[:, -1]
demo_cache = demo.new_kv_cache(1, max_len=257)
demo_prompt = torch.randint(0, 8192, (100,), generator=torch.Generator().manual_seed(2)).tolist()
ttft_prompt = torch.randint(0, 32768, (1, 500), generator=torch.Generator().manual_seed(1))

def decode(L, n=20):
    cache = caches[L]
    for _ in range(n):
        if cache.pos == cache.max_len:
            cache.truncate(L)
        token = logits[L].argmax(-1, keepdim=True)
        logits[L] = big.decode(token, cache) if new_api else big(token, kv_cache=cache)[:, -1]
    return n

def generate():
    demo_cache.truncate(0)
    return sum(1 for _ in demo.generate(demo_prompt, 40, temperature=0, kv_cache=demo_cache))

def first_token():
    cache = big.new_kv_cache(1, max_len=501)
    gpt.sample_next_token(big(ttft_prompt, kv_cache=cache)[:, -1], temperature=0.6, top_k=50).item()
    return 1

import session
server = model_of(512, 512)  # bench/serve.py's model: tiny preset, 512-token vocabulary
rows = session.batch_cache(server, 16, 512) if hasattr(session, "batch_cache") else session.BatchCache(server, 16, 512)
prompts = [torch.randint(0, 512, (12 + 9 * i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
session.prefill(server, rows, 0, [0] * 8, prompts)
row_tokens = [1] * 8

def batch(n=20):
    for i in range(8):  # back to the prompts: the rows sit at 12, 21, ..., 75 tokens
        rows.set_length(i, len(prompts[i])) if hasattr(rows, "set_length") else rows.lengths.__setitem__(i, len(prompts[i]))
    for _ in range(n):
        session.decode(server, rows, row_tokens)
    return n

blocks = {"decode@128": lambda: decode(128), "decode@512": lambda: decode(512), "decode@2048": lambda: decode(2048),
          "generate": generate, "first token (500-token prompt)": first_token, "batch of 8 rows (per step)": batch}
for block in blocks.values():
    block()  # warm-up
print(json.dumps(list(blocks)), flush=True)
for line in sys.stdin:
    wall, cpu = time.perf_counter(), time.process_time()
    n = blocks[line.strip()]()
    print(json.dumps({"n": n, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)
'''


def paired(base: list[float], new: list[float]) -> str:
    return (f"base {statistics.median(base):.2f}, new {statistics.median(new):.2f}, "
            f"paired new/base {statistics.median(n / b for b, n in zip(base, new)):.3f}")


def decode_ab(base: Path, rounds: int) -> None:
    trees = {"base": base, "new": ROOT}
    workers = {k: subprocess.Popen([sys.executable, "-c", WORKER], cwd=tree, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for k, tree in trees.items()}
    names = [json.loads(w.stdout.readline()) for w in workers.values()][0]
    times = {(k, n): [] for k in trees for n in names}
    loads = []
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for name in names:
            for k in (("base", "new") if r % 2 == 0 else ("new", "base")):
                workers[k].stdin.write(name + "\n")
                workers[k].stdin.flush()
                times[k, name].append(json.loads(workers[k].stdout.readline()))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    print(f"{rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})")
    print("| block | wall ms per token | CPU ms per token |\n|---|---|---|")
    for name in names:
        cells = [paired(*([t[m] / t["n"] * 1e3 for t in times[k, name]] for k in ("base", "new")))
                 for m in ("wall", "cpu")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def checkpoint_of(base: Path, folder: Path) -> Path:
    """bench/serve.py's checkpoint, written by the base checkout's code: a newer checkout reads an older
    model config (fields it added take their defaults), an older one cannot read a newer config."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, '.'); from bench.serve import make_checkpoint; "
            "print(make_checkpoint(Path(sys.argv[1]), 'tiny', sequence_len=512))")
    run = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=base, capture_output=True, text=True, check=True)
    return Path(run.stdout.split()[-1])


def serve_ab(base: Path, rounds: int, clients: int, tokens: int, engines: list[int]) -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)
    folder = Path(tempfile.mkdtemp(prefix="ab_serve_"))
    checkpoint = checkpoint_of(base, folder)
    servers = {}
    try:
        for name, tree in (("base", base), ("new", ROOT)):
            for max_batch in engines:
                bench_serve.ROOT = tree  # start_server runs that checkout's serve.py
                servers[name, max_batch] = bench_serve.start_server(
                    checkpoint, max_batch, tokens, open(folder / f"serve_{name}_{max_batch}.log", "w"))
                bench_serve.round_of(servers[name, max_batch][1], 2, 8)  # warm-up
        results = {key: [] for key in servers}
        loads = []
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            for key in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                results[key].append(bench_serve.round_of(servers[key][1], clients, tokens))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    print(f"N = {clients} clients, {tokens} tokens each, {rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f}")
    print("| engine | tokens/s | TTFT p50 (s) | token gap p50 (s) |\n|---|---|---|---|")
    for max_batch in engines:
        cells = [paired(*([r[m] for r in results[k, max_batch]] for k in ("base", "new")))
                 for m in ("tok_s", "ttft50", "gap50")]
        print(f"| --max-batch {max_batch} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "serve"])
    p.add_argument("--base", required=True, type=Path, help="the other checkout (e.g. a worktree of the base commit)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=8, help="serve: concurrent clients")
    p.add_argument("--tokens", type=int, default=64, help="serve: tokens per client")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 16], help="serve: the engines (default 1 16)")
    args = p.parse_args()
    if not (args.base / "gpt.py").is_file():
        p.error(f"--base {args.base} is not a nanoschnack checkout (no gpt.py)")
    if min(args.rounds, args.clients, args.tokens, *args.max_batch) < 1:
        p.error("--rounds, --clients, --tokens and --max-batch must be at least 1")
    if args.what == "decode":
        decode_ab(args.base, args.rounds)
    else:
        serve_ab(args.base, args.rounds, args.clients, args.tokens, args.max_batch)


if __name__ == "__main__":
    main()
