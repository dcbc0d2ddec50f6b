"""The reliability sweep (issue 10): every CLI given bad input fails cleanly and damages nothing.

Each case runs a stage script against a shared "world" (a tokenizer, a base and
a chat checkpoint, prepared shards, report.md, good and bad data files) and checks that

- the exit code is not 0,
- stderr ends with one `error: ...` line that names the problem, and holds no Traceback,
- every file that existed before (the whole world, and the checkpoints of a copied
  output folder) is byte-identical afterwards, and no `*.tmp` is left behind.

"Disk full" is simulated with RLIMIT_FSIZE (writes past N bytes fail with EFBIG,
"File too large", once SIGXFSZ is ignored), a limit of the whole process: those cases
run the script as a process of its own (exit code, stderr), one or more per script
but chat.py and serve.py (whose own tests run theirs). The others call the same
main() in this process (conftest's refusal: a non-zero SystemExit, no traceback),
which spares each a start of Python and torch (4-5 s on the 2-core CI machine).
"Unwritable" output folders lie below a regular file: the tests run as root, so
chmod would not stop a write.

Covered elsewhere, not repeated here: kill -9 and resume equal to an uninterrupted
run (tests/test_train.py::test_resume_after_sigkill, tests/test_sft.py::
test_resume_after_sigkill_equals_uninterrupted) and a torn torch.save
(tests/test_train.py::test_interrupted_save_keeps_last_good_checkpoint), and the bad inputs
each CLI's own tests try (a missing --data for train.py and sft.py, a missing --checkpoint
for chat.py and serve.py, ...). Here: a real SIGKILL in the middle of a checkpoint write
(test_kill_during_checkpoint_write).
"""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import common
import prepare
import sft
import train
from conftest import FIXTURE_TEXT, make_checkpoint, refusal, script_main, signal_handlers_kept

REPO = Path(__file__).resolve().parents[1]

TRAIN = ["--preset", "nano", "--tokenizer", "{w}/out/tokenizer", "--data", "parquet://{w}/train.parquet",
         "--val-data", "parquet://{w}/val.parquet", "--max-steps", "4", "--eval-every", "0", "--save-every", "1",
         "--out", "{t}/run"]
SFT = ["--preset", "tiny", "--base", "{w}/out/base", "--data", "jsonl://{w}/conversations.jsonl",
       "--val-data", "jsonl://{w}/conversations.jsonl", "--max-steps", "3", "--device-batch-size", "2",
       "--examples-per-step", "4", "--eval-every", "0", "--save-every", "1", "--identity-repeat", "0",
       "--out", "{t}/chat"]
EVAL = ["--checkpoint", "{w}/out/chat", "--local-only", "--tasks", "quiz", "--task-file",
        "quiz=jsonl://{w}/quiz.jsonl", "--no-report"]
TOK = ["--data", "parquet://{w}/train.parquet", "--vocab-size", "320", "--out", "{t}/tok"]
IN_THE_WAY = "file.txt is a file, not a folder; choose another "  # an output folder below a regular file
PREPARE = ["prepare", "--data", "parquet://{w}/train.parquet", "--out", "{t}/prep", "--shard-rows", "10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tokenizer_dir, small_tokenizer):
    """Good and bad inputs, and outputs of earlier stages that no failing run may touch."""
    w = tmp_path_factory.mktemp("world")
    lines = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    docs = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))]
    pq.write_table(pa.table({"text": docs}), w / "train.parquet", row_group_size=8)
    pq.write_table(pa.table({"text": docs[:6]}), w / "val.parquet")
    conversations = [{"messages": [{"role": "user", "content": f"Sag mir Satz {i}."},
                                   {"role": "assistant", "content": lines[i % len(lines)]}]} for i in range(16)]
    (w / "conversations.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations),
                                           encoding="utf-8")
    (w / "quiz.jsonl").write_text(json.dumps({"context": "Die Hauptstadt von Deutschland ist",
                                              "choices": ["Berlin", "Rom"], "label": 0}) + "\n", encoding="utf-8")
    (w / "empty.jsonl").write_bytes(b"")
    (w / "empty.txt").write_bytes(b"")
    (w / "empty.parquet").write_bytes(b"")
    (w / "malformed.jsonl").write_text('{"messages": [\n{oops\n', encoding="utf-8")
    (w / "garbage.pt").write_bytes(b"this is not a checkpoint\n")
    torch.save({"step": 1}, w / "not_a_checkpoint.pt")
    (w / "file.txt").write_text("a regular file, so nothing can be created below it\n")
    shutil.copytree(small_tokenizer_dir, w / "out" / "tokenizer")

    # a base checkpoint (resumable, step 1 of 4) and a chat checkpoint (resumable, step 1 of 3), as the CLIs write them
    fill = lambda args, extra: [a.format(w=w, t=w / "out") for a in args] + extra
    with signal_handlers_kept():
        train.main(fill(TRAIN, ["--out", str(w / "out" / "base"), "--stop-after-steps", "1"]))
        sft.main(fill(SFT, ["--stop-after-steps", "1"]))
    make_checkpoint(w / "other_base", small_tokenizer, kind="base", sequence_len=64, n_embd=32)
    prepare.prepare(f"parquet://{w}/train.parquet", str(w / "prepared"), shard_rows=10, val_frac=0.1,
                 log=lambda *a: None)
    assert (w / "out" / "report.md").is_file() and (w / "prepared" / "shard_00001.parquet").is_file()
    return w


