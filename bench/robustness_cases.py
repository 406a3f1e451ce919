"""Census of the robustness cases (issue 9): many random mutations per input
kind and command, each run through the property of tests/mutate.py.

    python bench/robustness_cases.py [N] [--seed S] [--show-failures]

Prints a Markdown table: input kind | command | cases tried | exit 1 one-line
| valid image | failures, then each distinct failure (its first line) with
how often it happened and one case that shows it. N (default
FASTLAYER_ROBUSTNESS_EXAMPLES, else 50) cases per (command, input kind).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mutate  # noqa: E402

T = TypeVar("T")

PLAN = [
    *(("build", k) for k in mutate.BASE_KINDS),
    *(("stream-nix", k) for k in mutate.BASE_KINDS),
    *(("inspect", k) for k in mutate.BASE_KINDS),
    ("merge", "docker-archive"),
    ("merge", "docker-archive-gz"),
    ("build-spec", "spec-json"),
    ("build-spec", "spec-toml"),
    ("stream-nix-conf", "nix-conf"),
    ("rank", "graph-export"),
    ("rank", "graph-pathinfo"),
    ("plan", "graph-export"),
    ("plan", "graph-pathinfo"),
]


class RandomPick:
    """mutate.Pick over random.Random."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def one(self, items: Sequence[T]) -> T:
        return items[self.rng.randrange(len(items))]

    def fraction(self) -> float:
        return self.rng.random()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=mutate.examples(50))
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--show-failures", action="store_true", help="print every failing case")
    ap.add_argument(
        "--entries",
        action="store_true",
        help="instead: every entry mutation (op x member x digest fixed or not) of every base "
        "kind, through build, stream-nix, inspect and merge",
    )
    args = ap.parse_args()
    mutate.warm()
    if args.entries:
        return every_entry_mutation(args.show_failures)
    pick = RandomPick(random.Random(args.seed))
    rows = []
    failures: dict[str, list[str]] = defaultdict(list)
    start = time.monotonic()
    for command, kind in PLAN:
        counts: Counter[str] = Counter()
        for _ in range(args.n):
            case = mutate.draw_case(pick, command, kind)
            try:
                counts[mutate.in_fresh_dir(lambda host, c=case: mutate.run_case(c, host))] += 1
            except mutate.Failure as e:
                counts["failure"] += 1
                first = str(e).splitlines()[0]
                failures[f"{command} | {_kind(first)}"].append(f"{case.describe()} -> {first}")
        rows.append((kind, command, args.n, counts["exit 1"], counts["valid"], counts["failure"]))
        print(f"  {kind} {command}: {dict(counts)}", file=sys.stderr)
    print("| input kind | command | cases tried | exit 1 one-line | valid image | failures |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    total = [sum(r[i] for r in rows) for i in range(2, 6)]
    print("| **all** | | " + " | ".join(str(x) for x in total) + " |")
    print(f"\n{time.monotonic() - start:.0f} s, seed {args.seed}")
    for key, items in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"\n- {len(items)}x {key}\n    e.g. {items[0][:400]}")
        if args.show_failures:
            for item in items[1:]:
                print(f"    {item[:400]}")
    return 0


def every_entry_mutation(show: bool) -> int:
    counts: Counter[tuple[str, str, str]] = Counter()
    failures: dict[str, list[str]] = defaultdict(list)
    for command in ("build", "stream-nix", "inspect", "merge"):
        kinds = ("docker-archive",) if command == "merge" else mutate.BASE_KINDS
        for kind in kinds:
            for role in (*mutate.DOCS[kind], "layer0", "layer1"):
                for op in mutate.ENTRY_OPS:
                    for fix in (False, True) if op in mutate.DIGEST_OPS else (False,):
                        case = mutate.Case(
                            kind, command, mutate.Mutation("entry", role, op, fix_digest=fix)
                        )
                        try:
                            r = mutate.in_fresh_dir(lambda host, c=case: mutate.run_case(c, host))
                        except mutate.Failure as e:
                            r = "failure"
                            first = str(e).splitlines()[0]
                            failures[f"{command} | {_kind(first)}"].append(
                                f"{case.describe()} -> {first}"
                            )
                        counts[(kind, command, r)] += 1
    print("| input kind | command | entry cases | exit 1 one-line | valid image | failures |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in mutate.BASE_KINDS:
        for command in ("build", "stream-nix", "inspect", "merge"):
            row = [counts[(kind, command, r)] for r in ("exit 1", "valid", "failure")]
            if sum(row):
                print(f"| {kind} | {command} | {sum(row)} | " + " | ".join(map(str, row)) + " |")
    for key, items in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"\n- {len(items)}x {key}\n    e.g. {items[0][:400]}")
        for item in items[1:] if show else []:
            print(f"    {item[:400]}")
    return 0


def _kind(first_line: str) -> str:
    """A failure's class: the text before digits and names vary."""
    for sep in (" at ", ": layer ", " in output file", "; stderr"):
        first_line = first_line.split(sep)[0]
    return first_line[:160]


if __name__ == "__main__":
    raise SystemExit(main())
