"""The Typer app object that every command module registers on."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Find product photos from a shopper's words (Hierarchical Similarity Learning).")
