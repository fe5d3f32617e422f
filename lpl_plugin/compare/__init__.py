"""`lpl-plugin compare`: the same sd-scripts run with and without LPL, measured and reported side by side."""
