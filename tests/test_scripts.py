"""Dataset scripts: downloads (fake HTTP server with Range support), sources, archives, and each prepare script end
to end on tiny synthetic archives that mimic the real layouts; convert_slices on synthetic and real slices."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from covid_monai.datalist import build_datalist, check_training_data
from scripts import convert_slices, prepare_covid19_ct_seg, prepare_medseg, prepare_mosmed
from scripts.datasets import (
    ChecksumError,
    DatasetError,
    RemoteFile,
    UnsafeArchiveError,
    atomic_path,
    download,
    extract_zip,
    kfold_groups,
    obtain,
    parse_checksum,
    run_cases,
    split_fractions,
)
from tests.conftest import shared_data


# --------------------------------------------------------------------------------------------- fake HTTP server
@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before the connection drops (once)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = unquote(urlparse(self.path).path.lstrip("/"))
        requested = self.headers.get("Range")
        self.state.requests.append((name, requested))
        data = self.state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if requested and not self.state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.state.cut.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, ServerState]]:
    """A local HTTP server with Range support serving ``state.files``; yields (base URL, state)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------- downloads
def test_download_resumes_after_an_interruption(server, tmp_path):
    url, state = server
    payload = bytes(range(256)) * 400
    state.files["big.bin"] = payload
    state.cut["big.bin"] = 30_000
    dest = tmp_path / "dl" / "big.bin"
    with pytest.raises(DatasetError, match="run again to resume"):
        download(f"{url}/big.bin", dest, sha256(payload), retries=0, backoff=0)
    part = dest.with_name("big.bin.part")
    assert part.stat().st_size == 30_000 and not dest.exists()
    assert download(f"{url}/big.bin", dest, sha256(payload), retries=0) == dest
    assert dest.read_bytes() == payload and not part.exists()
    assert state.requests == [("big.bin", None), ("big.bin", "bytes=30000-")]
    download(f"{url}/big.bin", dest, sha256(payload))  # present and verified: no request
    assert len(state.requests) == 2


def test_download_retries_within_one_run_and_restarts_when_range_is_ignored(server, tmp_path):
    url, state = server
    payload = b"0123456789" * 5000
    state.files["a.bin"] = payload
    state.cut["a.bin"] = 12_345
    dest = tmp_path / "a.bin"
    download(f"{url}/a.bin", dest, "md5:" + hashlib.md5(payload).hexdigest(), retries=2, backoff=0)
    assert dest.read_bytes() == payload
    assert state.requests[-1] == ("a.bin", "bytes=12345-")
    # A server that ignores Range answers 200 with the whole file: the stale .part is replaced, not appended to.
    state.ignore_range = True
    state.files["b.bin"] = payload
    (tmp_path / "b.bin.part").write_bytes(b"stale bytes")
    download(f"{url}/b.bin", tmp_path / "b.bin", sha256(payload), backoff=0)
    assert (tmp_path / "b.bin").read_bytes() == payload


def test_download_checksum_mismatch_keeps_the_part_file(server, tmp_path):
    url, state = server
    state.files["x.zip"] = b"not what was expected" * 100
    dest = tmp_path / "x.zip"
    wrong = sha256(b"something else")
    with pytest.raises(ChecksumError, match=r"x\.zip\.part.*delete it"):
        download(f"{url}/x.zip", dest, wrong)
    assert not dest.exists() and (tmp_path / "x.zip.part").read_bytes() == state.files["x.zip"]
    # The next run finds the complete .part (416 from the server) and refuses it again, fetching nothing new.
    with pytest.raises(ChecksumError):
        download(f"{url}/x.zip", dest, wrong)
    assert state.requests[-1] == ("x.zip", f"bytes={len(state.files['x.zip'])}-")
    with pytest.raises(DatasetError, match="HTTP 404"):
        download(f"{url}/missing.zip", tmp_path / "missing.zip")


