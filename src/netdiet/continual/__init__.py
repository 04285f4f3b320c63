"""Continual learning under a byte budget: scenarios, strategies, the byte ledger and metrics."""
