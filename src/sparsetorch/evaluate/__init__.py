"""Measuring: perplexity, speed, size, per-layer inspection, reports."""
