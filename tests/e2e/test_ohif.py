"""OHIF end to end in a real browser: a CT and a DICOM-SEG in Orthanc, shown by OHIF in headless Chromium.

Set-up (``scripts/install_e2e.sh``): Debian's Orthanc + DICOMweb plugin, Chromium, and OHIF's prebuilt viewer.
Missing pieces skip the tests, unless ``MEDPLIB_E2E_REQUIRED=1`` (CI), where they fail them.

Data: the real LiTS CT (``monai_medplib.data.lits``) written as a DICOM series (``monai_medplib.io``) and
uploaded to Orthanc. The SEG comes from
- ``test_ohif_shows_liver_seg_over_ct``: the true liver label, written with ``monai_medplib.io.write_dicom_seg``;
- ``test_ohif_shows_monailabel_grounding``: our MONAI Label app's ``medplib_grounding`` with the shipped demo
  model, grounding "liver" on a slab of slices through a real MONAI Label server on Orthanc's DICOMweb root,
  which stores the SEG in Orthanc. Its segment is labelled "liver" and it covers the true LiTS liver
  (Dice >= 0.8 against the reference label resampled onto the SEG's frames).

What ``check_ohif_shows_seg`` proves: OHIF, served from one origin with Orthanc's DICOMweb behind it, opens the
study, loads the SEG as a labelmap over the CT when its series is opened, holds exactly the voxels that the
SEG in Orthanc holds (slice by slice), and draws them: on a slice with plenty of mask, screen pixels inside
the mask are tinted and pixels away from it are not. Screenshots and reports land in the test's tmp folder and
in ``outputs/e2e/`` (``ohif_seg.png``, ``ohif_grounding.png`` and their ``.json``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.support.ohif import CHROMIUM_ARGS, OhifServer, find_chromium, ohif_dist_dir, viewer_url
from tests.support.orthanc import OrthancServer, missing_orthanc
from tests.support.paths import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

OUTPUT_DIR = REPO / "outputs" / "e2e"
SEGMENT_LABEL = "Liver"
BROWSER_TIMEOUT_MS = 60_000
# OHIF's onboarding tour would cover the viewport in the screenshot; mark it as already shown.
# A screen pixel counts as tinted by the overlay from this chroma on (grey CT: 0; OHIF's fills measured 15-68).
TINTED = 6
SKIP_TOUR_JS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


@dataclass
class CtSeries:
    """A CT series on disk: its files in slice order (index k of the volume) and their UIDs and positions."""

    files: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    positions: np.ndarray  # (slices, 3) ImagePositionPatient in mm
    orientation: (
        np.ndarray
    )  # (2, 3) ImageOrientationPatient: row (along columns) and column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    size: tuple[int, int]  # (rows, columns)


@dataclass
class Timings:
    """Wall-clock seconds per stage, written next to the screenshot."""

    start: float = field(default_factory=time.monotonic)
    stages: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str) -> None:
        self.stages[stage] = round(time.monotonic() - self.start - sum(self.stages.values()), 2)


# ------------------------------------------------------------------------------------------------------- data
def read_ct_series(paths: list[Path]) -> CtSeries:
    """UIDs and positions of a written CT series (files in slice order)."""
    import pydicom

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return CtSeries(
        files=list(paths),
        study_uid=headers[0].StudyInstanceUID,
        series_uid=headers[0].SeriesInstanceUID,
        sop_uids=[h.SOPInstanceUID for h in headers],
        positions=np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers]),
        orientation=np.asarray([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3),
        pixel_spacing=tuple(float(v) for v in headers[0].PixelSpacing),
        size=(int(headers[0].Rows), int(headers[0].Columns)),
    )


def write_lits_ct(out_dir: Path) -> CtSeries:
    """The real LiTS CT (case 117) as an axial DICOM CT series."""
    from monai_medplib.data.lits import load_lits_case
    from monai_medplib.io import write_dicom_series

    case = load_lits_case()
    paths = write_dicom_series(
        case.image,
        case.affine,
        out_dir,
        modality="CT",
        series_description="CT abdomen (LiTS 117)",
        patient_id="LITS117",
        patient_name="LiTS^117",
    )
    return read_ct_series(paths)


def store_liver_seg(orthanc: OrthancServer, ct: CtSeries, work_dir: Path) -> str:
    """Puts the true LiTS liver label (liver + tumour) for ``ct`` into Orthanc as a DICOM-SEG written with
    ``monai_medplib.io.write_dicom_seg``; returns its SeriesInstanceUID.
    """
    import pydicom

    from monai_medplib.data.lits import load_lits_case
    from monai_medplib.io import write_dicom_seg

    case = load_lits_case()
    seg_path = write_dicom_seg(
        (case.label > 0).astype(np.uint8),
        ct.files[0].parent,
        work_dir / "liver_seg.dcm",
        segments={1: SEGMENT_LABEL},
        affine=case.affine,
        series_description="Liver (reference label)",
    )
    orthanc.upload([seg_path])
    return pydicom.dcmread(seg_path, stop_before_pixels=True).SeriesInstanceUID


@dataclass
class StoredSeg:
    """What Orthanc holds for a SEG series: its description, segment labels and mask on the CT's slices."""

    series_uid: str
    description: str
    segment_labels: list[str]
    mask: np.ndarray  # bool [slice k of the CT, row, column], union of all segments


