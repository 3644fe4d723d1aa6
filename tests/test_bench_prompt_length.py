"""benchmarks/prompt_length_study.py: the converged, paired prompt-length study end to end (--quick)."""
from __future__ import annotations

import json

import pytest
from benchmarks_support import load_study_module, run_quick


@pytest.mark.slow
def test_quick_prompt_length_study_end_to_end(tmp_path):
    """Per (regime, P, method): the lr selected by the mean val accuracy over the draws (then one edge
    round), n paired runs, the pairing with VPT random draw by draw; the cost of P per cell; the cut named."""
    out = tmp_path / "pl.json"
    _, proc = run_quick("prompt_length_study.py", tmp_path, out, timeout=900)
    doc = json.loads(out.read_text())
    study = load_study_module()
    from vipamin_scale.stats import paired

    assert doc["lengths"] == [1, 4] and doc["methods"] == [study.RANDOM, study.bench.DEFAULT]
    assert set(doc["cut"]) >= {"model", "lengths", "methods", "draws"} and doc["cut"]["draws"] == [10, 2]
    for regime, n in ((study.FEW, 2), (study.FULL, 2)):
        for length in ("1", "4"):
            row = doc["cells"][regime][length]
            for m in doc["methods"]:
                sel, res = row[m]["selected"], row[m]["results"]
                tried = [t["lr"] for t in sel["trials"]]
                assert tried[:2] == [0.5, 5.0] and len(tried) == 3 and tried[2] in (0.05, 50.0), tried
                for t in sel["trials"]:  # 4-shot: the mean over draws 0 and 1; full data: one draw
                    by = t["val_by_draw"]
                    assert len(by) == (2 if regime == study.FEW else 0)
                    if by and None not in by:
                        assert t["val_acc"] == pytest.approx(sum(by) / 2)
                best = max(sel["trials"], key=lambda t: -1 if t["val_acc"] is None else t["val_acc"])
                assert sel["value"] == best["lr"]
                assert res["n"] == n and len(res["runs"]) == n and res["mean"] == pytest.approx(sum(res["runs"]) / n)
            p = row[study.bench.DEFAULT]["paired"]
            assert p == paired(row[study.bench.DEFAULT]["results"]["runs"], row[study.RANDOM]["results"]["runs"])
        for m in doc["methods"]:  # the cost of P: a solo 4-shot run per (P, method)
            c = doc["cost"]["4"][m]
            assert c["step_s"] > 0 and c["init_time_s"] >= 0 and c["peak_mib"] is None  # no GPU here
    g = doc["gate"]
    assert g["random_lr"] == doc["cells"][study.FULL]["4"][study.RANDOM]["selected"]["value"]
    assert g["random_test"] == doc["cells"][study.FULL]["4"][study.RANDOM]["results"]["runs"][0]
    assert g["passed"] == (g["random_test"] >= g["probe_test"])
    # the final runs went as packs: a 4-shot run's record says so
    final = list((tmp_path / "work" / "final" / "P4" / "vpt_random" / study.FEW).glob("*/draw1/result.json"))
    assert len(final) == 1 and json.loads(final[0].read_text())["pack_size"] >= 2
    printed = proc.stdout
    assert "CUT VERSION" in printed and "| P | VIPAMIN − VPT random |" in printed
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_study_arguments_are_checked_before_any_run(capsys):
    study = load_study_module()
    for argv, what in ((["--gate-length", "7"], "--gate-length"), (["--methods", "VIPAMIN"], "--methods"),
                       (["--draws", "2"], "--select-draws")):
        with pytest.raises(SystemExit) as exc:
            study.parse(argv)
        assert exc.value.code == 2 and what in capsys.readouterr().err
    a = study.parse([])
    assert (a.lengths, a.draws, a.seeds, a.shots, a.select_draws) == ([1, 5, 10, 20, 50, 100], 10, 3, 4, 3)
    assert study.cut_from_full(a) == {}
    assert a.methods == [study.RANDOM, "VIPAMIN", "SPT rand", "BPT"]
    cfg = study.bench.run_cfg(study.at_length(a, 50), None, "BPT", full=True)
    assert (cfg.prompt.kind, cfg.prompt.length, cfg.prompt.bpt, cfg.data.max_train_samples) == ("bpt", 50, "whiten_fixed",
                                                                                                1000)


