"""How the code fits together: the import graph, shared plumbing, and safe checkpoint loading."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import sft
import train
from conftest import REPO_ROOT, make_checkpoint, refusal, script_main

MODULES = sorted(p.stem for p in REPO_ROOT.glob("*.py")) + ["kernels"]
README = REPO_ROOT / "README.md"


def fresh_python(code: str) -> tuple[list[str], str]:
    """The words `python -c code` prints in a new interpreter, and what it said (for a failed assertion): what a
    script's start imports shows only in a process of its own."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return proc.stdout.split(), proc.stdout + proc.stderr[-2000:]


def imported_modules(node: ast.AST) -> set[str]:
    """The top-level names an import statement imports (none for any other node, or a relative import)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    return set().union(*map(imported_modules, ast.walk(ast.parse(path.read_text(encoding="utf-8"))))) & set(MODULES)


def import_graph() -> dict[str, set[str]]:
    graph = {m: project_imports(REPO_ROOT / f"{m}.py") for m in MODULES if m != "kernels"}
    graph["kernels"] = set().union(*(project_imports(p) for p in (REPO_ROOT / "kernels").glob("*.py"))) - {"kernels"}
    return graph


def imported_only_in_functions(module: str) -> set[str]:
    """The project modules a module (kernels: the package) imports only inside functions, never when it is
    imported: tok.py imports data.py for its command line only."""
    files = (REPO_ROOT / "kernels").glob("*.py") if module == "kernels" else [REPO_ROOT / f"{module}.py"]
    inside, outside = set(), set()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_functions = {id(node) for f in functions for node in ast.walk(f)}
        for node in ast.walk(tree):
            (inside if id(node) in in_functions else outside).update(imported_modules(node))
    return (inside - outside) & set(MODULES)


def readme_import_diagram(readme: Path) -> tuple[set[tuple[str, str, str]], set[str]]:
    """The diagram under README's "How the code fits together", read as (module, what it imports, arrow), and
    the modules its lines without an arrow name. On a line, each module before an arrow imports each module
    after it (a chain a ──> b ──> c: a imports b, b imports c); a note in brackets after two spaces ends it."""
    section = readme.read_text(encoding="utf-8").split("### How the code fits together", 1)[1]
    edges, alone = set(), set()
    for line in filter(str.strip, section.split("```", 2)[1].splitlines()):
        parts = re.split(r"\s*(──>|····>)\s*", re.sub(r" {2,}\(.*\)$", "", line).strip())
        lists = [[diagram_node(name.strip(), line) for name in part.split(",")] for part in parts[::2]]
        if len(lists) == 1:
            alone |= set(lists[0])
        for importers, arrow, imported in zip(lists, parts[1::2], lists[1:]):
            edges |= {(a, b, arrow) for a in importers for b in imported}
    return edges, alone


def diagram_node(name: str, line: str) -> str:
    """The module a name in the diagram stands for: gpt.py is gpt, kernels/ the package."""
    if not re.fullmatch(r"\w+\.py|kernels/", name):
        raise AssertionError(f"README's import diagram: cannot read {name!r} in {line!r}: draw it as lines of the "
                             "form 'a.py ──> b.py, c.py' (kernels/ for the package)")
    return name.removesuffix(".py").removesuffix("/")


def test_no_import_cycles():
    graph = import_graph()
    state = {}  # 1: on the current path, 2: done

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


def test_readme_import_diagram_draws_exactly_the_imports():
    """Every arrow README's diagram draws is an import, with its kind (····> only inside functions), and every
    import between the root modules and kernels/ is drawn: the diagram had lost shards.py, export.py, a dozen
    imports, and drew access.py as importing engine.py and session.py."""
    drawn, alone = readme_import_diagram(README)
    graph = import_graph()
    real = {(module, dep, "····>" if dep in imported_only_in_functions(module) else "──>")
            for module, deps in graph.items() for dep in deps}
    assert drawn == real, (f"README's import diagram lacks {sorted(real - drawn)} "
                           f"and draws what is not imported so: {sorted(drawn - real)}")
    named = {m for edge in drawn for m in edge[:2]} | alone
    assert named == set(MODULES), (f"README's import diagram leaves out {sorted(set(MODULES) - named)} "
                                   f"and names {sorted(named - set(MODULES))}, which are no root modules")
    assert not any(graph[m] for m in alone), "a module on a line without an arrow imports a project module"


def test_stages_take_plumbing_from_common_not_from_each_other():
    graph = import_graph()
    stages = {"train", "sft", "evaluation", "chat", "serve", "prepare"}
    for stage in ("train", "sft", "evaluation", "session"):
        assert "common" in graph[stage], stage
    assert "session" in graph["chat"]  # chat.py is the terminal around session.py
    for stage in ("sft", "evaluation", "chat", "serve", "prepare"):
        assert not graph[stage] & (stages - {"evaluation", "chat"}), (stage, graph[stage])
    assert "train" not in graph["sft"] | graph["evaluation"] | graph["chat"] | graph["serve"]


def test_serving_does_not_import_the_terminal_chat():
    """The model side that chat.py and the server share lives in session.py: the server never loads chat.py."""
    graph = import_graph()
    serving = {"serve", "engine", "engine_process", "access"}

    def reach(module, seen):
        for dep in graph[module] - seen:
            seen.add(dep)
            reach(dep, seen)
        return seen
    assert "chat" not in set().union(*(reach(m, set()) for m in serving))
    assert "session" in graph["chat"] and "session" in graph["engine"]


def test_chat_and_serve_load_no_training_or_data_code():
    """What `python chat.py` / `python serve.py` really load: no train.py, sft.py, data.py, prepare.py."""
    probe = ("import sys, chat, serve; print(' '.join(sorted(m for m in sys.modules if m in "
             f"{MODULES!r})))")
    out, said = fresh_python(probe)
    assert out and not set(out) & {"train", "sft", "data", "prepare", "evaluation"}, said


@pytest.mark.skipif(bool(torch.version.cuda or torch.version.hip),
                    reason="a CUDA or ROCm torch makes the Triton ops at import, by design (kernels/attention.py)")
def test_scripts_start_without_torch_compile_machinery_on_a_cpu_only_torch():
    """Making a triton_op imports torch._inductor (3 s of CPU here, as long as torch itself): a CPU-only torch
    never takes the Triton path outside the tests, so no script pays it at start; the ops still work. Nor
    sympy (0.6 s), which only the Hopper path's symbolic stride checks need."""
    probe = ("import sys, train, sft, evaluation, chat, serve, export, kernels; "
             "print('torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules, 'sympy' in sys.modules); "
             "import torch; q = torch.randn(1, 2, 8, 16); out, lse = kernels.flash_attn_op(q, q, q); "
             "print('torch._inductor' in sys.modules, torch.allclose(out, kernels.flash_attn(q, q, q), atol=1e-5))")
    out, said = fresh_python(probe)
    assert out == ["False", "False", "False", "True", "True"], said
    # a CUDA build (its version string faked here) makes them at import, before any torch.compile sees the model
    probe = ("import torch; torch.version.cuda = '13.0'; import sys, kernels.attention as a, kernels.rmsnorm as r; "
             "print('torch._inductor' in sys.modules, *(n in vars(m) for m, n in ((a, 'flash_attn_op'), "
             "(a, 'flash_attn_backward_op'), (r, 'rms_norm_op'), (r, 'rms_norm_backward_op'))))")
    out, said = fresh_python(probe)
    assert out == ["True"] * 5, said


