"""Mammo-FActOR training and evaluation: data with ground-truth masks, the training loop, localization metrics.

The model side (projectors, loss, maps, save/load) is ``models.factor``; see docs/factor.md.
"""
