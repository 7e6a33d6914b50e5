"""The command line: argument handling, exit codes, one-line errors, subcommands on phantoms."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from covid_monai.cli import UsageError, main, parse_overrides


def test_parse_overrides_json_values_and_strings():
    assert parse_overrides(["--epochs", "3", "--pixdim=[1.5, 1.5, -1]", "--network-norm", "batch"]) == {
        "epochs": 3,
        "pixdim": [1.5, 1.5, -1],
        "network_norm": "batch",
    }


@pytest.mark.parametrize("tokens", [["--epochs"], ["epochs", "3"], ["--loss_name", "$print(1)"], ["--x", "@network"]])
def test_parse_overrides_refuses_bad_tokens_and_code(tokens):
    with pytest.raises(UsageError):
        parse_overrides(tokens)


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
