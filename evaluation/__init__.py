"""Scoring a trained model file: held-out errors per task, NVE MD stability, finite-difference checks and
plots (`evaluation.evaluate`, ``python -m evaluation.evaluate``). It reads prepared data (`data_prep`) and
model files (`matris`); `matris` itself stays the model, its graph, the calculator and the model files."""
