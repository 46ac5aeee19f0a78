"""Shared pieces of the recipes, one concern per module.

* ``flags``  -- the command-line flags every recipe shares (data, compression, schedule, output)
* ``data``   -- datasets: MNIST-5k images and moving-digit clips (offline), ImageFolder,
  Hugging Face ``datasets``, CIFAR, sktime BasicMotions, folders of videos
* ``models`` -- the recipes' own model classes (CIFAR ResNets, LSTM video classifier, small
  VideoMAE), registered with timm so that their checkpoints reload like any timm model
* ``loop``   -- the Accelerate training run, one method per phase: dense warm start, ADMM,
  decompose, fine-tune, evaluate, save

A recipe runs as ``python recipes/X.py ...`` or ``accelerate launch recipes/X.py ...``: either way
``recipes/`` is on ``sys.path`` and ``from _lib import ...`` finds this package.
"""
import sys
from pathlib import Path

# a source checkout without `pip install`: make `import tn_hf` find the package next to recipes/
_ROOT = Path(__file__).resolve().parents[2]
if (_ROOT / "tn_hf" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
