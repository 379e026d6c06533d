"""Remove Streaming shared memory that killed jobs left on this node, sparing every run still alive.

    python clean_shared_memory.py [--dry-run]

Streaming's own `clean_stale_shared_memory()` unlinks every block on the node, including those of
runs still training; this removes only blocks no living process maps (see slm/core/shared_memory.py). Training
runs the same cleanup at start, so this is for a node where a crashed job blocks something else.
"""

from __future__ import annotations

import argparse
import sys

from slm.core.shared_memory import clean_stale_shared_memory, stale_shared_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    names = stale_shared_memory() if args.dry_run else clean_stale_shared_memory()
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(names)} stale Streaming shared-memory block(s)" + "".join(f"\n  {n}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
