"""Settings: the LPL options, reading and checking files, messages and the errors users see (the bottom layer)."""
