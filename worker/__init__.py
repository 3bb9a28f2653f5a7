"""Celery app and tasks, the training loop, feature-map extraction and checkpoints."""
