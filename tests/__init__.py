"""lpl-plugin test suite."""
