"""Convoy: train CNNs and extract their feature maps as jobs.

This package holds what every part shares: settings, the queue, the artifact store, the CLI.
"""
