"""Pure tensor math on torch tensors (no nn.Module): TT/TR/Tucker/BT decompositions, projections, ranks."""
from .bt import BTResult, bt_allocate, bt_decompose, bt_params, bt_project, bt_ranks, bt_ranks_for_ratio, bt_to_full
from .factorize import auto_modes, factorize
from .ranks import allocate_ranks, allocation_summary, ranks_for_ratio, tn_params
from .tr import tr_project, tr_ranks, tr_svd, tr_to_full
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


__all__ = ["chain", "factorize", "auto_modes", "tt_svd", "tt_to_full", "tt_project", "tt_ranks",
           "tr_svd", "tr_to_full", "tr_project", "tr_ranks", "tn_params", "ranks_for_ratio",
           "allocate_ranks", "allocation_summary", "truncated_factor", "unfolding_spectrum",
           "tucker_svd", "tucker_to_full", "tucker_project", "tucker_ranks", "tucker_params",
           "tucker_ranks_for_ratio", "tucker_allocate", "mode_spectra", "project", "PROJECTIONS",
           "BTResult", "bt_decompose", "bt_to_full", "bt_project", "bt_ranks", "bt_params", "bt_ranks_for_ratio",
           "bt_allocate"]
