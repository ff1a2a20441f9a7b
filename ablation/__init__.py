"""The machinery of the report, one concern per module; notebooks reach it through helpers.py.

configs (the grid's vocabulary) · parameters (rules and checks) · store (files and code identity)
· lm (stage 00) · activations (stage 01) · kernels (sparse CPU kernels) · sae (the two models)
· starts (initializations) · train (the trainer) · grid (one cell) · synthetic (known answers)
· metrics · stats (over runs) · decisions · labels (words, no torch) · plots.
Importing the package imports none of them, so a module without torch stays without torch.
"""