def test_a_full_regime_cut_to_the_gate_is_named_and_its_left_out_cells_say_not_run(capsys, tmp_path):
    """--full-lengths/--full-methods: the full-data regime trains only the cells named (the gate's among
    them); the JSON holds just those, the tables say "not run" for the rest, the cut is named."""
    study = load_study_module()
    R, V = study.RANDOM, study.bench.DEFAULT
    for argv, what in ((["--full-lengths", "5"], "--full-lengths"), (["--full-lengths", "10", "7"], "--full-lengths"),
                       (["--full-methods", "VIPAMIN"], "--full-methods")):
        with pytest.raises(SystemExit) as exc:
            study.parse(argv)
        assert exc.value.code == 2 and what in capsys.readouterr().err
    a = study.parse(["--lengths", "1", "10", "--methods", R, V, "--draws", "3", "--seeds", "1",
                     "--full-lengths", "10", "--full-methods", R])
    assert study.full_cells(a) == [(10, R)]
    assert study.cut_from_full(a)["full_lengths"] == [[1, 5, 10, 20, 50, 100], [10]]
    sel = {"value": 0.16, "trials": [], "at_edge": []}
    selected = {(study.FEW, p, m): sel for p in (1, 10) for m in (R, V)}
    selected[(study.FULL, 10, R)] = sel
    acc = {(study.FEW, p, m, d): 0.5 + 0.1 * d + (0.05 if m == V else 0.0) for p in (1, 10) for m in (R, V)
           for d in range(3)}
    acc[(study.FULL, 10, R, 0)] = 0.9
    gate = {"n": 1000, "epochs": 10, "steps": 310, "probe_C": 1.0, "probe_test": 0.938, "random_lr": 0.16,
            "random_test": 0.9, "passed": True}
    doc = study.record(a, [], selected, acc, {}, gate, 0.0)
    assert set(doc["cells"][study.FULL]["10"]) == {R} and doc["cells"][study.FULL]["1"] == {}
    assert doc["regimes"][study.FULL]["cells"] == [[10, R]]
    assert doc["cells"][study.FEW]["1"][V]["paired"]["mean"] == pytest.approx(0.05)
    full_table = study.accuracy_markdown(doc, study.FULL)
    assert "| 10 | 90.0 ± – (n=1) | not run |" in full_table and "| 1 | not run | not run |" in full_table
    assert "| 1 | – |" in study.paired_markdown(doc, study.FULL)
    assert "| 10 | 0.16 | 0.16 | 0.16 | not run |" in study.selected_markdown(doc)

    # the full regime held only the gate's cell: the section names it instead of tables of "not run";
    # --render rewrites the plot and the marked section from the JSON, training nothing
    assert study.gate_only(doc) and doc["command"] == "python benchmarks/prompt_length_study.py"
    section = study.results_section(doc, "pl.png")
    assert "only the gate's cell was run" in section and "Test accuracy (%), full" not in section
    assert "| 10 | **+5.0 ± 0.0 [+5.0, +5.0] (n=3)** |" in section  # VIPAMIN − random: +0.05 in every draw
    out, md = tmp_path / "pl.json", tmp_path / "RESULTS.md"
    out.write_text(json.dumps(doc))
    md.write_text(f"before\n{study.BEGIN}\nold\n{study.END}\nafter\n")
    study.main(["--render", "--out", str(out), "--results-md", str(md)])
    text = md.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "\nold\n" not in text and section in text
    assert out.with_suffix(".png").stat().st_size > 10_000 and not (tmp_path / "work").exists()
