"""collect_results: grouping, mean/std/per-seed values, plots and the metrics copy on a hand-written runs tree."""
import json
import math

import pytest

import collect_results as cr
import run_metrics

GRADMEM_K2 = "gradmem_llama_L4H4D128_mem8_K2_ilr0.04_whead_grad_second_bs_64_lr_1e-04"
GRADMEM_K1 = "gradmem_llama_L4H4D128_mem8_K1_ilr0.04_whead_grad_second_bs_64_lr_1e-04"
RMT = "rmt2segm_llama_L4H4D128_mem8_bs_64_lr_1e-04"
# the saved arguments (a part of them) of each run name: collect_results reads these, not the names
GRADMEM_ARGS = {"n_mem_tokens": 8, "K": 2, "inner_lr": 0.04, "last_K_second_order": None, "grad_mode": "second"}
ARGS = {GRADMEM_K2: GRADMEM_ARGS, GRADMEM_K1: {**GRADMEM_ARGS, "K": 1},
        RMT: {"n_mem_tokens": 8, "K": 1, "use_reconstruction_loss": False}}

# (task, run_name, seed) -> (token_accuracy, exact_match); None = no all_results.json (still running / crashed)
RESULTS = {
    ("N8-K2V2-V62_1M", GRADMEM_K2, 1): (0.99, 0.98),
    ("N8-K2V2-V62_1M", GRADMEM_K2, 2): (0.97, 0.94),
    ("N8-K2V2-V62_1M", GRADMEM_K2, 3): (0.95, 0.90),
    ("N8-K2V2-V62_1M", GRADMEM_K1, 1): (0.50, 0.20),
    ("N8-K2V2-V62_1M", GRADMEM_K1, 2): None,
    ("N8-K2V2-V62_1M", RMT, 1): (0.9, 0.8),
    ("N8-K2V2-V62_1M", RMT, 2): (0.8, 0.6),
    ("N16-K2V2-V62_1M", GRADMEM_K2, 1): (0.9, 0.8),
    ("N16-K2V2-V62_1M", GRADMEM_K2, 2): (0.7, 0.5),
    ("N16-K2V2-V62_1M", RMT, 1): (0.12, 0.014),
    ("N16-K2V2-V62_1M", RMT, 2): (0.11, 0.012),
}


def write_runs(root):
    for (task, name, seed), result in RESULTS.items():
        run = root / task / name / f"run_{seed}"
        run.mkdir(parents=True)
        record = {"cli_args": {"seed": seed, "run_name": name, **ARGS[name]}}
        if seed == 1:  # today's layout: run record run_config.json beside the model's config.json
            (run / "run_config.json").write_text(json.dumps(record))
            (run / "config.json").write_text(json.dumps({"model_type": "grad_memgpt"}))
        else:  # older runs: the run record is config.json
            (run / "config.json").write_text(json.dumps(record))
        (run / "checkpoint-10").mkdir()
        (run / "checkpoint-10" / "model.safetensors").write_bytes(b"weights")
        em = result[1] if result else 0.1
        history = [{"step": 0, "eval_exact_match": 0.0}, {"step": 5, "loss": 1.0},
                   {"step": 10, "eval_exact_match": em / 2}, {"step": 20, "eval_exact_match": em},
                   {"step": 20, "train_runtime": 1.0}, {"step": 20, "eval_exact_match": em}]
        (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        if result is not None:
            (run / "all_results.json").write_text(json.dumps(
                {"eval_token_accuracy": result[0], "eval_exact_match": result[1], "global_step": 20}))
    (root / "runs_without_layout").mkdir()  # not a run folder: ignored


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    write_runs(root)
    return root


def by_key(groups):
    return {(g.task, g.run_name): g for g in groups}


def test_groups_mean_std_per_seed(runs_root):
    runs = cr.find_runs(runs_root)
    assert len(runs) == len(RESULTS)
    groups = by_key(cr.group_runs(runs))
    assert len(groups) == 5

    g = groups[("N8-K2V2-V62_1M", GRADMEM_K2)]
    assert g.seeds == [1, 2, 3]
    assert g.values["eval_exact_match"] == [0.98, 0.94, 0.90]
    assert g.mean("eval_exact_match") == pytest.approx(0.94, abs=1e-12)
    assert g.std("eval_exact_match") == pytest.approx(0.04, abs=1e-12)  # ddof=1
    assert g.mean("eval_token_accuracy") == pytest.approx(0.97, abs=1e-12)
    assert g.std("eval_token_accuracy") == pytest.approx(0.02, abs=1e-12)

    g = groups[("N8-K2V2-V62_1M", GRADMEM_K1)]  # one seed without all_results.json: nan, skipped by mean/std
    assert g.seeds == [1, 2]
    assert g.values["eval_exact_match"][0] == 0.20 and math.isnan(g.values["eval_exact_match"][1])
    assert g.mean("eval_exact_match") == pytest.approx(0.20)
    assert math.isnan(g.std("eval_exact_match"))
    assert cr.format_cell(g, "eval_exact_match") == "0.200000 (NaN) [0.2, nan]"

    g = groups[("N16-K2V2-V62_1M", RMT)]
    assert cr.format_cell(g, "eval_exact_match") == "0.013000 (0.001414) [0.014, 0.012]"


def test_markdown_table_sorted_by_task_then_exact_match(runs_root):
    table = cr.markdown_table(cr.group_runs(cr.find_runs(runs_root)))
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split(" | ")[1] for r in rows] == [GRADMEM_K2, RMT, GRADMEM_K1, GRADMEM_K2, RMT]
    assert rows[0].startswith("| N8-K2V2-V62_1M |") and rows[3].startswith("| N16-K2V2-V62_1M |")  # by N
    assert "| 1, 2, 3 | 0.970000 (0.020000) [0.99, 0.97, 0.95] | 0.940000 (0.040000) [0.98, 0.94, 0.9] |" in table


