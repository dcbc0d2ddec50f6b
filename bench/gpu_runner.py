"""
How bench/gpu.py always reports: its sections, each in its own process with a time
limit, and their rows, each to stdout and the report file the moment it exists.

    report = Report(path)                      # prints, and appends to `path` (if any), line by line
    run_sections([(fn, limit), ...], args, report)
    row = case(args, ["cells", "that", "label"], measure)   # inside a section: one table row
    timeit(fn, smoke), max_err(got, want, tol), ok_cell(ok)   # what sections measure and check with

A section is a generator function `section_<name>(args, device)` yielding report
lines, its first line its description; its title is the first line of its
docstring. Each runs in a process forked from a server that has imported torch and
the project once and never touched CUDA (multiprocessing's forkserver): a clean CUDA
state for every section, without importing torch again each time. A section gets
START_LIMIT seconds to print its first line (process start, CUDA initialisation),
then `limit` seconds from that line to finish and exit; past that it is killed,
and a row says so. A case that raises is one row with the error's first line; an
exception outside any case ends the section with a row; a process that dies, one row.
"""
import multiprocessing
import os
import sys
import time
import traceback

import torch

START_LIMIT = 120
BAD_MARKS = ("**FAILED**", "**NO**", "**TIMED OUT**")  # rows that make the exit status 1


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300].replace("|", "/")


def case(args, cells: list, measure) -> str:
    """One table row: the leading `cells`, then what `measure()` returns (a list of cells).

    An exception becomes this row's error, the first line of it, and the section goes on
    (the traceback goes to stderr). --test-fail-case LABEL fails the case whose cells,
    joined by spaces, are LABEL (tests only)."""
    label = " ".join(map(str, cells))
    try:
        if label == args.test_fail_case:
            raise RuntimeError("deliberate failure (--test-fail-case)\nthis second line must not reach the row")
        rest = measure()
    except Exception as e:
        print(f"[{label}]", file=sys.stderr)
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rest = [f"**FAILED**: `{one_line(e)}`"]
    return "| " + " | ".join(map(str, [*cells, *rest])) + " |"


class Report:
    """Lines to stdout and, appended, to the report file, each the moment it exists."""

    def __init__(self, path):
        self.path, self.bad = path, 0

    def __call__(self, line: str = "") -> None:
        self.bad += any(mark in line for mark in BAD_MARKS)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def _section_process(section, args, conn) -> None:
    """The body of a section's process: send each line of the section as it comes."""
    os.dup2(2, 1)  # whatever the section prints goes to stderr: stdout carries the report only
    sys.stdout = sys.stderr
    device = torch.device("cpu" if args.smoke else "cuda")
    try:
        for line in section(args, device):
            conn.send(line)
    except Exception as e:  # what no case caught: the section ends here, with a row saying why
        traceback.print_exc()
        conn.send(f"**FAILED**: `{one_line(e)}` (the section ended here; traceback on stderr)")
    conn.close()


def run_section(section, limit: float, args, report: Report, context) -> None:
    """Run one section in its own process; report its lines as they come; end it at its limit."""
    report(f"### {section.__doc__.splitlines()[0]}")
    report()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_section_process, args=(section, args, send), daemon=True)
    started = time.monotonic()
    process.start()
    send.close()  # the child holds the only sending end: its exit is our end of file
    deadline, first_line, ended = started + max(limit, START_LIMIT), None, None
    try:
        while ended is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = (f"{limit:.0f} s after its first line" if first_line else
                        f"{max(limit, START_LIMIT):.0f} s, before its first line")
                ended = f"**TIMED OUT**: killed at its time limit, {what}; the rows above are all it had"
            elif receive.poll(min(remaining, 1.0)):
                try:
                    line = receive.recv()
                except EOFError:  # its last line; now it must exit, within the same limit
                    process.join(max(0.0, deadline - time.monotonic()))
                    if process.is_alive():
                        ended = f"**TIMED OUT**: killed at its time limit, {limit:.0f} s after its first line, still exiting"
                    break
                if first_line is None:
                    first_line = time.monotonic()
                    deadline = first_line + limit
                report(line)
            elif not process.is_alive() and not receive.poll():
                break
    except KeyboardInterrupt:
        ended = "**FAILED**: interrupted (Ctrl-C)"
        raise
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        if ended is None and process.exitcode != 0:
            ended = f"**FAILED**: the section's process died (exit code {process.exitcode}); the rows above are all it had"
        if ended:
            report()
            report(ended)
        report()
        report(f"({time.monotonic() - started:.0f} s)")
        report()


def run_sections(sections: list, args, report: Report, preload: list[str], root) -> None:
    """Run each (section, limit) in turn, each in its own process forked from one that imported `preload`."""
    # The modules are named, and the repo root put on PYTHONPATH: Python 3.11's forkserver
    # neither preloads "__main__" nor takes this process's sys.path.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    for section, limit in sections:
        run_section(section, limit, args, report, context)


# ----------------------------------------------------------------------------
# What the sections measure and check with


def timeit(fn, smoke: bool) -> float:
    """Seconds per call: CUDA-event timing via triton.testing.do_bench on the GPU, one call on the CPU."""
    if not smoke:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100) / 1e3
    fn()  # warm-up; then one timed call, the smoke run only checks that the code runs
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ok_cell(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def max_err(got, want, tol) -> tuple[float, bool]:
    """Largest |got - want| and whether every element is within atol + rtol * |want|."""
    got, want = got.double().cpu(), want.double().cpu()
    diff = (got - want).abs()
    atol, rtol = tol
    return diff.max().item(), bool((diff <= atol + rtol * want.abs()).all())
