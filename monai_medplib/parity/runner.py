"""Parity with the original MedPLIB: run a golden fixture (``upstream_tiny_*`` format) and compare everything.

A fixture directory holds ``model/`` (saved by the original code), ``inputs/`` (images, masks, ``prompts.json``),
``expected/expected.json`` plus ``expected/<case>.safetensors``, and ``tokenization.json``. Nothing here knows
case names: what to run is read from each case's entries (an ``image``; a ``region_mask``; ``greedy`` /
``evalpath_greedy`` results; grounding entries such as ``resize`` and ``evaluate_output_ids``), and every stored
tensor is compared by name with its ``suggested_tolerance``. Tensor names ending in ``_tail`` (from
``tail_start``) or ``_lastN`` are slices along the sequence axis. Model stages run through the same
:class:`~monai_medplib.pipeline.MedPLIBPipeline` primitives users call, so a failing row names the stage.
Cases with training losses (``tf_losses``) are also run through the training path (:mod:`.training`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..pipeline import MedPLIBPipeline
from ..processing import MASK_THRESHOLD, clip_pixels, load_rgb, sam_pixels
from ..tokenization import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, MedPLIBTokenizer, build_prompt
from .compare import (
    EXACT,
    ParityReport,
    Row,
    compare_binary_mask,
    compare_tensor,
    compare_values,
    parse_tolerance,
    threshold_margin,
)
from .training import check_training_losses

# Fixture conversation-template names (the release's conv_templates keys) -> ours.
TEMPLATE_NAMES = {
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "llava_v1": "llava_v1",
    "medplib_v1": "llava_v1",
}
_MISSING = object()


class ParityFixture:
    """Files of one fixture directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        expected_file = self.root / "expected" / "expected.json"
        if not expected_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a parity fixture: {expected_file} is missing")
        self.expected = json.loads(expected_file.read_text())
        prompts_file = self.root / "inputs" / "prompts.json"
        self.prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else {}
        tok_file = self.root / "tokenization.json"
        self.tokenization = json.loads(tok_file.read_text()) if tok_file.is_file() else None
        name = self.expected.get("conv_template", self.prompts.get("conv_template", "v1"))
        if name not in TEMPLATE_NAMES:
            raise ValueError(f"unknown conversation template {name!r} in {expected_file}")
        self.template = TEMPLATE_NAMES[name]

    @property
    def cases(self) -> dict[str, dict]:
        return self.expected.get("cases", {})

    def tensors(self, case: str) -> dict[str, torch.Tensor]:
        path = self.root / "expected" / f"{case}.safetensors"
        return load_file(str(path)) if path.is_file() else {}

    def prompt_case(self, case: str) -> dict:
        return self.prompts.get("cases", {}).get(case, {})


def run_parity(fixture_dir: str | Path, device: str = "cpu") -> ParityReport:
    """Load ``fixture_dir/model`` with the strict loader (fp32) and compare every case; never raises on a mismatch."""
    fixture = ParityFixture(fixture_dir)
    report = ParityReport()
    try:
        pipe = MedPLIBPipeline.from_pretrained(
            fixture.root / "model", device=device, dtype=torch.float32, template=fixture.template
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        report.rows.append(
            Row(
                "model",
                "strict load",
                math.inf,
                "loads",
                False,
                " ".join(line.strip() for line in str(err).splitlines()),
            )
        )
        return report
    report.rows.append(Row("model", "strict load", 0.0, "loads", True))
    report.rows += _fixture_constants(pipe.tokenizer, fixture.expected)
    if fixture.tokenization is not None:
        report.rows += check_tokenization(pipe.tokenizer, fixture.tokenization)
    for name, entry in fixture.cases.items():
        report.rows += _CaseCheck(pipe, fixture, name, entry).run()
        report.rows += check_training_losses(
            pipe.model, pipe.tokenizer, fixture.root / "inputs", name, entry, fixture.template
        )
    return report


def _fixture_constants(tokenizer: MedPLIBTokenizer, expected: dict) -> list[Row]:
    ours = {"seg_token_idx": tokenizer.seg_id, "eos_token_id": tokenizer.eos_id}
    ours["colon_id_used_for_prompt_cut"] = tokenizer.colon_id
    ours["mask_threshold_logit"] = math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))
    rows = []
    for key, value in ours.items():
        if key in expected:
            if isinstance(value, float):
                diff = abs(value - expected[key])
                rows.append(Row("fixture", key, diff, "<= 1e-09", diff <= 1e-9))
            else:
                rows.append(compare_values("fixture", key, value, expected[key]))
    return rows


