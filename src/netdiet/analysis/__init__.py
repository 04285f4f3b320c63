"""Analysis: op counts, memory, latency, scaling and storage — the figures every other part reports."""