def hashes(folder: Path, logs: bool = True) -> dict[str, str]:
    """sha256 of every file below folder (without log.jsonl files: a resumed run appends to its log)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and (logs or p.name != "log.jsonl")}


def run(script, args, fsize=None, timeout=120):
    def limit_file_size():  # "disk full": writes past fsize bytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_file_size if fsize else None)


def case(script, base, extra, expect, copy=None, fsize=None, id=None):
    return pytest.param(script, base + extra, expect, copy or {}, fsize, id=id)


CASES = [
    # train.py
    case("train.py", TRAIN, ["--data", "parquet://{w}/train.parquet?text=nope"], "no column 'nope'",
         id="train-wrong-column"),
    case("train.py", TRAIN, ["--data", "txt://{w}/empty.txt"], "all its files are empty", id="train-empty-txt"),
    case("train.py", TRAIN, ["--data", "jsonl://{w}/malformed.jsonl"], "malformed.jsonl:1: not valid JSON",
         id="train-malformed-jsonl"),
    case("train.py", TRAIN, ["--tokenizer", "{w}/garbage.pt"], "not a readable tokenizer.json",
         id="train-garbage-tokenizer"),
    case("train.py", TRAIN, ["--resume", "--seq-len", "32"], "from another model config", copy={"run": "out/base"},
         id="train-resume-other-seq-len"),
    case("train.py", TRAIN, ["--resume"], "not a train.py checkpoint", copy={"run": "out/chat"},
         id="train-resume-chat-checkpoint"),
    case("train.py", TRAIN, ["--resume", "--data", "parquet://{w}/val.parquet"], r"val.parquet: its files are not the "
         r"ones the data loader state was saved with, at parquet://.*/train.parquet: added, removed, renamed",
         copy={"run": "out/base"}, id="train-resume-other-data"),
    case("train.py", TRAIN, ["--resume", "--data", "parquet://{w}/train.parquet?shuffle=on"],
         "data loader state is from another", copy={"run": "out/base"}, id="train-resume-other-options"),
    case("train.py", TRAIN, ["--out", "{w}/file.txt/run"], IN_THE_WAY + "--out", id="train-out-below-file"),
    case("train.py", TRAIN, ["--resume"], r"cannot write checkpoint .*ckpt_0000002.pt: \[Errno 27\] File too large; "
         r"free disk space .*\(the previous checkpoint ckpt_0000001.pt is intact\)", copy={"run": "out/base"},
         fsize=200_000, id="train-disk-full-checkpoint"),
    case("train.py", TRAIN, ["--resume"], r"cannot write .*log.jsonl .*File too large.*--resume",
         copy={"run": "out/base"}, fsize=100, id="train-disk-full-log"),
    # sft.py
    case("sft.py", SFT, ["--data", "jsonl://{w}/malformed.jsonl"], r"no usable conversations .*\(2 read, 2 rejected",
         id="sft-malformed-jsonl"),
    case("sft.py", SFT, ["--data", "parquet://{w}/empty.parquet"], "not a readable parquet file",
         id="sft-empty-parquet"),
    case("sft.py", SFT, ["--base", "{w}/garbage.pt"], "cannot read checkpoint", id="sft-garbage-base"),
    case("sft.py", SFT, ["--base", "{w}/other_base", "--resume"], "from another model config",
         copy={"chat": "out/chat"}, id="sft-resume-other-model"),
    case("sft.py", SFT, ["--resume"], "not an sft.py checkpoint", copy={"chat": "out/base"},
         id="sft-resume-base-checkpoint"),
    case("sft.py", SFT, ["--out", "{w}/file.txt/chat"], IN_THE_WAY + "--out", id="sft-out-below-file"),
    case("sft.py", SFT, ["--resume"], r"cannot write checkpoint .*ckpt_0000002.pt: \[Errno 27\] File too large.*"
         r"ckpt_0000001.pt is intact", copy={"chat": "out/chat"}, fsize=200_000, id="sft-disk-full-checkpoint"),
    # evaluation.py
    case("evaluation.py", EVAL, ["--tasks", "bpb", "--bpb-data", "parquet://{w}/train.parquet?bogus=1"],
         "option 'bogus' does not apply", id="eval-bad-spec"),
    case("evaluation.py", EVAL, ["--task-file", "quiz=jsonl://{w}/malformed.jsonl"], "malformed.jsonl:1: not a JSON object",
         id="eval-malformed-task-file"),
    case("evaluation.py", EVAL, ["--task-file", "quiz=jsonl://{w}/conversations.jsonl"], "conversations.jsonl:1: not a quiz",
         id="eval-wrong-task-rows"),
    case("evaluation.py", EVAL, ["--checkpoint", "{w}/garbage.pt"], "cannot read checkpoint", id="eval-garbage-checkpoint"),
    case("evaluation.py", EVAL, ["--json", "{w}/file.txt/results.json"], IN_THE_WAY + "--json", id="eval-json-below-file"),
    case("evaluation.py", EVAL[:-1], [], r"cannot write the report card .*report.md .*File too large", fsize=300,
         id="eval-disk-full-report"),
    # chat.py, serve.py
    case("chat.py", ["--prompt", "Hallo"], ["--checkpoint", "{w}/not_a_checkpoint.pt"], "not a nanoschnack checkpoint",
         id="chat-not-a-checkpoint"),
    case("serve.py", ["--port", "0"], ["--checkpoint", "{w}/garbage.pt"], "cannot read checkpoint",
         id="serve-garbage-checkpoint"),
    # tok.py
    case("tok.py", TOK, ["--data", "jsonl://{w}/empty.jsonl"], "all its files are empty", id="tok-empty-jsonl"),
    case("tok.py", TOK, ["--out", "{w}/file.txt/tok"], IN_THE_WAY + "--out", id="tok-out-below-file"),
    case("tok.py", TOK, [], r"cannot write .*tokenizer.json \(File too large", copy={"tok": "out/tokenizer"},
         fsize=1000, id="tok-disk-full-keeps-old-tokenizer"),
    # data.py
    case("data.py", PREPARE, ["--data", "jsonl://{w}/nothing.jsonl"], "file not found", id="prepare-missing-data"),
    case("data.py", PREPARE, ["--data", "jsonl://{w}/malformed.jsonl"], "malformed.jsonl:1: not valid JSON",
         id="prepare-malformed-jsonl"),
    case("data.py", PREPARE, ["--out", "{w}/prepared", "--shard-rows", "12"], "other settings",
         id="prepare-other-settings-keeps-shards"),
    case("data.py", PREPARE, ["--out", "{w}/file.txt/prep"], "cannot create folder .*file.txt/prep",
         id="prepare-out-below-file"),
    case("data.py", PREPARE, [], r"cannot write .*File too large.*run the same command again", fsize=2000,
         id="prepare-disk-full"),
]


@pytest.mark.parametrize("script, args, expect, copy, fsize", CASES)
def test_bad_input_fails_with_one_error_line_and_damages_nothing(world, tmp_path, capsys, script, args, expect, copy,
                                                                 fsize):
    for dest, src in copy.items():  # an output folder this run may write into, holding good checkpoints
        shutil.copytree(world / src, tmp_path / dest)
    before_world, before_copies = hashes(world), hashes(tmp_path, logs=False)
    argv = [a.format(w=world, t=tmp_path) for a in args]
    if fsize:  # the file-size limit is the process's: a process of its own, as a user runs the script
        proc = run(script, argv, fsize)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        said = proc.stderr
    else:
        said, _ = refusal(script_main(script), argv, capsys)

    lines = said.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), said[-2000:]
    assert sum(l.startswith("error:") for l in lines) == 1, said[-2000:]
    assert re.search(expect, lines[-1]), lines[-1]
    assert hashes(world) == before_world
    after_copies = hashes(tmp_path, logs=False)
    assert {k: v for k, v in after_copies.items() if k in before_copies} == before_copies
    assert not [p for p in [*world.rglob("*.tmp"), *tmp_path.rglob("*.tmp")]], "a temp file was left behind"
    if fsize and copy:  # the checkpoint or tokenizer that was there still loads
        for dest in copy:
            if (ckpt := common.latest_checkpoint(tmp_path / dest)) is not None:
                assert ckpt.name == "ckpt_0000001.pt" and common.load_model(ckpt)[2]["step"] == 1
            else:
                from tok import Tokenizer
                assert Tokenizer.load(tmp_path / dest).vocab_size == 512


def test_kill_during_checkpoint_write(world, tmp_path):
    """SIGKILL while train.py is inside torch.save: the newest whole checkpoint loads, and --resume goes on.

    To kill at a known point, the checkpoint's temp file is a named pipe: the writer blocks in the
    middle of the checkpoint once the pipe is full, and is killed there. The bytes it had written
    then become the torn temp file a real crash leaves behind."""
    run_dir = tmp_path / "run"
    shutil.copytree(world / "out" / "base", run_dir)
    good = hashes(run_dir, logs=False)
    tmp = run_dir / "ckpt_0000002.pt.tmp"
    os.mkfifo(tmp)
    reader = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
    args = [a.format(w=world, t=tmp_path) for a in TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    victim = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--resume"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    torn, deadline = b"", time.time() + 120
    try:
        while len(torn) < 100_000 and time.time() < deadline and victim.poll() is None:
            try:
                torn += os.read(reader, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
            if not torn:
                time.sleep(0.01)
        assert victim.poll() is None and len(torn) >= 100_000, victim.stderr.read().decode()[-2000:]
        victim.send_signal(signal.SIGKILL)  # blocked in the middle of torch.save, the pipe full
        victim.wait()
        while chunk := os.read(reader, 1 << 16):
            torn += chunk
    finally:
        os.close(reader)
        if victim.poll() is None:
            victim.kill()
        victim.stderr.close()
    tmp.unlink()
    tmp.write_bytes(torn)  # what a crash in the middle of the write leaves
    assert len(torn) < (run_dir / "ckpt_0000001.pt").stat().st_size

    assert common.latest_checkpoint(run_dir).name == "ckpt_0000001.pt"
    assert hashes(run_dir, logs=False) == {**good, "ckpt_0000002.pt.tmp": hashlib.sha256(torn).hexdigest()}
    assert common.load_model(run_dir)[2]["step"] == 1
    proc = run("train.py", [*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "ckpt_0000001.pt" in proc.stdout
    assert common.load_checkpoint(common.latest_checkpoint(run_dir))["step"] == 4
    assert not list(run_dir.glob("*.tmp"))


def test_a_short_log_write_is_finished_and_a_torn_line_dropped_on_resume(tmp_path, capsys):
    """A disk that fills up makes an unbuffered write short, with no error: the rest of the line must still be
    written (or the next write raises). A line a full disk or a kill cut short anyway is dropped when --resume
    opens the log, or the resumed run's first record would be glued onto it."""
    class FillingDisk:  # a write takes at most 7 bytes, as the kernel returns on a disk with a little room left
        name, written = "log.jsonl", b""

        def write(self, data):
            self.written += bytes(data[:7])
            return len(data[:7])

    disk = FillingDisk()
    common.append_log(disk, {"step": 1, "loss": 4.25})
    assert json.loads(disk.written) == {"step": 1, "loss": 4.25} and disk.written.endswith(b"\n")

    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with common.open_log(tmp_path) as log:
        common.append_log(log, {"step": 3})
    assert [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3}]
    assert "ended in a line cut short (a full disk or a kill); its 15 bytes dropped" in capsys.readouterr().out


