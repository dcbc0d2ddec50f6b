"""Shared pytest fixtures for nanoschnack.

The Triton interpreter must be switched on before the first `@triton.jit`
is imported, so it is set here, at the very top, before any project import.
It lets the kernel tests run Triton kernels on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import collections
import contextlib
import importlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def torchrun(*args, nproc: int = 2, timeout: int = 300, **env):
    """`python -m torch.distributed.run --standalone --nproc_per_node=N ARGS` as a user runs it, one thread per
    process and the repository importable, with `env` added; the finished process (stdout and stderr as text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def sample_data_dir() -> Path:
    """Where the German sample data lives: $NANOSCHNACK_DATA or ../shared/data."""
    return Path(os.environ.get("NANOSCHNACK_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The sample-data folder; skips the test with the reason when it is absent."""
    path = sample_data_dir()
    if not (path / "pretrain").is_dir():
        pytest.skip(f"sample data not found at {path} (set NANOSCHNACK_DATA to the folder holding pretrain/, sft/, eval/)")
    return path


FIXTURE_TEXT = Path(__file__).parent / "fixtures" / "german.txt"


def stop_from_the_middle(text: str) -> str:
    """A stop sequence that ends an answer as near its middle as can be, after at least one character: the
    fewest characters (two or more) from there on that do not appear earlier. Two characters alone may appear
    at its start (a random model repeats itself), and end the answer before its first character. A random
    model also makes bytes that are no UTF-8, shown as U+FFFD: a stop sequence holding one would depend on
    where the stream decoder gave up on a character, so none does."""
    middle = len(text) // 2
    for start in sorted(range(1, len(text) - 1), key=lambda i: abs(i - middle)):
        for end in range(start + 2, len(text) + 1):
            if "\ufffd" in text[start:end]:
                break
            if text.index(text[start:end]) == start:
                return text[start:end]
    raise AssertionError(f"{text!r} has no stop sequence that ends it after its first character")


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token tokenizer trained on the German fixture, saved to a folder (shared by all tests)."""
    from tok import Tokenizer
    lines = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train(lines * 3, vocab_size=512, show_progress=False).save(folder)
    return folder


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_dir):
    from tok import Tokenizer
    return Tokenizer.load(small_tokenizer_dir)


def make_checkpoint(folder, tokenizer, kind: str = "chat", seed: int = 0, **config) -> Path:
    """A checkpoint of a tiny random GPT in train.py's format (for chat, eval and server tests).

    The weights are random but not init_weights' zeros, so the logits depend on the input, and drawn after
    the model is made, so they do not change with how GPT.init_weights draws its own. The special tokens'
    rows of the lm_head are zero: their logits are exactly 0, below the largest of the hundreds of ordinary
    tokens' random logits (unless every one of those is negative, a chance of about 2^-hundreds), so a greedy
    answer never ends by itself, whatever the seed or the init: it runs to its max_tokens
    (tests of an ending force one: a stop sequence, or tokens put in its place)."""
    import dataclasses
    import torch
    import gpt
    import common
    config = gpt.GPTConfig(**{**dict(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                                     n_kv_head=1, n_embd=64), **config})
    model = gpt.GPT(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.ndim == 2 and p.shape[0] == config.vocab_size else 0.1)
        model.lm_head.weight[list(tokenizer.special.values())] = 0.0
    state = dict(model=model.state_dict(), model_config=dataclasses.asdict(config), tokenizer_json=tokenizer.to_json(),
                 kind=kind, step=1, tokens=0)
    return common.save_checkpoint(Path(folder), 1, state, keep_last=1)


@contextlib.contextmanager
def signal_handlers_kept():
    """Put back the SIGINT/SIGTERM handlers afterwards: train.py and sft.py install their own (StopSignal),
    which would outlive a main() called in the test process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def script_main(script: str):
    """The function `python script` runs (data.py hands `prepare ARGS` to prepare.py's main)."""
    if script == "data.py":
        import prepare
        return lambda argv: prepare.main(argv[1:] if argv[:1] == ["prepare"] else argv)
    return importlib.import_module(script.removesuffix(".py")).main


def refusal(main, argv: list[str], capsys) -> tuple[str, str]:
    """What a stage's main() says when it refuses argv, as the user's terminal would show it: what it printed
    on stderr (argparse's errors), then the SystemExit message, which Python prints last; and its stdout.
    Fails unless main() ends with a non-zero SystemExit and no traceback. The in-process twin of running the
    script: the same check without a start of Python and torch (4-5 s on the 2-core box) for each bad input."""
    with signal_handlers_kept(), pytest.raises(SystemExit) as exit:
        main(argv)
    printed = capsys.readouterr()
    said = f"{printed.err}\n{exit.value.code}"
    assert exit.value.code not in (0, None) and "Traceback" not in said, said[-1500:]
    return said, printed.out


def sigkill_when_file_appears(script: Path, args: list[str], path: Path, timeout: float = 120):
    """Run a stage script and kill -9 it as soon as `path` exists (or when it exits or time runs out)."""
    import subprocess
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    victim = subprocess.Popen([sys.executable, str(script), *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


def sigint_as_in_a_shell():
    """A child's SIGINT as a shell starts it (give it as Popen's preexec_fn): a test process may ignore or
    block SIGINT (the suite's workers sometimes do), and children inherit both, so the child would never
    see Ctrl-C."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def decode_compiled_on_cpu(monkeypatch):
    """GPT.decode's step compiled on the CPU as it is on CUDA (torch.compile, fullgraph, static shapes), through
    TorchDynamo and AOTAutograd but without Inductor's code generation, which would take minutes here.
    Yields the list of graphs compiled, one entry (the shapes of the graph's tensor inputs) per compile:
    a recompile appends one more."""
    import torch
    from torch._dynamo.backends.registry import lookup_backend
    import gpt
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(gpt.decode_step, backend=backend, fullgraph=True, dynamic=False)
    monkeypatch.setitem(gpt._compiled_steps, "cpu", step)
    monkeypatch.setenv(gpt.COMPILE_ENV, "1")
    yield graphs
    torch._dynamo.reset()


def pytest_collection_modifyitems(items):
    """The order in which xdist's loadfile hands out the test files (pyproject.toml turns its own off): the
    ahead-of-time compile first (tests/test_kernels_aot.py: the one file of minutes, on a core of its own
    beside the other worker, see its `compiled` fixture), then the others most tests first, as xdist would,
    so that the files handed out last are short. xdist's own order put the compile last, where it ran beside
    the other worker's last files on two processes of its own (four busy processes on two cores)."""
    tests_per_file = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path.name != "test_kernels_aot.py", -tests_per_file[item.path], str(item.path)))