def test_learning_curve_drops_reevaluation_after_training(runs_root):
    run = next(r for r in cr.find_runs(runs_root) if r.seed == 1 and r.run_name == RMT and r.task == "N8-K2V2-V62_1M")
    assert cr._series(run.log_history) == ([0, 10, 20], [0.0, 0.4, 0.8])


def test_plot_grouping():
    assert cr.model_family(GRADMEM_K2) == "gradmem" and cr.model_family(RMT) == "rmt2segm"
    assert cr.model_family("llama_L4H4D128_L1024_bs_64_lr_1e-04") == "llama"
    assert cr.model_family("mamba_L4D128_bs_64_lr_3e-04") == "mamba" and cr.model_family("gpt2_x") == "other"
    assert cr.kv_task_n("N16-K2V2-V62_1M") == 16 and cr.kv_task_n("squad_v2") is None
    assert cr.task_variant("N32-K2V2-V62_noise_0.5_1M") == "N*-K2V2-V62_noise_0.5_1M"

    def group(name, **changed):
        args = ARGS.get(name, GRADMEM_ARGS)
        return cr.Group("N8-K2V2-V62_1M", name, [1], {m: [0.5] for m in cr.METRICS}, {**args, **changed})

    last_k1 = "gradmem_llama_L4H4D128_mem8_K2_ilr0.04_last_K1_whead_grad_second_bs_64_lr_1e-04"
    groups = [group(GRADMEM_K2), group(GRADMEM_K1), group(RMT), group(last_k1, last_K_second_order=1),
              group(GRADMEM_K2.replace("second", "first"), grad_mode="first"),
              group(GRADMEM_K2.replace("ilr0.04", "ilr0.08"), inner_lr=0.08)]
    found = cr.ablation_groups(groups, "K")
    assert list(found) == [("N8-K2V2-V62_1M", GRADMEM_K2.replace("_K2_", "_K*_"))]
    assert list(found[list(found)[0]]) == ["1", "2"]
    found = cr.ablation_groups(groups, "grad_mode")
    assert list(found) == [("N8-K2V2-V62_1M", GRADMEM_K2.replace("second", "*"))]
    assert list(found[list(found)[0]]) == ["first", "second"]


def test_em_vs_n_leaves_out_groups_without_an_exact_match(tmp_path):
    """A family whose only runs are unfinished (no exact match yet) gets no panel; with no point at all, no figure."""
    def group(name, em):
        return cr.Group("N8-K2V2-V62_1M", name, [1], {m: [em] for m in cr.METRICS}, {})

    finished, unfinished = group(GRADMEM_K2, 0.5), group("mamba_L4D128_bs_64_lr_3e-04", math.nan)
    assert cr.plot_em_vs_n([finished, unfinished], tmp_path).name == "em_vs_n.png"
    assert cr.plot_em_vs_n([unfinished], tmp_path / "none") is None


