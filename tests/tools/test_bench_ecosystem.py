"""tools/bench_ecosystem.py --quick: flux and dit, both recipes, every loader and export target checked."""

import json

import bench_ecosystem as bench
import pytest


@pytest.mark.slow
def test_quick_run_writes_the_report(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "ecosystem.json").read_text())
    assert report["quick"] and set(report["families"]) == set(bench.QUICK_FAMILIES)
    assert {"load_average_at_start", "cpu_model"} <= set(report["machine"])
    assert {"torch", "diffusers", "compressed_tensors", "torchao", "git_commit"} <= set(report["versions"])
    for family, entry in report["families"].items():
        assert set(entry["methods"]) == set(bench.RECIPES)
        for method, row in entry["methods"].items():
            assert set(row["cells"]) == set(bench.COLUMNS)
            cells = row["cells"]
            for column in (
                *bench.LOADERS[:3],
                "adatsq export --to compressed-tensors",
                "adatsq export --to gptqmodel",
            ):
                assert cells[column]["works"] is True, (family, method, column, cells[column])
            assert "does not apply" in cells["transformers from_pretrained"]["detail"]
            for target in ("torchao", "quanto"):  # not installed in the test venv: said so, never "works"
                cell = cells[f"adatsq export --to {target}"]
                installed = report["versions"][{"torchao": "torchao", "quanto": "optimum_quanto"}[target]]
                assert cell["works"] is not None or (not installed and "not installed here" in cell["detail"])
        assert entry["methods"]["adatsq"]["switching_layers"] > 0  # the AdaTSQ rows do switch bits
    markdown = (tmp_path / "ecosystem.md").read_text()
    assert markdown.startswith("# Ecosystem") and "## flux (`FluxPipeline`" in markdown
    (tmp_path / "ecosystem.md").unlink()
    assert bench.main(["--from-json", str(tmp_path / "ecosystem.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ecosystem.md").read_text() == markdown
