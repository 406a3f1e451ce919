"""CLI subcommands, one module each; see fastlayer.cli."""