def test_write_summary_writes_table_json_and_pngs(runs_root, tmp_path):
    out = tmp_path / "summary"
    cr.main(["--runs", str(runs_root), "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    matrix = ["k_scaling.png", "matrix.json", "matrix.md", "matrix_curves_N16-K2V2-V62_1M.png",
              "matrix_curves_N8-K2V2-V62_1M.png"]  # the GradMem runs' saved arguments name a family and an lr
    assert names == sorted(["ablation_K.png", "em_vs_n.png", "learning_curves_N16-K2V2-V62_1M.png",
                            "learning_curves_N8-K2V2-V62_1M.png", "summary.json", "summary.md", *matrix])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    records = json.loads((out / "summary.json").read_text())
    k1 = next(r for r in records if r["run_name"] == GRADMEM_K1)
    assert k1["eval_exact_match"] == {"mean": 0.2, "std": None, "per_seed": [0.2, None]}
    assert "0.940000 (0.040000) [0.98, 0.94, 0.9]" in (out / "summary.md").read_text()


def test_copy_metrics_copies_json_only_and_rebuilds_same_table(runs_root, tmp_path):
    dest = tmp_path / "results" / "runs"
    cr.main(["--runs", str(runs_root), "--copy_metrics", str(dest)])
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert len(copied) == 3 * (len(RESULTS) - 1)  # the unfinished run (no all_results.json) is left out
    assert all(p.endswith(run_metrics.RUN_FILES + ("/config.json",)) for p in copied) and not any("checkpoint" in p for p in copied)
    assert not any(p.endswith("run_1/config.json") for p in copied)  # a model's config is not a run record
    assert not (dest / "N8-K2V2-V62_1M" / GRADMEM_K1 / "run_2").exists()
    finished = cr.markdown_table(cr.group_runs([r for r in cr.find_runs(runs_root) if r.metrics]))
    assert cr.markdown_table(cr.group_runs(cr.find_runs(dest))) == finished


def test_bad_input_fails_clearly(tmp_path, runs_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cr.find_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folders"):
        cr.find_runs(tmp_path / "empty")
    with pytest.raises(ValueError, match="inside --runs"):
        cr.copy_metrics(runs_root, runs_root / "copy")
    with pytest.raises(SystemExit):
        cr.main(["--runs", str(runs_root)])  # neither --out nor --copy_metrics


def test_malformed_result_files_are_skipped_with_a_warning(runs_root, capsys):
    run = runs_root / "N8-K2V2-V62_1M" / RMT
    bad = {run / "run_1" / "all_results.json": "{",
           run / "run_2" / "all_results.json": "[0.9, 0.8]",
           runs_root / "N16-K2V2-V62_1M" / RMT / "run_1" / "all_results.json": '{"eval_exact_match": "0.9"}',
           runs_root / "N16-K2V2-V62_1M" / RMT / "run_2" / "trainer_state.json": '{"log_history": "none"}',
           runs_root / "N16-K2V2-V62_1M" / GRADMEM_K2 / "run_1" / "trainer_state.json":
               '{"log_history": [{"step": "ten", "eval_exact_match": 0.5}]}'}
    for path, text in bad.items():
        path.write_text(text)
    runs = {r.path: r for r in cr.find_runs(runs_root)}
    assert len(runs) == len(RESULTS)  # every run is still listed
    warnings = capsys.readouterr().err
    for path in bad:
        assert f"skipping {path}" in warnings
        assert (runs[path.parent].metrics if path.name == "all_results.json" else runs[path.parent].log_history) in ({}, [])
    groups = by_key(cr.group_runs(list(runs.values())))
    assert math.isnan(groups[("N8-K2V2-V62_1M", RMT)].mean("eval_exact_match"))
    assert groups[("N16-K2V2-V62_1M", GRADMEM_K2)].values["eval_exact_match"] == [pytest.approx(0.8), 0.5]


def test_no_two_series_of_a_plot_look_alike():
    """More series than colours: after the ten colours of the cycle, the next ten are dashed with other markers."""
    styles = [run_metrics.series_style(i) for i in range(40)]
    assert len({tuple(sorted(s.items())) for s in styles}) == 40
    assert styles[10]["color"] == styles[0]["color"] and styles[10]["linestyle"] != styles[0]["linestyle"]