@pytest.mark.parametrize("error, one_line", [
    ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13993. This is typically caused "
     "by a remote worker crashing.", True),
    ("NCCL error: remote process exited or there was a network error", True),
    ("CUDA out of memory", False)])
def test_a_rank_whose_peer_failed_says_so_in_one_line(monkeypatch, capfd, error, one_line):
    """Under torchrun the rank that met the error says why; the others' collectives then fail on the closed
    connection, and their 30-line tracebacks only buried that line. A real error keeps its traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def main():
        raise RuntimeError(error)

    if one_line:
        with pytest.raises(SystemExit) as e:
            common.run_main(main)
        assert e.value.code == 1
        assert capfd.readouterr().err == "[rank 0] stopped: another rank failed; see its error above\n"
    else:
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            common.run_main(main)


def test_a_failed_json_write_keeps_the_old_results(world, tmp_path):
    """--json is written beside the old file and renamed over it: a full disk leaves the old results whole."""
    results = tmp_path / "results.json"
    argv = [a.format(w=world, t=tmp_path) for a in EVAL] + ["--json", str(results)]
    proc = run("evaluation.py", argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = results.read_bytes()
    proc = run("evaluation.py", argv, fsize=len(before) // 2)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"error: cannot write --json .*results.json .*File too large.*the file as it was is unchanged",
                     proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    assert results.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
