"""The report's words: outcome labels and the authors' Table 3 with its stated rules (no torch)."""

from __future__ import annotations

# outcome labels of the comparisons under the declared margin (an equivalence test: the whole 95%
# interval beyond -margin, beyond +margin, or within +-margin); readme.py reads them from the JSON
CLOSER = "archetypal closer by more than the margin"
FURTHER = "archetypal further apart by more than the margin"
EQUIVALENT = "equivalent within the margin"
UNDECIDED = "undecided: the interval crosses the margin"
AGREES_MORE = "archetypal agrees more by more than the margin"
AGREES_LESS = "archetypal agrees less by more than the margin"
# one word per outcome, for tables (the glossary spells them out)
SHORT = {CLOSER: "closer", FURTHER: "further", EQUIVALENT: "equivalent", UNDECIDED: "undecided",
         AGREES_MORE: "agrees more", AGREES_LESS: "agrees less"}

# The authors' vision notebooks (DINOv2-small patch tokens; Hungarian cosine distance, 2 runs),
# keyed by the configuration that builds each condition as their code does
AUTHORS_TABLE3 = {
    ("topk-random", "raw"): 0.283, ("topk-random", "centered"): 0.419,
    ("ra-kmeans-shared", "raw"): 0.087, ("ra-kmeans-shared", "centered"): 0.245,
    ("ra-projection-off-free", "raw"): 0.089, ("ra-projection-off-free", "centered"): 0.081,
    ("topk-kmeans-shared-free", "raw"): 0.076, ("topk-kmeans-shared-free", "centered"): 0.072,
}

AUTHORS_CONDITIONS = {"topk-random": "TopK SAE, random init",
                      "ra-kmeans-shared": "RA-SAE (shared k-means init)",
                      "ra-projection-off-free": "RA-SAE, projection off",
                      "topk-kmeans-shared-free": "TopK SAE, shared k-means init"}

SHARED_START = ("ra-kmeans-shared", "ra-projection-off-free", "topk-kmeans-shared-free")

UNCONSTRAINED_SHARED = ("ra-projection-off-free", "topk-kmeans-shared-free")

AUTHORS_RULES = {  # the authors' pattern as three stated rules: name -> the rule, in words
    "raw_shared_far_closer": "on raw data, every shared-start condition ends at most half as far "
                             "apart as TopK from a random start",
    "centering_pulls_ra_apart": "centering moves the RA-SAE at least 1.5 times further apart",
    "unconstrained_stay_close": "on centered data, the unconstrained shared-start models stay at "
                                "most half as far apart as TopK",
}

# a claim's status, the report's only three words for it (README and notebook 04 alike)
SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NOT_ESTABLISHED = "not established"
STATUSES = (SUPPORTED, CONTRADICTED, NOT_ESTABLISHED)

# the claims the report decides: name -> (whose claim, the claim in words, the preprocessings it is
# decided on). Across architectures the cosine compares like with like only on centered activations:
# on raw ones an archetypal atom is a point that carries the data mean and a TopK atom a direction
# beside a bias that absorbs it. Fel et al. reported stability on both; the galaxy lives on raw.
CLAIMS = {
    "shared_start_stable": ("Fel et al. 2025", "archetypal runs from the shared k-means start end closer "
                            "than TopK runs from random starts", ("raw", "centered")),
    "independent_not_closer": ("Brzozowski & Chung 2026", "with starts that are not shared, archetypal "
                               "runs end no closer than TopK runs from random starts", ("centered",)),
    "constraint_no_effect": ("Brzozowski & Chung 2026", "from a matched start, the archetypal "
                             "constraint does not end runs closer", ("centered",)),
    "no_stabilization": ("Brzozowski & Chung 2026", "archetypal runs do not come closer over training "
                         "than TopK runs do", ("centered",)),
    "galaxy": ("Brzozowski & Chung 2026", "on raw activations, the data mean makes archetypal atoms "
               "look alike to the cosine", ("raw",)),
}
