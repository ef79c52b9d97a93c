"""experiments/keep_skills.py end to end on a tiny chat model: generation, calibration, conversion, KL
distillation, the delta and the evaluation of base + delta, and --reuse."""

import importlib
import json

import torch

import speed
from checkpoint import load_model
from delta import load_with_delta
from test_selfgen import PROMPTS, save_tiny


def run(exp, tmp_path, teacher, *extra):
    prompts, questions = tmp_path / "prompts.txt", tmp_path / "q.json"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    questions.write_text(json.dumps([{"category": "facts", "question": p, "expected": ["a"]} for p in PROMPTS[:4]]))
    data = tmp_path / "data"
    return exp.main([f"--teacher={teacher}", f"--data={data}", f"--out={tmp_path / 'res'}", f"--runs={tmp_path / 'runs'}",
                     "--share=1", "--gen_tokens=400", "--gen_val_tokens=200", "--gen_batch_size=4",
                     "--gen_max_new_tokens=24", "--gen_compile=False", f"--prompts={prompts}", f"--calib_dataset={data}",
                     "--calib_batches=2", "--iters=4", "--batch_size=2", "--block_size=16",
                     "--eval_tokens=64", "--eval_block_size=16", f"--eval_sets={data / 'val.bin'}",
                     f"--questions={questions}", "--mix=", *extra])


def test_keep_skills_quick_end_to_end_and_reuse(tmp_path):
    exp = importlib.import_module("experiments.keep_skills")
    teacher = tmp_path / "teacher.pt"
    save_tiny(teacher)
    results = run(exp, tmp_path, teacher, "--train_set=consumers_qo", "--local_iters=2")
    row = results["models"]["kv1"]
    assert len(row["kv_source"]) == 3 and len(set(row["kv_source"])) == 2  # one of 3 layers reads another's K/V
    assert row["kv_fraction"] == 2 / 3
    assert set(row["phase_s"]) == {"calibration", "conversion", "distillation", "delta", "evaluation"}
    ev = row["evaluation"]
    assert ev["delta"].endswith("kv1.safetensors")
    figures = ev["sets"][str(tmp_path / "data" / "val.bin")]
    assert figures["kl"] > 0 and figures["agreement"] < 1  # the student is not the teacher
    assert ev["chat"]["questions"] == 4 and len(ev["chat"]["answers"]) == 4
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["selfgen"]["settings"]["dtype"] == "bfloat16"  # the default
    # the evaluated student is base + the shipped delta: its logits are the distilled model's, to bf16 rounding
    adapted, _ = load_model(str(tmp_path / "runs" / "kv1" / "distill"))
    shipped, _ = load_with_delta(str(teacher), str(tmp_path / "res" / "kv1.safetensors"))
    x = torch.randint(3, 50, (1, 12))
    assert list(shipped.config.kv_source) == row["kv_source"]
    torch.testing.assert_close(shipped(x)[0], adapted(x)[0], atol=0.05, rtol=0.02)
    md = (tmp_path / "res" / "results.md").read_text()
    assert f"| 0.67 (kv1) | the teacher's chat answers | {ev['chat']['on_teacher_answers']['ppl_ratio']:.4f} |" in md
    assert PROMPTS[0] in md and "Phase wall times" in md and results["goals"] == []  # goals: the 30-layer maps only
    # --reuse: nothing runs again, the delta and the trained checkpoint keep their files
    stamps = {p: p.stat().st_mtime_ns for p in [tmp_path / "res" / "kv1.safetensors",
                                                tmp_path / "runs" / "kv1" / "distill" / "ckpt.pt"]}
    again = run(exp, tmp_path, teacher, "--train_set=consumers_qo", "--local_iters=2", "--reuse=True")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["models"]["kv1"]["phase_s"] == row["phase_s"]