def check_tokenization(tokenizer: MedPLIBTokenizer, data: dict) -> list[Row]:
    """Every string of ``tokenization.json``: pieces, ids, model ids and decoded text."""
    rows = []
    if "len_tokenizer" in data:
        rows.append(compare_values("tokenization", "len_tokenizer", len(tokenizer), data["len_tokenizer"]))
    if "special_ids" in data:
        ours = {tok: tokenizer.token_to_id(tok) for tok in data["special_ids"]}
        rows.append(
            compare_values(
                "tokenization", "special_ids", list(ours.values()), list(data["special_ids"].values())
            )
        )
    for key, value in (("IMAGE_TOKEN_INDEX", IMAGE_TOKEN_INDEX), ("REGION_TOKEN_INDEX", REGION_TOKEN_INDEX)):
        if key in data:
            rows.append(compare_values("tokenization", key, value, data[key]))
    fields = {
        "pieces": tokenizer.tokenize,
        "ids": tokenizer.encode,
        "ids_no_special": lambda text: tokenizer.encode(text, add_bos=False),
        "ids_tokenizer_image_token": tokenizer.encode_prompt,
        # the mm_utils variant does not insert the region placeholder (the demo worker does it afterwards)
        "ids_mm_utils_tokenizer_image_token": lambda t: [
            i for i in tokenizer.encode_prompt(t) if i != REGION_TOKEN_INDEX
        ],
        "decoded_skip_special": lambda text: tokenizer.decode(tokenizer.encode(text)),
    }
    cases = data.get("cases", [])
    for field, fn in fields.items():
        with_field = [c for c in cases if field in c]
        if not with_field:
            continue
        bad = [c["text"] for c in with_field if fn(c["text"]) != c[field]]
        note = f"first mismatch: {bad[0]!r}" if bad else ""
        rows.append(
            Row(
                "tokenization",
                f"{field} ({len(with_field)} strings)",
                float(len(bad)),
                str(EXACT),
                not bad,
                note,
            )
        )
    return rows


