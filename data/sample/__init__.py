"""Bundled sample data for the demo: a generated corpus, its vocab and an SST-2-style task."""
