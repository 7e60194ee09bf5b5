"""Serving trained runs: adapters side by side (pool.py), the Playground's comparisons
(playground.py), and a run leaving the app as a zip, a merged model or a Hub repository (export.py)."""
