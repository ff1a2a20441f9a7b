"""The grid's vocabulary: architectures, starts, decoders, configurations, preprocessing."""

from __future__ import annotations


ARCHITECTURES = ("topk", "ra")

INITS = {"topk": ("random", "kmeans-shared", "kmeans-independent", "random-points"),
         "ra": ("random", "kmeans-shared", "kmeans-independent", "random-points")}

# how each architecture's decoder is built and kept; the first is the architecture's default.
# topk: "unit" rows renormalized after every step (overcomplete's default l2) or "free" rows
# (overcomplete's normalization="identity"). ra: "projected" (the RA-SAE), "unprojected" (W, Lambda
# and exp(m) trained without the projection) or "relax" (the reference's projection=False: one free
# matrix Relax started at W C and returned as is, no multiplier; built as a free-row TopK SAE with
# no pre-bias, since that is what it is)
DECODERS = {"topk": ("unit", "free"), "ra": ("projected", "unprojected", "relax")}

# configuration name -> (architecture, initialization, decoder)
CONFIGURATIONS = {
    "topk-random": ("topk", "random", "unit"),
    "topk-kmeans-shared": ("topk", "kmeans-shared", "unit"),
    # start-matched controls: TopK started at the same kind of points as the RA-SAE of that start
    "topk-kmeans-independent": ("topk", "kmeans-independent", "unit"),
    "topk-random-points": ("topk", "random-points", "unit"),
    "ra-kmeans-shared": ("ra", "kmeans-shared", "projected"),
    "ra-kmeans-independent": ("ra", "kmeans-independent", "projected"),
    "ra-projection-off": ("ra", "kmeans-shared", "unprojected"),
    "ra-random-points": ("ra", "random-points", "projected"),
    # the authors' two controls exactly as their code builds them (Table 3, the authors profiles)
    "topk-kmeans-shared-free": ("topk", "kmeans-shared", "free"),
    "ra-projection-off-free": ("ra", "kmeans-shared", "relax"),
}

PREPROCESSING = ("raw", "centered")

BASELINE = "topk-random"  # the configuration every archetypal challenger is compared with

CHALLENGERS = ("ra-kmeans-independent", "ra-random-points")  # archetypal, starts not shared

# the constraint's own effect: each RA-SAE against the TopK SAE started at the same kind of points
# (unit-norm rows, trained unconstrained), so that only the constraint differs
MATCHED_START = {"ra-kmeans-shared": "topk-kmeans-shared",
                 "ra-kmeans-independent": "topk-kmeans-independent",
                 "ra-random-points": "topk-random-points"}

# the constraint alone, its parameterization held fixed: the RA-SAE against the same W C + Lambda
# and exp(m) trained without the projection, from the same shared start
PARAMETERIZATION_MATCHED = ("ra-kmeans-shared", "ra-projection-off")

# every comparison the report decides: (comparison, archetypal configuration, reference); the
# original protocol is the shared start that Fel et al. report as stability
COMPARISONS = (("original protocol", "ra-kmeans-shared", BASELINE),
               *(("against topk-random", c, BASELINE) for c in CHALLENGERS),
               *(("matched start", ra, topk) for ra, topk in MATCHED_START.items()),
               ("matched start", *PARAMETERIZATION_MATCHED))
