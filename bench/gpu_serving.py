"""
Chat and serving on one GPU (issue 26): the decode step, and the whole pipeline as a user runs it.

    python bench/gpu_serving.py                          # both sections on CUDA, markdown rows as they come
    python bench/gpu_serving.py --sections decode --quick
    python bench/gpu_serving.py --smoke                  # CPU, toy sizes: only that every row comes out
                                                         # (tests/test_kernels_bench_gpu.py, through bench/gpu.py)

bench/gpu.py runs the two sections as its sections decode and pipeline (each in its own process with a
time limit, as all of them). Each prints a markdown table, one row per case as it finishes; a case that fails is one row
saying so, and the others still run.

decode: d12 and d20 (--quick: d12), random weights, vocabulary 65,536, context 2,048, loaded
as chat.py and serve.py load a model (session.load_session on a checkpoint written here:
linear weights in bf16, the decode step compiled with CUDA graphs and warmed up at load):
  load             seconds for load_session, and of it compiling the decode step
  first token      the first request after load: 16-token prompt to its first token (target < 1 s)
  batch 1, greedy  tokens/s after the first token, 256 new tokens, first and second answer
                   (target for d20: at least 1,000)
  batch 1, eager   the same on a cache whose step is not compiled (NANOSCHNACK_COMPILE_DECODE=0)
  equal tokens     the compiled step's greedy tokens against the eager step's (correctness)
  engine           engine.BatchEngine with 32 requests of 128 tokens at once (aggregate tokens/s,
                   its compile at start) against engine.Engine answering them one at a time
                   (target: at least 10x), and whether each batched answer is the one-at-a-time one

pipeline: the stage scripts in subprocesses, on local data, each stage one row with its wall
time and what it produced:
  tokenizer        python tok.py --data <pretrain parquet> --vocab-size 32768 (--quick: 8192)
  pretraining      torchrun --standalone --nproc_per_node=1 train.py --preset d12, 60 steps
                   (--quick: 20) of 16 x 2048 tokens, evaluation and a checkpoint at the end
  SFT              python sft.py --preset full, 30 steps (--quick: 10) on the local conversations
  evaluation       python evaluation.py --tasks bpb: bits per byte on held-out German text
  chat             python chat.py --prompt "Wer bist du?": one greedy answer
  serve            python serve.py --max-batch 8, then 4 concurrent streamed chat requests

Where the data comes from: --data DIR, else $NANOSCHNACK_DATA: a folder laid out as the sample data
(pretrain/<source>/train-*.parquet and val.parquet, sft/*.jsonl with sft/val.jsonl held out,
optionally eval/ud_gsd_dev.txt; README, "Data"). In the nanoschnack workspace that is
../shared/data: copy it to the GPU machine. --smoke writes a tiny folder of its own.

What the GPU machine needs besides torch and triton: the project's dependencies (datasets and
pyarrow for the local parquet files, tokenizers, tiktoken, numpy, safetensors) and, for the serve
row, fastapi and uvicorn: `pip install -e ".[web]"` (without torch's pin, keep the image's torch:
`pip install --no-deps -e . && pip install datasets tokenizers tiktoken numpy safetensors fastapi uvicorn`).
A missing package fails only the rows that need it, naming it.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo root holds gpt.py

import torch

from bench.gpu_runner import one_line  # an error as one line of a table cell

SECTIONS = ["decode", "pipeline"]
FIXTURE_TEXT = ROOT / "tests" / "fixtures" / "german.txt"


def emit(line: str) -> None:
    """Where the rows go: stdout; bench/gpu.py's sections replace it to collect them."""
    print(line, flush=True)


def _row(*cells) -> None:
    """A markdown table row; a "|" inside a cell (the stage scripts' log lines have them) becomes "/"."""
    emit("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")


