"""The arena end to end at a tiny budget: report files, resumption, --fresh, failing cells and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from effarch.arena import QUICK, ArenaOptions, TaskSpec, run_arena
from effarch.arena import quality as quality_mod
from effarch.arena.literature import check_mqar, classify
from effarch.arena.memory import CpuPeakMemory
from effarch.arena.plots import pareto_front
from effarch.models.presets import preset_config

TINY = replace(
    QUICK,
    name="tiny",
    tasks=(
        TaskSpec(
            "mqar-16x2", "mqar", 16, 32, {"num_pairs": 2}, sweep=True, n_train=64, n_test=8, batch_size=4, steps=3
        ),
        TaskSpec(
            "induction-16",
            "induction_heads",
            16,
            8,
            {},
            eval_lens=(16, 32),
            n_train=64,
            n_test=8,
            batch_size=4,
            steps=3,
        ),
        TaskSpec("lm-16", "lm", 16, 260, {}, n_test=8, batch_size=4, steps=3),
    ),
    lrs=(1e-3, 3e-3),
    time_budget_s=None,
    train_lens=(16, 32),
    train_tokens=64,
    infer_lens=(16,),
    decode_tokens=2,
    cache_lens=(16, 1024),
    repeats=1,
    lm_max_bytes=50_000,
)
# cache 1 + train 2 + infer 1 + quality (2 swept + 2 others) = 8 cells per architecture
CELLS_PER_ARCH = 8


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    paragraphs = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    path.write_text("\n\n".join(paragraphs))
    return str(path)


def _opts(out, text_file, **kw):
    base = dict(suite=TINY, archs=["transformer:debug"], data=text_file, out=str(out), progress=False)
    base.update(kw)
    return ArenaOptions(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("arena")
    result = run_arena(_opts(out, text_file))
    return out, result


def test_report_files_exist_and_parse(finished):
    out, result = finished
    assert result.complete and result.cells_run == CELLS_PER_ARCH and result.cells_failed == 0
    data = json.loads((out / "results.json").read_text())
    for key in ("machine", "versions", "seeds", "suite", "archs", "cells", "run"):
        assert key in data
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["run"]["planned_cells"]) <= set(data["cells"])
    assert all(c["status"] == "ok" for c in data["cells"].values())
    q = (
        data["cells"]["quality/transformer:debug/induction-16/lr=0.001"]
        if ("quality/transformer:debug/induction-16/lr=0.001" in data["cells"])
        else data["cells"]["quality/transformer:debug/induction-16/lr=0.003"]
    )
    assert set(q["by_length"]) == {"16", "32"} and 0.0 <= q["accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    for heading in (
        "## Verdict",
        "## Quality",
        "## Speed and memory",
        "## Check against the literature",
        "## Settings",
    ):
        assert heading in report
    assert "Status: complete" in report
    for png in ("throughput.png", "memory.png", "decode.png", "cache.png", "quality.png", "pareto.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not list(out.glob(".*.tmp")), "no temporary files are left behind"


def test_unswept_tasks_use_the_best_swept_rate(finished):
    out, _ = finished
    cells = json.loads((out / "results.json").read_text())["cells"]
    sweep = {c["lr"]: c["accuracy"] for c in cells.values() if c.get("task") == "mqar-16x2"}
    best = max(sweep, key=lambda lr: (sweep[lr], -lr))
    others = [c for c in cells.values() if c.get("task") in ("induction-16", "lm-16")]
    assert len(others) == 2 and all(c["lr"] == best for c in others)


def test_resume_skips_finished_cells_and_fresh_redoes_them(tmp_path, text_file):
    first = run_arena(_opts(tmp_path, text_file))
    assert first.cells_run == CELLS_PER_ARCH
    again = run_arena(_opts(tmp_path, text_file))
    assert again.cells_run == 0 and again.cells_skipped == CELLS_PER_ARCH
    fresh = run_arena(_opts(tmp_path, text_file, fresh=True))
    assert fresh.cells_run == CELLS_PER_ARCH and fresh.cells_skipped == 0


def test_stop_after_leaves_a_partial_report_that_resumes(tmp_path, text_file):
    stopped = run_arena(_opts(tmp_path, text_file, stop_after_s=0.0, only="speed"))
    assert not stopped.complete and stopped.cells_run == 0
    assert "partial" in (tmp_path / "report.md").read_text()
    done = run_arena(_opts(tmp_path, text_file, only="speed"))
    assert done.complete and done.cells_run == 4  # cache + 2 train + 1 infer
    assert "partial" in (tmp_path / "report.md").read_text()  # the report covers the whole grid
    quality = run_arena(_opts(tmp_path, text_file, only="quality"))
    assert quality.complete and quality.cells_skipped == 0
    report = (tmp_path / "report.md").read_text()
    assert "Status: complete" in report
    quality_rows = [r for r in report.split("## Quality")[1].split("\n") if r.startswith("| transformer")]
    assert quality_rows and "–" not in quality_rows[0]
    # A later speed-only run keeps the quality figures in the report.
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    speed_cell = next(k for k in cells if k.startswith("train/"))
    data = json.loads((tmp_path / "results.json").read_text())
    del data["cells"][speed_cell]
    (tmp_path / "results.json").write_text(json.dumps(data))
    again = run_arena(_opts(tmp_path, text_file, only="speed"))
    assert again.cells_run == 1
    assert (tmp_path / "report.md").read_text().split("## Quality")[1].split("## Speed")[0] == report.split(
        "## Quality"
    )[1].split("## Speed")[0]


def test_a_failing_cell_is_recorded_and_redone_on_resume(tmp_path, text_file, monkeypatch):
    real = quality_mod.quality_cell

    def broken(arch, task, *a, **kw):
        if task.name == "lm-16":
            raise RuntimeError("simulated failure")
        return real(arch, task, *a, **kw)

    monkeypatch.setattr(quality_mod, "quality_cell", broken)
    first = run_arena(_opts(tmp_path, text_file, only="quality"))
    assert first.complete and first.cells_failed == 1
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    errors = [c for c in cells.values() if c["status"] == "error"]
    assert len(errors) == 1 and "simulated failure" in errors[0]["note"]
    assert "simulated failure" in (tmp_path / "report.md").read_text()
    monkeypatch.setattr(quality_mod, "quality_cell", real)
    second = run_arena(_opts(tmp_path, text_file, only="quality"))
    assert second.cells_run == 1 and second.cells_failed == 0


def test_adding_an_architecture_reuses_the_others_cells(finished, tmp_path, text_file):
    out, _ = finished
    target = tmp_path / "arena"
    target.mkdir()
    (target / "results.json").write_text((out / "results.json").read_text())
    more = run_arena(_opts(target, text_file, archs=["transformer:debug", "transformer-mqa:debug"], only="speed"))
    assert more.cells_run == 4 and more.cells_skipped == 4


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(archs=["no-such-arch"]), "neither a registered preset nor a config JSON file"),
        (dict(archs=["missing.json"]), "does not exist"),
        (dict(archs=[","]), "no names"),
        (dict(suite="huge"), "is not one of"),
        (dict(tasks=["sudoku"]), "is not a task"),
        (dict(time_budget_s=-1.0), "positive"),
        (dict(device="tpu"), "is not one of"),
    ],
)
def test_bad_options_raise_one_clear_error(tmp_path, text_file, kw, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        run_arena(_opts(out, text_file, **kw))
    assert "\n" not in str(e.value)
    assert not out.exists(), "nothing is written for a refused run"


def test_bad_data_raises_one_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a b")
    for path, match in (
        (tmp_path / "nope.txt", "does not exist"),
        (empty, "empty"),
        (binary, "not UTF-8 text"),
        (tiny, "tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            run_arena(_opts(tmp_path / "out", str(path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_full_suite_without_cuda_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        run_arena(ArenaOptions(suite="full", archs=["transformer"], out=str(tmp_path / "o"), progress=False))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from effarch.cli import main

    code = main(["arena", "--arch", "no-such-arch", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no-such-arch" in err


def test_corrupt_results_file_is_refused(tmp_path, text_file):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="--fresh"):
        run_arena(_opts(tmp_path, text_file))


# ---- parts -----------------------------------------------------------------------------------------
def test_cpu_peak_memory_counts_live_storages():
    x = torch.randn(256, 1024)  # 1 MiB
    with CpuPeakMemory() as m:
        a = x * 2  # 1 MiB live
        b = a + 1  # 2 MiB live
        del a
        c = b.view(-1)  # a view: no new memory
        b.add_(1)  # in place: no new memory
        d = b * 3  # 2 MiB live
        del b, c, d
    assert m.peak == 2 * 2**20
    assert m.live == 0


def test_literature_classes_and_verdicts():
    assert classify(preset_config("transformer:debug")) == "attention"
    assert classify(preset_config("gated-deltanet:debug")) == "delta rule"
    assert classify(preset_config("mamba:debug")) is None
    rows = [
        {"task": "mqar", "arch": "t", "class": "attention", "accuracy": 0.99, "state_bytes": 1},
        {"task": "mqar", "arch": "g", "class": "delta rule", "accuracy": 0.95, "state_bytes": 1},
        {"task": "mqar", "arch": "r", "class": "fixed-decay linear attention", "accuracy": 0.40, "state_bytes": 1},
    ]
    (v,) = check_mqar(rows)
    assert [status for _, status, _ in v["checks"]] == ["agrees"] * 4 and not v["budget_note"]
    rows[1]["accuracy"] = 0.30
    (v,) = check_mqar(rows)
    assert [status for _, status, _ in v["checks"]] == ["agrees", "disagrees", "agrees", "disagrees"]
    rows[0]["accuracy"] = 0.31  # attention did not learn the task: the orderings say nothing
    (v,) = check_mqar(rows)
    assert [status for _, status, _ in v["checks"]] == ["disagrees"] + ["inconclusive"] * 3 and v["budget_note"]
    (v,) = check_mqar([r for r in rows if r["class"] != "fixed-decay linear attention"])
    assert [status for _, status, _ in v["checks"]][2] == "not measured"


def test_pareto_front():
    pts = {"a": (1.0, 0.9), "b": (2.0, 0.5), "c": (1.5, 0.4), "d": (0.5, 0.9)}
    assert pareto_front(pts) == ["a", "b"]


def test_bench_ops_appends_a_dated_section(tmp_path, monkeypatch, capsys):
    from effarch.arena import bench

    tiny = (torch.float32, 2, 8, 32, (16,), 1)
    for key in list(bench.SHAPES):
        monkeypatch.setitem(bench.SHAPES, key, tiny)
    results = tmp_path / "RESULTS.md"
    bench.run_ops_bench(device="cpu", results=str(results), scripts=False)
    bench.run_ops_bench(device="cpu", results=str(results), scripts=False)
    text = results.read_text()
    assert text.startswith("# effarch benchmark results")
    assert text.count("effarch bench ops (cpu)") == 2
    assert "| SDPA causal | 16 × 2 |" in text and "failed" not in text
    with pytest.raises(ValueError, match="device"):
        bench.run_ops_bench(device="tpu", results=str(results), scripts=False)


def test_time_budget_skips_over_budget_cells_and_retries_them(tmp_path, text_file):
    budget = replace(TINY, time_budget_s=0.01, tasks=TINY.tasks[:1], lrs=(3e-3,))
    first = run_arena(_opts(tmp_path, text_file, suite=budget))
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    skipped = [cid for cid, c in cells.items() if c["status"] == "skipped"]
    assert skipped and all(cid.startswith(("train/", "infer/")) for cid in skipped)
    q = cells["quality/transformer:debug/mqar-16x2/lr=0.003"]
    assert q["status"] == "ok" and q["steps"] <= 3 and q["time_cap_s"] >= 1.0
    assert "over budget" in (tmp_path / "report.md").read_text()
    again = run_arena(_opts(tmp_path, text_file, suite=budget))
    assert again.cells_run >= 1 and again.cells_skipped >= first.cells_run - len(skipped)


def test_fixed_step_tasks_train_every_step_whatever_the_budget(tmp_path, text_file):
    lm = replace(TINY.tasks[2], steps=7, fixed_steps=True)
    budget = replace(TINY, time_budget_s=0.01, tasks=(lm,), lrs=(3e-3,))
    run_arena(_opts(tmp_path, text_file, suite=budget, only="quality"))
    cell = json.loads((tmp_path / "results.json").read_text())["cells"]["quality/transformer:debug/lm-16/lr=0.003"]
    assert cell["status"] == "ok" and cell["steps"] == 7 and cell["tokens"] == 7 * lm.batch_size * lm.train_len
    assert "time_cap_s" not in cell


def test_default_line_up_has_one_preset_per_family_plus_hybrids():
    from effarch import registry
    from effarch.arena.archs import default_specs

    specs = default_specs()
    presets = registry.entries("preset")
    assert specs[0] == "transformer" and len(specs) == len(set(specs))
    families = [presets[s].family for s in specs]
    non_hybrid = [f for f in families if not f.startswith("hybrid/")]
    assert len(non_hybrid) == len(set(non_hybrid)), "one representative per family"
    expected = {e.family for e in presets.values() if not e.family.startswith(("hybrid/", "diffusion/"))}
    assert set(non_hybrid) == expected
    hybrids = {n for n, e in presets.items() if e.family.startswith("hybrid/")}
    assert hybrids <= set(specs)


def test_deadline_stops_a_slow_cell():
    import time

    from effarch.arena.deadline import CellTimeout, deadline

    t0 = time.perf_counter()
    with pytest.raises(CellTimeout), deadline(0.2):
        while True:
            sum(range(1000))
    assert time.perf_counter() - t0 < 5
    with deadline(0.5):  # finishing in time raises nothing, and the timer is cleared
        pass
    time.sleep(0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode figure needs a GPU")
def test_inference_cell_measures_graphed_decode_on_cuda():
    from effarch.arena.speed import inference_cell

    rec = inference_cell(preset_config("transformer:debug"), 64, decode_tokens=4, repeats=1, time_cap_s=60.0,
                         device=torch.device("cuda"))  # fmt: skip
    assert rec["status"] == "ok" and rec["decode_graph_s_per_token"] > 0


def test_inference_cell_measures_cache_and_latency_on_cpu():
    from effarch.arena.speed import cache_cell, inference_cell

    config = preset_config("transformer:debug")
    rec = inference_cell(config, 32, decode_tokens=2, repeats=1, time_cap_s=60.0, device=torch.device("cpu"))
    assert rec["status"] == "ok" and rec["prefill_s"] > 0 and len(rec["decode_times_s"]) == 2
    analytic = cache_cell(config, (32,), dtype=torch.float32)["cache_bytes"]["32"]
    assert rec["cache_bytes_measured"] == analytic  # the mixers' own accounting matches the real cache


def test_summary_table_has_a_line_per_architecture(tmp_path):
    from effarch.arena.cli import summary_table

    cells = {
        "quality/a/lm": {"arch": "a", "kind": "quality", "status": "ok", "task_kind": "lm", "task": "lm", "bpb": 2.5},
        "quality/a/mqar": {
            "arch": "a",
            "kind": "quality",
            "status": "ok",
            "task_kind": "mqar",
            "task": "m",
            "accuracy": 0.5,
        },
        "train/a/256": {"arch": "a", "kind": "train", "status": "ok", "length": 256, "tokens_per_s": 1000.0},
        "train/b/256": {"arch": "b", "kind": "train", "status": "ok", "length": 256, "tokens_per_s": 2000.0},
        "cache/a": {"arch": "a", "kind": "cache", "status": "ok", "cache_bytes": {"256": 512, "512": 1024}},
    }
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    lines = summary_table(tmp_path / "results.json").splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["a", "2.500", "0.500", "1,000", "2.0"]
    assert lines[2].split() == ["b", "-", "-", "2,000", "-"]
    assert summary_table(tmp_path / "missing.json") == ""


def test_workers_run_each_architecture_in_its_own_process_and_resume(tmp_path, text_file):
    archs = ["transformer:debug", "retnet:debug"]
    run = run_arena(_opts(tmp_path, text_file, archs=archs, workers=2, only="quality"))
    assert run.complete and run.cells_failed == 0
    data = json.loads((tmp_path / "results.json").read_text())
    quality = [c for c in data["cells"].values() if c["kind"] == "quality"]
    assert len(quality) == 2 * 4 and all(c["status"] == "ok" for c in quality)
    assert {c["arch"] for c in quality} == set(archs)
    # each job kept its own store and log
    for label in archs:
        folder = tmp_path / ".workers" / f"quality-{label.replace(':', '_')}"
        assert (folder / "results.json").exists() and (folder / "log.txt").exists()
    assert "Status" in (tmp_path / "report.md").read_text()
    again = run_arena(_opts(tmp_path, text_file, archs=archs, workers=2, only="quality"))
    assert again.cells_run == 0 and again.cells_skipped == 2 * 4
    # --redo also clears the jobs' own stores, which would otherwise seed the jobs with the old cells.
    redone = run_arena(_opts(tmp_path, text_file, archs=archs, workers=2, only="quality", redo=["retnet:debug"]))
    assert redone.cells_run == 4 and redone.cells_skipped == 4


def test_bad_worker_count_is_refused(tmp_path, text_file):
    with pytest.raises(ValueError, match="--workers 0 is invalid"):
        run_arena(_opts(tmp_path, text_file, workers=0))


def test_suite_survives_a_json_round_trip():
    from effarch.arena.suites import FULL, Suite

    for suite in (QUICK, FULL, TINY):
        assert Suite.from_dict(json.loads(json.dumps(suite.to_dict()))) == suite


def test_literature_summary_over_the_grid():
    from effarch.arena.literature import summarize

    def rows(task, attn, delta, fixed):
        return [
            {"task": task, "arch": "t", "class": "attention", "accuracy": attn, "state_bytes": 1},
            {"task": task, "arch": "d", "class": "delta rule", "accuracy": delta, "state_bytes": 1},
            {"task": task, "arch": "r", "class": "fixed-decay linear attention", "accuracy": fixed, "state_bytes": 1},
        ]

    easy_then_hard = check_mqar(rows("easy", 0.99, 1.0, 0.98) + rows("hard", 0.99, 0.99, 0.01))
    lines = {line.split(":")[0]: line for line in summarize(easy_then_hard)}
    assert "agrees on every task" in lines["attention solves MQAR"]
    far = lines["fixed-decay linear attention far below"]
    assert "agrees on hard, disagrees on easy" in far and "only on the easier tasks" in far
    # a disagreement on the harder task is not explained away
    hard_then_easy = check_mqar(
        rows("hard", 0.99, 0.99, 0.01)[:0] + rows("a", 0.99, 0.99, 0.01) + rows("b", 0.99, 1.0, 0.98)
    )
    far = {line.split(":")[0]: line for line in summarize(hard_then_easy)}["fixed-decay linear attention far below"]
    assert "disagrees on b" in far and "only on the easier" not in far
    unsolved = summarize(check_mqar(rows("x", 0.3, 0.2, 0.1)))
    assert any("not shown" in line for line in unsolved)


def test_report_only_rewrites_the_report_from_stored_results(finished, tmp_path, text_file):
    out, _ = finished
    target = tmp_path / "copy"
    target.mkdir()
    stored = (out / "results.json").read_text()
    (target / "results.json").write_text(stored)
    result = run_arena(_opts(target, text_file, report_only=True))
    assert result.complete and result.cells_run == 0 and result.cells_skipped == CELLS_PER_ARCH
    assert (target / "results.json").read_text() == stored  # figures and their machine untouched
    report = (target / "report.md").read_text()
    assert "Status: complete" in report
    # The same report but for the order of the seeds' keys (results.json stores them sorted).
    same = lambda text: [line for line in text.splitlines() if "Seeds:" not in line]  # noqa: E731
    assert same(report) == same((out / "report.md").read_text())


def test_report_only_needs_no_gpu_for_a_gpu_suite(finished, tmp_path, text_file, monkeypatch):
    out, _ = finished
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_suite = replace(TINY, device="cuda")
    result = run_arena(_opts(tmp_path, text_file, suite=gpu_suite, report_only=True))
    assert result.cells_run == 0 and (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    "kw,match",
    [(dict(fresh=True), "--fresh would discard them"), (dict(), "does not exist; run the arena first")],
)
def test_report_only_bad_input(tmp_path, text_file, kw, match):
    with pytest.raises(ValueError, match=match):
        run_arena(_opts(tmp_path / "empty", text_file, report_only=True, **kw))


def test_report_appended_to_a_results_file(finished, tmp_path):
    """--results: the report's figures as a dated section (its own header line: where they were measured),
    headings moved under the section's, plots left out; appended again on a second call, the file kept."""
    from effarch.arena.cli import append_report

    out, _ = finished
    report = (out / "report.md").read_text()
    results = tmp_path / "RESULTS.md"
    results.write_text("# effarch benchmark results\n\n## 2026-01-01 - earlier\n\nkept\n")
    append_report(out / "report.md", results)
    append_report(out / "report.md", results)
    text = results.read_text()
    assert text.startswith("# effarch benchmark results\n\n## 2026-01-01 - earlier\n\nkept\n")
    header = report.splitlines()[2]  # "<date> on <machine> ...; torch ..."
    date = header.split(" ", 1)[0]
    assert text.count(f"## {date} - Arena, tiny suite\n\n{header}\n") == 2
    assert "\n### Verdict" in text and "\n### Quality" in text and "\n#### Growing context" in text
    assert "\n## Verdict" not in text
    assert "![" not in text and "Plots" not in text
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert table_rows and all(text.count(row) >= 2 for row in table_rows)