class _CaseCheck:
    """All comparisons of one fixture case."""

    def __init__(self, pipe: MedPLIBPipeline, fixture: ParityFixture, name: str, entry: dict) -> None:
        self.pipe, self.model, self.fixture = pipe, pipe.model, fixture
        self.name, self.entry = name, entry
        self.expected = fixture.tensors(name)
        self.meta = entry.get("tensors", {})
        self.rows: list[Row] = []
        self.compared: set[str] = set()

    # ------------------------------------------------------------------ comparison helpers
    def tensor(self, key: str, ours: torch.Tensor) -> None:
        if key in self.expected and key not in self.compared:
            expected = self.expected[key]
            tol = parse_tolerance(self.meta.get(key, {}).get("suggested_tolerance"))
            self.rows.append(
                compare_tensor(
                    self.name,
                    key,
                    ours.reshape(expected.shape) if ours.numel() == expected.numel() else ours,
                    expected,
                    tol,
                )
            )
            self.compared.add(key)

    def sequence(self, base: str, full: torch.Tensor) -> None:
        """Compare ``base`` / ``base_tail`` / ``base_lastN`` tensors (sequence = axis 1 of ``full``)."""
        for key in self.expected:
            if key == base:
                self.tensor(key, full)
            elif key == f"{base}_tail" and "tail_start" in self.entry:
                self.tensor(key, full[:, self.entry["tail_start"] :])
            elif (m := re.fullmatch(re.escape(base) + r"_last(\d+)", key)) is not None:
                self.tensor(key, full[:, -int(m.group(1)) :])

    def value(self, key: str, ours: object, expected: object = _MISSING) -> None:
        if expected is _MISSING:
            if key.split(".")[0] not in self.entry:
                return
            expected = self.entry
            for part in key.split("."):
                if not isinstance(expected, dict) or part not in expected:
                    return
                expected = expected[part]
        self.rows.append(compare_values(self.name, key, ours, expected))

    # ------------------------------------------------------------------ stages
    def run(self) -> list[Row]:
        if "image" not in self.entry:
            return [Row(self.name, "case", math.nan, "-", None, "no image entry: not a model case")]
        with torch.no_grad():
            self._run()
        for key in self.expected:
            if key not in self.compared:
                self.rows.append(Row(self.name, key, math.nan, "-", None, "unknown quantity: not compared"))
        return self.rows

    def _run(self) -> None:
        inputs = self.fixture.root / "inputs"
        rgb = load_rgb(inputs / self.entry["image"])
        self.tensor("images_clip", clip_pixels(rgb)[None])
        images_sam, resize = sam_pixels(rgb)
        self.tensor("images_sam", images_sam[None])
        self.value("resize", list(resize))
        self.value("original_size", list(rgb.shape[:2]))
        question = self._check_prompt()
        ids = self.entry.get("input_ids") or self.pipe.prompt_ids(question)
        grounding = (
            "resize" in self.entry or "evaluate_output_ids" in self.entry or "low_res_masks" in self.expected
        )
        feats = self.pipe.encode_images([rgb], with_sam=grounding)[0]
        self.tensor("clip_features", feats.clip_feats[None])
        self.tensor("mm_projector_out", self.model.model.mm_projector(feats.clip_feats)[None])
        self.tensor("region_feature_map", self.model.model.region_fea_adapter(feats.clip_feats)[None])
        grids, mask_path = None, None
        if "region_mask" in self.entry:
            mask_path = inputs / self.entry["region_mask"]
            grids = [[self._check_region(feats, mask_path)]]
        embeds, mask = self.pipe.embed([feats], [ids], grids)
        self.tensor("inputs_embeds", embeds)
        self.value("prefill_expanded_len", embeds.shape[1])
        if grids and "region_token_expanded_position" in self.entry:
            pos = self.entry["region_token_expanded_position"]
            row = compare_tensor(
                self.name,
                "inputs_embeds[region position]",
                embeds[0, pos : pos + 1],
                self.model.region_features(feats.clip_feats, grids[0]),
                EXACT,
            )
            self.rows.append(row)
        self._check_prefill(embeds, mask, "prefill")
        if "greedy" in self.entry:
            self._check_greedy(feats, ids, grids, embeds, "greedy", question, rgb, mask_path)
        if "evalpath_greedy" in self.entry or any(k.startswith("evalpath_") for k in self.expected):
            eval_embeds, eval_mask = self.pipe.embed([feats], [ids], None)  # official eval: region dropped
            self.value("evalpath_prefill_expanded_len", eval_embeds.shape[1])
            self.sequence("evalpath_prefill_logits", self.model.llm_forward(eval_embeds, eval_mask).logits)
            if "evalpath_greedy" in self.entry:
                self._check_greedy(feats, ids, None, eval_embeds, "evalpath_greedy", question, rgb, mask_path)
        if grounding:
            self._check_grounding(feats, ids, embeds, question, rgb)

    def _check_prompt(self) -> str | None:
        case = self.fixture.prompt_case(self.name)
        question = case.get("question", self.entry.get("question"))
        if question is None:
            return None
        prompt = build_prompt(question, self.pipe.template)
        if "prompt_after_cut" in case:
            self.value("prompt_text", prompt, case["prompt_after_cut"])
        self.value("input_ids", self.pipe.prompt_ids(question))
        return question

    def _check_region(self, feats, mask_path: Path) -> torch.Tensor:
        grid = self.pipe.region_grid(feats.original_size, mask=mask_path)
        largest = self.pipe.region_grid(feats.original_size, mask=mask_path, keep_largest_component=True)
        self.tensor("region_grid24", grid)
        self.tensor("region_grid24_dataset_path", largest)
        self.value("region_cells", int(grid.sum()))
        self.value("region_cells_dataset_path", int(largest.sum()))
        self.tensor("region_feature", self.model.region_features(feats.clip_feats, [grid]))
        return grid

    def _check_prefill(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: str) -> None:
        layer_inputs: list[torch.Tensor] = []

        def keep_input(module, args, kwargs):
            layer_inputs.append(args[0] if args else kwargs["hidden_states"])

        hooks = [
            layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in self.model.model.layers
        ]
        try:
            out = self.model.llm_forward(embeds, mask, output_router_logits=True)
        finally:
            for hook in hooks:
                hook.remove()
        self.sequence(f"{prefix}_logits", out.logits)
        # release output_hidden_states: inputs_embeds, inputs of layers 1..n-1, final-norm output of the last layer
        hidden = torch.stack([h[0] for h in layer_inputs] + [out.hidden_states[0]])
        self.sequence(f"{prefix}_hidden_states", hidden)
        if out.router_logits:
            router = torch.stack([r[0] for r in out.router_logits]).float()
            self.sequence(f"{prefix}_router_logits", router)
            self.sequence(f"{prefix}_router_probs", router.softmax(-1))
            argmax = router.softmax(-1).argmax(-1)
            self.sequence(f"{prefix}_router_argmax", argmax)
            counts = torch.stack([torch.bincount(a, minlength=router.shape[-1]) for a in argmax])
            self.tensor(f"{prefix}_moe_exp_counts", counts)
            self.value("routing_counts_prefill", counts.tolist())

    def _check_greedy(self, feats, ids, grids, embeds, key, question, rgb, mask_path) -> None:
        expected = self.entry[key]
        steps = len(expected["new_ids"])
        out = self.pipe.generate([feats], [ids], grids, max_new_tokens=steps, return_step_logits=True)
        new_ids = out.new_ids[0]
        self.value(f"{key}.new_ids", new_ids)
        self.value(f"{key}.step_argmax", out.step_logits[0].argmax(-1).tolist())
        # answers are stripped (release .strip()); the ids above are compared exactly anyway
        text_expected = str(expected.get("text", "")).strip()
        if "text" in expected:
            self.value(f"{key}.text", self.pipe.decode_text(new_ids), text_expected)
        self.value(f"{key}.eos_generated", self.pipe.tokenizer.eos_id in new_ids)
        self.tensor(f"{key}_step_logits", out.step_logits[0])
        if "decode_step_router_argmax" in expected and len(new_ids) > 1:
            # router choice of every fed-back token, from one teacher-forced pass over prompt + new tokens
            fed = self.model.model.embed_tokens(torch.tensor(new_ids[:-1], device=embeds.device))[None]
            routers = self.model.llm_forward(
                torch.cat([embeds, fed], 1), output_router_logits=True
            ).router_logits
            length = embeds.shape[1]
            choice = torch.stack([r[0, length:].argmax(-1) for r in routers], dim=1)
            self.value(f"{key}.decode_step_router_argmax", choice.tolist())
        if question is not None and "text" in expected:  # the same through the user-level call
            if mask_path is None:
                text = self.pipe.answer(rgb, question, max_new_tokens=steps)
            else:
                text = self.pipe.answer_region(
                    rgb, question, mask=mask_path, max_new_tokens=steps, official_eval_region=grids is None
                )
            self.value(
                f"{key}.text (via {'answer' if mask_path is None else 'answer_region'})",
                text,
                text_expected,
            )

    def _check_grounding(self, feats, ids, embeds, question, rgb) -> None:
        tok = self.pipe.tokenizer
        self.tensor("sam_image_embeddings", feats.sam_embedding[None])
        new = self.entry.get("evaluate_output_ids", [*ids, tok.seg_id, tok.eos_id])[len(ids) :]
        length = embeds.shape[1]
        fed = self.model.model.embed_tokens(torch.tensor(new[:-1], dtype=torch.long, device=embeds.device))[
            None
        ]
        hidden = self.model.llm_forward(torch.cat([embeds, fed], 1)).hidden_states[0]
        self.value("evaluate_hidden_len", hidden.shape[0])
        if tok.seg_id not in new:
            self.rows.append(
                Row(self.name, "seg token", math.inf, "present", False, "no <SEG> in the forced output")
            )
            return
        first = new.index(tok.seg_id)
        release = len(new) - 2 if new.count(tok.seg_id) == 1 else first  # release evaluate() quirk
        self.value("seg_hidden_index_used", length - 1 + release)
        self.value("seg_hidden_index_clean_rule", length - 1 + first)
        seg_state = hidden[length - 1 + release]
        self.tensor("seg_hidden_state", seg_state)
        text_embeds = self.model.seg_embeddings(seg_state[None])
        self.tensor("seg_embedding_256", text_embeds[0])
        prompt_encoder = self.model.model.visual_model.prompt_encoder
        self.tensor("sam_sparse_embeddings", prompt_encoder(text_embeds=text_embeds[:, None])[0])
        self.tensor("sam_dense_pe", prompt_encoder.get_dense_pe())
        low_res, iou = self.pipe.decode_masks([feats], seg_state[None])
        self.tensor("low_res_masks", low_res)
        self.tensor("iou_predictions", iou)
        logits = self.pipe.postprocess(low_res[0], feats)
        binary, via = torch.sigmoid(logits) > MASK_THRESHOLD, ""
        if new == [tok.seg_id, tok.eos_id] and question is not None:  # the forced answer through ground()
            result = self.pipe.ground(rgb, question, force_seg=True)
            logits, binary, via = (
                torch.from_numpy(result.logits),
                torch.from_numpy(result.mask),
                " (via ground)",
            )
        self.tensor("pred_mask_logits", logits[None])
        if "pred_mask_binary" in self.expected:
            expected_logits = self.expected.get("pred_mask_logits")
            threshold = self.fixture.expected.get(
                "mask_threshold_logit", math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))
            )
            self.rows.append(
                compare_binary_mask(
                    self.name,
                    "pred_mask_binary" + via,
                    binary[None],
                    self.expected["pred_mask_binary"],
                    expected_logits,
                    threshold,
                    threshold_margin(self.entry),
                )
            )
            self.compared.add("pred_mask_binary")
        if "full_teacher_forced_ids" in self.entry:
            full = self.entry["full_teacher_forced_ids"]
            full_embeds, full_mask = self.pipe.embed([feats], [full], None)
            self.sequence("tf_full_logits", self.model.llm_forward(full_embeds, full_mask).logits)
            if tok.seg_id in full:
                p = full.index(tok.seg_id)
                image_rows = feats.clip_feats.shape[0] - 1
                self.value("tf_seg_index", p - 1 + image_rows * full[:p].count(IMAGE_TOKEN_INDEX))
