"""
Benchmark chat decoding: tokens/s with the KV cache against recomputing the whole
context for every new token, and the time to the first token.

    python bench/chat.py                                   # tiny preset, vocab 32768, CPU (+ CUDA if present)
    python bench/chat.py --preset d12 --device cuda

At each context length L (128, 512, 2048) the model holds L random tokens and
decodes greedily one token at a time:
- cache: L tokens prefilled once (not timed), then one decode step (GPT.decode) per
  token on top of the KV cache, as chat.py decodes: compiled where chat.py compiles it
  (gpt.compile_wanted: on CUDA, or with NANOSCHNACK_COMPILE_DECODE=1), else eager;
- recompute: one forward over all L + i tokens per step, logits of the last
  position taken (generation without a cache). GPT.forward puts every position
  through lm_head;
- recompute, last lm_head: the same, but only the last position goes through
  lm_head (nanoGPT's trick), the stricter baseline. The speedup is against it.
TTFT: a 500-token prompt into an empty cache, one forward, the first token
sampled (what chat.py does for a new conversation of that length); median of runs.
Random weights: speed does not depend on them. Goal: cache >= 5x at 512 tokens.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds gpt.py

import torch

import gpt


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_model(preset: str, vocab_size: int, sequence_len: int, device) -> gpt.GPT:
    torch.manual_seed(0)
    model = gpt.GPT(gpt.preset(preset, vocab_size=vocab_size, sequence_len=sequence_len)).to(device)
    with torch.no_grad():  # init_weights zeroes the output projections; fill them like trained weights
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def last_logits_lm_head_once(model: gpt.GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT.forward without a cache, but only the last position through lm_head (the model's own trunk, so
    every part of its recipe runs)."""
    T = idx.shape[1]
    x = model.trunk(idx, model.cos[:, :T], model.sin[:, :T])
    return gpt.SOFTCAP * torch.tanh(model.lm_head(x[:, -1:]) / gpt.SOFTCAP)


class Timer:
    def __init__(self, device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def decode_rate(step, timer: Timer, min_steps: int, min_seconds: float) -> tuple[float, int]:
    """Tokens/s of step() (one new token each), after one warm-up step; run until both minimums are met."""
    step()
    start, n = timer.now(), 0
    while n < min_steps or timer.now() - start < min_seconds:
        step()
        n += 1
    return n / (timer.now() - start), n


def bench_context(model, L: int, device, args) -> dict:
    """Median tokens/s of each way to decode at context L, over args.repeats interleaved rounds."""
    timer = Timer(device)
    g = torch.Generator(device="cpu").manual_seed(L)
    context = torch.randint(0, model.config.vocab_size, (1, L), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rates = {"cache": [], "recompute": [], "recompute_last": []}
    with torch.inference_mode(), autocast:
        cache = model.new_kv_cache(1, max_len=L + 256)
        if gpt.compile_wanted(device):
            gpt.compile_decode(model, cache)
        state = {}

        def cached_step():  # one token on top of the cache
            if cache.pos == cache.max_len:  # roll back: the context stays between L and L + 256
                cache.truncate(L)
            next_id = state["logits"].argmax(dim=-1, keepdim=True)
            state["logits"] = model.decode(next_id, cache)

        def full_step(forward):  # the whole context for every token
            next_id = forward(state["ids"]).argmax(dim=-1, keepdim=True)
            state["ids"] = torch.cat([state["ids"], next_id], dim=1)

        for _ in range(args.repeats):  # interleaved, so that a burst of load on a shared machine hits all alike
            cache.reset()
            state["logits"] = model(context, kv_cache=cache)[:, -1]  # prefill, not timed
            rates["cache"].append(decode_rate(cached_step, timer, args.min_steps, args.min_seconds)[0])
            for name, forward in (("recompute", lambda ids: model(ids)[:, -1]),
                                  ("recompute_last", lambda ids: last_logits_lm_head_once(model, ids)[:, -1])):
                state["ids"] = context
                rates[name].append(decode_rate(lambda: full_step(forward), timer, args.min_recompute_steps,
                                               args.min_seconds)[0])
    return {"L": L, **{name: statistics.median(r) for name, r in rates.items()}}


def time_to_first_token(model, prompt_len: int, device, runs: int, last_only: bool = False) -> list[float]:
    """Seconds from a prompt to its first sampled token with a fresh cache, as chat.py does (after a warm-up).

    last_only: what it would take if GPT.forward put only the last position through lm_head."""
    timer = Timer(device)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(runs + 1):  # the first run warms up
            start = timer.now()
            cache = model.new_kv_cache(1, max_len=prompt_len + 1)
            if last_only:
                logits = last_logits_lm_head_once(model, prompt.to(device))[:, -1]
            else:
                logits = model(prompt.to(device), kv_cache=cache)[:, -1]
            gpt.sample_next_token(logits, temperature=0.6, top_k=50).item()
            if i:
                times.append(timer.now() - start)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="gpt.py preset: nano, tiny, d12, ... (default tiny)")
    p.add_argument("--vocab-size", type=int, default=32768, help="tok.py's default vocabulary")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--min-steps", type=int, default=32, help="decode steps with the cache, at least")
    p.add_argument("--min-recompute-steps", type=int, default=4, help="decode steps recomputing, at least")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is shown")
    p.add_argument("--ttft-prompt", type=int, default=500)
    p.add_argument("--ttft-runs", type=int, default=5)
    args = p.parse_args()
    if min(args.repeats, args.ttft_runs, args.min_steps, args.min_recompute_steps) < 1 or args.preset not in gpt.PRESETS:
        p.error(f"--repeats, --ttft-runs and the step counts must be at least 1, --preset one of {', '.join(gpt.PRESETS)}")
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    for name in devices:
        device = torch.device(name)
        model = make_model(args.preset, args.vocab_size, max(max(args.contexts), args.ttft_prompt), device)
        c = model.config
        where = torch.cuda.get_device_name(device) + ", bf16 autocast" if device.type == "cuda" else "CPU, fp32"
        where += ", decode step compiled" if gpt.compile_wanted(device) else ", decode step eager"
        print(f"\n### {name}: {where}; preset {args.preset} ({c.n_layer} layers, width {c.n_embd}, "
              f"{c.n_head} heads), vocab {c.vocab_size}, {model.num_params() / 1e6:.1f}M parameters\n")
        print("| context | tok/s with KV cache | tok/s recompute (forward as is) "
              "| tok/s recompute (lm_head on last only) | speedup vs. the latter |")
        print("|---:|---:|---:|---:|---:|")
        for L in args.contexts:
            r = bench_context(model, L, device, args)
            print(f"| {L} | {r['cache']:,.1f} | {r['recompute']:,.2f} | {r['recompute_last']:,.2f} "
                  f"| {r['cache'] / r['recompute_last']:,.1f}x |", flush=True)
        print(f"\n(median of {args.repeats} interleaved rounds, each at least {args.min_seconds:g} s and "
              f"{args.min_steps} / {args.min_recompute_steps} tokens)")
        for last_only in (False, True):
            ttft = time_to_first_token(model, args.ttft_prompt, device, args.ttft_runs, last_only)
            how = ("if only the last position went through lm_head" if last_only
                   else "as chat.py prefills (GPT.forward: every position through lm_head)")
            print(f"\nTTFT, {args.ttft_prompt}-token prompt, {how}: median {statistics.median(ttft) * 1000:,.1f} ms "
                  f"(min {min(ttft) * 1000:,.1f}, max {max(ttft) * 1000:,.1f}, {len(ttft)} runs)")


if __name__ == "__main__":
    main()
