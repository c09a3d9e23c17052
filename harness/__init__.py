"""The Ray/Optuna harness: sweeps of the indivaid trainer and their leaderboards (the only Ray code)."""