def test_local_folder_and_file_url_sources(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "Lung_Mask").mkdir(parents=True)
    (mirror / "a.zip").write_bytes(b"archive bytes")
    good = RemoteFile("a.zip", size=13, checksum=sha256(b"archive bytes"))
    assert obtain(str(mirror), good, tmp_path / "dl") == mirror / "a.zip"  # used in place, nothing copied
    assert obtain(mirror.as_uri(), good, tmp_path / "dl") == mirror / "a.zip"
    assert not (tmp_path / "dl").exists()
    with pytest.raises(ChecksumError, match="does not match"):
        obtain(mirror.as_uri(), RemoteFile("a.zip"), tmp_path / "dl", checksum=sha256(b"other"))
    assert obtain(str(mirror), RemoteFile("Lung_Mask.zip"), tmp_path / "dl") == mirror / "Lung_Mask"
    with pytest.raises(DatasetError, match="not in the source folder"):
        obtain(str(mirror), RemoteFile("b.zip"), tmp_path / "dl")
    assert parse_checksum("D41D8CD98F00B204E9800998ECF8427E") == ("md5", "d41d8cd98f00b204e9800998ecf8427e")
    with pytest.raises(ValueError):
        parse_checksum("sha256:1234")


# ------------------------------------------------------------------------------------------------------ archives
def test_extract_zip_refuses_path_traversal(tmp_path):
    for bad in ("../evil.txt", "/abs/evil.txt", "ok/../../evil.txt", "C:/evil.txt"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("good.txt", "fine")
            zf.writestr(zipfile.ZipInfo(bad), "gotcha")
        with pytest.raises(UnsafeArchiveError, match="refused"):
            extract_zip(archive, tmp_path / "out" / "x")
        assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "evil.txt").exists()
    link = zipfile.ZipInfo("link")
    link.external_attr = 0o120777 << 16  # a symbolic link member
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(tmp_path / "link.zip", tmp_path / "out" / "y")
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind


def test_extract_zip_is_atomic_filtered_and_reused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/keep.nii.gz", "k")
        zf.writestr("top/skip.txt", "s")
        zf.writestr("__MACOSX/top/._keep.nii.gz", "junk")
    dest = extract_zip(archive, tmp_path / "x", keep=lambda name: name.endswith(".nii.gz"))
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [".complete", "top/keep.nii.gz"]
    archive.unlink()
    assert extract_zip(archive, tmp_path / "x") == dest  # finished extraction reused
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "d.json") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert not any(p.name.startswith(".d.json") or p.name == "d.json" for p in tmp_path.iterdir())


def test_run_cases_goes_on_after_a_bad_case_and_resumes(tmp_path):
    calls = []

    def job(case: str) -> dict:
        calls.append(case)
        if case == "bad":
            raise ValueError("broken voxels")
        (tmp_path / f"{case}.out").write_text(case)
        return {"case": case}

    jobs = {c: ([tmp_path / f"{c}.out"], lambda c=c: job(c)) for c in ("a", "bad", "c")}
    entries, failed = run_cases(tmp_path, jobs, {"dataset": "demo"})
    assert sorted(entries) == ["a", "c"] and "broken voxels" in failed["bad"]
    entries, failed = run_cases(tmp_path, jobs, {"dataset": "demo"})  # finished cases are skipped
    assert calls == ["a", "bad", "c", "bad"] and sorted(entries) == ["a", "c"]
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["cases"]) == ["a", "c"]


# -------------------------------------------------------------------------------------------------------- splits
def test_splits_are_disjoint_seeded_and_stratified():
    cases = [f"coronacases_{i:03d}" for i in range(1, 11)] + [f"radiopaedia_{i}_1_0" for i in range(10)]
    strata = {c: c.split("_")[0] for c in cases}
    folds = kfold_groups(cases, 5, seed=0, strata=strata)
    assert sorted(c for f in folds for c in f) == sorted(cases)
    assert all(sum(c.startswith("coronacases") for c in f) == 2 and len(f) == 4 for f in folds)
    assert kfold_groups(cases, 5, 0, strata) == folds and kfold_groups(cases, 5, 1, strata) != folds
    parts = split_fractions(cases, seed=0, strata=strata)
    assert [len(p) for p in parts] == [14, 4, 2] and sorted(sum(parts, [])) == sorted(cases)
    assert [len(p) for p in split_fractions([str(i) for i in range(9)])] == [6, 2, 1]


def test_case_names_and_window_mapping():
    case_id = prepare_covid19_ct_seg.case_id
    assert case_id("coronacases_org_001.nii.gz") == "coronacases_001" == case_id("coronacases_001.nii")
    assert case_id("coronacases_org_case007.nii") == "coronacases_007" == case_id("case007.nii.gz")
    assert case_id("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz") == "radiopaedia_4_85506_1"
    assert case_id("radiopaedia_4_85506_1.nii.gz") == "radiopaedia_4_85506_1"
    assert prepare_covid19_ct_seg.window_to_hu(np.array([0, 127.5, 255])).tolist() == [-1250, -500, 250]


