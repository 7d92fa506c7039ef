"""MedPLIB's special token strings and the placeholder ids that stand for images and regions in prompts.

The one home of these facts: the tokenizer, the model (which expands the placeholders into features) and the
pipeline import them from here. This module imports nothing.
"""

IMAGE_TOKEN_INDEX = -200  # an <image> in model ids: replaced by the 576 projected CLIP rows
REGION_TOKEN_INDEX = -300  # between <region></region>: replaced by one region feature
IGNORE_INDEX = -100  # training labels that carry no loss

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_PLACEHOLDER = "<image>"  # not a vocabulary token: replaced by IMAGE_TOKEN_INDEX in prompts
SEG_TOKEN = "<SEG>"
REGION_START_TOKEN = "<region>"
REGION_END_TOKEN = "</region>"
MASK_START_TOKEN = "<mask>"
MASK_END_TOKEN = "</mask>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
REGION_PAIR = REGION_START_TOKEN + REGION_END_TOKEN
IMAGE_HEADER = IM_START_TOKEN + IMAGE_PLACEHOLDER + IM_END_TOKEN + "\n"

# Release order == id order (ids follow the SentencePiece vocabulary: 32000.. in the release).
ADDED_TOKENS: tuple[str, ...] = (
    SEG_TOKEN,
    "<ref>",
    "</ref>",
    REGION_START_TOKEN,
    REGION_END_TOKEN,
    "<sr>",
    "</sr>",
    MASK_START_TOKEN,
    MASK_END_TOKEN,
    *(f"<gen_{i}>" for i in range(1, 257)),
    IM_START_TOKEN,
    IM_END_TOKEN,
)
assert len(ADDED_TOKENS) == 267