def test_loading_a_checkpoint_runs_no_init_and_no_compile_machinery(tmp_path, small_tokenizer):
    """chat.py's, serve.py's and evaluation.py's load on a CPU: torch's Python references for the meta device
    (nn.Embedding's normal_, arange, to_empty's empty_like) imported torch._dynamo and sympy, 3.5 s of CPU
    before the first token; and every weight was drawn at random before the checkpoint's replaced it."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer)
    probe = ("import sys, common, torch; torch.nn.init.normal_ = None; torch.Tensor.normal_ = None; "
             f"model, _, ckpt = common.load_model({str(checkpoint)!r}); "
             "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules, model.training, "
             "all(torch.equal(t, ckpt['model'][k]) for k, t in model.state_dict().items()))")
    out, said = fresh_python(probe)
    assert out == ["False", "False", "False", "True"], said


def test_serve_http_side_holds_no_weights_and_loads_without_compile_machinery(tmp_path, small_tokenizer):
    """serve.py's HTTP process tokenizes and checks prompts; the engine process runs the model. Its session
    used to be loaded on the CPU and then moved to the meta device: a d20-shaped checkpoint's 1.6 GB read and
    copied for nothing (3.4 GB peak, 6-7 s more to the first /health on a 2-core CPU: bench/RESULTS.md). On the
    meta device it reads no weight, and computing its rotary tables there would import torch._dynamo
    (gpt.GPT.init_rotary)."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, sequence_len=96)
    probe = ("import sys, session, torch; "
             f"s = session.load_session({str(checkpoint)!r}, 'meta'); "
             "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules, "
             "all(t.is_meta for t in [*s.model.parameters(), *s.model.buffers()]), s.context_len, s.kind, "
             "s.completion_prompt('Hallo', session.Sampling())[1:] == s.tokenizer.encode('Hallo'))")
    out, said = fresh_python(probe)
    assert out == ["False", "False", "True", "96", "chat", "True"], said


