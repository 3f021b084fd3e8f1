"""Training: a recipe's rows (tasks.py), the torch models (models.py), fitting the predictor, autoencoder gate
and second opinion into a run directory (train.py), and its HTML report (report.py)."""