def _case(name: str, fn, *cells_before, width: int = 3) -> object:
    """Run one case: fn() -> (its `width` cells, a value). Print its row, or one FAILED row (the traceback on
    stderr); return the value, None on failure."""
    try:
        cells, value = fn()
    except Exception as e:
        traceback.print_exc()
        _row(*cells_before, name, f"**FAILED**: `{one_line(e)}`", *[""] * (width - 1))
        return None
    _row(*cells_before, name, *cells)
    return value


def _warm_up_note(cache) -> str:
    """", prefill warmed up in X s" where session.warm_up_prefill ran on this cache (it runs where the step compiles)."""
    seconds = cache.prefill_warm_up_seconds
    return "" if seconds is None else f", prefill warmed up in {seconds:.1f} s"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# decode


def synthetic_tokenizer(vocab_size: int):
    """A tokenizer of exactly vocab_size tokens. The decode rows need the real vocabulary size (lm_head is a
    large part of a decode step), not real text: BPE trained on made-up words, all different, has merges to spare."""
    from tok import Tokenizer
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghklmnprstwz" for v in "aeiouäöü"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(4 * vocab_size)]
    tokenizer = Tokenizer.train([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)], vocab_size,
                                show_progress=False)
    if tokenizer.vocab_size != vocab_size:
        raise RuntimeError(f"the synthetic tokenizer has {tokenizer.vocab_size} tokens, not {vocab_size}")
    return tokenizer


def write_checkpoint(folder: Path, preset: str, tokenizer, sequence_len: int) -> Path:
    """A random-weight checkpoint in train.py's format (speed does not depend on the weights)."""
    import dataclasses
    import common
    import gpt
    config = gpt.preset(preset, tokenizer.vocab_size, sequence_len)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    state = dict(model=model.state_dict(), model_config=dataclasses.asdict(config), tokenizer_json=tokenizer.to_json(),
                 kind="chat", step=1, tokens=0)
    return common.save_checkpoint(folder, 1, state, keep_last=1)


def _greedy(session, prompt: list[int], n: int, cache) -> tuple[list[int], float, float]:
    """n greedy tokens after prompt on an empty `cache` of the session's model: (tokens, seconds to the
    first token, tokens/s after it)."""
    cache.truncate(0)
    _sync(session.device)
    start = time.perf_counter()
    stream = session.model.generate(prompt, n, temperature=0.0, kv_cache=cache)
    tokens = [next(stream)]
    first = time.perf_counter()
    tokens += list(stream)
    _sync(session.device)
    return tokens, first - start, (len(tokens) - 1) / (time.perf_counter() - first)


def _first_difference(a: list[int], b: list[int]) -> str:
    if a == b:
        return f"equal ({len(a)} tokens)"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ from token {i} of {len(a)}"


def _run_jobs(engine, engine_module, prompts: list[tuple[str, list[int]]], sampling, stop_ids,
              timeout: float) -> tuple[list, float]:
    """Submit one job per (text, prompt ids) at once and wait for all to finish: (the jobs, wall seconds)."""
    done = threading.Semaphore(0)
    jobs = []
    for text, ids in prompts:
        events = []
        deliver = lambda event, events=events: (events.append(event), event[0] in engine_module.FINAL and done.release())
        jobs.append(engine_module.Job(ids, sampling, stop_ids=stop_ids, text=text, deliver=deliver))
        jobs[-1].log = events
    start = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        if not done.acquire(timeout=timeout):
            raise TimeoutError(f"the engine did not finish {len(jobs)} requests in {timeout:.0f} s")
    seconds = time.perf_counter() - start
    for job in jobs:
        kind, value = job.log[-1]
        if kind != "done":
            raise RuntimeError(f"a request ended with {kind}: {value}")
    return jobs, seconds


