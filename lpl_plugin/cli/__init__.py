"""The `lpl-plugin` command line: one module per group of subcommands."""