def test_results_flag_refuses_a_folder_and_a_report_that_is_not_the_arenas(tmp_path, capsys):
    from effarch.arena.report import results_section
    from effarch.cli import main

    code = main(["arena", "--report-only", "--out", str(tmp_path / "o"), "--results", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a folder" in err
    with pytest.raises(ValueError, match="arena's title"):
        results_section("# something else\n")


def test_cells_record_the_code_and_the_report_flags_mixed_versions(finished, tmp_path, text_file):
    from effarch.arena.store import code_stamp

    out, _ = finished
    data = json.loads((out / "results.json").read_text())
    assert {c["code"] for c in data["cells"].values()} == {code_stamp()}
    assert "versions of effarch's code" not in (out / "report.md").read_text()
    first = next(iter(data["cells"]))
    data["cells"][first]["code"] = "0123456789ab"
    (tmp_path / "results.json").write_text(json.dumps(data))
    run_arena(_opts(tmp_path, text_file, report_only=True))
    report = (tmp_path / "report.md").read_text()
    assert "measured by 2 versions of effarch's code" in report and "1 by 0123456789ab" in report


def test_redo_measures_the_chosen_stored_cells_again(finished, tmp_path, text_file):
    out, _ = finished
    stored = json.loads((out / "results.json").read_text())["cells"]
    label = next(iter(stored.values()))["arch"]
    n_train = sum(c["kind"] == "train" for c in stored.values())
    for redo, expected in (
        (["train"], n_train),
        (["speed", label], sum(c["kind"] in ("cache", "train", "infer") for c in stored.values())),
        (["quality"], sum(c["kind"] == "quality" for c in stored.values())),
    ):
        target = tmp_path / "-".join(redo)
        target.mkdir()
        (target / "results.json").write_text((out / "results.json").read_text())
        run = run_arena(_opts(target, text_file, redo=redo))
        assert run.cells_run == expected and run.cells_skipped == CELLS_PER_ARCH - expected
    again = run_arena(_opts(target, text_file))  # without --redo the run resumes
    assert again.cells_run == 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(redo=["nonsense"]), "neither a cell kind"),
        (dict(redo=["train"], fresh=True), "cannot be combined"),
        (dict(redo=["train"], report_only=True), "cannot be combined"),
    ],
)
def test_redo_bad_input(tmp_path, text_file, kw, match):
    with pytest.raises(ValueError, match=match):
        run_arena(_opts(tmp_path, text_file, **kw))


