"""experiments/echo.py's bookkeeping: which earlier runs it may reuse, and its progress lines. (The
experiment itself takes half an hour; its commands are plain train.py runs, tested in test_train.py.)"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def echo():
    spec = importlib.util.spec_from_file_location("_echo", os.path.join(ROOT, "experiments", "echo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_log(out_dir, config, kinds=("start", "eval", "done")):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
        for kind in kinds:
            f.write(json.dumps({"kind": kind, "config": config, "iter": 0, "val_loss": 1.0}) + "\n")


def test_reuses_only_a_finished_run_of_the_same_settings(echo, tmp_path):
    config = {"kv_source": "upper:half", "max_iters": 800, "learning_rate": 0.001, "compile": False}
    args = ["--kv_source=upper:half", "--max_iters=800", "--learning_rate=1e-3", "--compile=False"]
    assert echo.finished_records(str(tmp_path / "none"), args) is None
    write_log(tmp_path / "a", config)
    assert len(echo.finished_records(str(tmp_path / "a"), args)) == 3
    with pytest.raises(ValueError, match=r"other settings \(max_iters=800 \(this run: 400\)\)"):
        echo.finished_records(str(tmp_path / "a"), args[:1] + ["--max_iters=400"])
    write_log(tmp_path / "b", config, kinds=("start", "eval"))  # unfinished: to be run again
    assert echo.finished_records(str(tmp_path / "b"), args) is None
    write_log(tmp_path / "c", config | {"eval_only": True}, kinds=("start", "eval"))  # an evaluation-only run
    assert len(echo.finished_records(str(tmp_path / "c"), args + ["--eval_only=True"])) == 2


def test_progress_lines_say_which_run_and_what_is_left(echo, capsys):
    progress = echo.Progress([100, 100, 50])
    progress.start("pretraining dense, seed 1", 100, ["train.py"])
    progress.end(100, 20.0, reused=False, val_loss=1.5)
    out = capsys.readouterr().out
    assert "[1/3] pretraining dense, seed 1: 100 iterations" in out
    assert "[1/3] took 20 s, val loss 1.5000" in out and "about 30 s left" in out  # 150 iterations at 0.2 s
