"""CLI subcommands, one module each; see fastlayer.cli."""


def add_graph_arguments(p) -> None:  # type: ignore[no-untyped-def]
    """GRAPH [KEY] --store-dir -o: how rank and plan take a closure graph."""
    p.add_argument(
        "graph", help="exportReferencesGraph JSON, nix path-info JSON or closureInfo dir"
    )
    p.add_argument("key", nargs="?", help="key of the graph list in an attrs JSON file")
    p.add_argument("--store-dir", help="store directory (default $NIX_STORE_DIR or /nix/store)")
    p.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")
