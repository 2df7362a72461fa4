"""collect_results' comparison matrix on a hand-written runs tree: cells from the saved arguments (not the names), the
best lr chosen on valid (never on test), the selected checkpoint's test numbers beside the final one's, the
diverged / collapsed / unfinished table (listed, never dropped), and the K-scaling data and plots; the lr choice of
run_paper_claims.sh's two phases (lr_sweep_choice: the same rule on the phase-1 runs, no choice from a faulty sweep)."""
import json
import math
from pathlib import Path

import pytest

import collect_results as cr
import results_matrix as rm

N8, N16 = "N8-K2V2-V62_1M", "N16-K2V2-V62_1M"
BASE = {"max_steps": 10000, "warmup_steps": 300, "adam_beta2": 0.999, "per_device_batch_size": 64, "use_cpu": False}
FAMILY_ARGS = {
    "gradmem": {"grad_mode": "second", "n_mem_tokens": 8, "learning_rate": 1e-3},
    "rmt": {"use_reconstruction_loss": True, "n_mem_tokens": 8, "mem_proj_mode": "proj"},
    "llama": {"max_input_length": None, "base_model": "llama", "adam_beta2": 0.98},
    "mamba": {"max_input_length": None, "base_model": "mamba"},
}


def saved_args(family, task, seed, lr, K=None, **changed):
    args = {**BASE, **FAMILY_ARGS[family], "seed": seed, "data_path": f"./data/{task}", **changed}
    args["inner_lr" if family == "gradmem" else "learning_rate"] = lr
    if K is not None:
        args["K"] = K
    return args


# (task, family, K, lr, seed) -> results; the run folder name is deliberately uninformative: cells come from the args
RUNS = [
    # GradMem K=2 at N8: ilr 0.04 is best on valid (0.9) but worse on test than ilr 0.08 (valid 0.8): 0.04 is chosen
    (N8, "gradmem", 2, 0.04, 143, dict(valid=0.92, test=0.50)),
    (N8, "gradmem", 2, 0.04, 144, dict(valid=0.88, test=0.52, final_valid=0.86, final_test=0.48)),
    (N8, "gradmem", 2, 0.08, 143, dict(valid=0.80, test=0.95)),
    (N8, "gradmem", 2, 0.08, 144, dict(valid=0.80, test=0.97)),
    # K=1: a tie on valid between 0.04 and 0.16 -> the smaller lr; 0.16 seed 144 diverged (its numbers stay in)
    (N8, "gradmem", 1, 0.04, 143, dict(valid=0.30, test=0.31)),
    (N8, "gradmem", 1, 0.04, 144, dict(valid=0.30, test=0.29)),
    (N8, "gradmem", 1, 0.16, 143, dict(valid=0.50, test=0.49)),
    (N8, "gradmem", 1, 0.16, 144, dict(valid=0.10, test=0.12, loss=math.nan)),
    # RMT K=1: 3e-4 collapsed on seed 143 (best logged 0.9, final 0.1), 1e-4 unfinished on seed 144 (no results)
    (N8, "rmt", 1, 3e-4, 143, dict(valid=0.90, test=0.88, final_valid=0.10, final_test=0.08)),
    (N8, "rmt", 1, 3e-4, 144, dict(valid=0.70, test=0.69, rollbacks=1)),
    (N8, "rmt", 1, 1e-4, 143, dict(valid=0.60, test=0.61)),
    (N8, "rmt", 1, 1e-4, 144, None),
    (N8, "rmt", 2, 1e-4, 143, dict(valid=0.75, test=0.74)),
    (N8, "llama", None, 5e-5, 143, dict(valid=0.40, test=0.41)),
    (N8, "mamba", None, 3e-4, 143, dict(valid=0.20, test=0.21, skipped_steps=3)),
    (N16, "gradmem", 2, 0.04, 143, dict(valid=0.70, test=0.71)),
    (N16, "rmt", 2, 1e-4, 143, dict(valid=0.30, test=0.32)),
]


