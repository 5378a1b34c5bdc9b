"""Benchmark helpers: real text-classification tasks from data in registry packages."""
