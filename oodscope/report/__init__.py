"""Reports: leaderboards and figures (matplotlib is imported only when a figure is drawn)."""
