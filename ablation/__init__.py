"""The machinery of the report, one concern per module; notebooks reach it through helpers.py.

configs (the grid's vocabulary) · parameters (rules and checks) · store (files and code identity)
· lm (stage 00) · activations (stage 01) · kernels (sparse CPU kernels) · sae (the two models)
· starts (initializations) · train (the resumable trainer) · schedule (budgets and cooldown branches)
· grid (one cell, trained and recorded) · evaluation (what a record keeps of a budget) · records (a
cell's committed record) · cluster (cells in parallel on Dask) · synthetic (known answers) · metrics
· bootstrap (intervals over runs) · stats (over runs, from records) · convergence (still moving?)
· decisions · variants and robustness (notebook 05) · verify (retrained against records) · labels
(words, no torch) · plots · memory (heap trimming).
Importing the package imports none of them, so a module without torch stays without torch.
"""
