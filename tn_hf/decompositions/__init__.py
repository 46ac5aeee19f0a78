"""Pure tensor math on torch tensors (no nn.Module): TT/TR/Tucker/BT decompositions, projections, ranks."""
from .bt import BTResult, bt_allocate, bt_decompose, bt_params, bt_project, bt_ranks, bt_ranks_for_ratio, bt_to_full
from .factorize import auto_modes, factorize
from .ranks import allocate_ranks, allocation_summary, ranks_for_ratio, tn_params
from .tr import ALS_SWEEPS, tr_als, tr_project, tr_ranks, tr_svd, tr_to_full
from .tt import chain, truncated_factor, tt_project, tt_ranks, tt_svd, tt_to_full, unfolding_spectrum
from .tucker import (
    mode_spectra,
    tucker_allocate,
    tucker_params,
    tucker_project,
    tucker_ranks,
    tucker_ranks_for_ratio,
    tucker_svd,
    tucker_to_full,
)

PROJECTIONS = {"tt": tt_project, "tr": tr_project, "tucker": tucker_project, "bt": bt_project}


def project(tensor, ranks, format: str = "tt"):
    """Dense projection of ``tensor`` onto the ``format`` tensors with ranks <= ``ranks`` (ADMM's
    Z-step): ``tt_project`` / ``tr_project`` (d+1 ranks), ``tucker_project`` (d ranks) or
    ``bt_project`` ([N, r_1..r_d]: a local solution, BT has no closed-form best approximation)."""
    if format not in PROJECTIONS:
        raise ValueError(f"project: format {format!r} is not supported; valid: {sorted(PROJECTIONS)}")
    return PROJECTIONS[format](tensor, ranks)


WARM_FORMATS = ("tr", "bt")  # no closed-form fit: ADMM's projections and its decomposition start warm
WARM_SWEEPS = {"tr": 1, "bt": 2}  # ALS / block sweeps per warm-started fit


def fit(tensor, ranks, format: str, init=None) -> list:
    """Cores of ``tensor`` at ``ranks`` for a format in ``WARM_FORMATS``, in the layers' layout (TR: the
    ring's cores; BT: ``[core, *factors]``). ``init``: such cores of a nearby tensor (ADMM's previous
    Z-step) to start from; None: a cold fit (TR-SVD + ALS, or ``bt_decompose``). Never worse than ``init``."""
    if format == "tr":
        return tr_als(tensor, init, WARM_SWEEPS["tr"]) if init is not None else \
            tr_svd(tensor, ranks=ranks, sweeps=ALS_SWEEPS)
    if format == "bt":
        res = bt_decompose(tensor, ranks=ranks, init=init, sweeps=WARM_SWEEPS["bt"]) if init is not None else \
            bt_decompose(tensor, ranks=ranks)
        if init is not None and res.history[-1] > res.history[0]:  # (round-off) keep the start
            return [t.to(tensor.dtype) for t in init]
        return [res.core, *res.factors]
    raise ValueError(f"fit: format {format!r} has a closed-form fit (project); warm fits: {WARM_FORMATS}")


def to_full(cores, format: str):
    """Dense tensor from ``fit``'s cores."""
    return tr_to_full(cores) if format == "tr" else bt_to_full(cores[0], list(cores[1:]))


__all__ = ["chain", "factorize", "auto_modes", "tt_svd", "tt_to_full", "tt_project", "tt_ranks",
           "tr_svd", "tr_als", "tr_to_full", "tr_project", "tr_ranks", "tn_params", "ranks_for_ratio",
           "allocate_ranks", "allocation_summary", "truncated_factor", "unfolding_spectrum",
           "tucker_svd", "tucker_to_full", "tucker_project", "tucker_ranks", "tucker_params",
           "tucker_ranks_for_ratio", "tucker_allocate", "mode_spectra", "project", "PROJECTIONS",
           "BTResult", "bt_decompose", "bt_to_full", "bt_project", "bt_ranks", "bt_params", "bt_ranks_for_ratio",
           "bt_allocate", "fit", "to_full", "WARM_FORMATS"]