def write_run(root, task, family, K, lr, seed, result, name=None, **changed):
    run = root / task / (name or f"run_group_{family}_{K}_{lr:g}") / f"run_{seed}"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"cli_args": saved_args(family, task, seed, lr, K, **changed)}))
    if result is None:  # unfinished: no results, two checkpoints; the newest one's log is the log so far
        for step, em in ((200, 0.20), (300, 0.35)):
            (run / f"checkpoint-{step}").mkdir()
            log = [{"step": 100, "loss": 2.0, "grad_norm": step / 10}, {"step": step, "eval_exact_match": em}]
            (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": log}))
        return run
    best = max(result["valid"], result.get("final_valid", 0))
    history = [{"step": 0, "eval_exact_match": 0.0, "eval_loss": 3.0},
               {"step": 100, "loss": result.get("loss", 1.0)},
               {"step": 100, "eval_exact_match": best, "eval_loss": 1.0},
               {"step": 200, "eval_exact_match": result.get("final_valid", result["valid"]), "eval_loss": 1.0},
               {"step": 200, "train_runtime": 1.0}]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    metrics = {"eval_exact_match": result["valid"], "eval_loss": 1.0, "test_generated_exact_match": result["test"],
               "global_step": 200, "rollbacks": result.get("rollbacks", 0), "spike_skipped_steps": 2,
               "skipped_steps": result.get("skipped_steps", 0)}
    if "final_valid" in result:
        metrics.update(final_eval_exact_match=result["final_valid"],
                       final_test_generated_exact_match=result["final_test"])
    (run / "all_results.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for task, family, K, lr, seed, result in RUNS:
        write_run(root, task, family, K, lr, seed, result)
    return root


def cells_by_label(cells):
    return {(c.task, c.label): c for c in cells}


def test_cells_from_saved_arguments_with_per_seed_values(runs_root):
    cells = rm.matrix_cells(cr.find_runs(runs_root))
    assert len(cells) == 11
    by = cells_by_label(cells)
    assert [c.label for c in cells if c.task == N8] == [
        "gradmem K=1 inner lr 0.04", "gradmem K=1 inner lr 0.16", "gradmem K=2 inner lr 0.04",
        "gradmem K=2 inner lr 0.08", "rmt K=1 lr 0.0001", "rmt K=1 lr 0.0003", "rmt K=2 lr 0.0001", "llama lr 5e-05",
        "mamba lr 0.0003"]
    assert [c.task for c in cells][-2:] == [N16, N16]  # by N
    g = by[(N8, "gradmem K=2 inner lr 0.04")]
    assert [r.seed for r in g.runs] == [143, 144]
    assert g.values("valid_em") == [0.92, 0.88] and g.mean("valid_em") == pytest.approx(0.90)
    assert g.values("test_gen_em") == [0.50, 0.52]
    # final beside selected: seed 143's final is the selected checkpoint, seed 144's is its own
    assert g.values("final_valid_em") == [0.92, 0.86] and g.values("final_test_gen_em") == [0.50, 0.48]
    assert [r.final_is_selected for r in g.runs] == [True, False]
    unfinished = by[(N8, "rmt K=1 lr 0.0001")]
    assert unfinished.values("valid_em")[0] == 0.60 and math.isnan(unfinished.values("valid_em")[1])
    assert unfinished.mean("valid_em") == pytest.approx(0.60) and unfinished.finished == 1
    assert unfinished.runs[1].steps == 300 and unfinished.runs[1].problems == ["unfinished"]
    assert unfinished.runs[1].best_logged_valid_em == 0.35 and unfinished.runs[1].max_grad_norm == 30.0


def test_best_lr_is_chosen_on_valid_never_on_test(runs_root):
    cells = rm.matrix_cells(cr.find_runs(runs_root))
    best = {key: cell.lr for key, cell in rm.best_lr_cells(cells).items()}
    assert best[(N8, "gradmem", 2, "")] == 0.04  # valid 0.90 > 0.80, although 0.08 is far better on test
    assert best[(N8, "gradmem", 1, "")] == 0.04  # tie on valid (0.30 vs mean 0.30): the smaller lr
    assert best[(N8, "rmt", 1, "")] == 3e-4  # mean valid 0.80 (a collapsed seed included) vs 0.60 (one seed)
    assert best[(N8, "llama", None, "")] == 5e-5 and best[(N16, "rmt", 2, "")] == 1e-4
    assert len(best) == 8


def test_problem_runs_are_listed_and_kept(runs_root):
    cells = rm.matrix_cells(cr.find_runs(runs_root))
    rows = {(row[1], row[2]): row for row in rm.problem_rows(cells)}
    assert {key: row[3] for key, row in rows.items()} == {
        ("gradmem K=1 inner lr 0.16", "144"): "diverged",
        ("rmt K=1 lr 0.0001", "144"): "unfinished",
        ("rmt K=1 lr 0.0003", "143"): "collapsed",
        ("rmt K=1 lr 0.0003", "144"): "rolled back",
        ("mamba lr 0.0003", "143"): "non-finite steps skipped",
    }
    collapsed = rows[("rmt K=1 lr 0.0003", "143")]
    assert collapsed[5:7] == ["0.9000", "0.1000"]  # best logged, final valid
    diverged = cells_by_label(cells)[(N8, "gradmem K=1 inner lr 0.16")]
    assert diverged.mean("valid_em") == pytest.approx(0.30)  # the diverged seed's 0.10 stays in the mean


def test_rules(tmp_path):
    """Each rule on its own: a non-finite loss in the results is divergence, and so is a logged gradient norm of 1e6
    or more; a final EM at half the best is not a collapse, below it is; a best below COLLAPSE_MIN_BEST never
    collapses."""
    def problems(result, grad_norm=None, **metrics):
        run = write_run(tmp_path / str(len(list(tmp_path.iterdir()))), N8, "llama", None, 5e-5, 143, result)
        if metrics:
            data = json.loads((run / "all_results.json").read_text())
            (run / "all_results.json").write_text(json.dumps({**data, **metrics}))
        if grad_norm is not None:
            state = json.loads((run / "trainer_state.json").read_text())
            state["log_history"][1]["grad_norm"] = grad_norm
            (run / "trainer_state.json").write_text(json.dumps(state))
        (found,) = cr.find_runs(run.parent.parent.parent)
        return rm.run_problems(found)

    assert problems(dict(valid=0.5, test=0.5)) == []
    assert problems(dict(valid=0.5, test=0.5), final_test_loss=math.inf) == ["diverged"]
    assert problems(dict(valid=0.5, test=0.5), grad_norm=9.9e5) == []
    assert problems(dict(valid=0.5, test=0.5), grad_norm=1e6) == ["diverged"]
    assert problems(dict(valid=0.5, test=0.5), grad_norm=math.inf) == ["diverged"]
    assert problems(dict(valid=0.8, test=0.8, final_valid=0.4, final_test=0.4)) == []
    assert problems(dict(valid=0.8, test=0.8, final_valid=0.39, final_test=0.4)) == ["collapsed"]
    assert problems(dict(valid=0.15, test=0.1, final_valid=0.0, final_test=0.0)) == []


def test_variants_and_runs_outside_the_matrix(runs_root):
    """Same family, K and lr with another warmup: another cell, named by the option where they differ; a run without
    a record or on another task is not in the matrix (and counted)."""
    write_run(runs_root, N8, "gradmem", 2, 0.04, 143, dict(valid=0.99, test=0.99), name="other", warmup_steps=100)
    (runs_root / "squad" / "x" / "run_1").mkdir(parents=True)
    (runs_root / "squad" / "x" / "run_1" / "all_results.json").write_text('{"eval_exact_match": 0.5}')
    runs = cr.find_runs(runs_root)
    cells = rm.matrix_cells(runs)
    labels = [c.label for c in cells if c.task == N8 and c.family == "gradmem" and c.K == 2]
    assert labels == ["gradmem K=2 inner lr 0.04 [warmup_steps=100]", "gradmem K=2 inner lr 0.04 [warmup_steps=300]",
                      "gradmem K=2 inner lr 0.08 [warmup_steps=300]"]
    best = rm.best_lr_cells(cells)
    assert best[(N8, "gradmem", 2, "warmup_steps=300")].lr == 0.04
    assert best[(N8, "gradmem", 2, "warmup_steps=100")].runs[0].valid_em == 0.99
    assert len(runs) - sum(len(c.runs) for c in cells) == 1


def test_k_scaling_points_use_the_best_lr_per_k(runs_root):
    points = rm.k_scaling(rm.best_lr_cells(rm.matrix_cells(cr.find_runs(runs_root))))
    at_n8 = {(p["family"], p["K"]): p for p in points if p["n"] == 8}
    assert set(at_n8) == {("gradmem", 1), ("gradmem", 2), ("rmt", 1), ("rmt", 2), ("llama", None), ("mamba", None)}
    assert at_n8[("gradmem", 2)]["lr"] == 0.04
    assert at_n8[("gradmem", 2)]["test_generated_exact_match_per_seed"] == [0.50, 0.52]
    assert at_n8[("gradmem", 2)]["test_generated_exact_match_mean"] == pytest.approx(0.51)
    assert at_n8[("rmt", 1)]["lr"] == 3e-4 and at_n8[("rmt", 1)]["seeds"] == [143, 144]
    assert [(p["family"], p["K"]) for p in points if p["n"] == 16] == [("gradmem", 2), ("rmt", 2)]


def test_write_summary_writes_the_matrix(runs_root, tmp_path):
    out = tmp_path / "out"
    cr.main(["--runs", str(runs_root), "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    for name in ("matrix.md", "matrix.json", "k_scaling.png", f"matrix_curves_{N8}.png", f"matrix_curves_{N16}.png",
                 "summary.md", "summary.json", "em_vs_n.png"):
        assert name in names
    for name in ("k_scaling.png", f"matrix_curves_{N8}.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
    text = (out / "matrix.md").read_text()
    best_table = text.split("## Best lr")[1].split("## Every cell")[0]
    assert ("| 8 | gradmem | 2 | inner 0.04 **best** | 143, 144 (2) | 0.9000 [0.9200, 0.8800] | 0.5100 [0.5000, "
            "0.5200] | 0.8900 [0.9200, 0.8600] | 0.4900 [0.5000, 0.4800] | 200 | - |") in best_table
    assert "inner 0.08" not in best_table
    sweep = text.split("## Every cell")[1].split("## Diverged")[0]
    assert "| 8 | gradmem | 2 | inner 0.08 | 143, 144 (2) | 0.8000 [0.8000, 0.8000] | 0.9600 [0.9500, 0.9700]" in sweep
    assert "| 8 | rmt | 1 | 0.0001 | 143, 144 (1) | 0.6000 [0.6000, -] |" in sweep
    problems = text.split("## Diverged")[1]
    assert problems.count(str(runs_root)) == 5 and "unfinished" in problems and "diverged" in problems
    records = json.loads((out / "matrix.json").read_text())
    chosen = [c for c in records["cells"] if c["best_lr"]]
    assert len(chosen) == 8 and len(records["cells"]) == 11
    rmt = next(c for c in records["cells"] if c["family"] == "rmt" and c["lr"] == 1e-4 and c["K"] == 1)
    assert rmt["runs"][1]["valid_exact_match"] is None and rmt["runs"][1]["problems"] == ["unfinished"]
    best = rm.best_lr_cells(rm.matrix_cells(cr.find_runs(runs_root)))
    assert records["k_scaling"] == json.loads(json.dumps(rm.k_scaling(best)))


def test_lr_sweep_choice_on_the_mean_valid_of_the_sweep_seeds(tmp_path):
    """Two sweep seeds: the best mean valid EM (not the best single seed, not test), a tie to the smaller lr; a failed
    run, results of another --max_steps or no valid EM leave the sweep without a choice, each named."""
    sweep = {0.04: [(0.75, 0.1), (0.25, 0.1)], 0.08: [(0.5, 0.2), (0.5, 0.2)], 0.16: [(0.8, 1.0), (0.1, 1.0)]}
    entries = []
    for lr, results in sweep.items():
        for seed, (valid, test) in zip((143, 144), results):
            run = write_run(tmp_path, N8, "gradmem", 2, lr, seed, dict(valid=valid, test=test))
            entries.append(["gradmem_K2", "8", f"{lr:g}", f"N8_gradmem_K2_ilr{lr:g}_s{seed - 142}", str(run), "10000",
                            "0"])
    (record,) = rm.lr_sweep_choice(entries)
    assert (record["sweep"], record["family"], record["K"], record["n"]) == ("gradmem_K2", "gradmem", 2, 8)
    assert record["chosen"] == "0.04" and record["problems"] == []  # 0.5 ties 0.08's 0.5; 0.16: 0.45 (best seed 0.8)
    assert [(e["lr"], e["valid_exact_match_mean"], [r["valid_exact_match"] for r in e["runs"]])
            for e in record["lrs"]] == [("0.04", 0.5, [0.75, 0.25]), ("0.08", 0.5, [0.5, 0.5]),
                                        ("0.16", pytest.approx(0.45), [0.8, 0.1])]
    assert rm.lr_choice_summary(record) == "valid EM 0.04: 0.5000, 0.08: 0.5000, 0.16: 0.4500 -> 0.04"

    entries[0][6] = "1"  # failed (stale results on disk are not read)
    entries[2][5] = "20000"  # planned longer than the results on disk
    (Path(entries[5][4]) / "all_results.json").write_text(json.dumps({"eval_loss": 1.0, "global_step": 200}))
    (record,) = rm.lr_sweep_choice(entries)
    assert record["chosen"] is None
    assert record["problems"] == [
        "N8_gradmem_K2_ilr0.04_s1 failed or was skipped",
        f"N8_gradmem_K2_ilr0.08_s1's results are of --max_steps 10000, not the planned 20000 ({entries[2][4]})",
        f"N8_gradmem_K2_ilr0.16_s2 has no valid exact match in all_results.json ({entries[5][4]})"]
    assert [r["valid_exact_match"] for e in record["lrs"] for r in e["runs"]] == [None, 0.25, None, 0.5, 0.8, None]
    assert rm.lr_choice_summary(record).startswith("no choice: N8_gradmem_K2_ilr0.04_s1 failed or was skipped; ")
    md = rm.lr_choice_markdown([record], ["1", "2"], ["3"])
    assert "| 8 | gradmem | 2 | inner 0.04 | 0.2500 [143: -, 144: 0.2500] | none: phase 2 skipped |" in md
    assert "## Sweeps without a choice" in md and "on the sweep seeds 1 2" in md and "other seeds: 3." in md


def choice_record(sweep, n, chosen, valid):
    family, K = sweep.split("_K") if "_K" in sweep else (sweep, None)
    lrs = [{"lr": lr, "valid_exact_match_mean": v, "runs": [{"run": "r", "seed": 143, "valid_exact_match": v}]}
           for lr, v in valid.items()]
    return {"sweep": sweep, "family": family, "K": None if K is None else int(K), "n": n, "chosen": chosen,
            "problems": [], "lrs": lrs}


def test_lr_choices_of_later_sittings_add_up_to_one_record(tmp_path):
    """A sitting over one K keeps the choices of the others on the same sweep seeds (its own replace theirs, never
    twice), joins the other seeds, and merge_lr_choice adds a second part's file; other sweep seeds start anew."""
    k2 = choice_record("gradmem_K2", 8, "0.04", {"0.04": 0.98, "0.08": 0.97})
    rm.write_lr_choice([k2, choice_record("rmt_K2", 8, "1e-4", {"1e-4": 0.04})], tmp_path, ["1"], ["2", "3"])
    rm.write_lr_choice([choice_record("gradmem_K5", 8, "0.3", {"0.3": 0.998})], tmp_path, [1], [2])
    rm.write_lr_choice([choice_record("gradmem_K5", 8, "2.0", {"0.3": 0.9, "2.0": 0.99})], tmp_path, ["1"], ["2"])
    part_b = tmp_path / "b"
    rm.write_lr_choice([choice_record("mamba", 8, "3e-4", {"3e-4": 0.1})], part_b, ["1"], ["2", "3"])
    rm.merge_lr_choice(part_b / "lr_choice.json", tmp_path)
    choice = json.loads((tmp_path / "lr_choice.json").read_text())
    assert [(r["sweep"], r["chosen"]) for r in choice["sweeps"]] == [
        ("gradmem_K2", "0.04"), ("gradmem_K5", "2.0"), ("mamba", "3e-4"), ("rmt_K2", "1e-4")]
    assert (choice["sweep_seeds"], choice["other_seeds"]) == ([1], [2, 3])
    md = (tmp_path / "lr_choice.md").read_text()
    assert "| 8 | gradmem | 2 | inner 0.04 | 0.9800 [143: 0.9800] | **chosen** |" in md
    assert "| 8 | gradmem | 5 | inner 2.0 | 0.9900 [143: 0.9900] | **chosen** |" in md
    assert md.count("| 8 | gradmem | 5 |") == 2 and "on the other seeds: 2 3" in md
    rm.write_lr_choice([choice_record("rmt_K5", 8, "3e-4", {"3e-4": 0.1})], tmp_path, ["1", "2"], ["3"])
    choice = json.loads((tmp_path / "lr_choice.json").read_text())
    assert [r["sweep"] for r in choice["sweeps"]] == ["rmt_K5"] and choice["sweep_seeds"] == [1, 2]


def test_best_lr_is_compared_on_the_seeds_every_lr_has(tmp_path):
    """After the two-phase protocol the chosen lr has more seeds than the others: the lrs are compared on the seeds
    they share, so the chosen one stays chosen when its extra seeds are worse (over all its seeds 0.04 would lose)."""
    for lr, seeds in ((0.04, {143: 0.9, 144: 0.5, 145: 0.5}), (0.08, {143: 0.8})):
        for seed, valid in seeds.items():
            write_run(tmp_path, N8, "gradmem", 2, lr, seed, dict(valid=valid, test=valid))
    best = rm.best_lr_cells(rm.matrix_cells(cr.find_runs(tmp_path)))
    assert best[(N8, "gradmem", 2, "")].lr == 0.04  # seed 143: 0.9 > 0.8 (means over all seeds: 0.63 < 0.8)


def test_the_sweep_seeds_of_lr_choice_json_decide_after_phase_two(tmp_path):
    """Phase 2 may run a non-chosen lr on the other seeds too (as the warm start of a larger N that chose it): then
    every lr has every seed, and only the sweep seeds in lr_choice.json say what the protocol compared."""
    root, out = tmp_path / "runs", tmp_path / "results"
    for lr, seeds in ((0.02, {143: 0.7, 144: 0.5, 145: 0.5}), (0.04, {143: 0.6, 144: 0.8, 145: 0.8})):
        for seed, valid in seeds.items():
            write_run(root, N8, "gradmem", 2, lr, seed, dict(valid=valid, test=valid))
    runs = cr.find_runs(root)
    assert rm.best_lr_cells(rm.matrix_cells(runs))[(N8, "gradmem", 2, "")].lr == 0.04  # all three seeds shared
    out.mkdir()
    choice = {"sweeps": [{"lrs": [{"lr": "0.02", "runs": [{"seed": 143}]}, {"lr": "0.04", "runs": [{"seed": 143}]}]}]}
    (out / "lr_choice.json").write_text(json.dumps(choice))
    assert rm.lr_choice_seeds(out) == {143}
    rm.write_matrix(runs, out, root)
    best = [c["lr"] for c in json.loads((out / "matrix.json").read_text())["cells"] if c["best_lr"]]
    assert best == [0.02]  # seed 143: 0.7 > 0.6


def test_k_scaling_takes_each_k_at_its_best_outer_lr(runs_root):
    """GradMem K=5 at two outer lrs (two variants): the point is the one with the better valid exact match (never
    test), on the K=1/K=2 line (no variant), with its outer lr; the other outer lr's cell stays in the matrix."""
    for seed, outer, valid, test in ((143, 1e-3, 0.01, 0.90), (143, 1e-4, 0.80, 0.20), (144, 1e-4, 0.70, 0.30)):
        result = dict(valid=valid, test=test, **({"loss": math.nan} if outer == 1e-3 else {}))  # 1e-3 diverged
        write_run(runs_root, N8, "gradmem", 5, 0.3, seed, result, name=f"k5_{outer:g}", learning_rate=outer)
    cells = rm.matrix_cells(cr.find_runs(runs_root))
    k5 = sorted(c.variant for c in cells if c.family == "gradmem" and c.K == 5)
    assert k5 == ["learning_rate=0.0001", "learning_rate=0.001"]
    points = rm.k_scaling(rm.best_lr_cells(cells))
    gradmem = {p["K"]: p for p in points if p["n"] == 8 and p["family"] == "gradmem"}
    assert sorted(gradmem) == [1, 2, 5] and {p["variant"] for p in gradmem.values()} == {""}
    k5 = gradmem[5]
    assert k5["outer_lr"] == 1e-4 and k5["outer_lrs_compared"] == [1e-4, 1e-3]
    assert k5["test_generated_exact_match_per_seed"] == [0.20, 0.30] and k5["finished_seeds"] == 2
    assert gradmem[2]["outer_lr"] == 1e-3 and gradmem[2]["outer_lrs_compared"] == []
    assert rm._point_note(k5) == "0.3, outer 0.0001 (n=2)"
    # matrix.md's K-scaling table holds the same points: K=5 at outer lr 1e-4 (both seeds), not the diverged 1e-3
    table = rm.matrix_markdown(cells, rm.best_lr_cells(cells), runs_root, 0).split("## K scaling")[1]
    table = table.split("## Every cell")[0]
    assert "| 8 | gradmem [learning_rate=0.0001] | 5 | inner 0.3 | 143, 144 (2) | 0.7500 [0.8000, 0.7000] |" in table
    assert "learning_rate=0.001]" not in table and table.count("| 8 | gradmem") == 3


def test_k_scaling_notes_a_diverged_point(runs_root):
    write_run(runs_root, N8, "gradmem", 5, 0.04, 143, dict(valid=0.001, test=0.002, loss=math.nan), name="k5")
    points = rm.k_scaling(rm.best_lr_cells(rm.matrix_cells(cr.find_runs(runs_root))))
    (k5,) = [p for p in points if p["family"] == "gradmem" and p["K"] == 5]
    assert k5["problems"] == ["diverged"] and rm._point_note(k5) == "0.04 (n=1, diverged)"
