"""
bench/data.py: packed tokens/s of the pretraining loader (dataloader.PretrainBatches).

    python bench/data.py [--data-dir ../shared/data] [--tokenizer out/tokenizer]

Reads all eight German sample sources (parquet, mixed by weight), tokenizes,
packs (B, T+1) blocks, and reports packed tokens/s per process for: one process
without a prefetch thread, one with one, and two processes at once (two ranks
of a simulated DDP run, each reading its own shard). The goal is >= 1M packed
tokens/s per process on a 2-core machine; one H100 at d20 consumes ~150K/s.
Without --tokenizer it first trains a 32768-token tokenizer on 20M characters.
"""
import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import dataloader  # noqa: E402
from tok import Tokenizer  # noqa: E402


def source_specs(data_dir: Path) -> list[str]:
    return [f"parquet://{d}/train-*.parquet" for d in sorted((data_dir / "pretrain").iterdir()) if d.is_dir()]


def measure(specs, tokenizer_dir, batch_size, seq_len, seconds, prefetch=0, rank=0, world_size=1, result=None):
    tokenizer = Tokenizer.load(tokenizer_dir)
    loader = dataloader.PretrainBatches(data.parse_specs(specs), tokenizer, batch_size, seq_len,
                                  rank=rank, world_size=world_size, prefetch=prefetch)
    batches = iter(loader)
    next(batches)  # opening the sources is start-up cost, not throughput
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        inputs, _ = next(batches)
        tokens += inputs.numel()
    rate = tokens / (time.perf_counter() - start)
    if result is not None:
        result[rank] = rate
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("NANOSCHNACK_DATA", "../shared/data"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per setting")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    if not (data_dir / "pretrain").is_dir():
        sys.exit(f"error: no sample data at {data_dir}; pass --data-dir or set NANOSCHNACK_DATA")
    specs = source_specs(data_dir)
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = "out/bench-tokenizer"
        if not Path(tokenizer_dir, "tokenizer.json").exists():
            import tok
            tok.main(["--data", *specs, "--vocab-size", "32768", "--max-chars", "20M", "--out", tokenizer_dir])
    shape = (args.batch_size, args.seq_len)
    rows = [("1 process, no prefetch", measure(specs, tokenizer_dir, *shape, args.seconds)),
            ("1 process, prefetch thread", measure(specs, tokenizer_dir, *shape, args.seconds, prefetch=4))]
    spawn = mp.get_context("spawn")  # forking after the tokenizer's threads start would hang them
    with spawn.Manager() as manager:
        result = manager.dict()
        procs = [spawn.Process(target=measure, args=(specs, tokenizer_dir, *shape, args.seconds, 4, r, 2, result))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        rows.append(("2 processes (2 ranks) at once, prefetch, per process", sum(result.values()) / 2))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, no GPU needed; python {platform.python_version()}")
    print(f"batch {args.batch_size}x{args.seq_len}, 8 German sample sources mixed, tokenizer {tokenizer_dir}\n")
    print("| setting | packed tokens/s per process |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
