"""Evaluation: tokenizer reconstruction, per-modality perplexity, benchmarks."""
