"""Pure tensor math on torch tensors (no nn.Module): TT/TR decompositions, projections, ranks."""
from .factorize import auto_modes, factorize
from .ranks import allocate_ranks, allocation_summary, ranks_for_ratio, tn_params
from .tr import tr_project, tr_ranks, tr_svd, tr_to_full
from .tt import truncated_factor, tt_project, tt_ranks, tt_svd, tt_to_full, unfolding_spectrum

__all__ = ["factorize", "auto_modes", "tt_svd", "tt_to_full", "tt_project", "tt_ranks",
           "tr_svd", "tr_to_full", "tr_project", "tr_ranks", "tn_params", "ranks_for_ratio",
           "allocate_ranks", "allocation_summary", "truncated_factor", "unfolding_spectrum"]
