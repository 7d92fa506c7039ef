"""monai-medplib: MedPLIB (AAAI 2025) as a MONAI-integrated plugin.

The wheel carries the MONAI Label app (``apps/medplib``) and the MONAI Bundle (``bundle``) as copies made at build
time (see ``monai_medplib/adapters/shipped.py``), plus a start-up hook (``.pth``) for pydicom 3; installing it
follows README "Installation".
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / f"{name}.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _shipped_layout():
    """monai_medplib/adapters/shipped.py, loaded on its own (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location(
        "_medplib_shipped", HERE / "monai_medplib/adapters/shipped.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithShipped(build_py):
    """build_py, then copy the app and the bundle into the package and the start-up hook beside it."""

    def run(self) -> None:
        build_lib = Path(self.build_lib)
        if not getattr(self, "editable_mode", False):
            # build/ of an earlier build keeps modules since deleted or renamed; they would ship in the wheel
            shutil.rmtree(build_lib / "monai_medplib", ignore_errors=True)
        super().run()
        if getattr(self, "editable_mode", False):
            return  # pip install -e: the clone's folders are found in place, install.sh writes the hook
        layout = _shipped_layout()
        for stale in list(
            build_lib.rglob("__pycache__")
        ):  # left in build/ by an earlier build of a used tree
            shutil.rmtree(stale)
        for name, (source, marker) in layout.SHIPPED.items():
            target = build_lib / "monai_medplib" / layout.SHIPPED_DIR / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(HERE / source, target, ignore=shutil.ignore_patterns(*layout.EXCLUDED))
            if not (target / marker).is_file():
                raise RuntimeError(f"{source}/{marker} is missing: cannot ship the {name}")
        hook_name, hook_line = layout.STARTUP_HOOK
        (build_lib / hook_name).write_text(hook_line)


setup(
    name="monai-medplib",
    version="0.1.0",
    description="MedPLIB biomedical multimodal LLM (VQA, region VQA, pixel grounding) for MONAI, "
    "MONAI Bundle and MONAI Label",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["monai_medplib", "monai_medplib.*"]),
    package_data={"monai_medplib": ["demo_model/*", "demo_model/**/*"]},
    exclude_package_data={"monai_medplib": ["demo_model/__pycache__/*", "demo_model/**/__pycache__/*"]},
    include_package_data=True,
    cmdclass={"build_py": BuildPyWithShipped},
    # torch is deliberately unpinned and installed first (README "Installation"): an unpinned torch reaching
    # the resolver alone would pull a CUDA build, and a pinned one would replace the user's own.
    install_requires=["torch>=2.1"] + _requirements("core"),
    extras_require={
        # MONAI Label's own run-time needs; monailabel itself (whose every release pulls torchvision through
        # monai[torchvision]) and pydicom-seg come with a second command, `pip install --no-deps ...`
        "app": _requirements("app"),
        # the demo data builder reads nilearn's MNI152 files (medplib eval / train on the demo data)
        "demo": _requirements("demo"),
        # int8 / int4 weight-only loading (from_pretrained(quantization=...))
        "quant": _requirements("quant"),
        "dev": _requirements("dev") + _requirements("quant"),
    },
    entry_points={"console_scripts": ["medplib=monai_medplib.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