def _engines(session, streams: int, new: int, preset: str) -> None:
    """The batched engine with `streams` requests at once against the one-at-a-time engine, as serve.py runs them
    (without HTTP): completions of `new` greedy tokens that stop only at <|bos|>, as a base model's do."""
    import engine as engine_module
    from session import Sampling
    tok = session.tokenizer
    rng = random.Random(1)
    texts = [" ".join(tok.decode([rng.randrange(300, tok.vocab_size)]) for _ in range(15)) for _ in range(streams)]
    prompts = [(t, [tok.bos_id] + tok.encode(t)) for t in texts]
    sampling = Sampling(temperature=0.0, top_k=None, max_new_tokens=new)
    state = {}

    def batched():
        started = time.perf_counter()
        engine = engine_module.BatchEngine(session.model, tok, session.context_len, streams, float("inf"))
        load = time.perf_counter() - started
        state["batched"], seconds = _run_jobs(engine, engine_module, prompts, sampling, {tok.bos_id}, 1800)
        state["rate"] = sum(len(j.reply.ids) for j in state["batched"]) / seconds
        compiled = (f"compiled for batch sizes {engine.cache.batch_sizes} in {engine.cache.compile_seconds:.1f} s"
                    f"{_warm_up_note(engine.cache)}" if engine.cache.compiled else "not compiled")
        return [f"{state['rate']:,.0f} tokens/s together", "", f"started in {load:.1f} s ({compiled}); "
                f"{streams} requests x {new} tokens"], True

    def alone():
        engine = engine_module.Engine(session, float("inf"))
        state["alone"], seconds = _run_jobs(engine, engine_module, prompts, sampling, {tok.bos_id}, 3600)
        rate = sum(len(j.reply.ids) for j in state["alone"]) / seconds
        ratio = f"; batched {state['rate'] / rate:.1f}x this" if "rate" in state else ""
        return [f"{rate:,.0f} tokens/s{ratio}", ">= 10x", "engine.Engine: the same requests, in turn"], True

    def equal():
        pairs = [(a.reply.ids, b.reply.ids) for a, b in zip(state["batched"], state["alone"])]
        first = next((_first_difference(a, b) for a, b in pairs if a != b), "")
        return [f"{sum(a == b for a, b in pairs)} of {streams} equal", "all", first], True

    _case(f"engine, {streams} streams at once", batched, preset)
    _case("engine, one at a time", alone, preset)
    _case("engine: batched answers = one at a time", equal, preset)


def decode_section(quick: bool, smoke: bool = False) -> None:
    """Print the decode rows (module docstring). smoke: on the CPU, the nano model, eager, seconds."""
    from session import Sampling, load_session
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run with --smoke for the CPU smoke run")
    presets = ["nano"] if smoke else ["d12"] if quick else ["d12", "d20"]
    vocab, context = (512, 256) if smoke else (65536, 2048)
    new, engine_new, streams = (24, 16, 4) if smoke else (128 if quick else 256, 128, 32)
    emit("| model | case | result | target | note |\n|---|---|---|---|---|")
    tokenizer = _case("tokenizer", lambda: ([f"{vocab:,} tokens (synthetic)", "", ""],
                                            synthetic_tokenizer(vocab)), "-")
    if tokenizer is None:
        return
    prompt = [tokenizer.bos_id] + list(range(300, 315))  # 16 tokens
    for preset in presets:
        folder = Path(tempfile.mkdtemp(prefix="gpu_serving_"))
        try:
            state = {}

            def load():
                checkpoint = write_checkpoint(folder, preset, tokenizer, context)
                _sync(device)
                started = time.perf_counter()
                state["session"] = s = load_session(str(checkpoint), device, Sampling(temperature=0, top_k=None))
                seconds = time.perf_counter() - started
                compiled = (f"decode step compiled in {s.cache.compile_seconds:.1f} s{_warm_up_note(s.cache)}"
                            if s.cache.compiled
                            else "decode step not compiled")
                return [f"{seconds:.1f} s", "", f"{s.model.num_params() / 1e6:.0f}M parameters; {compiled}; "
                        f"weights {s.model.lm_head.weight.dtype}"], s

            session = _case("load_session", load, preset)
            if session is None:
                continue

            def first_answer():
                state["compiled"], ttft, rate = _greedy(session, prompt, new, session.cache)
                return [f"{ttft:.3f} s", "< 1 s", f"{len(prompt)}-token prompt; then {rate:,.0f} tokens/s"], True

            def answer(cache, name):
                def run():
                    tokens, ttft, rate = _greedy(session, prompt, new, cache)
                    state[name] = tokens
                    target = ">= 1,000 (d20)" if name == "compiled" else ""
                    return [f"{rate:,.0f} tokens/s", target, f"{len(tokens)} tokens; first token {ttft:.3f} s"], True
                return run

            _case("first token after load", first_answer, preset)
            _case("batch 1, greedy (second answer)", answer(session.cache, "compiled"), preset)
            eager = session.model.new_kv_cache(1, session.cache.max_len)
            _case("batch 1, greedy, eager step", answer(eager, "eager"), preset)
            _case("greedy tokens: compiled = eager",
                  lambda: ([_first_difference(state["compiled"], state["eager"]), "equal", ""], True), preset)
            _engines(session, streams, engine_new, preset)
        finally:
            state.clear()
            shutil.rmtree(folder, ignore_errors=True)
            torch._dynamo.reset()  # the next model's graphs are new ones: don't count them against this one's