def test_worker_gpus_follow_the_parents_visible_devices():
    from effarch.arena.parallel import visible_device

    assert visible_device(1, None) == "1"
    assert visible_device(0, "") == "0"
    assert visible_device(0, "2,3") == "2"
    assert visible_device(1, " 2, 3 ") == "3"
    assert visible_device(1, "GPU-aaaa,GPU-bbbb") == "GPU-bbbb"


def test_verdict_names_no_winner_on_a_task_nobody_learned():
    from effarch.arena.report import verdict
    from effarch.arena.tables import Tables

    solved = TaskSpec("mqar-64x4", "mqar", 64, 256, {"num_pairs": 4})
    unlearned = TaskSpec("induction_heads-64", "induction_heads", 64, 16, {})  # chance 1/13
    t = Tables(archs=["a", "b"], tasks=[solved, unlearned])
    for arch, acc_solved, acc_unlearned in (("a", 0.9, 0.08), ("b", 0.5, 0.07)):
        for task, acc in ((solved, acc_solved), (unlearned, acc_unlearned)):
            t.sweep.setdefault(arch, {})[task.name] = {0.001: {"status": "ok", "accuracy": acc, "lr": 0.001}}
    lines = verdict(t)
    assert "Best on mqar-64x4: **a** (accuracy 0.900)." in lines
    assert not any(line.startswith("Best on induction_heads-64") for line in lines)
    assert any(
        line.startswith("No architecture beat chance on induction_heads-64 (best 0.080, chance 0.077)")
        for line in lines
    )
    # learned well above chance: a winner again
    t.sweep["a"][unlearned.name][0.001]["accuracy"] = 0.6
    assert "Best on induction_heads-64: **a** (accuracy 0.600)." in verdict(t)