def test_sft_rejects_model_presets_clearly(capsys):
    """`sft.py --preset d20` used to crash with a TypeError (the shared parser built SFTConfig(model=...))."""
    with pytest.raises(SystemExit) as e:
        common.parse_config(sft.SFTConfig, sft.PRESETS, ["--preset", "d20"])
    assert e.value.code == 2
    assert "unknown preset 'd20': use one of full, tiny" in capsys.readouterr().err
    assert train.parse_config(["--preset", "d26"]).model == "d26"  # train.py takes any depth
    with pytest.raises(SystemExit):
        train.parse_config(["--preset", "dx"])


# -----------------------------------------------------------------------------
# Safe loading: a checkpoint that would run code is refused by every loader

class Planted:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def planted(tmp_path, small_tokenizer):
    """A folder with a real checkpoint whose dict also holds a code-running object, and the marker path."""
    good = make_checkpoint(tmp_path / "good", small_tokenizer)
    state = torch.load(good, weights_only=True)
    marker = tmp_path / "code-ran"
    state["note"] = Planted(marker)
    for folder in ("evil", "evil_resume"):
        (tmp_path / folder).mkdir()
        torch.save(state, tmp_path / folder / "ckpt_0000001.pt")
    return tmp_path, marker


@pytest.mark.parametrize("script,args", [
    ("chat.py", ["--checkpoint", "{d}/evil", "--prompt", "Hallo"]),
    ("serve.py", ["--checkpoint", "{d}/evil", "--port", "0"]),
    ("evaluation.py", ["--checkpoint", "{d}/evil", "--local-only", "--tasks", "bpb", "--bpb-data", "txt://{d}/t.txt"]),
    ("sft.py", ["--preset", "tiny", "--base", "{d}/evil", "--data", "jsonl://{d}/c.jsonl", "--out", "{d}/chat"]),
    ("train.py", ["--preset", "nano", "--resume", "--out", "{d}/evil_resume", "--tokenizer", "{d}/tok",
                  "--data", "txt://{d}/t.txt", "--val-data", "txt://{d}/t.txt"]),
], ids=["chat", "serve", "evaluation", "sft-base", "train-resume"])
def test_every_loader_refuses_a_checkpoint_that_runs_code(planted, small_tokenizer, capsys, script, args):
    """Each script's main() in this process (conftest's refusal); tests/test_reliability.py runs them as processes."""
    folder, marker = planted
    (folder / "t.txt").write_text("Ein kurzer deutscher Text über Äpfel und Birnen. " * 40, encoding="utf-8")
    (folder / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "Hallo"}, '
                                    '{"role": "assistant", "content": "Guten Tag"}]}\n' * 40, encoding="utf-8")
    small_tokenizer.save(folder / "tok")
    said, _ = refusal(script_main(script), [a.format(d=folder) for a in args], capsys)
    assert not marker.exists(), "the checkpoint's code ran"
    lines = said.strip().splitlines()
    assert lines[-1].startswith("error: ") and "would run code or build objects when loaded" in lines[-1], said[-2000:]

