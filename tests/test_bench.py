"""scripts/bench.py runs end to end and writes its report (figures are not checked: no timing in tests)."""

from conftest import script


def test_bench_writes_a_report_with_every_section(tmp_path):
    result = script("scripts/bench.py", "--parts", "1,8", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path))
    report = (tmp_path / "bench-cpu.md").read_text()
    assert report in result.stdout
    assert "Made by `python scripts/bench.py --parts 1,8 --repeats 1 --device cpu --out" in report
    assert "## Whole model: training step of train.py" in report and "Projected time of the sweep" in report
    assert "| 64->64 @32x32 |" in report and "| 512->512 @2x2 |" in report  # all 8 distinct HetConv shapes
    assert "of 8 cells with P > 1 are within 1.5x" in report
