"""Teacher attributions: fast integrated gradients (equal to Captum's) and an index-aligned map cache.

``integrated_gradients``/``attribute`` compute per-pixel attributions; ``reduce_map``
turns them into one map per image; ``compute_attributions`` precomputes the maps of a
whole split once (resumable, in dataset index order) and ``open_attributions`` hands
them to training after checking they belong to its teacher and data.
"""

from igkd.attribution.cache import AttributionCache, compute_attributions, open_attributions
from igkd.attribution.integrated_gradients import integrated_gradients
from igkd.attribution.maps import REDUCTIONS, reduce_map
from igkd.attribution.methods import ATTRIBUTION_METHODS, attribute

__all__ = [
    "ATTRIBUTION_METHODS",
    "REDUCTIONS",
    "AttributionCache",
    "attribute",
    "compute_attributions",
    "integrated_gradients",
    "open_attributions",
    "reduce_map",
]
