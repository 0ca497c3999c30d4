"""Candidate generation: one prefill per prompt for samples and beams (prefill), our own diverse
beam search (diverse_beam), and the one entry point for every method (candidates)."""
