"""The command line: argument handling, exit codes, one-line errors, subcommands on phantoms."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import covid_monai
import covid_monai.distributed
import covid_monai.inference
from covid_monai.cli import build_parser, main
from covid_monai.errors import SharedRunError
from covid_monai.summary import CaseResult

PACKAGE = Path(covid_monai.__file__).resolve().parent
ENTRY_POINTS = {"cli.py", "__main__.py"}  # the command line itself and `python -m covid_monai`


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (an entry point block, which may call the command line)."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
        and test.left.id == "__name__" and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__"
    )


def cli_imports(source: str) -> list[int]:
    """Line numbers where ``source`` imports ``covid_monai.cli`` outside an ``if __name__ == "__main__":`` block."""
    lines: list[int] = []

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            if any(a.name == "covid_monai.cli" or a.name.startswith("covid_monai.cli.") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            absolute = node.level == 0 and (
                node.module == "covid_monai.cli" or (node.module or "").startswith("covid_monai.cli.")
                or (node.module == "covid_monai" and "cli" in names)
            )
            relative = node.level > 0 and (node.module == "cli" or (node.module is None and "cli" in names))
            if absolute or relative:
                lines.append(node.lineno)
        elif isinstance(node, ast.Constant) and node.value == "covid_monai.cli":  # importlib.import_module(...)
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return lines


def test_the_import_scan_finds_every_form():
    for source in ("import covid_monai.cli", "from covid_monai.cli import main", "from covid_monai import cli",
                   "from .cli import UsageError", "from . import cli", "def f():\n    from covid_monai.cli import x",
                   "importlib.import_module('covid_monai.cli')"):
        assert cli_imports(source) == [len(source.splitlines())], source
    assert cli_imports("if __name__ == '__main__':\n    from covid_monai.cli import main\n    main()") == []
    assert cli_imports("from covid_monai.errors import UsageError\nimport covid_monai.client") == []


def test_no_package_module_imports_the_command_line():
    """One direction only: the command line imports the modules, never a module the command line (no cycle)."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in modules
        if path.name not in ENTRY_POINTS and (lines := cli_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"package modules importing covid_monai.cli (module: lines): {offenders}"


def test_distributed_is_a_flag_of_the_one_infer_parser():
    parser = build_parser()
    base = ["infer", "scan.nii.gz", "-o", "out", "--bundle", "b"]
    assert parser.parse_args([*base, "--distributed"]).distributed is True
    assert parser.parse_args(base).distributed is False
    args = parser.parse_args(["prepare-train", "--data", "d", "--out", "b", "--val-fraction", "0.3"])
    assert (args.command, args.data, args.out, args.val_fraction, args.seed) == ("prepare-train", Path("d"),
                                                                                Path("b"), 0.3, 0)


@pytest.mark.parametrize("command", ["phantom", "train", "prepare-train", "infer", "report", "evaluate", "demo"])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: covid-monai {command}")


@pytest.fixture
def fake_runners(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple]:
    """``run_batch`` and ``run_sharded_batch`` replaced by recorders that return one ok and one failed case."""
    calls: dict[str, tuple] = {}

    def recorder(name: str):
        def run(inputs, out_dir, bundle_dir, **options):
            calls[name] = (list(inputs), out_dir, bundle_dir, options)
            return [CaseResult("a", "/scans/a.nii.gz", "ok"), CaseResult("b", "/scans/b.nii.gz", "failed", "bad")]
        return run

    monkeypatch.setattr(covid_monai.inference, "run_batch", recorder("single"))
    monkeypatch.setattr(covid_monai.distributed, "run_sharded_batch", recorder("sharded"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_distributed_infer_takes_every_option_of_infer(tmp_path, fake_runners, capsys):
    lobes = tmp_path / "lobes"
    lobes.mkdir()
    listing = tmp_path / "scans.txt"
    listing.write_text("more.nii.gz\n")
    args = ["infer", "scan.nii.gz", "-o", str(tmp_path / "out"), "--bundle", "b", "--list", str(listing),
            "--device", "cpu", "--workers", "3", "--save-probabilities", "--lungs", "--preview", "--lobes", str(lobes),
            "--seg-nrrd", "--dicom-seg", "--threshold", "0.3", "--min-lesion-ml", "0.5", "--overwrite", "--force",
            "--quiet", "--debug", "--slice_batch_size", "4"]
    assert main(args) == 1
    assert main([*args, "--distributed"]) == 1
    assert fake_runners["sharded"] == fake_runners["single"]
    inputs, _, _, options = fake_runners["single"]
    assert inputs == [Path("scan.nii.gz"), Path("more.nii.gz")]
    assert options == dict(knobs={"slice_batch_size": 4, "threshold": 0.3, "min_lesion_ml": 0.5}, device="cpu",
                           workers=3, save_probabilities=True, save_lungs=True, save_preview=True, lobes=lobes,
                           save_seg_nrrd=True, save_dicom_seg=True, overwrite=True, force=True, progress=False,
                           debug=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1 segmented, 0 skipped (done before), 1 failed -> ")
    assert out[2].startswith("1 segmented, 0 skipped (done before), 1 failed by 1 process(es) -> ")
    assert out[1] == out[3] == "  FAILED /scans/b.nii.gz: bad"


def test_distributed_infer_rank_0_reports_for_all(tmp_path, fake_runners, monkeypatch, capsys):
    args = ["infer", "scan.nii.gz", "-o", str(tmp_path / "out"), "--bundle", "b", "--distributed"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0  # rank 0 gives the batch's exit code (1 here: a case failed)
    assert capsys.readouterr().out == ""

    def refuse(*args, **kwargs):
        raise SharedRunError("rank 0 could not prepare out: ValueError: inside the input folder")

    monkeypatch.setattr(covid_monai.distributed, "run_sharded_batch", refuse)
    assert main(args) == 1
    assert capsys.readouterr().err == ""  # the same error on every rank: printed once, by rank 0
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["covid-monai infer (rank 0): error: rank 0 could not prepare out: ValueError: inside the input "
                   "folder"]


def test_prepare_train_usage_errors_exit_2(tmp_path, capsys):
    assert main(["prepare-train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--epochs"]) == 2
    assert "--epochs needs a value" in capsys.readouterr().err
    assert main(["prepare-train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--x", "$print(1)"]) == 2
    assert not (tmp_path / "b").exists()


def test_usage_errors_exit_2(capsys, tmp_path):
    assert main(["infer", "-o", str(tmp_path / "out"), "--bundle", str(tmp_path)]) == 2
    assert "no inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["infer", "scan.nii.gz"])  # -o and --bundle missing: argparse's own exit code 2
    assert exc.value.code == 2
    assert main(["evaluate", "--pred", "a", "--labels", "b", "--bogus", "1"]) == 2


def test_phantom_command_writes_dataset(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--n", "2", "--shape", "48", "48", "12", "--seed", "4"]) == 0
    for sub in ("images", "labels", "lungs"):
        files = sorted((tmp_path / "ph" / sub).glob("*.nii.gz"))
        assert [f.name for f in files] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert nib.load(str(tmp_path / "ph" / "images" / "phantom_000.nii.gz")).shape == (48, 48, 12)


def test_infer_exit_code_1_when_a_case_fails_and_one_line_error(tmp_path, random_bundle, phantoms, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"")
    good = phantoms / "images" / "phantom_000.nii.gz"
    code = main(["infer", str(good), str(bad), "-o", str(tmp_path / "out"), "--bundle", str(random_bundle),
                 "--device", "cpu", "--quiet", "--workers", "0"])
    assert code == 1
    out = capsys.readouterr().out
    assert "1 segmented" in out and "1 failed" in out
    failed = [line for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert len(failed) == 1 and "bad.nii.gz" in failed[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "skipped": 0, "failed": 1}


def test_infer_list_file_and_missing_bundle(tmp_path, random_bundle, phantoms, capsys):
    listing = tmp_path / "scans.txt"
    listing.write_text(f"# scans\n{phantoms / 'images' / 'phantom_001.nii.gz'}\n\n")
    args = ["infer", "--list", str(listing), "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    assert main([*args, "--bundle", str(random_bundle)]) == 0
    assert (tmp_path / "out" / "phantom_001_infection.nii.gz").is_file()
    assert main([*args, "--bundle", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "not a covid-monai bundle" in err and "Traceback" not in err


def test_evaluate_command(tmp_path, phantoms, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for label in sorted((phantoms / "labels").glob("*.nii.gz")):
        image = nib.load(str(label))
        nib.save(image, pred / label.name.replace(".nii.gz", "_infection.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--labels", str(phantoms / "labels")]) == 0
    rows = (pred / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("case,dice")
    dice = [float(r.split(",")[1]) for r in rows[1:]]
    assert np.allclose(dice, 1.0)


def test_infer_refuses_unknown_setting(tmp_path, random_bundle, phantoms, capsys):
    code = main(["infer", str(phantoms / "images" / "phantom_000.nii.gz"), "-o", str(tmp_path / "out"), "--bundle",
                 str(random_bundle), "--device", "cpu", "--quiet", "--treshold", "0.3"])
    assert code == 1
    assert "no setting treshold" in capsys.readouterr().err


def test_quiet_infer_prints_only_the_counts(tmp_path, random_bundle, phantoms):
    """``covid-monai infer --quiet`` (a process of its own, workers on) prints the final counts and no progress log
    lines; without it the log says when the run finished."""
    scan = str(phantoms / "images" / "phantom_000.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    runs = {}
    for quiet in (True, False):
        args = [sys.executable, "-m", "covid_monai", "infer", scan, "-o", str(tmp_path / f"out_{quiet}"),
                "--bundle", str(random_bundle), "--device", "cpu", *(["--quiet"] if quiet else [])]
        runs[quiet] = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", timeout=300)
        assert runs[quiet].returncode == 0, runs[quiet].stderr[-3000:]
        assert runs[quiet].stdout.startswith("1 segmented, 0 skipped (done before), 0 failed")
    assert "infer finished" in runs[False].stderr
    assert " INFO: " not in runs[True].stderr, runs[True].stderr[-3000:]
