"""The machinery of the report, one concern per module; notebooks reach it through helpers.py.

configs (the grid's vocabulary) · parameters (rules and checks) · store (files and code identity)
· lm (stage 00) · activations (stage 01) · kernels (sparse CPU kernels) · sae (the two models)
· starts (initializations) · train (the resumable trainer) · convergence (when a cell has stopped
moving) · grid (one cell) · cluster (cells in parallel on Dask) · synthetic (known answers) · metrics · bootstrap (intervals over runs)
· stats (over runs) · decisions · variants and robustness (notebook 05) · labels (words, no torch) · plots · memory (heap trimming).
Importing the package imports none of them, so a module without torch stays without torch.
"""