def test_keep_skills_lora_ships_the_adapters_over_the_teacher(tmp_path, monkeypatch, capsys):
    """train_set=lora: no conversion phase, the run trains adapters over the teacher itself, and the shipped
    delta is those adapters: base + delta gives the trained run's logits (fp32 adapters, merged). The default
    distill_dtype=auto is bf16 autocast where the CPU has bf16 instructions, fp32 where it has none."""
    from checkpoint import load_checkpoint
    from delta import read_delta
    from lora import merge_lora, model_from_lora_checkpoint
    exp = importlib.import_module("experiments.keep_skills")
    teacher = tmp_path / "teacher.pt"
    save_tiny(teacher)
    monkeypatch.setattr(exp, "resolve_device", lambda name: "cpu")
    monkeypatch.setattr(speed, "cpu_flags", lambda: "flags : avx2 fma avx512f avx512_bf16")
    row = run(exp, tmp_path, teacher, "--train_set=lora", "--lora_rank=2", "--learning_rate=1e-2",
              "--adapters_dtype=float32", "--gen_dtype=bfloat16", "--eval_dtype=bfloat16", "--calib_dtype=float32", "--calib_search=2",
              "--calib_search_batches=3")["models"]["kv1"]
    calibration = json.loads((tmp_path / "runs" / "kv1" / "calibration.json").read_text())["cmd"]
    assert "--search=2" in calibration and "--search_batches=3" in calibration  # searched switch by switch on 3 batches
    assert "searched among 2 switches on 3 batches" in (tmp_path / "res" / "results.md").read_text()
    assert "switch 1 of 1: layer" in (tmp_path / "runs" / "kv1" / "calibration.txt").read_text()
    distill_cmd = json.loads((tmp_path / "runs" / "kv1" / "distillation.json").read_text())["cmd"]
    assert "--dtype=bfloat16" in distill_cmd  # auto, on a CPU with bf16 instructions
    generation = json.loads((tmp_path / "runs" / "generation.json").read_text())
    assert "--dtype=bfloat16" in generation["cmd"]  # the teacher sampled in bf16, as its data's record says
    assert row["evaluation"]["settings"]["dtype"] == "bfloat16"  # the held-out sets scored in bf16 autocast
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["selfgen"]["settings"]["dtype"] == "bfloat16"
    assert set(row["phase_s"]) == {"calibration", "distillation", "delta", "evaluation"}
    kind, tensors, meta = read_delta(str(tmp_path / "res" / "kv1.safetensors"))
    assert kind == "lora" and json.loads(meta["kv_source"]) == row["kv_source"]
    assert any(k.endswith("mlp.down_proj.lora_B") for k in tensors)  # every linear, not only attention's
    assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith("lora_B")) > 0  # B left zero: trained
    run_model = merge_lora(model_from_lora_checkpoint(load_checkpoint(str(tmp_path / "runs" / "kv1" / "distill" /
                                                                          "ckpt.pt")))).eval()
    shipped, _ = load_with_delta(str(teacher), str(tmp_path / "res" / "kv1.safetensors"))
    x = torch.randint(3, 50, (1, 12))
    torch.testing.assert_close(shipped(x)[0], run_model(x)[0], atol=1e-5, rtol=1e-5)
    teacher_model, _ = load_model(str(teacher))
    assert (shipped(x)[0] - teacher_model(x)[0]).abs().max() > 1e-3  # the student is not the teacher
    # --mix: the generated text plus runs of another dataset's (here: its own, again) is the distillation's text
    data = tmp_path / "data"
    monkeypatch.setattr(speed, "cpu_flags", lambda: "flags : avx2 fma f16c")
    capsys.readouterr()
    again = run(exp, tmp_path, teacher, "--train_set=lora", "--lora_rank=2", "--learning_rate=1e-2", "--reuse=True",
                f"--mix={data}:100", "--eval_dtype=bfloat16", "--teacher_topk=8", "--calib_dtype=float32", "--calib_search=2",
                "--calib_search_batches=3")
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --")]
    assert len(warned) == 1 and "--eval_dtype=bfloat16" in warned[0] and "without bf16 instructions" in warned[0]
    assert again["mix_s"] >= 0 and again["models"]["kv1"]["phase_s"]["calibration"] == row["phase_s"]["calibration"]
    mixed = tmp_path / "runs" / "mix"
    assert (mixed / "train.bin").stat().st_size == (data / "train.bin").stat().st_size + 100 * 2
    distill_cmd = json.loads((tmp_path / "runs" / "kv1" / "distillation.json").read_text())["cmd"]
    assert f"--dataset={mixed}" in distill_cmd and "--dtype=float32" in distill_cmd  # auto, without bf16 instructions
    # --teacher_topk: the teacher's top 8 for every batch, made in the distillation and kept in the runs folder
    cache = tmp_path / "runs" / "teacher_top8.pt"
    assert f"--distill_cache={cache}" in distill_cmd and "--distill_cache_topk=8" in distill_cmd
    assert torch.load(cache, weights_only=True)["index"].shape[-1] == 8
    from configurator import run_script
    for topk in ("-1", "99"):  # the tiny teacher has 99 tokens
        assert run_script(exp.main, [f"--teacher={teacher}", f"--teacher_topk={topk}", f"--out={tmp_path / 'o'}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--teacher_topk={topk}" in err[0] and "99 tokens" in err[0], err


def test_keep_skills_bad_share_is_one_line(tmp_path, capsys):
    from configurator import run_script
    exp = importlib.import_module("experiments.keep_skills")
    assert run_script(exp.main, ["--share=0", f"--out={tmp_path}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--share" in err[0]
    assert run_script(exp.main, ["--train_set=all", f"--out={tmp_path}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_set" in err[0] and "lora" in err[0]
    assert run_script(exp.main, ["--local_iters=5", f"--out={tmp_path}"]) != 0  # the default set is lora: no local phase
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--local_iters" in err[0] and "consumers_qo" in err[0]
    assert run_script(exp.main, ["--train_set=consumers_qo", "--lora_rank=4", f"--out={tmp_path}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora_rank" in err[0]
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")  # only its existence is checked before the mix
    for mix, words in [("data/shakespeare_smollm2", "DIR:TOKENS"), (f"{tmp_path / 'none'}:100", "no train.bin")]:
        assert run_script(exp.main, [f"--mix={mix}", f"--teacher={teacher}", f"--out={tmp_path}",
                                     f"--runs={tmp_path / 'runs'}"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and not (tmp_path / "runs").exists()  # before the generation


def test_keep_skills_attention_sharing_row_beside_a_kv_run(tmp_path):
    """sharing=attention (EchoAtt): the map comes from adapt.py's attention criterion, train.py switches to it
    before step 0 and trains adapters on every linear the sharers still have; base + shipped adapters is the
    run's merged model; its KV cache keeps every layer's values and the non-sharers' keys. The plot takes a
    K/V run's results.json beside it."""
    from checkpoint import load_checkpoint
    from delta import read_delta
    from lora import merge_lora, model_from_lora_checkpoint
    exp = importlib.import_module("experiments.keep_skills")
    teacher = tmp_path / "teacher.pt"
    save_tiny(teacher, n_layer=4)
    kv_run = run(exp, tmp_path, teacher, "--lora_rank=2", f"--out={tmp_path / 'kv'}")
    results = run(exp, tmp_path, teacher, "--sharing=attention", "--lora_rank=2", "--adapters_dtype=float32", "--learning_rate=1e-2",
                  "--reuse=True", f"--beside={tmp_path / 'kv' / 'results.json'}")  # the generation reused
    row = results["models"]["attention1"]
    assert row["kv_source"] == [0, 1, 2, 3] and sum(i != j for i, j in enumerate(row["attn_source"])) == 1
    assert row["kv_fraction"] == 7 / 8 and kv_run["models"]["kv1"]["kv_fraction"] == 3 / 4
    calibration = json.loads((tmp_path / "runs" / "attention1" / "calibration.json").read_text())["cmd"]
    assert "--criterion=attention" in calibration and (tmp_path / "runs" / "attention1" / "attn_similarity.pt").exists()
    assert "--adapt_attn_target=" + ",".join(map(str, row["attn_source"])) in \
        json.loads((tmp_path / "runs" / "attention1" / "distillation.json").read_text())["cmd"]
    kind, tensors, meta = read_delta(str(tmp_path / "res" / "attention1.safetensors"))
    sharer = next(i for i, j in enumerate(row["attn_source"]) if i != j)
    assert json.loads(meta["attn_source"]) == row["attn_source"]
    assert not any(k.startswith((f"layers.{sharer}.self_attn.q_proj", f"layers.{sharer}.self_attn.k_proj")) for k in tensors)
    assert f"layers.{sharer}.self_attn.v_proj.lora_B" in tensors
    run_model = merge_lora(model_from_lora_checkpoint(load_checkpoint(str(tmp_path / "runs" / "attention1" / "distill" /
                                                                          "ckpt.pt")))).eval()
    shipped, _ = load_with_delta(str(teacher), str(tmp_path / "res" / "attention1.safetensors"))
    x = torch.randint(3, 50, (1, 12))
    torch.testing.assert_close(shipped(x)[0], run_model(x)[0], atol=1e-5, rtol=1e-5)
    assert results["goals"] == [] and (tmp_path / "res" / "pareto.png").stat().st_size > 0


def test_keep_skills_sharing_settings_and_beside_are_checked_in_one_line(tmp_path, capsys):
    from configurator import run_script
    exp = importlib.import_module("experiments.keep_skills")
    bad = tmp_path / "not_results.json"
    bad.write_text('{"models": {}}')
    for args, words in ((["--sharing=attention", "--train_set=consumers_qo"], ("--sharing=attention", "consumers_qo")),
                        (["--sharing=attention", "--criterion=logits"], ("--sharing=attention", "criterion=logits")),
                        (["--criterion=attention"], ("--criterion=attention", "--sharing=attention")),
                        ([f"--beside={tmp_path / 'missing.json'}"], ("--beside=", "missing.json")),
                        ([f"--beside={bad}"], ("--beside=", "not a results.json")),
                        (["--distill_dtype=float16"], ("distill_dtype", "float16")),
                        (["--gen_dtype=float16"], ("gen_dtype", "float16")),
                        (["--eval_dtype=half"], ("eval_dtype", "bfloat16")),
                        (["--calib_search=-1"], ("--calib_search=-1", "k >= 1")),
                        (["--sharing=attention", "--calib_search=4"], ("--calib_search=4", "K/V maps")),
                        (["--calib_search=0", "--calib_search_batches=8"], ("--calib_search_batches=8", "only with --calib_search")),
                        (["--calib_search=4", "--calib_batches=4", "--calib_search_batches=2"],
                         ("--calib_search_batches=2", "below --calib_batches=4"))):
        assert run_script(exp.main, [*args, f"--out={tmp_path / 'out'}", f"--teacher={bad}"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (args, err)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_keep_skills_plot_puts_runs_of_one_recipe_on_one_line():
    """Two K/V runs (say 8 and 15 layers, then 22 in a later run given --beside) are one line of the Pareto plot,
    every point kept; an attention run is its own line, and so is a K/V run on other text, with other steps or in
    another precision (a run without distill_dtype distilled in fp32)."""
    exp = importlib.import_module("experiments.keep_skills")

    def results(sharing, settings=None, **fractions):
        return {"settings": {"sharing": sharing, "train_set": "lora", **(settings or {})}, "models": {
            name: {"kv_fraction": f, "evaluation": {"sets": {"plays": {"ppl_ratio": 1 / f}}}} for name, f in fractions.items()}}

    mixed = {"mix": "data/shakespeare_smollm2:120000", "iters": 200}
    series = exp.plot_series([results("kv", kvA=0.25), results("kv", kvB=0.75, kvC=0.5), results("attention", atA=0.875),
                              results("kv", mixed, kvD=0.75), results("kv", {"iters": 200}, kvE=0.75),
                              results("kv", {"distill_dtype": "bfloat16"}, kvF=0.75),
                              results("kv", {"distill_dtype": "float32"}, kvG=0.5),
                              results("kv", {"distill_dtype": "float32", "gen_dtype": "bfloat16"}, kvH=0.5)])
    kv, attention = (next(v for k, v in series.items() if k.startswith(p)) for p in ("K/V sharing", "attention sharing"))
    assert sorted(kv["plays"]) == [(0.25, 4.0), (0.5, 2.0), (0.5, 2.0), (0.75, 4 / 3)]  # kvG: fp32, said or not
    assert attention["plays"] == [(0.875, 1 / 0.875)]
    labels = [k for k in series if k.startswith("K/V sharing")]
    assert len(labels) == 5 and any("shakespeare_smollm2" in k and "200 steps" in k for k in labels)
    assert series[next(k for k in labels if "bf16-generated" in k)]["plays"] == [(0.5, 2.0)]  # bf16 samples: its own
    assert sorted(series[next(k for k in labels if "bf16 autocast" in k)]["plays"]) == [(0.75, 4 / 3)]


def test_keep_skills_defaults_issue_the_shipped_deltas_commands(tmp_path, monkeypatch, capsys):
    """The bare command (`keep_skills.py --threads=2`, on a CPU with bf16 instructions) issues, phase by phase,
    the very commands of the run that made both shipped deltas (its records: results/smollm2-adapted/one-command/;
    its KV-0.73 phases are those that remade kv8.safetensors byte for byte from a fresh clone, fresh-clone/). The
    phases are not run: each call is recorded, and the calibration's map and the evaluation's report are the run's."""
    import os
    exp = importlib.import_module("experiments.keep_skills")
    records = os.path.join(exp.ROOT, "results", "smollm2-adapted", "one-command")
    recorded = lambda name: json.load(open(os.path.join(records, f"{name}.json")))["cmd"]  # noqa: E731
    issued = {}

    def phase(name, script, args, s):
        issued[name] = [script, *args]
        kv = os.path.dirname(name)  # the map's folder, '' for the generation and the mix
        folder = os.path.join(s.runs, kv)
        os.makedirs(folder, exist_ok=True)
        if name.endswith("calibration"):
            target = next(a for a in recorded(f"{kv}/distillation") if a.startswith("--adapt_target="))
            with open(os.path.join(s.runs, f"{name}.txt"), "w") as f:
                f.write(f"proposed kv_source sharing n layers: {target.split('=')[1]}\n")
        if name.endswith("delta"):
            os.makedirs(s.out, exist_ok=True)
            open(os.path.join(s.out, f"{kv}.safetensors"), "wb").close()
        if name.endswith("evaluation"):
            with open(os.path.join(records, kv, "eval.json")) as src, open(os.path.join(folder, "eval.json"), "w") as f:
                f.write(src.read())
        return {"cmd": issued[name], "wall_s": 1.0}

    monkeypatch.chdir(tmp_path)  # the results folder goes here
    for name, value in (("phase", phase), ("check_teacher", lambda s: None), ("check_mix", lambda s: None),
                        ("apply_threads", lambda threads, children: threads), ("resolve_device", lambda name: "cpu"),
                        ("cpu_multiplies_bf16", lambda: True), ("plot_all", lambda *a: False)):
        monkeypatch.setattr(exp, name, value)
    results = exp.main(["--threads=2"])
    assert list(issued) == ["generation", "mix"] + [f"{kv}/{p}" for kv in ("kv8", "kv15")
                                                    for p in ("calibration", "distillation", "delta", "evaluation")]
    for name in issued:
        assert issued[name] == recorded(name), name
    fresh = os.path.join(exp.ROOT, "results", "smollm2-adapted", "fresh-clone", "kv8", "distillation.json")
    assert issued["kv8/distillation"] == json.load(open(fresh))["cmd"]
    assert list(results["models"]) == ["kv8", "kv15"]  # both maps of the issue, in one command
    assert "no pareto.png: matplotlib is missing" in capsys.readouterr().out  # not claimed when not drawn


def test_keep_skills_lowest_consumer_trains_the_upper_layers_only(tmp_path, capsys):
    """--lowest_consumer=L: the calibration is asked for consumers at L and up, and the distillation puts adapters on
    q, o, gate, up and down of layers L and up only (so its backward stops at L); the shipped delta holds those alone.
    A layer that leaves too few layers to share, a negative one, or one with attention sharing: one line, before
    the generation."""
    from configurator import run_script
    from delta import read_delta
    exp = importlib.import_module("experiments.keep_skills")
    teacher = tmp_path / "teacher.pt"
    save_tiny(teacher, n_layer=4)
    row = run(exp, tmp_path, teacher, "--train_set=lora", "--lora_rank=2", "--calib_dtype=float32",
              "--lowest_consumer=2")["models"]["kv1"]
    calibration = json.loads((tmp_path / "runs" / "kv1" / "calibration.json").read_text())["cmd"]
    assert "--lowest_consumer=2" in calibration
    assert [i for i, j in enumerate(row["kv_source"]) if i != j][0] >= 2  # the one consumer: layer 2 or 3
    distill_cmd = json.loads((tmp_path / "runs" / "kv1" / "distillation.json").read_text())["cmd"]
    assert "--lora_layers=2,3" in distill_cmd and "--lora_targets=q,o,gate,up,down" in distill_cmd
    _, tensors, _ = read_delta(str(tmp_path / "res" / "kv1.safetensors"))
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in tensors}
    assert layers == {2, 3} and not any("k_proj" in k or "v_proj" in k for k in tensors)
    assert "on q, o, gate, up, down of layers 2 and up" in (tmp_path / "res" / "results.md").read_text()
    capsys.readouterr()
    for args, words in [(["--lowest_consumer=4"], "leaves 0 of the teacher's 4 layers"),
                        (["--lowest_consumer=-1"], "give 0, or a layer"),
                        (["--lowest_consumer=1", "--sharing=attention"], "--sharing=kv")]:
        runs = tmp_path / "bad-runs"
        assert run_script(exp.main, [f"--teacher={teacher}", f"--out={tmp_path / 'o'}", f"--runs={runs}", "--share=1",
                                     *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--lowest_consumer=" in err[0] and words in err[0] and not runs.exists(), err
