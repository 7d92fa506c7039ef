"""monai-medplib: MedPLIB (AAAI 2025) as a MONAI-integrated plugin."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


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
    include_package_data=True,
    # torch is deliberately unpinned here and installed first by scripts/install.sh (CPU build);
    # an unpinned torch reaching the resolver alone would pull a CUDA build.
    install_requires=["torch>=2.1"] + _requirements("core"),
    extras_require={
        "app": ["monailabel==0.8.5", "pydicom-seg==0.4.1"] + _requirements("app"),
        "dev": _requirements("dev") + ["liver-ct-segmentation-package==1.6.0"],
    },
    entry_points={"console_scripts": ["medplib=monai_medplib.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