# ----------------------------------------------------------------------------
# pipeline


def tiny_data_folder(root: Path) -> Path:
    """The sample data's layout with a few German sentences, for --smoke and tests/test_pipeline.py:
    pretrain/<source>/{train-*,val}.parquet, sft/*.jsonl, eval/*.txt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    lines = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    # Documents of three sentences (a row of the micro demo's 129 tokens holds about two, so best-fit rows do
    # not throw most of each away), 200 copies: the demo's SFT mixes in text rows at 45% of its rows, the
    # identity conversations (199 x 40) included, about 6,250 at micro scale after what the base model read,
    # half of them best-fit, a document or two each; 100 copies gave 3,658
    docs = [" ".join((lines + lines)[i:i + 3]) for i in range(len(lines))] * 200
    # Row groups of 1,024: tok.py's --max-chars 50k (the smoke run's) stops inside the first one. In row
    # groups of 32 it stopped in the fifth, and before tok.py closed its half-read stream itself
    # (TrainingText.close) some runs aborted at exit ("terminate called without an active exception")
    for source in ("lexikon", "reden"):
        (root / "pretrain" / source).mkdir(parents=True)
        pq.write_table(pa.table({"text": docs, "source": [source] * len(docs)}),
                       root / "pretrain" / source / "train-00000.parquet", row_group_size=1024)
        pq.write_table(pa.table({"text": docs[:4], "source": [source] * 4}), root / "pretrain" / source / "val.parquet")
    (root / "sft").mkdir()
    conversations = [{"messages": [{"role": "user", "content": f"Satz {i}?"},
                                   {"role": "assistant", "content": lines[i % len(lines)][:60]}]} for i in range(40)]
    for name, rows in (("chat.jsonl", conversations[:32]), ("val.jsonl", conversations[32:])):
        (root / "sft" / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (root / "eval").mkdir()
    (root / "eval" / "ud_gsd_dev.txt").write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
    return root


def _spec(path: Path) -> str:
    return str(path).replace("%", "%25").replace(" ", "%20")


def data_specs(data: Path) -> dict:
    """demo.sh's specs for a data folder: every pretraining source, its validation files, SFT and bits per byte."""
    sources = sorted(p for p in (data / "pretrain").iterdir() if p.is_dir())
    if not sources or not (data / "sft" / "val.jsonl").is_file():
        raise FileNotFoundError(f"{data} is not a data folder (pretrain/<source>/train-*.parquet, sft/val.jsonl)")
    val = [f"parquet://{_spec(s)}/val.parquet" for s in sources if (s / "val.parquet").is_file()]
    bpb = data / "eval" / "ud_gsd_dev.txt"
    return dict(pretrain=[f"parquet://{_spec(s)}/train-*.parquet" for s in sources], val=val,
                sft=f"jsonl://{_spec(data)}/sft/[!v]*.jsonl", sft_val=f"jsonl://{_spec(data / 'sft' / 'val.jsonl')}",
                bpb=[f"txt://{_spec(bpb)}?per=line"] if bpb.is_file() else val)


