"""The CI smoke test: demo.sh end to end at micro scale (seconds per stage), on a data folder made here; speedrun.sh's
commands against the stages' parsers."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_serving import tiny_data_folder  # the sample data's layout, as bench/gpu.py's smoke run writes it

REPO = Path(__file__).resolve().parents[1]


def run_demo(env_extra, *args, timeout=900, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "NANOSCHNACK_DATA"}
    env.update(OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run(["bash", str(REPO / "demo.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_demo_runs_every_stage_at_micro_scale(tmp_path):
    tiny_data_folder(tmp_path / "data")
    out = tmp_path / "out"
    # paths relative to where demo.sh is run from (it changes into the repository: they were taken from there)
    proc = run_demo(dict(NANOSCHNACK_DATA="data", NANOSCHNACK_OUT="out", NANOSCHNACK_DEMO_SCALE="micro"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1. tokenizer", "2. pretraining", "3. SFT", "4. evaluation", "5. a German chat answer"):
        assert f"== {stage}" in proc.stdout
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    base = torch.load(sorted((out / "base").glob("ckpt_*.pt"))[-1], weights_only=True)
    chat = torch.load(sorted((out / "chat").glob("ckpt_*.pt"))[-1], weights_only=True)
    assert base["kind"] == "base" and base["step"] == 4
    assert chat["kind"] == "chat" and chat["step"] == 3 and chat["base"].startswith(str(out / "base"))
    report = (out / "report.md").read_text(encoding="utf-8")
    for section in ("Tokenizer", "Pretraining", "SFT", "Evaluation"):
        assert f"## {section}" in report, report
    answer = proc.stdout.split("> Wer bist du?\n", 1)[1].split("\n-- chat took")[0]
    assert answer.strip(), proc.stdout[-2000:]
    for stage in ("tokenizer", "pretraining", "SFT", "evaluation", "chat"):  # each stage's own wall time
        assert f"-- {stage} took " in proc.stdout
    assert "The whole demo took " in proc.stdout
    assert f"chat.py --checkpoint {out}/chat" in proc.stdout


def test_demo_without_data_says_what_to_pass(tmp_path):
    proc = run_demo({}, timeout=60)
    assert proc.returncode == 2
    assert "NANOSCHNACK_DATA=/path/to/data ./demo.sh" in proc.stderr and "../shared/data" in proc.stderr
    proc = run_demo(dict(NANOSCHNACK_DATA=str(tmp_path)), timeout=60)
    assert proc.returncode == 2 and "need the sample data folder" in proc.stderr
    data = tiny_data_folder(tmp_path / "data")
    (data / "sft" / "val.jsonl").unlink()  # was found missing after the whole pretraining
    proc = run_demo(dict(NANOSCHNACK_DATA=str(data), NANOSCHNACK_OUT=str(tmp_path / "out")), timeout=60)
    assert proc.returncode == 2 and "sft/val.jsonl" in proc.stderr and not (tmp_path / "out").exists()


class Parsed(Exception):
    """Raised by the patched parse_args once a stage's flags have parsed: the stage itself never runs."""


def test_speedrun_passes_each_stage_only_flags_it_takes(tmp_path, monkeypatch):
    import common
    import evaluation
    import prepare
    import sft
    import tok
    import train
    log = tmp_path / "commands.jsonl"
    stand_in = tmp_path / "python"  # records each stage's command; `-c` (reading a default from data.py) runs
    stand_in.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"if sys.argv[1] == '-c':\n    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
                        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stand_in.chmod(0o755)
    env = dict(os.environ, PY=str(stand_in), OUT=str(tmp_path / "out"), PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "speedrun.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [(c[i].removesuffix(".py"), c[i + 1:]) for c in commands for i in [[a[-3:] for a in c].index(".py")]]
    assert [name for name, _ in stages] == ["prepare", "tok", "train", "sft", "evaluation", "evaluation"]
    assert commands[2][:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    train_config = common.parse_config(train.TrainConfig, train.PRESETS, stages[2][1])  # with the flags' ranges
    assert train_config.preset == "d20" and train_config.resume
    assert common.parse_config(sft.SFTConfig, sft.PRESETS, stages[3][1]).resume

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))
    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    mains = dict(prepare=prepare.main, tok=tok.main, evaluation=evaluation.main)
    for name, flags in stages:
        if name in mains:
            with pytest.raises(Parsed):  # an unknown flag or a bad value exits with argparse's error instead
                mains[name](flags)
