"""Tests for train.py: learning, DDP equivalence, exact resume, atomic checkpoints."""
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import common
import data
import dataloader
import gpt
import optim
import tok
import train
from conftest import make_checkpoint, refusal, sigkill_when_file_appears, signal_handlers_kept, torchrun

from tok import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "german.txt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small tokenizer and a parquet corpus of German sentences, shared by the tests here."""
    root = tmp_path_factory.mktemp("train")
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    Tokenizer.train(lines * 3, vocab_size=320, show_progress=False).save(root / "tok")
    docs = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))] * 4
    for k in range(2):
        pq.write_table(pa.table({"text": docs[k::2]}), root / f"train-{k}.parquet", row_group_size=8)
    pq.write_table(pa.table({"text": docs[:6]}), root / "val.parquet")
    return root


def args_for(root, out, *extra):
    return ["--preset", "nano", "--tokenizer", str(root / "tok"), "--data", f"parquet://{root}/train-*.parquet",
            "--val-data", f"parquet://{root}/val.parquet", "--out", str(out), "--max-steps", "6",
            "--save-every", "3", "--eval-every", "3", "--prefetch", "0", *extra]


def run_script(args, nproc=1, check=True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run(cmd + [str(REPO / "train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)
    if check and proc.returncode:
        raise AssertionError(f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def final_state(out):
    return torch.load(common.latest_checkpoint(out), weights_only=True)


def losses(out):
    by_step = {}
    for line in (Path(out) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"], record["loss_smooth"]  # a resumed run appends; the last counts
    return by_step


def test_loss_falls_on_german_sample(data_dir, tmp_path):
    source = data.parse_spec(f"parquet://{data_dir}/pretrain/klexikon/train-00000.parquet")
    texts = [t for _, t in zip(range(400), data.iter_texts(source))]
    Tokenizer.train(texts, vocab_size=1024, show_progress=False).save(tmp_path / "tok")
    out = tmp_path / "run"
    train.main(["--preset", "nano", "--tokenizer", str(tmp_path / "tok"), "--data", source.spec,
                "--val-data", f"parquet://{data_dir}/pretrain/klexikon/val.parquet", "--out", str(out),
                "--max-steps", "40", "--seq-len", "128", "--device-batch-size", "8", "--total-batch-size", "1024",
                "--eval-every", "40", "--save-every", "0", "--prefetch", "0"])
    loss = losses(out)
    first, last = sum(loss[s][0] for s in (1, 2, 3)) / 3, sum(loss[s][0] for s in (38, 39, 40)) / 3
    assert first > 6.5  # about ln(1024) = 6.93 at the start
    assert last < first - 1.5, (first, last)
    val_bpb = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["val_bpb"]
    val_texts = list(data.iter_texts(data.parse_spec(f"parquet://{data_dir}/pretrain/klexikon/val.parquet")))
    uniform_bpb = math.log2(1024) / tok.bytes_per_token(Tokenizer.load(tmp_path / "tok"), val_texts)
    assert 0 < val_bpb < 0.9 * uniform_bpb, (val_bpb, uniform_bpb)


def test_two_ranks_equal_one_process_with_accumulation(setup, tmp_path):
    out = tmp_path / "ddp"
    # fp32: equal up to the order of float sums (bf16 products would round differently per split)
    # with nanochat's schedules of Muon's momentum and weight decay, which the replay below must follow too;
    # device batch 2: two micro-steps on each rank, so DDP's no_sync accumulation (the gradients all-reduced at
    # the last micro-step, not the first) is what is compared (at the nano preset's 4 each rank had one)
    # (--weight-decay 0.0015: scaled to these 3 steps, 31, a step's lr x decay 0.31, below scaled_weight_decay's cap)
    flags = ("--max-steps", "3", "--dtype", "float32", "--weight-decay", "0.0015", "--device-batch-size", "2")
    proc = run_script(args_for(setup, out, *flags, "--eval-every", "0"), nproc=2)
    assert "parameters identical on all 2 ranks: True" in proc.stdout
    ddp_params = final_state(out)["model"]

    # the same global batch in one process: rank 0's and rank 1's micro-batches, accumulated
    cfg = train.parse_config(args_for(setup, out, *flags))
    tokenizer = Tokenizer.load(setup / "tok")
    model = train.build_model(cfg, tokenizer.vocab_size, torch.device("cpu"))
    decay = train.scaled_weight_decay(cfg, model.config, 3, log=lambda *a: None)
    assert f"weight decay 0.0015 (d12's) scaled to this run's 1,536 tokens of 512 a step: {decay:.4g}" in proc.stdout
    assert 0.1 < decay * cfg.matrix_lr < 0.5
    optimizers = optim.build_optimizers(model, dataclasses.replace(cfg, weight_decay=decay))
    ranks = [dataloader.PretrainBatches(data.parse_specs(cfg.data), tokenizer, cfg.device_batch_size, cfg.seq_len,
                                        rank, 2) for rank in range(2)]
    loaders = [iter(r) for r in ranks]
    logged = losses(out)
    for step in range(3):
        loss = train.train_step(model, optimizers, [next(loaders[r]) for r in (0, 0, 1, 1)],
                                train.schedule(cfg, step, step / 3), torch.device("cpu"))
        assert logged[step + 1][0] == pytest.approx(loss, rel=1e-5), step  # the log's loss: the mean over ranks
    for name, param in model.state_dict().items():  # the embedding alone: AdamW's eps 1e-10 turns the float
        # sums' order (4 micro-batches summed in another order than DDP's 2 + 2) into up to 1e-4 on rows whose
        # gradient is all but 0; a real difference in the gradient moves weights by about the learning rate
        tolerance = dict(rtol=1e-4, atol=1e-4) if name == "transformer.wte.weight" else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(param, ddp_params[name], **tolerance, msg=name)
    counted = json.loads(proc.stdout.split("counts per source: ")[1].split("; times read")[0])
    assert counted == {spec: sum(r.token_counts()[spec] for r in ranks) for spec in counted}  # both ranks' tokens


def test_an_error_under_torchrun_is_one_whole_line_per_rank(setup, tmp_path):
    """Every rank says what it met, each in a line of its own that names it (common.run_main): Python's own
    printing of a SystemExit ran two ranks' messages into one line."""
    missing = tmp_path / "no-tokenizer"
    proc = run_script(args_for(setup, tmp_path / "run", "--tokenizer", str(missing)), nproc=2, check=False)
    says = f"error: no tokenizer at {missing}; train one with: python tok.py --out {missing}"
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and sorted(l for l in lines if "error:" in l) == [
        f"[rank 0] {says}", f"[rank 1] {says}"], proc.stderr[-3000:]


def test_two_ranks_on_a_time_budget_stay_identical(setup, tmp_path):
    """The schedule follows the clock, and rank clocks start apart: each step's fraction of the budget must be
    one number on all ranks, or the ranks' weights step apart. The logged loss is the ranks' mean, and its
    smoothed average is the average of what is logged."""
    proc = run_script(args_for(setup, tmp_path / "tb", "--time-budget", "0.05", "--eval-every", "0", "--max-steps",
                               "0", "--save-every", "0"), nproc=2)
    assert "parameters identical on all 2 ranks: True" in proc.stdout
    smoothed = common.SmoothedLoss()
    for loss, loss_smooth in losses(tmp_path / "tb").values():
        assert loss_smooth == pytest.approx(smoothed.update(loss))


def test_resume_is_bitwise_exact(setup, tmp_path):
    run_script(args_for(setup, tmp_path / "a"))
    stopped = run_script(args_for(setup, tmp_path / "b", "--stop-after-steps", "3"))  # a deliberate stop: exit 0
    assert "stopped at step 3 (--stop-after-steps)" in stopped.stdout
    assert common.latest_checkpoint(tmp_path / "b").name == "ckpt_0000003.pt"
    run_script(args_for(setup, tmp_path / "b", "--resume"))
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_after_sigkill(setup, tmp_path):
    run_script(args_for(setup, tmp_path / "a", "--save-every", "2"))
    sigkill_when_file_appears(REPO / "train.py", args_for(setup, tmp_path / "b", "--save-every", "2"),
                              tmp_path / "b" / "ckpt_0000002.pt")
    run_script(args_for(setup, tmp_path / "b", "--save-every", "2", "--resume"))
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    good = common.save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=2)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(SystemExit, match=r"error: cannot write checkpoint .*ckpt_0000002.pt: \[Errno 28\] No space "
                                         r"left on device; .* \(the previous checkpoint ckpt_0000001.pt is intact\)"):
        common.save_checkpoint(tmp_path, 2, {"step": 2}, keep_last=2)
    assert common.latest_checkpoint(tmp_path) == good and not list(tmp_path.glob("*.tmp"))
    assert common.load_checkpoint(good)["step"] == 1


def test_keeps_last_k_checkpoints(tmp_path):
    for step in range(1, 5):
        common.save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
        common.save_checkpoint(tmp_path / "all", step, {"step": step}, keep_last=0)
    assert [p.name for p in sorted(tmp_path.glob("ckpt_*"))] == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    assert len(list((tmp_path / "all").glob("ckpt_*"))) == 4
    (tmp_path / "ckpt_best.pt").write_bytes(b"")  # not one of the run's: never pruned, never the newest
    common.save_checkpoint(tmp_path, 5, {"step": 5}, keep_last=2)
    assert common.latest_checkpoint(tmp_path).name == "ckpt_0000005.pt" and (tmp_path / "ckpt_best.pt").exists()


def test_a_new_run_never_writes_into_another_runs_checkpoints(setup, tmp_path):
    train.main(args_for(setup, tmp_path / "a", "--stop-after-steps", "3"))
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    with pytest.raises(SystemExit, match=r"holds another run's checkpoints \(newest ckpt_0000003.pt\)"):
        train.main(args_for(setup, tmp_path / "a", "--max-steps", "2", "--seed", "7"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


def test_resume_refuses_another_tokenizer(setup, tmp_path):
    lines = FIXTURE.read_text(encoding="utf-8").upper().splitlines()  # the same vocabulary size, other merges
    Tokenizer.train(lines * 3, vocab_size=320, show_progress=False).save(tmp_path / "other")
    train.main(args_for(setup, tmp_path / "a", "--stop-after-steps", "1"))
    with pytest.raises(SystemExit, match="was trained with another tokenizer"):
        train.main(args_for(setup, tmp_path / "a", "--resume", "--tokenizer", str(tmp_path / "other")))


def test_resume_refuses_changed_learning_rates_and_muon(setup, tmp_path, capsys):
    """The optimizers' saved state holds each group's initial learning rate and weight decay, and Muon's param
    groups: a resumed run would train with the saved ones and record the new ones (or, for --muon, end in a
    traceback). Refused, naming each flag; the same flags resume."""
    out = tmp_path / "a"
    train.main(args_for(setup, out, "--stop-after-steps", "1", "--eval-every", "0"))
    said, _ = refusal(train.main, args_for(setup, out, "--resume", "--matrix-lr", "0.5", "--embedding-lr", "2",
                                           "--unembedding-lr", "0.1", "--scalar-lr", "0.2", "--weight-decay", "0.1"),
                      capsys)
    assert ("was trained with other --matrix-lr (0.01, now 0.5), --embedding-lr (0.2, now 2.0), --unembedding-lr "
            "(0.004, now 0.1), --scalar-lr (0.05, now 0.2), --weight-decay (0.0, now 0.1); resume with the same "
            "settings") in said, said[-1500:]
    said, _ = refusal(train.main, args_for(setup, out, "--resume", "--muon", "torch"), capsys)
    assert "was trained with other --muon ('nanochat', now 'torch')" in said, said[-1500:]
    path = common.latest_checkpoint(out)  # a checkpoint whose train_config does not name its --muon
    ckpt = torch.load(path, weights_only=True)
    del ckpt["train_config"]["muon"]
    torch.save(ckpt, path)
    said, _ = refusal(train.main, args_for(setup, out, "--resume", "--muon", "torch"), capsys)
    assert "optimizer state does not fit this run's optimizers" in said and "resume with the --muon" in said, said
    train.main(args_for(setup, out, "--resume", "--eval-every", "0"))
    assert final_state(out)["step"] == 6


def test_a_resume_with_more_steps_scales_the_weight_decay_to_them(setup, tmp_path, capsys):
    """scaled_weight_decay follows the run's length, and so does the schedule on --resume with a new --max-steps;
    the optimizers' saved state kept the old decay while the log said the new one. Twice the steps: half."""
    out = tmp_path / "a"
    train.main(args_for(setup, out, "--weight-decay", "0.001", "--stop-after-steps", "3", "--eval-every", "0"))
    muon_decay = lambda path: {g["initial_weight_decay"] for g in torch.load(path, weights_only=True)[
        "optimizers"][1]["param_groups"]}
    [six] = muon_decay(common.latest_checkpoint(out))
    capsys.readouterr()
    train.main(args_for(setup, out, "--weight-decay", "0.001", "--resume", "--max-steps", "12", "--eval-every", "0"))
    [twelve] = muon_decay(common.latest_checkpoint(out))
    assert twelve == pytest.approx(six / 2, rel=1e-12)
    assert f"weight decay {six:.4g} -> {twelve:.4g}: scaled to the run's new length" in capsys.readouterr().out


def test_the_tokens_per_second_leave_out_evaluations_and_saves(setup, tmp_path, monkeypatch):
    """The rate (and the MFU and ETA from it) is training's: the line after an evaluation, a sample or a save
    read a tenth of it, and log.jsonl kept that. On a clock that only steps (1 s each) and evaluations and saves
    (100 s each) move, every line reads one step's tokens a second."""
    now = [0.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])

    def taking(seconds, function):
        def timed(*args, **kwargs):
            result = function(*args, **kwargs)
            now[0] += seconds
            return result
        return timed
    monkeypatch.setattr(train, "train_step", taking(1.0, train.train_step))
    monkeypatch.setattr(train, "evaluate", taking(100.0, train.evaluate))
    monkeypatch.setattr(common, "save_checkpoint", taking(100.0, common.save_checkpoint))
    out = tmp_path / "a"
    train.main(args_for(setup, out, "--log-every", "1"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    batch = records[0]["tokens"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and "val_bpb" in records[2]
    assert [r["tok_per_s"] for r in records] == [batch] * 6


def test_a_resumed_session_reports_the_last_evaluation_of_an_earlier_one(setup, tmp_path, capsys):
    """A session stopped before its next evaluation reported "final val bpb: not measured (--eval-every 0)", though
    --eval-every was 3 and the session before had measured it: the last evaluation now travels in the checkpoint.
    A resumed session's tokens/s and done line say they are this session's."""
    out, card = tmp_path / "a", tmp_path / "report.md"
    train.main(args_for(setup, out, "--stop-after-steps", "2"))
    assert "| final val bpb | not measured yet (the run stopped before its first evaluation) |" in card.read_text()
    train.main(args_for(setup, out, "--resume", "--stop-after-steps", "2"))  # steps 3 and 4: evaluated at 3
    measured = re.search(r"\| final val bpb \| (\d\.\d{4} \(step 3\)) \|", card.read_text())
    assert measured, card.read_text()
    capsys.readouterr()
    train.main(args_for(setup, out, "--resume", "--stop-after-steps", "1"))  # step 5: no evaluation
    text = card.read_text()
    assert f"| final val bpb | {measured.group(1)} |" in text and "(mean over this session, evals included)" in text
    assert re.search(r"done: [\d,]+ tokens, [\d,]+ of them in \d+s", capsys.readouterr().out)


def test_ranks_that_find_different_checkpoints_all_stop_saying_so(setup, tmp_path):
    """Only rank 0 saves, and each rank looks for the checkpoint to resume on its own node's disk: with an --out
    that is not shared, another node finds none and would train other steps from other data until the ranks'
    collectives hang. Every rank stops at once, saying what each found, before it reads any checkpoint (so rank 0's
    here is a stand-in file). The second node is a wrapper that gives rank 1 an --out of its own."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_0000003.pt").write_bytes(b"only on rank 0's node")
    wrapper = tmp_path / "node2.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "if os.environ['RANK'] == '1':\n"
                       "    sys.argv[sys.argv.index('--out') + 1] += '-node2'\n"
                       "sys.argv = sys.argv[1:]\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = torchrun(wrapper, REPO / "train.py", *args_for(setup, out, "--resume", "--eval-every", "0"), timeout=120)
    said = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert proc.returncode != 0 and len(said) == 2, proc.stderr[-3000:]
    for rank, line in enumerate(sorted(said)):
        assert line.startswith(f"[rank {rank}] error: the ranks find different checkpoints in --out"), line
        assert line.endswith("(rank 0: ckpt_0000003.pt, rank 1: none); --out must be one folder that every node "
                             "shares"), line
    assert "resumed from" not in proc.stdout and not (tmp_path / "run-node2" / "log.jsonl").exists()


def test_bad_validation_data_fails_before_the_first_step(setup, tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: validation data: .*vall.parquet"):
        train.main(args_for(setup, tmp_path / "a", "--val-data", f"parquet://{setup}/vall.parquet"))
    assert "step      1" not in capsys.readouterr().out and not (tmp_path / "a" / "log.jsonl").exists()


def test_resuming_a_finished_run_leaves_its_report(setup, tmp_path, capsys):
    train.main(args_for(setup, tmp_path / "a"))
    card = (tmp_path / "report.md").read_text()
    capsys.readouterr()
    train.main(args_for(setup, tmp_path / "a", "--resume"))
    assert "at step 6 of 6 already: nothing trained" in capsys.readouterr().out
    assert (tmp_path / "report.md").read_text() == card


def test_resuming_a_finished_time_budget_run_trains_nothing(setup, tmp_path, capsys):
    """A time budget's steps are not known in advance: a run whose budget is spent, resumed, trains no step (it
    trained one more, and saved it, at the final learning rate), and says so (not "of 9,223,372,036,854,775,807")."""
    out = tmp_path / "run"
    flags = ("--time-budget", "0.01", "--max-steps", "0", "--eval-every", "0", "--save-every", "0",
             "--sample-every", "0", "--log-every", "1000")
    train.main(args_for(setup, out, *flags))
    first = final_state(out)
    capsys.readouterr()
    train.main(args_for(setup, out, *flags, "--resume"))
    assert final_state(out)["step"] == first["step"] and len(common.checkpoints(out)) == 1
    assert f"spent its 0.01-minute budget already, at step {first['step']:,}: nothing trained" in capsys.readouterr().out


def test_resumed_time_budget_counts_the_earlier_sessions(setup, tmp_path, monkeypatch):
    """--time-budget over sessions: a resumed run's clock starts at the checkpoint's train_seconds (its schedule
    goes on where it was), and its own checkpoint adds this session's seconds to them."""
    def fake_elapsed(self, device=None):  # one second per reading of the clock, after the earlier sessions'
        self.readings = getattr(self, "readings", 0) + 1
        return self.prior + self.readings
    monkeypatch.setattr(common.TimeBudget, "elapsed", fake_elapsed)
    flags = ("--time-budget", "1", "--max-steps", "0", "--warmdown-ratio", "0.5", "--eval-every", "0",
             "--save-every", "0", "--log-every", "1000")
    out = tmp_path / "run"
    train.main(args_for(setup, out, *flags, "--stop-after-steps", "1"))
    path = common.latest_checkpoint(out)
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_seconds"] = 45.0  # as if the earlier sessions had used 45 of the 60 seconds
    torch.save(ckpt, path)
    train.main(args_for(setup, out, *flags, "--resume"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the resumed first step is in the warmdown, where only the earlier 45 seconds can have put it
    assert records[1]["lr_mult"] <= optim.lr_multiplier(45 / 60, 0.5, 0.05) < 1
    assert 2 < len(records) < 15  # the budget's last 15 seconds, at least one reading a step
    assert final_state(out)["train_seconds"] >= 45.0


def test_resume_refuses_a_checkpoint_of_another_world_size(setup, tmp_path):
    """Each rank resumes its own loader state: a checkpoint written by 2 processes is refused by 1, naming both
    counts (this one's loader states are one process's, so only that check can tell)."""
    out = tmp_path / "run"
    train.main(args_for(setup, out, "--stop-after-steps", "1", "--eval-every", "0"))
    path = common.latest_checkpoint(out)
    ckpt = torch.load(path, weights_only=True)
    ckpt["world_size"], ckpt["loader"] = 2, ckpt["loader"] * 2
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="was written by 2 processes, not 1; resume with the same number"):
        train.main(args_for(setup, out, "--resume", "--eval-every", "0"))


@pytest.mark.parametrize("flag, value, message", [
    ("--seq-len", "0", "--seq-len must be at least 1 (got 0)"),
    ("--log-every", "0", "--log-every must be at least 1"),
    ("--keep-last", "-1", "--keep-last must be at least 0"),
    ("--max-steps", "-5", "--max-steps must be at least 0"),
    ("--time-budget", "-1", "--time-budget must be at least 0"),
    ("--eval-tokens", "0", "--eval-tokens must be at least 1"),
    ("--tokens-per-param", "0", "--tokens-per-param must be above 0"),
    ("--rotary-base", "0", "--rotary-base must be above 0"),  # 0 ** (i / D): tables of nan and inf
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0"),
    ("--time-budget", "nan", "--time-budget must be a finite number (got nan)"),  # nan < 0 is False: it passed
    ("--matrix-lr", "inf", "--matrix-lr must be a finite number (got inf)"),
])
def test_numbers_out_of_range_are_refused_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--preset", "nano", flag, value])
    assert message in capsys.readouterr().err


def test_a_cuda_device_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: this torch .* sees no CUDA GPU"):
        common.setup_distributed("cuda")


def test_refuses_checkpoint_of_another_model(setup, tmp_path):
    train.main(args_for(setup, tmp_path / "a", "--stop-after-steps", "1"))
    with pytest.raises(SystemExit, match="from another model config"):
        train.main(args_for(setup, tmp_path / "a", "--resume", "--seq-len", "32"))


def test_peak_flops_tell_the_h100_cards_apart():
    assert [train.peak_flops(n) for n in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "Tesla T4")] == [
        756e12, 835e12, 989e12, 989e12, None]


def test_weight_decay_is_scaled_to_the_run_as_nanochat_does():
    """T_epoch held: decay x sqrt(B / 2^19) x (d12's tokens / the run's tokens); d20 at its defaults 0.28 -> 0.079."""
    cfg = train.parse_config(["--preset", "d20"])
    config = gpt.preset("d20", vocab_size=65536, sequence_len=2048)
    with torch.device("meta"):
        d12, d20 = (gpt.GPT(gpt.preset(name, vocab_size=65536, sequence_len=2048)).num_scaling_params()
                    for name in ("d12", "d20"))
    steps = int(12 * d20) // 2**19
    assert train.scaled_weight_decay(cfg, config, steps, print) == pytest.approx(0.28 * d12 / d20, rel=1e-3)
    quarter = dataclasses.replace(cfg, total_batch_size=2**17)  # a quarter of the batch, four times the steps
    assert train.scaled_weight_decay(quarter, config, 4 * steps, print) == pytest.approx(0.28 * d12 / d20 / 2, rel=1e-3)
    assert train.scaled_weight_decay(dataclasses.replace(cfg, time_budget=60.0), config, steps, print) == 0.28
    notes = []  # a smoke test of 10 steps: lr x decay past 1 would flip the matrices' signs every step
    assert train.scaled_weight_decay(cfg, config, 10, notes.append) == 0.5 / cfg.matrix_lr
    assert notes[-1].startswith(f"note: Muon's weight decay capped at {0.5 / cfg.matrix_lr:g} (0.5 / --matrix-lr)")
    assert train.parse_config(["--preset", "tiny"]).weight_decay == 0.0


def test_bad_input_gives_clear_errors(setup, tmp_path, capsys):
    """One `error:` line that names the problem: the first case as a process of its own (exit code, stderr,
    no traceback), the others through the same main() here (conftest's refusal)."""
    proc = run_script(args_for(setup, tmp_path, "--data", f"parquet://{tmp_path}/nothing.parquet"), check=False)
    assert proc.returncode != 0 and "error:" in proc.stderr and "file not found" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    for extra, message in [(["--tokenizer", str(tmp_path / "none")], "no tokenizer at"),
                           (["--total-batch-size", "100"], "not a multiple"),
                           (["--warmdown-ratio", "1.5"], "--warmdown-ratio 1.5 must be between 0 and 1")]:
        said, _ = refusal(train.main, args_for(setup, tmp_path, *extra), capsys)
        assert message in said, (extra, said[-1500:])


def test_checkpoint_loads_as_a_model_without_its_tokenizer_folder(setup, tmp_path):
    import shutil
    shutil.copytree(setup / "tok", tmp_path / "tok")
    train.main(args_for(setup, tmp_path / "run", "--max-steps", "1", "--eval-every", "0", "--tokenizer", str(tmp_path / "tok")))
    shutil.rmtree(tmp_path / "tok")  # the checkpoint carries its tokenizer
    model, tokenizer, ckpt = common.load_model(tmp_path / "run")
    assert ckpt["kind"] == "base" and ckpt["path"].endswith("ckpt_0000001.pt")
    assert tokenizer.encode("Guten Tag") == Tokenizer.load(setup / "tok").encode("Guten Tag")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    assert not model.training


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        common.load_model(tmp_path)
    torch.save({"step": 1}, tmp_path / "ckpt_0000001.pt")
    with pytest.raises(SystemExit, match="not a nanoschnack checkpoint"):
        common.load_model(tmp_path)
    (tmp_path / "ckpt_0000002.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*; delete it to fall back to an older one"):
        common.load_model(tmp_path)
    (tmp_path / "ckpt_0000003.pt").write_bytes(b"")  # torch's error for an empty file has no message
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*ckpt_0000003.pt \(not a file torch.save wrote"):
        common.load_model(tmp_path)
    (tmp_path / "log.jsonl").write_text("{}\n")  # named, not picked: no advice to delete it
    with pytest.raises(SystemExit, match=r"log.jsonl \(not a file torch.save wrote\)$"):
        common.load_model(tmp_path / "log.jsonl")


def test_load_model_refuses_a_tokenizer_of_another_size(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path, small_tokenizer, vocab_size=small_tokenizer.vocab_size + 64)
    with pytest.raises(SystemExit, match=f"tokenizer has {small_tokenizer.vocab_size} tokens, the model "
                                         f"{small_tokenizer.vocab_size + 64}"):
        common.load_model(tmp_path)


def test_load_model_takes_the_checkpoints_weights_as_float32_and_refuses_ones_that_do_not_fit(tmp_path, small_tokenizer):
    """load_model hands copies of the checkpoint's tensors to a model built on the meta device
    (common.model_holding): a weight missing, extra, of another shape or not a tensor is one error naming it;
    bf16 weights load as fp32; the model keeps nothing of the file it mapped. The same refusals on the meta device."""
    path = make_checkpoint(tmp_path / "good", small_tokenizer)
    state = torch.load(path, weights_only=True)
    model, _, _ = common.load_model(path)
    assert not model.training and model.cos.device.type == "cpu"
    assert all(torch.equal(t, state["model"][name]) for name, t in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # sft.py trains what it loads
    size = path.stat().st_size  # load_model maps the file: a copy overwritten in place must not reach the model
    with open(path, "r+b") as f:
        f.write(bytes(size))
    assert all(torch.equal(t, state["model"][name]) for name, t in model.state_dict().items())
    half = {**state, "model": {k: v.bfloat16() for k, v in state["model"].items()}}
    torch.save(half, tmp_path / "half.pt")
    model, _, _ = common.load_model(tmp_path / "half.pt")
    assert all(t.dtype == torch.float32 and torch.equal(t, half["model"][name].float())
               for name, t in model.state_dict().items())
    weights = state["model"]
    name = "transformer.h.0.attn.c_q.weight"
    assert name in weights
    for broken, says in [({k: v for k, v in weights.items() if k != name}, f'Missing key.*"{name}"'),
                         ({**weights, "extra.weight": torch.zeros(1)}, 'Unexpected key.*"extra.weight"'),
                         ({**weights, name: weights[name][:-1]}, f"size mismatch for {name}"),
                         ({**weights, name: "a string"}, f"not tensors: {name}")]:
        torch.save({**state, "model": broken}, tmp_path / "broken.pt")
        for device in ("cpu", "meta"):  # meta: serve.py's HTTP side, which checks shapes and reads no weights
            with pytest.raises(SystemExit, match=f"(?s)broken.pt does not fit its own model config: .*({says})"):
                common.load_model(tmp_path / "broken.pt", device)


# -----------------------------------------------------------------------------
# Out of memory, time budget, smoothed loss


def test_fit_device_batch_halves_until_it_fits():
    tried, log = [], []

    def try_batch(b):
        tried.append(b)
        if b > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert common.fit_device_batch(try_batch, 16, lambda b: 32 % b == 0, log.append, "cpu") == 2
    assert tried == [16, 8, 4, 2] and "device batch 2 (out of memory at 16" in log[-1]
    tried.clear()
    assert common.fit_device_batch(try_batch, 12, lambda b: 24 % b == 0, log.append, "cpu") == 3  # 12, 6, 3
    with pytest.raises(SystemExit, match="error: out of memory even at device batch 1 \\(asked 4\\)"):
        common.fit_device_batch(lambda b: try_batch(99), 4, lambda b: True, log.append, "cpu")


def test_out_of_memory_at_the_first_step_halves_the_device_batch(setup, tmp_path, monkeypatch, capsys):
    """train.py keeps --total-batch-size through gradient accumulation; the run learns the same tokens per step."""
    probe = common.probe_batch

    def tight_memory(model, batch_size, **kw):
        if batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        probe(model, batch_size, **kw)
    monkeypatch.setattr(common, "probe_batch", tight_memory)
    train.main(args_for(setup, tmp_path / "run", "--max-steps", "3", "--eval-every", "0"))
    out = capsys.readouterr().out
    assert "out of memory at device batch 4" in out and "out of memory at device batch 2" in out
    assert "device batch 1 (out of memory at 4" in out and "8 micro-steps per step of 512 tokens" in out
    state = final_state(tmp_path / "run")
    assert state["train_config"]["device_batch_size"] == 1 and state["tokens"] == 3 * 512


def test_the_warmup_counts_steps_and_the_cpu_presets_have_none(setup, tmp_path):
    """--warmup-steps 4 over a 6-step run: nanochat's (step + 1) / 4, then the warmdown over the last half, each step's
    learning rate as the log says; the nano preset (as tiny) starts at the full rate."""
    flags = ("--warmdown-ratio", "0.5", "--eval-every", "0", "--save-every", "0", "--log-every", "1")
    train.main(args_for(setup, tmp_path / "warm", "--warmup-steps", "4", *flags))
    records = [json.loads(l) for l in (tmp_path / "warm" / "log.jsonl").read_text().splitlines()]
    assert [r["lr_mult"] for r in records] == [pytest.approx(m) for m in (0.25, 0.5, 0.75, 1.0, 2 / 3 + 0.05 / 3,
                                                                          1 / 3 + 0.1 / 3)]
    train.main(args_for(setup, tmp_path / "flat", *flags))
    records = [json.loads(l) for l in (tmp_path / "flat" / "log.jsonl").read_text().splitlines()]
    assert records[0]["lr_mult"] == 1.0


def test_time_budget_sets_the_schedule_and_ends_the_run(setup, tmp_path, monkeypatch, capsys):
    """A fake clock: every reading of the budget's clock moves it 7 seconds, so the run is the same on any machine."""
    readings = []

    def fake_elapsed(self, device=None):
        readings.append(None)
        return self.prior + 7.0 * len(readings)
    monkeypatch.setattr(common.TimeBudget, "elapsed", fake_elapsed)
    train.main(args_for(setup, tmp_path / "run", "--time-budget", "1", "--max-steps", "2", "--warmdown-ratio", "0.5",
                        "--eval-every", "0", "--save-every", "0", "--log-every", "1000"))
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) > 2  # --max-steps is ignored: the budget decides
    # used_up() once before the first step, then fraction() and used_up() per step
    fractions = [min(1.0, 7.0 * (2 + 2 * i) / 60) for i in range(len(records))]
    assert [r["lr_mult"] for r in records] == [pytest.approx(optim.lr_multiplier(f, 0.5, 0.05))
                                                  for f in fractions]
    assert records[-1]["lr_mult"] < 0.2  # the warmdown is done when the budget ends
    out = capsys.readouterr().out
    assert "plan: 1 minutes (time budget)" in out and "1-minute budget" in out.split("done:")[1]
    assert final_state(tmp_path / "run")["step"] == len(records)  # saved at the end
    assert "in a time budget of 1 min" in (tmp_path / "report.md").read_text()


def test_smoothed_loss_is_a_debiased_moving_average():
    ema = common.SmoothedLoss(beta=0.9)
    assert ema.update(4.0) == pytest.approx(4.0)  # debiased: the first value is the loss itself
    assert ema.update(4.0) == pytest.approx(4.0)
    assert ema.update(2.0) == pytest.approx((0.9 * 0.9 * 0.1 * 4 + 0.9 * 0.1 * 4 + 0.1 * 2) / (1 - 0.9 ** 3))


def test_dtype_choice():
    """--dtype auto: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere; a bad value is a clear error."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert gpt.compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert gpt.compute_dtype("cpu", "float32") == torch.float32
    assert gpt.compute_dtype("cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="use auto, float32 or bfloat16"):
        gpt.compute_dtype("cpu", "float16")
    model = gpt.GPT(gpt.preset("nano", 64, 16))
    cfg = train.TrainConfig(muon="torch")
    assert isinstance(optim.build_optimizers(model, cfg, torch.float32)[1], optim.FP32Muon)
    assert type(optim.build_optimizers(model, cfg, torch.bfloat16)[1]) is torch.optim.Muon
    cfg = train.TrainConfig(muon="nanochat")
    assert optim.build_optimizers(model, cfg, torch.float32)[1].defaults["ortho_dtype"] == torch.float32
    assert optim.build_optimizers(model, cfg, torch.bfloat16)[1].defaults["ortho_dtype"] == torch.bfloat16


def test_bad_dtype_is_a_clear_error(setup, tmp_path):
    with pytest.raises(SystemExit, match="error: --dtype: unknown dtype 'float16'"):
        train.main(args_for(setup, tmp_path, "--dtype", "float16"))


# -----------------------------------------------------------------------------
# The run's length (nanochat's token ratio) and the model flags


def test_training_length_follows_nanochats_token_ratio():
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                                  value_embeds=True))
    cfg = train.TrainConfig(max_steps=0, max_tokens=0, total_batch_size=512, device_batch_size=4, seq_len=16)
    assert cfg.tokens_per_param == 12  # nanochat's base_train --target-param-data-ratio
    steps, _, _ = train.plan_run(cfg, model, 1, torch.device("cpu"), lambda *a: None)
    assert steps == int(12 * (2 * 12 * 64 * 64 + 2 * 12 + 64 * 64)) // 512  # blocks (and a ve gate), lm_head


def test_max_tokens_decides_the_length_over_a_presets_max_steps():
    """--max-tokens N is the run's length even where the preset sets max_steps (nano: 20, tiny: 400)."""
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    cfg = train.parse_config(["--preset", "nano", "--max-tokens", "2048", "--total-batch-size", "512",
                              "--seq-len", "16", "--device-batch-size", "4"])
    assert cfg.max_steps == 20
    steps, accum, _ = train.plan_run(cfg, model, 1, torch.device("cpu"), lambda *a: None)
    assert (steps, accum) == (4, 8)


class GradCapture:
    """An 'optimizer' that keeps each parameter's gradient at step() (train_step zeroes them after)."""
    param_groups = []

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}


def test_train_step_is_the_mean_loss_and_gradient_of_its_micro_batches():
    """Gradient accumulation: k micro-batches give the loss and the gradient of the one batch they make up."""
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    whole = model(x, y)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    capture = GradCapture(model)
    loss = train.train_step(model, [capture], [(x[:2], y[:2]), (x[2:], y[2:])], dict(lr_mult=1.0), "cpu",
                            torch.float32)
    assert loss == pytest.approx(whole.item(), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_flag_picks_the_model_of_another_preset(setup, tmp_path):
    """demo.sh trains `--preset tiny --model demo`: the run's settings from one preset, the model from another."""
    train.main(args_for(setup, tmp_path / "run", "--model", "demo", "--max-steps", "1", "--eval-every", "0"))
    model, _, ckpt = common.load_model(tmp_path / "run")
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (4, 128, 2)
    assert ckpt["train_config"]["seq_len"] == 64  # the run preset's (nano), not the model's


def test_recipe_flags_reach_the_model_and_its_checkpoint(setup, tmp_path, capsys):
    flags = ["--value-embeds", "--layer-lambdas", "--smear", "--backout", "--qk-gain", "1.2", "--muon", "nanochat"]
    train.main(args_for(setup, tmp_path / "run", "--max-steps", "2", "--eval-every", "2", *flags))
    model, _, ckpt = common.load_model(tmp_path / "run")
    c = model.config
    assert (c.value_embeds, c.layer_lambdas, c.smear, c.backout, c.qk_gain) == (True, True, True, True, 1.2)
    assert "validation bits per byte" in capsys.readouterr().out
    if not gpt.FLASH_ATTN_HAS_WINDOW:
        with pytest.raises(SystemExit, match="error: .*flash_attn has no window argument yet"):
            train.main(args_for(setup, tmp_path / "w", "--window-pattern", "SL"))
    with pytest.raises(SystemExit, match="error: window_pattern='SX'"):
        train.main(args_for(setup, tmp_path / "w", "--window-pattern", "SX"))


# --- from a mutation audit of common.py -------------------------------------------------

def test_only_the_newest_unreadable_checkpoint_is_advised_to_be_deleted(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path, small_tokenizer)  # a good ckpt_0000001.pt, made the newest
    (tmp_path / "ckpt_0000001.pt").rename(tmp_path / "ckpt_0000002.pt")
    (tmp_path / "ckpt_0000001.pt").write_bytes(b"garbage")  # an older file that is broken
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*ckpt_0000001.pt \(not a file torch.save wrote\)$"):
        common.load_model(tmp_path / "ckpt_0000001.pt")
    assert common.load_model(tmp_path)[2]["path"].endswith("ckpt_0000002.pt")


def test_a_time_budget_past_its_end_is_used_up_not_more():
    budget = common.TimeBudget(1, prior_seconds=90)  # an earlier session ran over the 1-minute budget
    assert budget.used_up("cpu") and budget.fraction() == 1.0  # the schedule ends at its end, never beyond
    assert common.TimeBudget(2, prior_seconds=60).fraction() == pytest.approx(0.5, abs=0.01)


def test_progress_lines_give_the_eta_and_a_forced_line_comes_at_once(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    lines = []
    progress = common.Progress("bpb", total=100, every=10.0, log=lines.append)
    now[0] += 5
    progress.update(10)  # within `every` seconds of the start: no line
    progress.update(25, force=True)  # a forced one (the last): at once
    now[0] += 15
    progress.update(50)  # 20 s for half: 20 s to go
    assert lines == ["bpb: 25/100, 5.0/s | 5s | 25.0%, ETA 15s", "bpb: 50/100, 2.5/s | 20s | 50.0%, ETA 20s"]


def test_smoothed_loss_resumes_from_its_saved_state():
    ema = common.SmoothedLoss(beta=0.9)
    ema.update(4.0), ema.update(2.0)
    resumed = common.SmoothedLoss(beta=0.9, state=ema.state())
    assert resumed.update(3.0) == ema.update(3.0) != pytest.approx(3.0)


def test_the_samples_fit_a_short_context(small_tokenizer):
    """sample_texts asked for 24 new tokens whatever the context: at --seq-len 2 the last step's sample raised
    ValueError before the final checkpoint was saved. Now a sample continues only as far as the training context
    reaches, and a prompt that fills it stays as it is."""
    prompt = "Die Stadt liegt am Fluss."
    prompt_tokens = 1 + len(small_tokenizer.encode(prompt))
    for sequence_len in (2, prompt_tokens + 3):
        config = gpt.GPTConfig(sequence_len=sequence_len, vocab_size=small_tokenizer.vocab_size, n_layer=1,
                               n_head=2, n_kv_head=2, n_embd=32)
        model = gpt.GPT(config)
        model.init_weights(seed=0)
        [text] = train.sample_texts(model, small_tokenizer, [prompt])
        assert text.startswith(prompt)
        new_tokens = len(small_tokenizer.encode(text)) - len(small_tokenizer.encode(prompt))
        assert new_tokens <= max(0, sequence_len - prompt_tokens)


# Runs a stage script (argv[1]) as its own program, with the signal SIGNAL sent to the rank SIGNAL_RANK at
# its first step's stop check: a Ctrl-C or SIGTERM at a known step, with no timing involved
SIGNAL_AT_FIRST_STEP = """
import os, runpy, signal, sys
import common
check = common.StopSignal.reason
def reason(self, *args):
    if not hasattr(reason, "sent") and os.environ.get("RANK", "0") == os.environ["SIGNAL_RANK"]:
        reason.sent = True
        signal.raise_signal(int(os.environ["SIGNAL"]))
    return check(self, *args)
common.StopSignal.reason = reason
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_saves_then_stops_a_set_e_script(setup, tmp_path):
    """Ctrl-C stops after the step with a checkpoint, and then exits 130: exit 0 let `train.py && sft.py` and
    demo.sh (set -e) go on to SFT on the half-trained model. The user hears at once that it was heard."""
    (tmp_path / "signal_at_first_step.py").write_text(SIGNAL_AT_FIRST_STEP)
    args = [str(REPO / "train.py"), *args_for(setup, tmp_path / "run")]
    script = f"set -e; {sys.executable} {tmp_path / 'signal_at_first_step.py'} {' '.join(args)}; echo NEXT STAGE"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SIGNAL": str(int(signal.SIGINT)),
           "SIGNAL_RANK": "0"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and "NEXT STAGE" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SIGINT: stopping after this step, with a checkpoint to --resume from; Ctrl-C again to quit without " \
           "saving" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "stopped at step 1 (signal); continue with --resume" in proc.stdout
    assert common.latest_checkpoint(tmp_path / "run").name == "ckpt_0000001.pt"


def test_sigterm_to_one_rank_stops_both_and_exits_143(setup, tmp_path):
    """A SIGTERM to one worker: both ranks save the same step and exit 128 + 15, without a traceback of theirs
    (torchrun's own report of the exit codes follows)."""
    (tmp_path / "signal_at_first_step.py").write_text(SIGNAL_AT_FIRST_STEP)
    proc = torchrun(tmp_path / "signal_at_first_step.py", REPO / "train.py",
                    *args_for(setup, tmp_path / "run", "--eval-every", "0"), SIGNAL=str(int(signal.SIGTERM)),
                    SIGNAL_RANK="1")
    assert proc.returncode != 0 and re.search(r"exitcode\s*: 143", proc.stderr), proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks: True" in proc.stdout, proc.stdout[-2000:]
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr), proc.stderr[-3000:]
    assert common.latest_checkpoint(tmp_path / "run").name == "ckpt_0000001.pt"
    # every rank's data position is saved, and each rank resumes at its own: its next batch is the one an
    # uninterrupted rank reads next (rank 1 at rank 0's position would train on rank 0's rows twice)
    cfg = train.parse_config(args_for(setup, tmp_path / "run", "--eval-every", "0", "--resume"))
    tokenizer = Tokenizer.load(setup / "tok")
    for rank in range(2):
        uninterrupted, resumed = (dataloader.PretrainBatches(data.parse_specs(cfg.data), tokenizer,
                                                             cfg.device_batch_size, cfg.seq_len, rank, 2,
                                                             packing=cfg.packing) for _ in range(2))
        uninterrupted = iter(uninterrupted)
        next(uninterrupted)  # the one step trained (one micro-step a rank)
        model = train.build_model(cfg, tokenizer.vocab_size, torch.device("cpu"))
        train.resume(cfg, model, tokenizer, optim.build_optimizers(model, cfg), resumed, rank, 2, lambda *a: None)
        for got, expected in zip(next(iter(resumed)), next(uninterrupted)):
            assert torch.equal(got, expected), rank


def test_a_second_ctrl_c_quits_without_saving():
    with signal_handlers_kept():
        stop = common.StopSignal()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # torchrun's, after the Ctrl-C: the save goes on
        assert stop.reason(1, 0, "cpu") == "signal" and stop.exit_code() == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stale_temp_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path, monkeypatch):
    """A kill during a signal stop's save leaves ckpt_<step>.pt.tmp, of a step the resumed run may never save
    again: as large as a checkpoint, it would stay for good."""
    (tmp_path / "ckpt_0000006.pt.tmp").write_bytes(b"half a checkpoint")
    common.save_checkpoint(tmp_path, 8, {"step": 8}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000008.pt"]

    def interrupted_save(obj, f):  # a second Ctrl-C while the stop's save is being written
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, 9, {"step": 9}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000008.pt"]


# --- from a mutation audit of train.py --------------------------------------------------

def test_the_last_step_is_evaluated_whatever_the_eval_every(setup, tmp_path):
    """A run whose length is no multiple of --eval-every (and every time-budget run) ends with an evaluation:
    the report's final val bpb is the final model's, not an older one's or none."""
    out = tmp_path / "a"
    train.main(args_for(setup, out, "--max-steps", "4", "--eval-every", "3", "--save-every", "0"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpb" in r] == [3, 4]
    assert f"| final val bpb | {records[-1]['val_bpb']:.4f} (step 4) |" in (tmp_path / "report.md").read_text()


def test_a_resumed_sessions_report_gives_its_own_tokens_per_second(setup, tmp_path, monkeypatch):
    """The report's tokens/s of a resumed session is this session's tokens over this session's seconds, not the
    whole run's tokens over them. On a clock that only the steps move (1 s each): one step's tokens a second."""
    now = [0.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])
    step = train.train_step

    def timed(*args, **kwargs):
        now[0] += 1.0
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", timed)
    out = tmp_path / "a"
    train.main(args_for(setup, out, "--stop-after-steps", "3", "--eval-every", "0"))
    train.main(args_for(setup, out, "--resume", "--eval-every", "0"))
    text = (tmp_path / "report.md").read_text()
    assert "| tokens/s | 512 (mean over this session, evals included) |" in text, text
    assert "| wall time | 0.1 min (all sessions) |" in text and "| tokens | 3,072 |" in text, text


def test_the_reports_mfu_is_the_share_of_all_devices_peak(tmp_path):
    """tokens/s counts every rank's tokens, so the MFU divides by every device's peak: 4 devices doing a third of
    the FLOPs one could do are at 33.3% / 4, not 33.3%."""
    model = gpt.GPT(gpt.preset("nano", 64, 16))
    peak = 1e12
    tok_per_s = peak / 3 / model.flops_per_token()  # a third of one device's peak
    cfg = train.TrainConfig(preset="nano", out=str(tmp_path / "base"))
    train.write_report(cfg, model, 10, 10, 0, 5120, tok_per_s, 60.0, peak, 4, torch.device("cpu"), None, [],
                       lambda *a: None)
    text = (tmp_path / "report.md").read_text()
    assert "| MFU | 8.3% |" in text and "| hardware | 4 x cpu |" in text, text