def seg_in_orthanc(orthanc: OrthancServer, seg_series_uid: str, ct: CtSeries) -> StoredSeg:
    """Reads the SEG series back from Orthanc (independently of the viewer) and decodes it with highdicom."""
    import highdicom as hd
    import pydicom

    matches = [
        s
        for s in orthanc.get_json("/series?expand")
        if s["MainDicomTags"]["SeriesInstanceUID"] == seg_series_uid
    ]
    if len(matches) != 1 or len(matches[0]["Instances"]) != 1:
        raise ValueError(f"expected one SEG instance in series {seg_series_uid}, Orthanc has {matches}")
    raw = orthanc.get_bytes(f"/instances/{matches[0]['Instances'][0]}/file")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(raw)))
    # Writers may omit empty frames (missing = empty) and may not state SpatialLocationsPreserved (pydicom-seg).
    pixels = seg.get_pixels_by_source_instance(
        ct.sop_uids,
        combine_segments=True,
        skip_overlap_checks=True,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    return StoredSeg(
        series_uid=seg_series_uid,
        description=str(seg.get("SeriesDescription", "")),
        segment_labels=[seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()],
        mask=pixels > 0,
    )


def ground_with_monailabel(
    orthanc: OrthancServer, ct: CtSeries, work_dir: Path, slices: str, text: str = "liver"
) -> tuple[str, dict]:
    """Runs our app's ``medplib_grounding`` (the app's default pipeline: the shipped demo model) on ``slices`` of
    the CT through a real MONAI Label server whose datastore is Orthanc's DICOMweb root; the server writes the
    result as DICOM-SEG and stores it in Orthanc (STOW-RS). Returns the new SEG's SeriesInstanceUID and the
    result JSON.
    """
    import requests

    from tests.support.mlserver import MONAILabelServer

    seg_before = set(orthanc.series_instance_uids())
    with MONAILabelServer(
        studies=orthanc.dicomweb_root,
        model="demo",
        conf={"models": "medplib_grounding"},
        log_path=work_dir / "mlserver.log",
    ) as server:
        # save_label + tag "final" is what makes MONAI Label's DICOMweb datastore upload a DICOM-SEG.
        params = {"text": text, "slices": slices, "save_label": True, "label_tag": "final"}
        reply = requests.post(
            f"{server.url}/infer/medplib_grounding",
            params={"image": ct.series_uid, "output": "json"},
            data={"params": json.dumps(params)},
            timeout=300,
        )
        assert reply.status_code == 200, f"/infer failed: {reply.status_code} {reply.text[:2000]}"
    new = [uid for uid in orthanc.series_instance_uids() if uid not in seg_before]
    assert len(new) == 1, f"expected the server to store one new series in Orthanc, got {new}"
    return new[0], reply.json()


def reference_liver_on_frames(ct: CtSeries) -> np.ndarray:
    """The true LiTS liver (liver + tumour) sampled at the centre of every pixel of every CT frame: bool
    ``[frame, row, column]``, from the frames' DICOM geometry (LPS) and the label's voxel -> RAS affine."""
    from monai_medplib.data.lits import load_lits_case

    case = load_lits_case()
    rows, cols = np.indices(ct.size)
    along_row, along_col = ct.orientation  # direction of increasing column index, of increasing row index
    in_plane = (
        cols[..., None] * ct.pixel_spacing[1] * along_row + rows[..., None] * ct.pixel_spacing[0] * along_col
    )
    lps = ct.positions[:, None, None, :] + in_plane[None]  # (frames, rows, columns, 3)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    to_voxel = np.linalg.inv(case.affine)
    ijk = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(case.label.shape)), axis=-1)
    ijk = np.clip(ijk, 0, np.array(case.label.shape) - 1)
    return inside & (case.label[ijk[..., 0], ijk[..., 1], ijk[..., 2]] >= 1)


