"""Evaluation: loss/perplexity and generation."""
