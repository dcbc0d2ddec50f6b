"""
report.py: the report card, report.md next to the checkpoint folders.

Each stage writes one section (tok.py: Tokenizer, train.py: Pretraining,
sft.py: SFT and Chat samples, evaluation.py: Evaluation (<kind>)). A section is
found by a marker comment, so re-running a stage replaces its own section and
leaves the others alone; sections are kept in the order of REPORT_SECTIONS
(a title "Evaluation (chat)" sorts with "Evaluation"), others go last, and
titles of the same place alphabetically, so the card never depends on the
order in which the stages ran.

It also holds the small markdown helpers the sections are written with. It imports
no other project module, so every stage (tok.py included) can use it.
"""
import fcntl
import glob
import os
import re
import sys
import tempfile
from pathlib import Path

REPORT_SECTIONS = ("Tokenizer", "Pretraining", "SFT", "Evaluation", "Chat samples")
REPORT_HEADER = ("# nanoschnack report card\n\nWritten by the stages themselves: tok.py, train.py, sft.py and "
                 "evaluation.py each keep one section up to date; running a stage again replaces its section.\n")
MARKER = re.compile(r"<!-- section: (.+) -->")


def report_path(out) -> Path:
    """The report card of a stage writing into folder `out`: report.md in its parent folder,
    so out/tokenizer, out/base and out/chat all report into out/report.md."""
    return Path(out).resolve().parent / "report.md"


def read_report(path) -> dict[str, str]:
    """The sections of a report card, {title: body}, in file order."""
    path = Path(path)
    sections, title, lines = {}, None, []
    for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else []):
        if m := MARKER.fullmatch(line):
            if title is not None:
                sections[title] = "\n".join(lines).strip()
            title, lines = m.group(1), []
        elif title is not None and not (line == f"## {title}" and not lines):
            lines.append(line)
    if title is not None:
        sections[title] = "\n".join(lines).strip()
    return sections


def section_rank(title: str) -> int:
    for i, name in enumerate(REPORT_SECTIONS):
        if title == name or title.startswith(name + " "):
            return i
    return len(REPORT_SECTIONS)


def update_report(path, title: str, body: str) -> Path:
    """Put `body` (markdown) into the report card at `path` as section `title`, replacing a section of
    that title or adding it in its place; written atomically. Returns the path.

    Stages that end together (evaluation.py on the base and the chat model, one GPU each) take turns: each
    holds a lock on the card's folder from reading the card to replacing it, and writes a temporary file of
    its own, so neither loses the other's section. A card that is not UTF-8 (edited by hand) is kept aside as
    report.md.damaged and a new one begun, with a warning: the stage's work is done and saved by then."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # released when the descriptor closes
            sections = read_readable_report(path)
            sections[title] = "\n".join(l for l in body.strip().splitlines() if not MARKER.fullmatch(l))
            text = REPORT_HEADER + "".join(f"\n<!-- section: {t} -->\n## {t}\n\n{sections[t]}\n"
                                           for t in sorted(sections, key=lambda t: (section_rank(t), t)))
            # a temporary card left by a stage that was killed (no other is being written: the lock is ours)
            for stale in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
                stale.unlink()
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # a reader sees the old card or the new one, never half of one
        finally:
            os.close(folder)
    except OSError as e:
        if tmp is not None and os.path.isfile(tmp):
            os.unlink(tmp)
        raise SystemExit(f"error: cannot write the report card {path} ({e}); free disk space or choose "
                         f"another folder (the card as it was is unchanged)") from None
    return path


def read_readable_report(path: Path) -> dict[str, str]:
    """read_report, or, for a card that is not UTF-8, none: the card moved aside, with a warning."""
    try:
        return read_report(path)
    except UnicodeDecodeError as e:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        print(f"warning: {path} is not UTF-8 text ({e.reason} at byte {e.start:,}): moved to {aside}, and a new "
              f"card begun", file=sys.stderr)
        return {}


def format_cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; ints get thousands separators, floats 4 decimals, None is '–'."""
    lines = ["| " + " | ".join(map(format_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(format_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def format_samples(samples: list[tuple[str, str]]) -> str:
    """Prompt/answer pairs as markdown; answers are quoted, so whatever the model writes stays inside."""
    parts = []
    for prompt, answer in samples:
        quoted = "\n".join("> " + line for line in (answer.strip() or "(keine Antwort)").splitlines())
        parts.append(f"**{format_cell(prompt.strip())}**\n\n{quoted}")
    return "\n\n".join(parts)