# ---------------------------------------------------------------------------------------------------- fixtures
def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("MEDPLIB_E2E_REQUIRED") == "1":
        pytest.fail(f"e2e stack incomplete: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """Checks Orthanc, Chromium, OHIF and Playwright are installed; returns the Chromium executable."""
    _require(missing_orthanc())
    chromium = find_chromium()
    _require(None if chromium else "no system Chromium (run scripts/install_e2e.sh)")
    _require(None if (ohif_dist_dir() / "index.html").is_file() else f"OHIF not at {ohif_dist_dir()}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _require("playwright (Python) is not installed")
    return chromium


# ----------------------------------------------------------------------------------------------- page probes
# The viewer exposes its services and cornerstone on window; these read its state, they change nothing.
SEGMENTATION_STATE_JS = """
() => {
  const segmentationService = window.services && window.services.segmentationService;
  const cs = window.cornerstone;
  if (!segmentationService || !cs) return {ready: false};
  const viewports = cs.getRenderingEngines().flatMap(e => e.getViewports());
  return {
    ready: true,
    segmentations: segmentationService.getSegmentations().map(s => ({
      id: s.segmentationId,
      label: s.label,
      segmentLabels: Object.values(s.segments || {}).filter(Boolean).map(x => x.label),
    })),
    viewports: viewports.map(v => ({
      id: v.id,
      status: v.viewportStatus,
      representations: segmentationService.getSegmentationRepresentations(v.id).map(r => ({
        segmentationId: r.segmentationId,
        type: r.type,
        visible: r.visible,
        segmentsVisible: Object.values(r.segments || {}).map(x => x.visible),
      })),
    })),
  };
}
"""

# Per labelmap slice: where its CT slice is, how many voxels are set and their row/column sums.
LABELMAP_CONTENT_JS = """
(segmentationId) => {
  const cs = window.cornerstone;
  const seg = window.services.segmentationService.getSegmentation(segmentationId);
  const labelmap = seg.representationData.Labelmap;
  return labelmap.imageIds.map((imageId, n) => {
    const image = cs.cache.getImage(imageId);
    const plane = cs.metaData.get('imagePlaneModule', labelmap.referencedImageIds[n]);
    if (!image || !plane) return {missing: imageId};
    const data = image.getPixelData();
    let count = 0, rowSum = 0, colSum = 0;
    for (let p = 0; p < data.length; p++) {
      if (data[p] !== 0) { count++; rowSum += Math.floor(p / image.columns); colSum += p % image.columns; }
    }
    return {position: plane.imagePositionPatient, count, rowSum, colSum};
  });
}
"""

# Shows the CT slice nearest ``position`` and returns where voxel centres (0,0), (0,1), (1,0) land on the page.
SHOW_SLICE_JS = """
async (position) => {
  const cs = window.cornerstone;
  const viewport = cs.getEnabledElements()[0].viewport;
  const imageIds = viewport.getImageIds();
  const distance = id => {
    const p = cs.metaData.get('imagePlaneModule', id).imagePositionPatient;
    return Math.hypot(p[0] - position[0], p[1] - position[1], p[2] - position[2]);
  };
  let index = 0;
  imageIds.forEach((id, i) => { if (distance(id) < distance(imageIds[index])) index = i; });
  await viewport.setImageIdIndex(index);
  viewport.render();
  const plane = cs.metaData.get('imagePlaneModule', imageIds[index]);
  const world = (r, c) => [0, 1, 2].map(a => plane.imagePositionPatient[a]
    + c * plane.columnPixelSpacing * plane.rowCosines[a] + r * plane.rowPixelSpacing * plane.columnCosines[a]);
  const rect = viewport.canvas.getBoundingClientRect();
  const onPage = (r, c) => {
    const xy = viewport.worldToCanvas(world(r, c));
    return [rect.left + xy[0], rect.top + xy[1]];
  };
  return {index, distance: distance(imageIds[index]), origin: onPage(0, 0),
          alongColumns: onPage(0, 1), alongRows: onPage(1, 0)};
}
"""

VIEWPORT_RENDERED_JS = """
() => {
  const cs = window.cornerstone;
  const vps = cs ? cs.getRenderingEngines().flatMap(e => e.getViewports()) : [];
  return vps.length > 0 && vps.every(v => v.viewportStatus === 'rendered');
}
"""


def chroma(rgb: np.ndarray) -> np.ndarray:
    """Colourfulness of screen pixels: max minus min of R, G, B. The CT is drawn in grey (0); a segment
    overlay of any non-grey colour raises it, whatever colour the SEG recommends."""
    rgb = rgb.astype(np.int16)
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def overlay_contrast(screenshot: Path, mask_slice: np.ndarray, geometry: dict) -> dict:
    """Tint (:func:`chroma`) of screen pixels at voxel centres well inside vs. well away from ``mask_slice``."""
    from PIL import Image
    from scipy import ndimage

    page = np.asarray(Image.open(screenshot).convert("RGB"))
    origin = np.asarray(geometry["origin"])
    step_col = np.asarray(geometry["alongColumns"]) - origin
    step_row = np.asarray(geometry["alongRows"]) - origin
    rows, cols = np.indices(mask_slice.shape)
    xy = origin + cols[..., None] * step_col + rows[..., None] * step_row
    x = np.clip(np.round(xy[..., 0]).astype(int), 0, page.shape[1] - 1)
    y = np.clip(np.round(xy[..., 1]).astype(int), 0, page.shape[0] - 1)
    tint = chroma(page[y, x])
    # Margins keep the segment outline (drawn on the border) out of both sets.
    inside = ndimage.binary_erosion(mask_slice, iterations=2)
    outside = ~ndimage.binary_dilation(mask_slice, iterations=3)
    return {
        "inside_mean": float(tint[inside].mean()),
        "outside_mean": float(tint[outside].mean()),
        "inside_tinted_fraction": float((tint[inside] >= TINTED).mean()),
        "outside_tinted_fraction": float((tint[outside] >= TINTED).mean()),
        "n_inside": int(inside.sum()),
        "n_outside": int(outside.sum()),
    }


def load_seg_in_viewer(page, seg_series_description: str) -> None:
    """Opens the SEG series like a user: double-click on its thumbnail in the study browser.

    With ``disableConfirmationPrompts`` in our app-config, OHIF then loads it as a labelmap over its CT in the
    same viewport, without asking.
    """
    thumbnail = page.locator("[data-cy=study-browser-thumbnail-no-image]").filter(
        has_text=seg_series_description
    )
    thumbnail.wait_for(timeout=BROWSER_TIMEOUT_MS)
    thumbnail.dblclick()


# ------------------------------------------------------------------------------------------------------ tests
SOFT_TISSUE_WINDOW_JS = """
() => {
  const viewport = window.cornerstone.getEnabledElements()[0].viewport;
  viewport.setProperties({voiRange: {lower: -140, upper: 260}});  // W 400 / L 60, OHIF's soft-tissue preset
  viewport.render();
}
"""

SEG_SHOWN_JS = """
() => {
  const s = window.services && window.services.segmentationService;
  return !!s && s.getSegmentations().length > 0 && window.cornerstone.getEnabledElements().some(
    e => s.getSegmentationRepresentations(e.viewport.id).length > 0);
}
"""


def check_ohif_shows_seg(
    chromium_path: str,
    orthanc: OrthancServer,
    ct: CtSeries,
    seg: StoredSeg,
    out_dir: Path,
    name: str,
    timings: Timings,
) -> dict:
    """Opens the study in OHIF, loads the SEG, checks it is loaded and visible; saves ``<name>.png``/``.json``.

    Checks: OHIF has exactly this one segmentation with the SEG's segment labels, shown as a visible labelmap
    in the viewport; its labelmap holds exactly the SEG's voxels slice by slice (same count per CT slice, same
    in-plane centroid); on a slice with plenty of mask, the screen is tinted inside the mask and not away
    from it. Returns the report (timings, overlay contrast, page errors).
    """
    from playwright.sync_api import sync_playwright

    with OhifServer(orthanc.dicomweb_root) as ohif, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.add_init_script(SKIP_TOUR_JS)
            page.goto(viewer_url(ohif.url, ct.study_uid))
            page.wait_for_function(VIEWPORT_RENDERED_JS)
            timings.mark("viewer_shows_ct")

            load_seg_in_viewer(page, seg.description)
            page.wait_for_function(SEG_SHOWN_JS)
            page.wait_for_function(VIEWPORT_RENDERED_JS)
            timings.mark("viewer_loads_seg")

            state = page.evaluate(SEGMENTATION_STATE_JS)
            assert state["ready"], "OHIF did not expose its services / cornerstone"
            assert len(state["segmentations"]) == 1, state
            segmentation = state["segmentations"][0]
            assert segmentation["segmentLabels"] == seg.segment_labels, segmentation
            shown = [r for v in state["viewports"] for r in v["representations"]]
            assert len(shown) == 1, state
            assert shown[0]["segmentationId"] == segmentation["id"] and shown[0]["type"] == "Labelmap", shown
            assert shown[0]["visible"] is True and all(shown[0]["segmentsVisible"]), shown

            # The viewer holds exactly the SEG's voxels, each on the CT slice it belongs to.
            content = page.evaluate(LABELMAP_CONTENT_JS, segmentation["id"])
            assert not [c for c in content if "missing" in c], (
                "labelmap slices missing from the viewer's cache"
            )
            n_slices = len(ct.files)
            viewer_counts = np.zeros(n_slices, dtype=np.int64)
            viewer_sums = np.zeros(2)
            for item in content:
                k = int(np.argmin(np.linalg.norm(ct.positions - np.asarray(item["position"]), axis=1)))
                viewer_counts[k] += item["count"]
                viewer_sums += (item["rowSum"], item["colSum"])
            areas = seg.mask.reshape(n_slices, -1).sum(axis=1)
            np.testing.assert_array_equal(viewer_counts, areas)
            expected_centroid = np.argwhere(seg.mask)[:, 1:].mean(axis=0)
            np.testing.assert_allclose(viewer_sums / viewer_counts.sum(), expected_centroid, atol=1e-6)

            # Visible: the segmentation panel lists the segment; on a slice with half the largest mask area
            # (mask and surroundings both on screen) the overlay tints the mask and nothing away from it.
            page.locator("[data-cy=panelSegmentation-btn]").click()  # opening it resizes the viewport: first
            page.get_by_text(seg.segment_labels[0], exact=True).first.wait_for()
            page.wait_for_timeout(500)
            shown_frames = np.flatnonzero(areas)  # a SEG of a slab of slices has empty frames elsewhere
            k_show = int(shown_frames[np.argmin(np.abs(areas[shown_frames] - areas.max() / 2))])
            geometry = page.evaluate(SHOW_SLICE_JS, ct.positions[k_show].tolist())
            assert geometry["distance"] < 1e-3, geometry
            page.evaluate(SOFT_TISSUE_WINDOW_JS)
            page.wait_for_function(VIEWPORT_RENDERED_JS)
            page.wait_for_timeout(500)  # the labelmap layer is composited on the next animation frame
            screenshot = out_dir / f"{name}.png"
            page.screenshot(path=str(screenshot))
            timings.mark("checks_and_screenshot")
        finally:
            browser.close()

    contrast = overlay_contrast(screenshot, seg.mask[k_show], geometry)
    report = {
        "timings_s": timings.stages,
        "seg": {
            "description": seg.description,
            "segments": seg.segment_labels,
            "voxels": int(seg.mask.sum()),
        },
        "slice_shown": k_show,
        "geometry": geometry,
        "overlay": contrast,
        "page_errors": page_errors,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".json"):
        shutil.copyfile(out_dir / f"{name}{suffix}", OUTPUT_DIR / f"{name}{suffix}")
    print(json.dumps(report, indent=2))
    assert contrast["n_inside"] > 500 and contrast["n_outside"] > 500, contrast
    assert contrast["inside_tinted_fraction"] > 0.95, contrast
    assert contrast["outside_tinted_fraction"] < 0.02, contrast
    assert contrast["inside_mean"] - contrast["outside_mean"] > 2 * TINTED, contrast
    assert not page_errors, page_errors
    return report


def test_ohif_shows_liver_seg_over_ct(chromium_path: str, tmp_path: Path) -> None:
    """The reference liver label as DICOM-SEG in Orthanc -> OHIF shows it over the CT."""
    timings = Timings()
    ct = write_lits_ct(tmp_path / "ct")
    timings.mark("write_ct_series")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        orthanc.upload(ct.files)
        timings.mark("orthanc_with_ct")
        seg = seg_in_orthanc(orthanc, store_liver_seg(orthanc, ct, tmp_path), ct)
        assert seg.segment_labels == [SEGMENT_LABEL] and seg.mask.sum() > 100_000, seg.segment_labels
        # the SEG writer and the geometric resampling used by the grounding test agree voxel for voxel
        np.testing.assert_array_equal(seg.mask, reference_liver_on_frames(ct))
        timings.mark("store_seg")
        check_ohif_shows_seg(chromium_path, orthanc, ct, seg, tmp_path, "ohif_seg", timings)


GROUNDED_SLICES = (40, 71)  # an off-centre slab: frames in the wrong order would show up elsewhere


def test_ohif_shows_monailabel_grounding(chromium_path: str, tmp_path: Path) -> None:
    """Our MONAI Label app grounds "liver" with the demo model on a slab of the CT from Orthanc and stores a
    DICOM-SEG -> its segment is "liver", it lies on the true liver, and OHIF shows it."""
    timings = Timings()
    ct = write_lits_ct(tmp_path / "ct")
    timings.mark("write_ct_series")
    first, last = GROUNDED_SLICES
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        orthanc.upload(ct.files)
        timings.mark("orthanc_with_ct")
        seg_uid, result = ground_with_monailabel(orthanc, ct, tmp_path, slices=f"{first}-{last}")
        seg = seg_in_orthanc(orthanc, seg_uid, ct)
        timings.mark("monailabel_grounding_to_orthanc")
        assert seg.segment_labels == ["liver"], seg.segment_labels
        slab = np.arange(first, last + 1)
        assert set(np.flatnonzero(seg.mask.any(axis=(1, 2)))) <= set(slab.tolist()), "SEG frames off the slab"
        reference = reference_liver_on_frames(ct)[slab]
        grounded = seg.mask[slab]
        dice = 2 * (grounded & reference).sum() / (grounded.sum() + reference.sum())
        print(f"grounded liver vs LiTS liver on frames {first}-{last}: Dice {dice:.3f}")
        assert dice >= 0.8, f"Dice {dice:.3f} of the grounded liver on frames {first}-{last}"
        assert int(seg.mask.sum()) == result["medplib"]["targets"]["liver"]["voxels"]
        report = check_ohif_shows_seg(chromium_path, orthanc, ct, seg, tmp_path, "ohif_grounding", timings)
    report["grounding"] = {"slices": [first, last], "dice_vs_lits_liver": round(float(dice), 4)}
    for folder in (tmp_path, OUTPUT_DIR):
        (folder / "ohif_grounding.json").write_text(json.dumps(report, indent=2))
