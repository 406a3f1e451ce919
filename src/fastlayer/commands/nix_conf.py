"""`fastlayer nix-conf` and `fastlayer fake-nss`: what nix/default.nix runs as
builders (no shell needed), usable by hand too."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nix-conf",
        help="a spec as nixpkgs' stream_layered_image conf (+ customisation layer) in a new dir",
        description="Plan the store layers and stage the customisation layer as `build` "
        "would, and write DIR/conf.json (for `stream-nix`), DIR/customisation/, "
        "DIR/spec.json and DIR/closure.json.",
    )
    p.add_argument("spec", help="the spec, .toml or .json (with --key: a JSON file holding it)")
    p.add_argument("-o", "--output", required=True, help="the directory to create")
    p.add_argument(
        "--key", help="the spec is the object under this key (e.g. in Nix's .attrs.json)"
    )
    p.add_argument("--script", help="also write an executable streaming the image here")
    p.add_argument("--fastlayer", help="the fastlayer executable --script runs")
    p.set_defaults(func=run)
    f = sub.add_parser(
        "fake-nss",
        help="DIR with etc/passwd, etc/group, etc/nsswitch.conf, var/empty (dockerTools.fakeNss)",
    )
    f.add_argument("output", help="the directory to create")
    f.set_defaults(func=run_fake_nss)


def run(args: argparse.Namespace) -> int:
    from fastlayer import untrusted
    from fastlayer.spec import load_spec
    from fastlayer.specconf import MAX_ATTRS, write_conf_dir
    from fastlayer.untrusted import Invalid

    source = args.spec
    if args.key is not None:
        data = untrusted.load_json_file(args.spec, "spec", MAX_ATTRS)
        if not isinstance(data, dict) or not isinstance(data.get(args.key), dict):
            raise Invalid(f"spec {args.spec}: no object under key {args.key!r}")
        # relative paths then mean the current directory (a Nix build's own)
        source = data[args.key]
    spec = load_spec(source)
    write_conf_dir(spec, args.output, script=args.script, fastlayer=args.fastlayer)
    return 0


def run_fake_nss(args: argparse.Namespace) -> int:
    from fastlayer.errors import FastlayerError
    from fastlayer.sources.customisation import fake_nss_files
    from fastlayer.spec import FakeNss

    if os.path.lexists(args.output):
        raise FastlayerError(f"fake-nss: {args.output} exists; give a new directory")
    os.mkdir(args.output, 0o755)
    for rel, text in fake_nss_files(FakeNss()).items():
        path = os.path.join(args.output, rel)
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    os.makedirs(os.path.join(args.output, "var", "empty"), 0o755)
    return 0