def _stage(args: list[str], timeout: float, env: dict, log: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run a stage script: (seconds, the finished process). A non-zero exit raises with its last line of output."""
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    log.write_text(" ".join(args) + "\n\n" + proc.stdout + "\n" + proc.stderr, encoding="utf-8")
    if proc.returncode:
        last = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit {proc.returncode}: {last[0][:200]} (log: {log})")
    return seconds, proc


def _last_line_with(output: str, word: str) -> str:
    return next((l.strip() for l in reversed(output.splitlines()) if word in l), "")[:160]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_chat(port: int, text: str, max_tokens: int, out: dict) -> None:
    """One streamed /v1/chat/completions request: time to the first piece, pieces, completion tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    out.update(status=response.status, first=None, text="", tokens=0)
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            out["tokens"] = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            out["first"] = out["first"] or time.perf_counter() - start
            out["text"] += event["choices"][0]["delta"]["content"]
    out["seconds"] = time.perf_counter() - start
    conn.close()


def _serve(work: Path, device: str, env: dict, streams: int, max_tokens: int) -> tuple[list, bool]:
    """serve.py on the chat checkpoint (engine process, --max-batch 8), and `streams` streamed requests at once."""
    port = _free_port()
    log = open(work / "serve.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(work / "chat"), "--device", device,
                             "--port", str(port), "--max-batch", "8", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {proc.returncode} (log: {work / 'serve.log'})")
            if time.perf_counter() - started > 900:
                raise TimeoutError("serve.py was not ready in 900 s")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - started
        results = [{} for _ in range(streams)]
        threads = [threading.Thread(target=_stream_chat, args=(port, f"Erzähl mir etwas über Nummer {i}.", max_tokens,
                                                               results[i])) for i in range(streams)]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    bad = [r for r in results if r.get("status") != 200 or not r.get("tokens")]
    if bad:
        raise RuntimeError(f"{len(bad)} of {streams} requests failed or came back empty: {bad[0]}")
    ttft = sorted(r["first"] for r in results if r["first"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return [f"{wall:.1f} s", f"ready after {ready:.1f} s; {streams} streams, {tokens} tokens, "
            f"{tokens / wall:,.0f} tokens/s together, first piece {ttft[0]:.2f}-{ttft[-1]:.2f} s; "
            f"answer: {results[0]['text'][:60]!r}"], True


def pipeline_section(quick: bool, smoke: bool = False, data: str | None = None) -> None:
    """Print the pipeline rows (module docstring). smoke: the CPU, micro sizes, a data folder written here."""
    device = "cpu" if smoke else "cuda"
    emit("| stage | wall time | result |\n|---|---:|---|")
    work = Path(tempfile.mkdtemp(prefix="gpu_pipeline_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if smoke:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    try:
        if smoke:
            folder = tiny_data_folder(work / "data")
        else:
            folder = Path(data or os.environ.get("NANOSCHNACK_DATA", "") or ROOT.parent / "shared" / "data")
        specs = data_specs(folder)
    except Exception as e:
        _row("data", "", f"**FAILED**: `{one_line(e)}`: pass --data DIR or set NANOSCHNACK_DATA")
        return
    py, log = sys.executable, lambda name: work / f"{name}.log"
    if smoke:  # seconds each: what is checked is that every stage runs and says what it did
        tok = ["--vocab-size", "512", "--max-chars", "50k"]
        train = ["--preset", "nano", "--seq-len", "64", "--max-steps", "2", "--eval-every", "2", "--save-every", "2"]
        sft = ["--preset", "tiny", "--max-steps", "2", "--device-batch-size", "2", "--examples-per-step", "2",
               "--eval-every", "2", "--val-conversations", "4", "--stop-rate-conversations", "2"]
        evaluation, serve_tokens = ["--limit", "4"], 8
    else:
        steps = 20 if quick else 60
        tok = ["--vocab-size", "8192" if quick else "32768", "--max-chars", "20M" if quick else "200M"]
        train = ["--preset", "d12", "--seq-len", "2048", "--device-batch-size", "16", "--total-batch-size", "32768",
                 "--max-steps", str(steps), "--eval-every", str(steps), "--eval-tokens", "131072", "--save-every",
                 str(steps), "--sample-every", str(steps)]
        sft = ["--preset", "full", "--max-steps", "10" if quick else "30", "--eval-every", "10" if quick else "30",
               "--val-conversations", "64", "--stop-rate-conversations", "16"]
        evaluation, serve_tokens = ["--limit", "200"], 64
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    both = lambda p: p.stdout + "\n" + p.stderr
    stages = [
        ("tokenizer", [py, "tok.py", "--data", *specs["pretrain"], *tok, "--out", str(work / "tokenizer")], 1800,
         lambda p: _last_line_with(p.stdout, "bytes/token")),
        ("pretraining", [*torchrun, "train.py", *train, "--data", " ".join(specs["pretrain"]),
                         "--val-data", " ".join(specs["val"]), "--tokenizer", str(work / "tokenizer"),
                         "--out", str(work / "base"), "--device", device], 3600,
         lambda p: _last_line_with(both(p), "validation bits per byte") + "; " + _last_line_with(both(p), "tok/s")),
        ("SFT", [py, "sft.py", *sft, "--base", str(work / "base"), "--data", specs["sft"],
                 "--val-data", specs["sft_val"], "--out", str(work / "chat"), "--device", device], 3600,
         lambda p: _last_line_with(both(p), "validation loss") + "; " + _last_line_with(both(p), "assistant_end")),
        ("evaluation (bits per byte)", [py, "evaluation.py", "--checkpoint", str(work / "chat"), "--local-only",
                                        "--tasks", "bpb", "--bpb-data", *specs["bpb"], *evaluation, "--device", device,
                                        "--no-report"], 1800,
         lambda p: _last_line_with(both(p), "bpb  ")),  # its log line, not the table's header
        ("chat (one answer)", [py, "chat.py", "--checkpoint", str(work / "chat"), "--device", device, "--prompt",
                               "Wer bist du?", "--temperature", "0", "--max-new-tokens", "16" if smoke else "48"], 900,
         lambda p: (_last_line_with(p.stderr, "decode step") or "decode step not compiled")
         + f"; answer: {p.stdout.strip()[:60]!r}"),
    ]
    try:
        for name, args, timeout, result in stages:
            def run(args=args, timeout=timeout, result=result, name=name):
                seconds, proc = _stage(args, timeout, env, log(name.split()[0]))
                return [f"{seconds:.1f} s", result(proc)], True
            if _case(name, run, width=2) is None and name in ("tokenizer", "pretraining", "SFT"):
                _row("(the later stages)", "", "not run: they need what this stage makes")
                return
        _case("serve (4 concurrent streams)", lambda: _serve(work, device, env, 4, serve_tokens), width=2)
    finally:
        if smoke:
            shutil.rmtree(work, ignore_errors=True)
        else:
            emit(f"\n(logs and checkpoints of the pipeline run: {work})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="See the module docstring (head bench/gpu_serving.py) for every row.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="d12 only, fewer tokens and steps")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run at toy sizes (what the test runs)")
    parser.add_argument("--data", help="the data folder for the pipeline (default: $NANOSCHNACK_DATA, else "
                                       "../shared/data)")
    args = parser.parse_args(argv)
    wanted = args.sections.split(",")
    if set(wanted) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(wanted) - set(SECTIONS))}; choose from {SECTIONS}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU smoke run")
    if "decode" in wanted:
        print("\n### Chat and serving decode\n", flush=True)
        decode_section(args.quick, args.smoke)
    if "pipeline" in wanted:
        print("\n### The pipeline on local data\n", flush=True)
        pipeline_section(args.quick, args.smoke, args.data)


if __name__ == "__main__":
    main()
