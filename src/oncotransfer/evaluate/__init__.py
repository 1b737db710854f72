"""Metrics, plots and reports for finished runs."""
