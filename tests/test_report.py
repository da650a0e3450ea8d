"""benchmarks/report.py: the tables it renders from a pytest-benchmark JSON file."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(group, impl, median, **extra):
    return {"name": f"{group}-{impl}", "group": group, "stats": {"median": median},
            "extra_info": {"impl": impl, **extra}}


DATA = {"machine_info": {"cpu_model": "cpu", "cpu_count": 2}, "datetime": "now", "benchmarks": [
    _bench("sgemm", "torch.mm", 0.01, kind="sgemm", gflop=1.0),
    _bench("fma peak", "fma avx512 x2", 0.05, kind="fma-peak", gflops=200.0),
    _bench("fwd", "native", 0.02, kind="forward", gflop=0.5),
    _bench("fwd", "torch-eager", 0.05, kind="forward", gflop=0.5),
    {"name": "paired", "group": "paired fwd", "stats": {"median": 0.3},
     "extra_info": {"kind": "paired", "rounds": 4, "gflop": 0.5,
                    "medians_ms": {"native": 20.0, "torch-eager": 50.0},
                    "paired": {"torch-eager": 2.4}}},
]}


def test_sequential_rows_have_ratios_and_ceiling_fractions():
    rows = _report().rows(DATA)
    native = next(r for r in rows["fwd"] if r["impl"] == "native")
    assert abs(native["speed-up"] - 2.5) < 1e-12 and native["vs"] == "torch-eager"
    assert abs(native["GFLOP/s"] - 25.0) < 1e-9 and abs(native["of sgemm"] - 0.25) < 1e-12
    assert abs(native["of peak"] - 0.125) < 1e-12          # 25 of the FMA row's own 200 GFLOP/s
    peak = rows["fma peak"][0]
    assert peak["GFLOP/s"] == 200.0 and "speed-up" not in peak and "of peak" not in peak
    assert "paired fwd" not in rows  # a paired round's total is not a row


def test_paired_table_quotes_the_median_of_per_round_ratios(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(DATA))
    out = tmp_path / "table.md"
    assert _report().main([str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### paired fwd (4 interleaved rounds)" in text
    assert "| torch-eager | 50 | 10 | 2.40x |" in text    # 2.4x, not 50 / 20 = 2.5x
    assert "| native | 20 | 25 |  |" in text


def test_the_fastest_copy_row_is_the_ceiling():
    data = {"benchmarks": [
        _bench("step", "copy (1 thread)", 0.004, kind="copy", bytes=8e6),   # 2 GB/s
        _bench("step", "copy (2 threads)", 0.002, kind="copy", bytes=8e6),  # 4 GB/s
        _bench("step", "native-cpu", 0.005, kind="step", bytes=12e6, baseline="torch-ref"),
        _bench("step", "torch-ref", 0.05, kind="step", bytes=12e6)]}
    native = next(r for r in _report().rows(data)["step"] if r["impl"] == "native-cpu")
    assert abs(native["GB/s"] - 2.4) < 1e-9 and abs(native["of copy"] - 0.6) < 1e-12
    assert abs(native["speed-up"] - 10.0) < 1e-9
