"""The `hsl` command line: a thin Typer layer over the hsl library."""