# ---------------------------------------------------------------------------------------- synthetic datasets
SHAPE = (12, 10, 4)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, tmp: Path) -> bytes:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    path = tmp / "scratch.nii.gz"
    nib.save(image, str(path))
    return path.read_bytes()


def make_zip(path: Path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def affine_of(i: int) -> np.ndarray:
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = [-100.0 + i, -120.0, -300.0 + 2 * i]
    return affine


def ct_seg_archives(folder: Path) -> dict[str, object]:
    """Fake Zenodo 3757476 zips: 10 coronacases in HU, 10 Radiopaedia cases in 0..255 (one of them in HU)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images, infections, lungs, expected = {}, {}, {}, {}
    for i in range(20):
        if i < 10:
            stem, mask = f"coronacases_org_{i + 1:03d}", f"coronacases_{i + 1:03d}"
            data = rng.integers(-1024, 400, SHAPE).astype(np.int16)
            hu = data.astype(np.int16)
        elif i < 19:
            stem = f"radiopaedia_org_covid-19-pneumonia-{i}_8{i}000_{i % 2}-dcm"
            mask = f"radiopaedia_{i}_8{i}000_{i % 2}"
            data = rng.uniform(0, 255, SHAPE).astype(np.float32)
            data[0, 0, 0], data[1, 0, 0] = 0.0, 255.0
            hu = np.rint(data / 255 * 1500 - 1250).astype(np.int16)
        else:  # named Radiopaedia but stored in HU: detected from its values and left as it is
            stem, mask = "radiopaedia_org_covid-19-pneumonia-99_89999_0-dcm", "radiopaedia_99_89999_0"
            data = rng.integers(-1024, 300, SHAPE).astype(np.int16)
            hu = data
        infection = (rng.random(SHAPE) > 0.8).astype(np.uint8)
        lung = np.zeros(SHAPE, np.uint8)
        lung[1:5, 2:8] = 1  # low i = patient's left (-x in RAS) with this affine
        lung[7:11, 2:8] = 2
        images[f"{stem}.nii.gz"] = nifti_bytes(data, affine_of(i), folder)
        infections[f"Infection_Mask/{mask}.nii.gz"] = nifti_bytes(infection.astype(np.float32), affine_of(i), folder)
        lungs[f"Lung_Mask/{mask}.nii.gz"] = nifti_bytes(lung, affine_of(i), folder)
        expected[prepare_covid19_ct_seg.case_id(mask)] = (hu, infection, lung, affine_of(i))
    images["__MACOSX/._coronacases_org_001.nii.gz"] = b"resource fork"
    blobs = {
        "COVID-19-CT-Seg_20cases.zip": make_zip(folder / "COVID-19-CT-Seg_20cases.zip", images),
        "Infection_Mask.zip": make_zip(folder / "Infection_Mask.zip", infections),
        "Lung_Mask.zip": make_zip(folder / "Lung_Mask.zip", lungs),
    }
    (folder / "scratch.nii.gz").unlink()
    return {"blobs": blobs, "expected": expected}


def test_prepare_covid19_ct_seg_end_to_end_over_http(server, tmp_path):
    url, state = server
    fake = ct_seg_archives(tmp_path / "zenodo")
    state.files.update(fake["blobs"])
    out = tmp_path / "covid19_ct_seg"
    args = ["--source", url, "--out", str(out)]
    args += [arg for name, data in fake["blobs"].items() for arg in ("--checksum", f"{name}={sha256(data)}")]
    assert prepare_covid19_ct_seg.main(args) == 0

    expected = fake["expected"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{c}.nii.gz" for c in expected)
    for case, (hu, infection, lung, affine) in expected.items():
        image = nib.load(out / "images" / f"{case}.nii.gz")
        assert image.get_data_dtype() == np.int16 and np.allclose(image.affine, affine)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), hu)
        label = nib.load(out / "labels" / f"{case}.nii.gz")
        assert label.get_data_dtype() == np.uint8 and np.allclose(label.affine, affine)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), infection)
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / "lungs" / f"{case}.nii.gz").dataobj), lung)

    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    mapped = sorted(c for c, e in manifest.items() if e["intensity"] != "HU")
    assert mapped == sorted(c for c in expected if c.startswith("radiopaedia_") and c != "radiopaedia_99_89999_0")
    assert all(e["lung_label_1_side"] == "left" for e in manifest.values())
    readme = (out / "README.md").read_text()
    assert "hu = v / 255 * 1500 - 1250" in readme and mapped[0] in readme

    cases = sorted(expected)
    task1 = [json.loads((out / f"datalist_task1_fold{i}.json").read_text()) for i in range(5)]
    cv5 = [json.loads((out / f"datalist_cv5_fold{i}.json").read_text()) for i in range(5)]
    names = [[Path(item["image"]).name.removesuffix(".nii.gz") for item in d["training"]] for d in task1]
    assert all(len(d["training"]) == 4 and len(d["test"]) == 16 for d in task1)
    assert sorted(sum(names, [])) == cases  # the 4-case training groups partition the 20 cases
    assert all(sum(n.startswith("coronacases") for n in group) == 2 for group in names)
    tests = [[Path(item["image"]).name.removesuffix(".nii.gz") for item in d["test"]] for d in cv5]
    assert all(len(d["training"]) == 16 and len(t) == 4 for d, t in zip(cv5, tests, strict=True))
    assert sorted(sum(tests, [])) == cases  # every case in exactly one test fold
    assert tests == names  # 80/20 fold i tests on the group that Task 1 fold i trains on
    for d in cv5:
        assert not {i["image"] for i in d["training"]} & {i["image"] for i in d["test"]}
    seed = json.loads((out / "datalist_seed_70_20_10.json").read_text())
    assert [len(seed[k]) for k in ("training", "validation", "test")] == [14, 4, 2]
    assert len({i["image"] for k in seed for i in seed[k]}) == 20
    assert all((out / item[k]).is_file() for d in task1 + cv5 + [seed] for s in d.values() for item in s for k in item)
    check_training_data(build_datalist(out / "datalist_cv5_fold0.json"))  # the training CLI accepts it as is

    # A re-run verifies the downloads, skips finished cases and gives the same datalists.
    n_requests = len(state.requests)
    assert prepare_covid19_ct_seg.main(args) == 0
    assert len(state.requests) == n_requests
    assert json.loads((out / "datalist_task1_fold0.json").read_text()) == task1[0]


def test_prepare_covid19_ct_seg_from_a_folder_with_given_folds(tmp_path):
    fake = ct_seg_archives(tmp_path / "mirror")
    cases = sorted(fake["expected"])
    folds = [{"train": cases[i * 4 : i * 4 + 4], "val": cases[: i * 4] + cases[i * 4 + 4 :]} for i in range(5)]
    folds[0]["train"] = ["coronacases_org_001.nii.gz", "case002", *cases[2:4]]  # names in any spelling
    (tmp_path / "task1.json").write_text(json.dumps(folds))
    out = tmp_path / "out"
    result = prepare_covid19_ct_seg.prepare(str(tmp_path / "mirror"), out, task1_splits=tmp_path / "task1.json")
    assert not result["failed"] and len(result["cases"]) == 20
    fold0 = json.loads((out / "datalist_task1_fold0.json").read_text())
    assert [i["image"] for i in fold0["training"]] == [f"images/{c}.nii.gz" for c in cases[:4]]
    assert not (out / "downloads").exists()  # local archives are used in place
    with pytest.raises(DatasetError, match="inside the input folder"):
        prepare_covid19_ct_seg.prepare(str(tmp_path), tmp_path / "mirror" / "out")


def test_prepare_covid19_ct_seg_refuses_a_bad_checksum(tmp_path, capsys):
    ct_seg_archives(tmp_path / "mirror")
    code = prepare_covid19_ct_seg.main(
        [
            "--source",
            str(tmp_path / "mirror"),
            "--out",
            str(tmp_path / "out"),
            "--checksum",
            f"Infection_Mask.zip=md5:{'0' * 32}",
        ]
    )
    assert code == 1
    assert "Infection_Mask.zip: md5" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


def test_prepare_mosmed_extracts_only_labelled_studies(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    rng = np.random.default_rng(1)
    members, expected = {}, {}
    for n in range(255, 261):
        data = rng.integers(-1024, 500, SHAPE).astype(np.int16)
        mask = (rng.random(SHAPE) > 0.7).astype(np.uint8)
        members[f"COVID19_1110/studies/CT-1/study_{n:04d}.nii.gz"] = nifti_bytes(data, affine_of(n), folder)
        members[f"COVID19_1110/masks/study_{n:04d}_mask.nii.gz"] = nifti_bytes(mask, affine_of(n), folder)
        expected[f"study_{n:04d}"] = (data, mask)
    members["COVID19_1110/studies/CT-0/study_0001.nii.gz"] = nifti_bytes(np.zeros(SHAPE, np.int16), np.eye(4), folder)
    members["COVID19_1110/dataset_registry.xlsx"] = b"registry"
    blob = make_zip(folder / "COVID19_1110.zip", members)
    (folder / "scratch.nii.gz").unlink()
    out = tmp_path / "mosmed"
    args = ["--source", folder.as_uri(), "--out", str(out), "--checksum", f"COVID19_1110.zip={sha256(blob)}"]
    assert prepare_mosmed.main(args) == 0
    raw = [p.name for p in (out / "raw").rglob("*.nii.gz")]
    assert "study_0001.nii.gz" not in raw and len(raw) == 12
    for case, (data, mask) in expected.items():
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / "images" / f"{case}.nii.gz").dataobj), data)
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / "labels" / f"{case}.nii.gz").dataobj), mask)
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(sum((f["test"] for f in splits["cv5_folds"]), [])) == sorted(expected)
    seed = splits["seed_70_20_10"]
    assert [len(seed[k]) for k in ("training", "validation", "test")] == [4, 1, 1]
    # The extracted dataset folder works as a source too.
    result = prepare_mosmed.prepare(str(out / "raw" / "COVID19_1110" / "COVID19_1110"), tmp_path / "mosmed2")
    assert result["cases"] == sorted(expected) and not result["failed"]


def test_prepare_medseg_slices_and_volumes(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    rng = np.random.default_rng(2)
    stack = rng.uniform(-1024, 600, (16, 14, 6)).astype(np.float32)
    classes = rng.integers(0, 4, (16, 14, 6)).astype(np.float32)
    affine = affine_of(3)
    (folder / "tr_im.nii.gz").write_bytes(nifti_bytes(stack, affine, folder))
    (folder / "tr_mask.nii.gz").write_bytes(nifti_bytes(classes, affine, folder))
    volumes, masks = {}, {}
    for n in range(1, 6):
        volumes[f"rp_im/{n}.nii.gz"] = nifti_bytes(rng.integers(-1024, 900, SHAPE).astype(np.int16), affine, folder)
        masks[f"rp_msk/{n}.nii.gz"] = nifti_bytes(rng.integers(0, 4, SHAPE).astype(np.uint8), affine, folder)
    make_zip(folder / "rp_im.zip", volumes)
    make_zip(folder / "rp_msk.zip", masks)
    (folder / "scratch.nii.gz").unlink()
    out = tmp_path / "medseg"
    assert prepare_medseg.main(["--source", str(folder), "--out", str(out)]) == 0

    k = 4
    image = nib.load(out / "images" / f"medseg_slice_{k:03d}.nii.gz")
    assert image.shape == (16, 14, 1) and image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(image.dataobj)[..., 0], stack[:, :, k])
    np.testing.assert_allclose(image.affine[:3, 3], (affine @ [0, 0, k, 1])[:3])
    label = np.asanyarray(nib.load(out / "labels" / f"medseg_slice_{k:03d}.nii.gz").dataobj)[..., 0]
    np.testing.assert_array_equal(label, np.isin(classes[:, :, k], (1, 2)))
    kept = np.asanyarray(nib.load(out / "classes" / f"medseg_slice_{k:03d}.nii.gz").dataobj)[..., 0]
    np.testing.assert_array_equal(kept, classes[:, :, k])
    assert len(list((out / "images").glob("medseg_rp_*.nii.gz"))) == 5
    for subset, n in (("slices", 6), ("volumes", 5)):
        folds = [json.loads((out / f"datalist_{subset}_cv5_fold{i}.json").read_text()) for i in range(5)]
        tests = sorted(item["image"] for d in folds for item in d["test"])
        assert len(tests) == n == len(set(tests))
        assert (out / f"datalist_{subset}_seed_70_20_10.json").is_file()


# ------------------------------------------------------------------------------------------------ convert_slices
def test_convert_slices_synthetic(tmp_path):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (7, 5), dtype=np.uint8)  # 7 rows, 5 columns
    Image.fromarray(gray).save(images / "1.png")
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(images / "10.png")
    Image.fromarray(gray).save(images / "2.png")  # no mask
    mask = np.zeros((7, 5), np.uint8)
    mask[2:5, 1:3] = 255
    Image.fromarray(mask).save(masks / "1.png")
    Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2)).save(masks / "10.png")
    Image.fromarray(np.zeros((7, 5), np.uint8)).save(masks / "99.png")  # no image
    result = convert_slices.convert(images, out, masks, spacing=(0.7, 0.6, 5.0))
    assert result["pairs"] == ["1", "10"] and result["unlabelled"] == ["2"] and result["orphan_masks"] == ["99"]
    for name in ("1", "10"):
        image = nib.load(out / "images" / f"{name}.nii.gz")
        label = nib.load(out / "labels" / f"{name}.nii.gz")
        assert image.shape == label.shape == (5, 7, 1) and image.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, :, 0], gray.T)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj)[:, :, 0], (mask.T > 127).astype(np.uint8))
        np.testing.assert_allclose(image.affine, np.diag([-0.7, -0.6, 5.0, 1.0]))
        np.testing.assert_allclose(label.affine, image.affine)
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["training"] == [{"image": f"images/{n}.nii.gz", "label": f"labels/{n}.nii.gz"} for n in ("1", "10")]
    assert datalist["test"] == [{"image": "images/2.nii.gz"}]
    # 0/1 masks stay 0/1; a mask of another size fails that pair only; OUT inside an input folder is refused.
    Image.fromarray((mask > 0).astype(np.uint8)).save(masks / "2.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(masks / "10.png")
    code = convert_slices.main(["--images", str(images), "--masks", str(masks), "--out", str(out), "--overwrite"])
    assert code == 1
    label2 = np.asanyarray(nib.load(out / "labels" / "2.nii.gz").dataobj)[:, :, 0]
    np.testing.assert_array_equal(label2, (mask.T > 0).astype(np.uint8))
    with pytest.raises(DatasetError, match="inside the input folder"):
        convert_slices.convert(images, images / "out", masks)


def test_convert_slices_real_covid_semiseg(tmp_path):
    train = shared_data("covid_semiseg", "train")
    out = tmp_path / "semiseg"
    code = convert_slices.main(["--images", str(train / "images"), "--masks", str(train / "masks"), "--out", str(out)])
    assert code == 0
    names = sorted(p.stem for p in (train / "images").glob("*.jpg"))
    assert len(list((out / "labels").iterdir())) == len(names) == 50
    picture = np.asarray(Image.open(train / "images" / "0.jpg").convert("L"))
    image = nib.load(out / "images" / "0.nii.gz")
    assert image.shape == (picture.shape[1], picture.shape[0], 1)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, :, 0], picture.T)
    label = np.asanyarray(nib.load(out / "labels" / "0.nii.gz").dataobj)
    assert set(np.unique(label).tolist()) == {0, 1}
    datalist = build_datalist(out / "datalist.json")
    check_training_data(datalist)


def test_convert_slices_multiclass_keeps_class_indices(tmp_path):
    """Palette masks keep their indices (0/1/2) with labels='multiclass'; a value beyond the classes is refused."""
    from PIL import Image

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5).save(images / "a.png")
    classes = np.zeros((6, 8), np.uint8)
    classes[1:3, 2:5], classes[4, 6] = 1, 2
    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([0, 0, 0, 255, 200, 0, 200, 0, 255] + [0] * 759)  # colours whose luma is not 1 or 2
    palette.save(masks / "a.png")
    result = convert_slices.convert(images, out, masks, labels="multiclass")
    assert result["pairs"] == ["a"] and not result["failed"]
    label = np.asarray(nib.load(str(out / "labels" / "a.nii.gz")).dataobj)
    np.testing.assert_array_equal(label[:, :, 0], classes.T)
    binary = convert_slices.convert(images, tmp_path / "binary", masks)  # the default reads grey levels: not indices
    assert binary["pairs"] == ["a"]
    Image.fromarray(classes * 3).save(masks / "a.png")  # values 0, 3, 6: not classes 0..2
    failed = convert_slices.convert(images, tmp_path / "bad", masks, labels="multiclass")
    assert "outside the classes" in failed["failed"]["a"] and str(masks / "a.png") in failed["failed"]["a"]
