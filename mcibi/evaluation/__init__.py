"""Evaluation and inference: the test protocols, TTA, confusion metrics, prediction and the served MLflow model."""
