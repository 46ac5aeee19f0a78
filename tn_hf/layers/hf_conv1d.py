"""TN layers for transformers' ``Conv1D`` (GPT-2 and other models built from it).

``transformers.pytorch_utils.Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed:
``weight`` (in_features, out_features) = (nx, nf) and ``y = x @ weight + bias``. Its TN layers are
the Linear ones of each format (``TTHFConv1D`` is a ``TTLinear``, ...) with that orientation:

* ``tensorize`` / ``detensorize`` take and give the weight as Conv1D stores it (in, out), so the
  layer's ``weight`` has Conv1D's shape, decomposing a Conv1D reads its weight the right way round
  and ADMM pulls the Conv1D's own parameter (read transposed) towards the low-rank set;
* the forward is the Linear layer's (``y = x W^T + b`` with W = weight.T): the same as Conv1D's;
* ``to_dense()`` gives back a ``Conv1D``.

transformers is imported only by ``to_dense`` (a model holding a Conv1D has imported it already).
"""
from __future__ import annotations

import torch
from torch import nn

from .bt import BTLinear
from .linear import TRLinear, TTLinear, _LinearLayer
from .tucker import TuckerLinear

CONV1D = "transformers.pytorch_utils.Conv1D"  # its key in the dense-type table (layers.__init__)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly transformers' ``Conv1D`` (without importing transformers)."""
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}" == CONV1D


class _HFConv1D(_LinearLayer):
    """The Conv1D orientation over a format's Linear layer (put it first among the bases)."""

    _args_doc = _LinearLayer._args_doc.replace("``nn.Linear``", "``nn.Linear`` (Conv1D(nf, nx): in_features=nx, "
                                               "out_features=nf)")

    @classmethod
    def dense_spec(cls, module, *, ranks=None, in_factors=None, out_factors=None, n_modes=None):
        if not is_hf_conv1d(module):
            raise ValueError(f"{cls.__name__}.dense_spec: expected transformers' Conv1D, got {type(module).__name__}")
        nx, nf = module.weight.shape
        return cls.dense_spec_from_sizes(nx, nf, module.bias is not None, ranks=ranks, in_factors=in_factors,
                                         out_factors=out_factors, n_modes=n_modes)

    @classmethod
    def tensorize(cls, weight, spec):
        shape = (spec["in_features"], spec["out_features"])
        if tuple(weight.shape) != shape:
            raise ValueError(f"{cls._where(spec)}: Conv1D weight shape {tuple(weight.shape)} != {shape} (in, out)")
        return super().tensorize(weight.T, spec)

    @classmethod
    def detensorize(cls, tensor, spec):
        return super().detensorize(tensor, spec).T

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.T

    def to_dense(self) -> nn.Module:  # type: ignore[override]  # Conv1D, the module this layer replaces
        from transformers.pytorch_utils import Conv1D

        w = self.weight.detach()
        dense = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
        if self.bias is None:
            dense.bias = None  # type: ignore[assignment]  # Conv1D always makes one; this layer has none
        return self._filled(dense)


class TTHFConv1D(_HFConv1D, TTLinear):
    """transformers' ``Conv1D`` (GPT-2) with a Tensor-Train weight; see ``layers.hf_conv1d``."""


class TRHFConv1D(_HFConv1D, TRLinear):
    """transformers' ``Conv1D`` (GPT-2) with a Tensor-Ring weight; see ``layers.hf_conv1d``."""


class TuckerHFConv1D(_HFConv1D, TuckerLinear):
    """transformers' ``Conv1D`` (GPT-2) with a Tucker weight; see ``layers.hf_conv1d``."""


class BTHFConv1D(_HFConv1D, BTLinear):
    """transformers' ``Conv1D`` (GPT-2) with a block-term weight; see ``layers.hf_conv1d``."""
