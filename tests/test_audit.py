"""The systems audit in a smoke configuration: tiny images, shallow nets, two steps, one worker per row."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from ffablate import audit
from ffablate.cli import main

SMOKE = {"batch": 8, "micro_batch": 4, "width": 12, "classes": 4, "steps": 2, "warmup": 1}
SMOKE_ARGS = [
    "--resolution",
    "16",
    "--batch",
    "8",
    "--micro-batch",
    "4",
    "--width",
    "12",
    "--classes",
    "4",
    "--steps",
    "2",
    "--rounds",
    "1",
]


METHODS = ["ff", "bp", "bp-ga", "bp-ckpt"]


@pytest.fixture(scope="module")
def cli_rows(tmp_path_factory) -> tuple[list[dict], Path]:
    """One CLI smoke run shared by the tests below: every worker costs a fresh interpreter (a few seconds)."""
    plots = tmp_path_factory.mktemp("plots")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["audit", "--methods", ",".join(METHODS), "--depths", "2", *SMOKE_ARGS, "--json", "--plot-dir", str(plots)]
        )
    assert code == 0
    return json.loads(out.getvalue()), plots


def test_the_cpu_peak_is_a_steady_step_even_without_warmup():
    # --warmup 0 measured the very first step, before AdamW had state: 24% under the steady peak.
    cold, warm = (audit.measure(audit.plan(["ff"], [2], [16], **{**SMOKE, "warmup": w})[0]) for w in (0, 1))
    assert cold["peak_memory_bytes"] == warm["peak_memory_bytes"]


def test_cli_json_smoke_gives_one_ok_row_per_method(cli_rows):
    rows, plots = cli_rows
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert set(audit.ROW_FIELDS) <= set(row)
        assert row["status"] == "ok", row
        assert row["peak_memory_bytes"] >= row["activation_memory_bytes"] > 0
        assert row["param_state_bytes"] > 0 and row["images_per_second"] > 0
    assert {r["micro_batch"] for r in rows if r["method"] == "bp-ga"} == {4}
    assert (plots / "audit_memory.png").stat().st_size > 0
    assert (plots / "audit_throughput.png").stat().st_size > 0


def test_bp_memory_grows_with_depth_and_over_cap_is_a_row(cli_rows):
    shallow = next(r for r in cli_rows[0] if r["method"] == "bp")
    # Blocks after the two downsampling ones have 1/16 of the stem's area: it takes depth to outgrow the
    # stem's backward, which sets BP's peak in shallow nets.
    deep_spec = audit.plan(["bp"], [16], [16], **SMOKE)[0]
    capped_spec = audit.plan(["bp"], [2], [16], memory_cap_bytes=1024, **SMOKE)[0]
    deep, capped = audit.run_audit([deep_spec, capped_spec])
    assert deep["status"] == "ok"
    assert deep["activation_memory_bytes"] > shallow["activation_memory_bytes"]
    assert deep["peak_memory_bytes"] > shallow["peak_memory_bytes"]
    # A tiny cap: a status row with the measured peak, no exception and no throughput.
    assert capped["status"] == "over-cap"
    assert capped["peak_memory_bytes"] == pytest.approx(shallow["peak_memory_bytes"], rel=0.01)
    assert capped["images_per_second"] is None


def test_ff_activation_memory_is_flat_in_depth_and_counts_no_gradient():
    # The trainers free every gradient when a step starts: at FF's peak (block 0's backward) the later blocks'
    # gradients do not exist yet. Subtracting all of them from that peak made FF's activations shrink with depth.
    shallow, deep = audit.run_audit(audit.plan(["ff"], [2, 8], [16], **SMOKE))
    assert shallow["status"] == deep["status"] == "ok"
    assert deep["param_state_bytes"] > 4 * shallow["param_state_bytes"]
    ratio = deep["activation_memory_bytes"] / shallow["activation_memory_bytes"]
    assert 1.0 <= ratio < 1.02, (shallow, deep)


def test_bad_methods_value_exits_2_with_one_line(capsys):
    assert main(["audit", "--methods", "ff,backprop"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backprop" in err and "bp-ga" in err


@pytest.mark.parametrize(
    ("flag", "value"), [("--timeout", "inf"), ("--timeout", "0"), ("--budget", "nan"), ("--timeout", "1e9")]
)
def test_time_limits_must_be_finite_and_positive(capsys, flag, value):
    # 1e9 ("no limit") overflowed subprocess.run's timeout with a traceback.
    assert main(["audit", "--methods", "bp", "--depths", "2", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} must be a positive number of seconds, at most 1e+06" in err


def test_backbone_downsamples_twice_then_keeps_resolution():
    assert audit.backbone_updates(4, 32) == {"channels": "32,32,32,32", "strides": "2,2,1,1"}


def test_summary_ratios_compare_ff_to_the_leanest_bp():
    def row(method, depth, peak, act, ips):
        return {
            "method": method,
            "depth": depth,
            "resolution": 32,
            "peak_memory_bytes": peak,
            "activation_memory_bytes": act,
            "images_per_second": ips,
            "status": "ok",
        }

    rows = [
        row("ff", 4, 50, 40, 90),
        row("bp", 4, 200, 190, 120),
        row("bp-ga", 4, 100, 90, 100),
        row("ff", 8, 50, 41, 90),
        row("bp", 8, 300, 290, 120),
        row("bp-ga", 8, 150, 140, 100),
    ]
    summary = audit.summarize(rows)
    ratio = next(s for s in summary if s["kind"] == "ratio" and s["depth"] == 4)
    assert ratio["best_bp"] == "bp-ga"
    assert ratio["memory_ratio"] == pytest.approx(0.5)
    assert ratio["throughput_ratio_vs_bp_ga"] == pytest.approx(0.9)
    growth = {s["method"]: s["activation_growth"] for s in summary if s["kind"] == "depth-growth"}
    assert growth["ff"] == pytest.approx(41 / 40) and growth["bp"] == pytest.approx(290 / 190)
    assert ratio["bp_missing"] == []
    assert ratio["throughput_ratio_vs_bp_ga_rounds"] == 1 and "1 round: spread not measured" in audit._spread(
        ratio, "throughput_ratio_vs_bp_ga"
    )
    # Activations per added block between the two deepest depths, beside the deepest/shallowest ratio.
    per_block = {s["method"]: s["bytes_per_block"] for s in summary if s["kind"] == "depth-growth"}
    assert per_block["ff"] == pytest.approx(1 / 4) and per_block["bp"] == pytest.approx(100 / 4)
    # The budget skipped depth 8's bp-ga: "best BP" falls back to bp, and the summary names what is missing.
    rows[-1] = {**rows[-1], "status": "skipped"}
    deep = next(s for s in audit.summarize(rows) if s["kind"] == "ratio" and s["depth"] == 8)
    assert deep["best_bp"] == "bp" and deep["bp_missing"] == ["bp-ga"] and deep["throughput_ratio_vs_bp_ga"] is None
    assert audit.render_summary(audit.summarize(rows))[0].row_count == 2


def test_growth_takes_each_depths_first_round_and_cuda_rows_say_why_no_cpu_ratio():
    # Growth read the last round's bytes while the memory ratios read the first; and CUDA rows, which have no
    # CPU-second figures, were said to have "no bp-ga row" beside a bp-ga ratio.
    rows = [
        {"method": m, "depth": d, "resolution": 32, "round": i, "status": "ok", "peak_memory_bytes": 10}
        | {"activation_memory_bytes": act + 100 * i, "images_per_second": 50.0}
        for i in (0, 1)
        for m, d, act in (("ff", 4, 1000), ("ff", 8, 1000), ("bp-ga", 4, 1000), ("bp-ga", 8, 2000))
    ]
    summary = audit.summarize(rows)
    growth = {s["method"]: s["activation_growth"] for s in summary if s["kind"] == "depth-growth"}
    assert growth == {"ff": pytest.approx(1.0), "bp-ga": pytest.approx(2.0)}
    ratio = next(s for s in summary if s["kind"] == "ratio" and s["method"] == "ff")
    assert audit._spread(ratio, "throughput_ratio_vs_bp_ga") == "1.00 (1.00-1.00, 2 rounds)"
    assert audit._spread(ratio, "cpu_throughput_ratio_vs_bp_ga") == "- (no images_per_cpu_second measured)"


def test_throughput_ratios_are_taken_round_by_round_with_their_range():
    # One timing per configuration gave ratios that identical reruns moved by 0.67-1.06: each round's FF is now
    # compared with the BP-GA of its own round, and the summary gives the median and the range.
    rows = [
        {"method": m, "depth": 4, "resolution": 32, "micro_batch": 4, "round": i, "status": "ok"}
        | {"peak_memory_bytes": 10, "activation_memory_bytes": 5, "images_per_second": ips}
        for i, (ff, ga) in enumerate([(90, 100), (60, 100), (100, 90)])
        for m, ips in (("ff-ga", ff), ("bp-ga", ga))
    ]
    (ratio,) = [s for s in audit.summarize(rows) if s["kind"] == "ratio"]
    assert ratio["throughput_ratio_vs_bp_ga"] == pytest.approx(0.9)
    assert ratio["throughput_ratio_vs_bp_ga_range"] == pytest.approx([0.6, 100 / 90])
    assert audit._spread(ratio, "throughput_ratio_vs_bp_ga") == "0.90 (0.60-1.11, 3 rounds)"
    assert [(s.method, s.round) for s in audit.plan(["ff", "bp"], [2], [16], batch=4, rounds=2)] == [
        ("ff", 0),
        ("bp", 0),
        ("ff", 1),
        ("bp", 1),
    ]


def test_the_plots_draw_one_point_per_depth_with_the_rounds_range(tmp_path, monkeypatch):
    # Every round's point was joined in one line, zigzagging between one round's high and the next depth's low.
    from matplotlib.figure import Figure

    saved = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **k: saved.setdefault(Path(path).name, fig))
    rows = [
        {"method": "ff", "depth": d, "resolution": 16, "round": i, "status": "ok"}
        | {"peak_memory_bytes": 2**20, "activation_memory_bytes": 2**19, "images_per_second": ips}
        for d, values in ((2, (100.0, 60.0, 80.0)), (4, (50.0, 90.0, 70.0)))
        for i, ips in enumerate(values)
    ]
    audit.plot(rows, tmp_path)
    (line,) = saved["audit_throughput.png"].axes[0].get_lines()[:1]
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [80.0, 70.0]


def test_the_budget_bounds_the_whole_audit(monkeypatch):
    given = []
    monkeypatch.setattr(audit, "run_worker", lambda spec, timeout: given.append(timeout) or {"status": "ok"})
    clock = iter([0.0, 0.0, 50.0, 95.0])
    monkeypatch.setattr(audit.time, "monotonic", lambda: next(clock))
    specs = [audit.AuditSpec(method="ff", depth=d, resolution=32, batch=8, micro_batch=8) for d in (1, 2, 3)]
    rows = audit.run_audit(specs, timeout=20, budget=60)
    assert given == [20, 10]  # the second worker gets only the 10 s left, not its full 20
    assert rows[2]["status"] == "skipped"


def test_ctrl_c_keeps_the_measured_rows_and_writes_them(monkeypatch, tmp_path, capsys):
    def worker(spec, timeout):
        if spec.depth > 2:
            raise KeyboardInterrupt  # what subprocess.run re-raises after killing the worker
        measured = {"peak_memory_bytes": 2, "activation_memory_bytes": 1, "param_state_bytes": 1}
        return {**audit.base_row(spec), **measured, "images_per_second": 9.0, "status": "ok"}

    monkeypatch.setattr(audit, "run_worker", worker)
    out = tmp_path / "audit.json"
    argv = [
        "audit",
        "--methods",
        "ff,bp",
        "--depths",
        "2,3",
        "--resolution",
        "8",
        "--rounds",
        "1",
        "--json",
        "--output",
        str(out),
    ]
    assert main(argv) == 130
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["status"], r.get("error")) for r in rows] == [("ok", None)] * 2 + [("skipped", "interrupted")] * 2
    assert json.loads(out.read_text())["rows"] == rows
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "interrupted after 2 of 4" in err and str(out) in err


def test_a_worker_killed_by_ctrl_c_stops_the_audit_instead_of_being_an_error_row(monkeypatch):
    # Ctrl-C reaches the worker too; if it dies of it first, that is still the user stopping the audit.
    died = audit.subprocess.CompletedProcess([], -audit.signal.SIGINT, "", "KeyboardInterrupt")
    monkeypatch.setattr(audit.subprocess, "run", lambda *a, **k: died)
    specs = audit.plan(["ff", "bp"], [2], [8], batch=4)
    with pytest.raises(audit.AuditInterrupted) as exc:
        audit.run_audit(specs)
    assert exc.value.finished == 0 and [r["status"] for r in exc.value.rows] == ["skipped", "skipped"]
