"""saicl: Structured Attention for In-Context Learning on Hugging Face T5.

Install torch first (``pip install torch==2.13.0``) so pip never pulls a multi-GB CUDA build.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "saicl" / "version.py").read_text(), version)

setup(
    name="saicl",
    version=version["__version__"],
    description="Structured Attention for In-Context Learning (SAICL) for Hugging Face T5 models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["saicl", "saicl.attention", "saicl.kernels", "saicl.meta_train", "saicl.eval"],
    # kernels/, meta_train/ and eval/ live at the repo root but must never install as top-level
    # `kernels` / `eval` packages: those names clash with other distributions and builtins.
    package_dir={
        "saicl": "saicl",
        "saicl.attention": "saicl/attention",
        "saicl.kernels": "kernels",
        "saicl.meta_train": "meta_train",
        "saicl.eval": "eval",
    },
    include_package_data=True,
    package_data={"saicl.meta_train": ["configs/*.json", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "transformers>=5.20,<6",
        "datasets>=3.0",
        "safetensors",
        "numpy",
        "tqdm",
        "accelerate>=1.0",
        "pyyaml",
        "matplotlib",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "sentencepiece", "tokenizers", "hypothesis>=6"],
        "xformers": ["xformers"],
        "mutation": ["mutmut>=3.3,<4"],  # mutation testing of the core (docs/testing.md); not part of CI
    },
    entry_points={
        "console_scripts": [
            "saicl-demo = saicl.demo:main",
            "saicl-run = saicl.eval.main_job:main",
            "saicl-train = saicl.meta_train.cli:main",
            "saicl-data = saicl.meta_train.convert:main",
            "saicl-eval = saicl.eval.evaluate:main",
            "saicl-bench = saicl.eval.bench:main",
        ]
    },
)
