"""Privacy guard rails: DP-SGD training (dp.py, sampling.py) and the memorisation audit (canaries.py)."""
