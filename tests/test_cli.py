"""The `dit-optimum architecture` command on a tiny matrix, and argument errors."""

from __future__ import annotations

import json

from dit_optimum.cli import main


def test_architecture_writes_rows_with_ratios_to_sdpa(tmp_path, capsys):
    code = main(
        [
            "architecture",
            "--presets",
            "DiT-XS/8",
            "--attention-types",
            "sdpa,mqa,focused",
            "--sample-sizes",
            "16,32",
            "--batch-size",
            "1",
            "--repeats",
            "1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "architecture.json").read_text())
    rows = result["rows"]
    assert [(r["attention_type"], r["tokens"]) for r in rows] == [
        ("sdpa", 4),
        ("mqa", 4),
        ("focused", 4),
        ("sdpa", 16),
        ("mqa", 16),
        ("focused", 16),
    ]
    for row in rows:
        assert row["forward_s"] > 0 and row["gflops"] > 0
        if row["attention_type"] == "sdpa":
            assert row["time_ratio"] == row["params_ratio"] == 1.0
    assert next(r for r in rows if r["attention_type"] == "mqa")["params_ratio"] < 1
    assert "threads" in result["hardware"]
    report = (tmp_path / "report.md").read_text()
    assert "| DiT-XS/8 | focused | 16 |" in report
    assert "focused" in capsys.readouterr().out


def test_architecture_rejects_unknown_names(tmp_path, capsys):
    assert main(["architecture", "--attention-types", "sdpa,flash", "--output-dir", str(tmp_path)]) == 2
    assert "flash" in capsys.readouterr().err
    assert main(["architecture", "--presets", "DiT-M/2", "--output-dir", str(tmp_path)]) == 2
    assert "DiT-XS/2" in capsys.readouterr().err
    assert not (tmp_path / "architecture.json").exists()
