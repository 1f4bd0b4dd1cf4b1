"""Evaluation on real data: datasets, tasks, baselines and reports."""
