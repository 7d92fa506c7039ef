"""The MedPLIB MONAI Label app on a DICOMweb datastore: a real Orthanc, DICOM-SEG results saved back to it.

The demo model runs on a 12-slice slab of the real LiTS CT stored in Orthanc as a DICOM series; what is tested is
the DICOMweb path (no dcmqi download at start-up, series fetched from the PACS, DICOM-SEG written by this package
with the grounded text as segment label and the series' own frame of reference and patient text, STOW-RS accepted
by Orthanc, a PACS that is down answered 502 with nothing left behind).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pydicom
import pytest
import requests

from tests.support.app_clients import write_lits_slab
from tests.support.mlserver import MONAILabelServer
from tests.support.orthanc import OrthancServer, missing_orthanc

pytestmark = [
    pytest.mark.slow,
    # Without Orthanc these are skipped locally; CI (MEDPLIB_E2E_REQUIRED=1) installs it and must run them.
    pytest.mark.skipif(
        missing_orthanc() is not None and os.environ.get("MEDPLIB_E2E_REQUIRED") != "1",
        reason=str(missing_orthanc()),
    ),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from monai_medplib.io import write_dicom_series

    work = tmp_path_factory.mktemp("dicomweb")
    slab = write_lits_slab(work / "ct.nii.gz", flip_i=False)
    volume = np.rint(slab.image)  # whole HU, stored exactly with slope 1
    files = write_dicom_series(
        volume,
        slab.affine,
        work / "ct",
        rescale=(1.0, 0.0),
        series_description="MedPLIB app test CT – nativ",  # en dash and a CJK name: UTF-8 text
        patient_name="山田^太郎",
    )
    (work / "tmp").mkdir()
    with OrthancServer(work / "orthanc") as orthanc:
        orthanc.upload(files)
        (series_uid,) = orthanc.series_instance_uids()
        # the server's own temp folder: what a save leaves behind there is seen
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"), "TMPDIR": str(work / "tmp")}
        conf = {"models": "medplib_grounding,medplib_vqa"}
        with MONAILabelServer(orthanc.dicomweb_root, conf=conf, env=env, log_path=work / "ml.log") as server:
            server.tmp = work / "tmp"
            server.source = pydicom.dcmread(files[0], stop_before_pixels=True)
            yield orthanc, server, series_uid, volume


def _files_in(folder):
    """Files left in the server's temp folder (torch makes an empty cache folder there)."""
    return [p for p in folder.rglob("*") if p.is_file()]


def _seg_series(orthanc):
    series = orthanc.get_json("/series?expand")
    return [s for s in series if s["MainDicomTags"].get("Modality") == "SEG"]


def test_datastore_lists_the_series_and_no_dcmqi_was_downloaded(pacs):
    _, server, series_uid, _ = pacs
    info = requests.get(server.url + "/info/", timeout=60).json()
    assert info["datastore"]["total"] == 1
    # offline, a dcmqi download attempt would have failed the start-up; it was not even tried
    assert "dcmqi-1.2.4" not in server.log_text()
    first = requests.post(server.url + "/activelearning/first", json={}, timeout=120).json()
    assert first["id"] == series_uid


def test_the_series_converted_for_the_cache_is_not_left_in_the_temp_folder(pacs):
    """MONAI Label converts each series to a NIfTI in the system temp folder, copies it into its cache and left
    the temporary copy: a patient's CT, readable by every user of the machine."""
    _, server, series_uid, _ = pacs
    reply = requests.post(server.url + "/activelearning/first", json={}, timeout=120)
    assert reply.json()["id"] == series_uid
    assert _files_in(server.tmp) == []


