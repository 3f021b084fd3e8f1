"""Evaluation on the real datasets beside the published results (`edgekit eval NAME`): one module per
evaluation (skab, fall_screening, ipol, deferral), run and tabled by evaluate.py. Imports training and
export; neither imports it."""
