"""The MedPLIB MONAI Label app on a DICOMweb datastore: a real Orthanc, DICOM-SEG results saved back to it.

The demo model runs on a 12-slice slab of the real LiTS CT stored in Orthanc as a DICOM series; what is tested is
the DICOMweb path (no dcmqi download at start-up, series fetched from the PACS, DICOM-SEG written through pydicom
with the grounded text as segment label, STOW-RS accepted by Orthanc).
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
        volume, slab.affine, work / "ct", rescale=(1.0, 0.0), series_description="MedPLIB app test CT"
    )
    with OrthancServer(work / "orthanc") as orthanc:
        orthanc.upload(files)
        (series_uid,) = orthanc.series_instance_uids()
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache")}
        conf = {"models": "medplib_grounding,medplib_vqa"}
        with MONAILabelServer(orthanc.dicomweb_root, conf=conf, env=env, log_path=work / "ml.log") as server:
            yield orthanc, server, series_uid, volume


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


def _ground_and_save_final(pacs, text: str) -> tuple[dict, pydicom.Dataset]:
    """Ground ``text`` on slice 6 with ``save_label``; the reply and the one new DICOM-SEG in Orthanc."""
    orthanc, server, series_uid, _ = pacs
    before = {s["MainDicomTags"]["SeriesInstanceUID"] for s in _seg_series(orthanc)}
    params = {"text": text, "slice": 6, "save_label": True, "label_tag": "final"}
    reply = requests.post(
        f"{server.url}/infer/medplib_grounding",
        params={"image": series_uid, "output": "json"},
        data={"params": json.dumps(params)},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text[:2000]
    new = [s for s in _seg_series(orthanc) if s["MainDicomTags"]["SeriesInstanceUID"] not in before]
    assert len(new) == 1, new
    seg = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{new[0]['Instances'][0]}/file")))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    return reply.json(), seg


def test_final_label_is_saved_back_to_orthanc_as_dicom_seg(pacs):
    reply, seg = _ground_and_save_final(pacs, "liver")
    voxels = reply["medplib"]["targets"]["liver"]["voxels"]
    assert seg.SegmentSequence[0].SegmentLabel == "liver"  # named from the result's label_names
    assert int(np.count_nonzero(seg.pixel_array)) == voxels > 500  # the liver, about 1000 voxels on a slice


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