def test_vqa_on_a_dicomweb_series(pacs):
    _, server, series_uid, _ = pacs
    reply = requests.post(
        f"{server.url}/infer/medplib_vqa",
        params={"image": series_uid, "output": "json"},
        data={"params": json.dumps({"question": "Is the liver visible in this image?", "slice": 2})},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["answer"] == "yes" and reply.json()["medplib"]["slice"] == 2


def test_dicom_seg_output_is_valid_and_accepted_by_orthanc(pacs, tmp_path):
    orthanc, server, series_uid, _ = pacs
    params = {"text": "liver", "slice": 5, "label_info": [{"name": "liver", "id": 1}]}
    reply = requests.post(
        f"{server.url}/infer/medplib_grounding",
        params={"image": series_uid, "output": "dicom_seg"},
        data={"params": json.dumps(params)},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text[:2000]
    assert reply.headers["content-type"].startswith("application/dicom")
    seg = pydicom.dcmread(io.BytesIO(reply.content))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    path = tmp_path / "seg.dcm"
    path.write_bytes(reply.content)
    before = len(_seg_series(orthanc))
    orthanc.upload([path])
    assert len(_seg_series(orthanc)) == before + 1


def _save_final(server, series_uid: str, text: str) -> requests.Response:
    params = {"text": text, "slice": 6, "save_label": True, "label_tag": "final"}
    return requests.post(
        f"{server.url}/infer/medplib_grounding",
        params={"image": series_uid, "output": "json"},
        data={"params": json.dumps(params)},
        timeout=120,
    )


def _ground_and_save_final(pacs, text: str) -> tuple[dict, pydicom.Dataset]:
    """Ground ``text`` on slice 6 with ``save_label``; the reply and the one new DICOM-SEG in Orthanc."""
    orthanc, server, series_uid, _ = pacs
    before = {s["MainDicomTags"]["SeriesInstanceUID"] for s in _seg_series(orthanc)}
    reply = _save_final(server, series_uid, text)
    assert reply.status_code == 200, reply.text[:2000]
    new = [s for s in _seg_series(orthanc) if s["MainDicomTags"]["SeriesInstanceUID"] not in before]
    assert len(new) == 1, new
    seg = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{new[0]['Instances'][0]}/file")))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert _files_in(server.tmp) == []  # the SEG sent was not left in the temp folder
    return reply.json(), seg


def test_final_label_is_saved_back_to_orthanc_as_dicom_seg(pacs):
    reply, seg = _ground_and_save_final(pacs, "liver")
    voxels = reply["medplib"]["targets"]["liver"]["voxels"]
    assert seg.SegmentSequence[0].SegmentLabel == "liver"  # named from the result's label_names
    assert int(np.count_nonzero(seg.pixel_array)) == voxels > 500  # the liver, about 1000 voxels on a slice


def test_saved_dicom_seg_keeps_the_series_frame_of_reference_and_patient_text(pacs):
    """MONAI Label's own converter gave the SEG a new frame of reference (viewers do not overlay it on the CT),
    wrote the patient name '山田^太郎' as '??^??' and added clinical-trial attributes."""
    _, server, _, _ = pacs
    _, seg = _ground_and_save_final(pacs, "liver")
    source = server.source
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.SpecificCharacterSet, seg.PatientName, seg.PatientID) == (
        "ISO_IR 192",
        "山田^太郎",
        source.PatientID,
    )
    assert not [e.keyword for e in seg if e.keyword.startswith("ClinicalTrial")]


def test_a_structure_not_found_saves_no_dicom_seg_and_answers_200(pacs):
    orthanc, server, series_uid, _ = pacs
    before = len(_seg_series(orthanc))
    reply = _save_final(server, series_uid, "white matter")  # a CT has none: the label is empty
    assert reply.status_code == 200, reply.text[:2000]
    assert reply.json()["medplib"]["targets"]["white matter"]["voxels"] == 0
    assert len(_seg_series(orthanc)) == before and _files_in(server.tmp) == []


def test_saved_dicom_seg_codes_each_label_in_snomed_ct(pacs):
    # PACS index segments by their codes: MONAI Label's default would code every segment as Spleen (78961009)
    _, seg = _ground_and_save_final(pacs, "liver, tumour")
    codes = {
        s.SegmentLabel: (
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
        for s in seg.SegmentSequence
    }
    # SNOMED CT: Anatomical Structure / Liver; Morphologically Abnormal Structure / Neoplasm (pydicom codes.SCT)
    expected = {"liver": ("91723000", "10200004"), "tumour": ("49755003", "108369006")}
    assert "liver" in codes and all(codes[name] == expected[name] for name in codes), codes
    assert [s.SegmentNumber for s in seg.SegmentSequence] == list(range(1, len(codes) + 1))


def test_a_pacs_that_is_down_is_a_502_naming_it_and_leaves_nothing(pacs):
    """Last in this file: it stops Orthanc (pytest runs a file's tests in order). The STOW failed with a bare 500
    and left the SEG, patient data in it, readable in the system temp folder."""
    orthanc, server, series_uid, _ = pacs
    orthanc.stop()
    reply = _save_final(server, series_uid, "liver")  # the series is in the server's cache; the STOW fails
    assert reply.status_code == 502, reply.text[:2000]
    assert "the PACS did not store the DICOM-SEG" in reply.json()["detail"]
    assert _files_in(server.tmp) == []
    assert requests.get(server.url + "/info/", timeout=60).status_code == 200
