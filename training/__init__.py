"""Training: RSNA-layout data (real or synthetic phantoms), model fitting, evaluation, artifacts."""
