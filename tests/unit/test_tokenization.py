"""Tokenizer and prompt templates against the transformers-4.31 oracle of the public fixture."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from monai_medplib.tokenization import (
    ADDED_TOKENS,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    MedPLIBTokenizer,
    build_prompt,
    build_training_example,
    conversation_to_prompt,
    normalize_regions,
)


@pytest.fixture(scope="module")
def tokenizer(public_fixture: Path) -> MedPLIBTokenizer:
    return MedPLIBTokenizer.from_pretrained(public_fixture / "model")


@pytest.fixture(scope="module")
def oracle(public_fixture: Path) -> dict:
    return json.loads((public_fixture / "tokenization.json").read_text())


@pytest.fixture(scope="module")
def expected(public_fixture: Path) -> dict:
    return json.loads((public_fixture / "expected" / "expected.json").read_text())


@pytest.fixture(scope="module")
def prompts(public_fixture: Path) -> dict:
    return json.loads((public_fixture / "inputs" / "prompts.json").read_text())


def test_vocabulary_layout(tokenizer, oracle, public_fixture):
    assert len(ADDED_TOKENS) == 267 and len(set(ADDED_TOKENS)) == 267
    assert len(tokenizer) == oracle["len_tokenizer"] == 867
    for token, token_id in oracle["special_ids"].items():
        assert tokenizer.token_to_id(token) == token_id, token
    added = json.loads((public_fixture / "model" / "added_tokens.json").read_text())
    assert [added[t] for t in ADDED_TOKENS] == list(range(600, 867))  # release order == id order
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.seg_id == 600
    assert (tokenizer.region_start_id, tokenizer.region_end_id) == (603, 604)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (865, 866)
    assert tokenizer.colon_id == 569


def test_default_added_ids_equal_file(public_fixture):
    bare = MedPLIBTokenizer(public_fixture / "model" / "tokenizer.model")
    assert len(bare) == 867 and bare.seg_id == 600 and bare.im_end_id == 866


def test_all_oracle_strings(tokenizer, oracle):
    cases = oracle["cases"]
    assert len(cases) == 35
    for case in cases:
        text = case["text"]
        assert tokenizer.tokenize(text) == case["pieces"], text
        assert tokenizer.encode(text) == case["ids"], text
        assert tokenizer.encode(text, add_bos=False) == case["ids_no_special"], text
        assert tokenizer.encode_prompt(text) == case["ids_tokenizer_image_token"], text
        assert tokenizer.decode(case["ids"]) == case["decoded_skip_special"], text


def test_whitespace_rules_examples(tokenizer):
    # Newline after an added token disappears; </s> does not strip its neighbours.
    assert tokenizer.encode("<im_end>\nIs") == tokenizer.encode("<im_end>Is")
    assert tokenizer.encode("a </s> b") != tokenizer.encode("a</s>b")
    assert tokenizer.encode_prompt("<region> \n </region>") == [1, 603, REGION_TOKEN_INDEX, 604]


def test_prompts_and_ids_of_every_case(tokenizer, expected, prompts):
    for name, case in expected["cases"].items():
        prompt_case = prompts["cases"][name]
        question = prompt_case["question"].replace("region_mask.png", "")
        prompt = build_prompt(question, "vicuna_v1")
        assert prompt == prompt_case["prompt_after_cut"], name
        ids = tokenizer.encode_prompt(prompt)
        assert ids == case["input_ids"], name
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[-1] == tokenizer.colon_id
        full = conversation_to_prompt(prompt_case["conversations"], "vicuna_v1")
        assert full == case["dataset_prompt"], name


def test_region_prompt_forms(prompts):
    target = prompts["cases"]["b_region_vqa"]["prompt_after_cut"]
    assert build_prompt("What is the abnormality in <region>?") == target  # demo: bare <region>
    assert build_prompt("What is the abnormality in <region>m.png</region>?") == target  # data
    assert build_prompt("What is the abnormality in <region></region>?", region=True) == target
    # Demo auto-fill when the user typed no <region>: appended before " ASSISTANT:".
    assert build_prompt("What is this?", region=True).endswith("What is this? <region></region> ASSISTANT:")
    assert normalize_regions("<region>a</region> and <region>") == "<region></region> and <region></region>"


def test_templates_and_multi_turn(oracle):
    multi = oracle["cases"][4]["text"]
    built = build_prompt(
        "And the spleen?", "llava_v1", history=[("Describe the image.<image>", "The liver is normal.")]
    )
    assert built == multi
    assert "curious human" in build_prompt("q", "llava_v1") and "curious user" in build_prompt("q")
    assert build_prompt("q", answer="a").endswith("USER: <im_start><image><im_end>\nq ASSISTANT: a</s>")
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_prompt("q", "v0")


def test_decode_of_greedy_outputs(tokenizer, expected):
    checked = 0
    for case in expected["cases"].values():
        for key in ("greedy", "evalpath_greedy"):
            if key in case:
                assert tokenizer.decode(case[key]["new_ids"]) == case[key]["text"]
                checked += 1
    assert checked == 4
    assert tokenizer.decode([1, 377, 572, 375, 267, 600, 541, 558, 2]) == "Sure, it is <SEG> ."
    assert tokenizer.decode([600, 2], skip_special_tokens=False) == "<SEG> </s>"
    with pytest.raises(ValueError, match="-200"):
        tokenizer.decode([IMAGE_TOKEN_INDEX])


def test_training_labels_single_turn(tokenizer, expected, prompts):
    case = expected["cases"]["c_grounding"]
    ids, labels = build_training_example(
        prompts["cases"]["c_grounding"]["conversations"], tokenizer, "vicuna_v1"
    )
    assert ids == case["full_teacher_forced_ids"]
    assert ids[-2:] == [tokenizer.seg_id, tokenizer.eos_id]
    assert labels == [IGNORE_INDEX] * (len(ids) - 2) + [tokenizer.seg_id, tokenizer.eos_id]

    ids, labels = build_training_example(prompts["cases"]["a_vqa"]["conversations"], tokenizer, "vicuna_v1")
    answer = tokenizer.encode("Yes.", add_bos=False) + [tokenizer.eos_id]
    assert ids[-len(answer) :] == answer
    assert labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer


def test_training_labels_multi_turn(tokenizer):
    conversations = [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": "The liver is normal."},
        {"from": "human", "value": "Segment the <region>r.png</region> organ."},
        {"from": "gpt", "value": "<SEG><mask>m.png</mask>"},
    ]
    ids, labels = build_training_example(conversations, tokenizer, "llava_v1")
    first = tokenizer.encode("The liver is normal.", add_bos=False) + [tokenizer.eos_id]
    second = [tokenizer.seg_id, tokenizer.eos_id]
    supervised = [(i, t) for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert [t for _, t in supervised] == first + second
    assert ids[-2:] == second
    start = ids.index(tokenizer.eos_id) - len(first) + 1
    assert [i for i, _ in supervised[: len(first)]] == list(range(start, start + len(first)))
    assert REGION_TOKEN_INDEX in ids and labels[ids.index(REGION_TOKEN_INDEX)] == IGNORE_INDEX


def test_training_mismatch_ignores_everything(tokenizer):
    # A "</s>" inside an answer breaks the round split: the release ignores such an example.
    conversations = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a</s>b"}]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ids, labels = build_training_example(conversations, tokenizer)
    assert labels == [IGNORE_INDEX] * len(ids)


def test_bad_inputs(public_fixture, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        MedPLIBTokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="lack"):
        MedPLIBTokenizer(public_fixture / "model" / "tokenizer.model", added_tokens={"<SEG>": 600})
    with pytest.raises(ValueError, match="consecutive"):
        MedPLIBTokenizer(
            public_fixture / "model" / "tokenizer.model",
            added_tokens={t: 700 + i for i, t in enumerate(ADDED_TOKENS)},
        )
    with pytest.raises(ValueError, match="expected 'gpt'"):
        conversation_to_prompt([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = MedPLIBTokenizer.from_pretrained(tmp_path)
    text = "USER: <im_start><image><im_end>\nSegment <region></region> ASSISTANT: <SEG></s>"
    assert again.encode_prompt(text) == tokenizer.encode_prompt(text)


def test_text_that_is_not_unicode_is_refused_by_name(tokenizer):
    # a non-UTF-8 byte on a command line reaches Python as a lone surrogate ("\udcff"); sentencepiece's own error
    # for it names neither the text nor the character
    with pytest.raises(ValueError, match=r"lone surrogate '\\udcff' at character 6"):
        tokenizer.encode("liver \udcff")
    assert tokenizer.decode(tokenizer.encode("liver \U0001f600")) == "liver \U0001f600"  # a pair is text
