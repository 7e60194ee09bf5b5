"""Research on top of the engine: the benchmark, the sparsity probe, the results suite, the
leaderboard and the report that answers the literature review's questions."""
