"""MONAI transforms: CT / MR volumes -> MedPLIB's 8-bit 2D slices, prompts onto slices, and back."""

from monai_medplib.transforms.intensity import *  # noqa: F403
from monai_medplib.transforms.intensity import __all__ as _intensity_all
from monai_medplib.transforms.prompts import *  # noqa: F403
from monai_medplib.transforms.prompts import __all__ as _prompts_all
from monai_medplib.transforms.slicing import *  # noqa: F403
from monai_medplib.transforms.slicing import __all__ as _slicing_all

__all__ = [*_intensity_all, *_slicing_all, *_prompts_all]
