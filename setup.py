"""fairseq-bitfit: BitFit (bias-only fine-tuning) for fairseq.

fairseq itself comes from PyPI's ve-fairseq==0.12.3, installed with --no-deps by
run_scripts/install.sh: its metadata requires torchaudio, which would replace
the installed torch with a multi-GB CUDA build, and text training never imports
it.  Its real runtime needs are listed here instead.
"""
from setuptools import find_packages, setup

FAIRSEQ_RUNTIME = [
    "hydra-core>=1.0.7,<1.4",
    "omegaconf>=2.0.6,<2.4",
    "numpy>=1.21",
    "regex",
    "sacrebleu>=1.4.12",
    "tqdm",
    "bitarray",
    "scikit-learn",
    "scipy",
    "packaging",
    "cffi",
    "cython",
]

SERVE = ["fastapi>=0.100", "uvicorn>=0.23"]
# hydra's launchers for `train.py -m` sweeps and the GLUE runner's PARALLEL / LAUNCHER=submitit.
SWEEP = ["hydra-joblib-launcher>=1.2", "hydra-submitit-launcher>=1.2", "submitit>=1.4"]

setup(
    name="fairseq-bitfit",
    version="0.1.0",
    description="BitFit: bias-only fine-tuning of pretrained transformer encoders, on fairseq",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_ext", "fairseq_ext.*"]),
    install_requires=[
        "torch>=2.6",  # install.sh pins the build first; a bare 'torch' would pull CUDA
        *FAIRSEQ_RUNTIME,
        "sentencepiece",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "matplotlib",
        "tensorboardX",  # --tensorboard-logdir (the GLUE runner writes OUTPUT_DIR/tensorboard)
        # The way out to transformers (tools.export_hf) and the comparison modes (LoRA and IA3
        # through PEFT's inject_adapter_in_model); pinned to the minor versions tested here.
        "transformers>=4.40,<6",
        "peft>=0.21,<0.22",
    ],
    extras_require={
        # The HTTP server (python -m fairseq_ext.tools.serve).
        "serve": SERVE,
        # Sweeps: train.py -m with hydra/launcher=joblib or submitit_slurm.
        "sweep": SWEEP,
        # The suite runs on two pytest-xdist workers (tests/pytest.ini), and tests the server too.
        "test": ["pytest>=7", "pytest-xdist>=3.5", *SERVE, *SWEEP],
    },
    entry_points={"console_scripts": ["fairseq-bitfit-train=fairseq_ext.training.main:cli_main"]},
)
