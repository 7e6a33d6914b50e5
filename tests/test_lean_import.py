"""``covid-monai infer`` imports MONAI without Ignite, scipy.signal and matplotlib, and gets the same masks.

Each check runs in a fresh interpreter: the point is what a new process imports. A MONAI release that starts to need
one of these packages at import, or to use one on the inference path, fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from covid_monai.lean_import import FULL_IMPORT_ENV, NOT_NEEDED_FOR_INFERENCE

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
from covid_monai.lean_import import NOT_NEEDED_FOR_INFERENCE, import_monai_for_inference
lean = import_monai_for_inference()
import covid_monai.inference, covid_monai.bundle  # the inference path imports on top of a lean MONAI
import monai.bundle
loaded = [name for name in NOT_NEEDED_FOR_INFERENCE if name in sys.modules]
findable_after = [name for name in NOT_NEEDED_FOR_INFERENCE if importlib.util.find_spec(name) is not None]
print(json.dumps({"lean": lean, "loaded": loaded, "findable_after": findable_after,
                  "config_parser": hasattr(monai.bundle, "ConfigParser")}))
"""


def _python(code: str, *args: str, full_import: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(FULL_IMPORT_ENV, None)
    if full_import:
        env[FULL_IMPORT_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def test_monai_imports_without_the_packages_inference_does_not_use():
    proc = _python(PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["lean"] is True
    assert probe["loaded"] == [], f"imported although inference does not use them: {probe['loaded']}"
    assert probe["config_parser"] is True
    # the packages are only hidden while MONAI imports: a later import finds them as usual
    assert probe["findable_after"] == list(NOT_NEEDED_FOR_INFERENCE)


def test_a_whole_monai_import_loads_them_so_the_lean_one_saves_their_import():
    """If MONAI stops importing these packages, the lean import has nothing left to save: this says so."""
    proc = _python(PROBE, full_import=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["lean"] is False
    assert probe["loaded"] == list(NOT_NEEDED_FOR_INFERENCE)


def test_lean_and_whole_imports_write_the_same_masks_and_volumes(tmp_path, phantoms, random_bundle):
    """The program as users run it (``python -m covid_monai infer``, workers on) with and without the lean import;
    the report's plot imports matplotlib after the lean import, as usual."""
    outputs = {}
    for full_import in (False, True):
        out = tmp_path / ("whole" if full_import else "lean")
        proc = _python("import sys; from covid_monai.cli import console_main; sys.argv[0] = 'covid-monai'; "
                       "sys.exit(console_main())", "infer", str(phantoms / "images"), "-o", str(out),
                       "--bundle", str(random_bundle), "--device", "cpu", "--quiet", "--report",
                       full_import=full_import)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[full_import] = out
    lean_masks = sorted(outputs[False].glob("*_infection.nii.gz"))
    assert len(lean_masks) == 4
    for path in lean_masks:
        lean, whole = nib.load(path), nib.load(outputs[True] / path.name)
        np.testing.assert_array_equal(np.asarray(lean.dataobj), np.asarray(whole.dataobj))
        np.testing.assert_array_equal(lean.affine, whole.affine)

    def volumes(out: Path) -> list[tuple]:
        cases = json.loads((out / "summary.json").read_text())["cases"]
        return sorted((c["case"], c["infection_ml"], c["lung_ml"]) for c in cases)

    assert volumes(outputs[False]) == volumes(outputs[True])
    images = {full: (out / "report.html").read_text().count("data:image/png;base64,") for full, out in outputs.items()}
    assert images[False] == images[True] >= 1, images  # the involvement plot (matplotlib) is there both ways


def test_a_monai_that_needs_a_hidden_package_is_imported_whole_instead():
    """Hiding a package MONAI cannot do without (here its own utils) must not break the run: MONAI comes in whole."""
    proc = _python("""
import sys
from covid_monai.lean_import import import_monai_for_inference
assert import_monai_for_inference(("monai.utils",)) is False
import covid_monai.inference
from monai.transforms import Spacingd
assert "monai.utils" in sys.modules and Spacingd is sys.modules["monai.transforms"].Spacingd
print("whole")
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "whole"
