"""The hostile-input harness (tests/hostile/; docs/security.md, "The hostile-input harness"): every kind of input slm
reads from elsewhere, every command that reads it, on hostile variants derived from an honest instance, with the
trust boundary's invariants checked after each run. A fixed sample of it runs in `make test`; every variant in
`make test-hostile` (the `hostile` mark)."""

from __future__ import annotations

import os

import pytest
from hostile.harness import COMMANDS, Harness, pairs, sample
from hostile.world import build_outside, build_world

pytestmark = pytest.mark.train
SAMPLE_PER_KIND = 8


@pytest.fixture(scope="module")
def harness(tmp_path_factory, shards, tokenizer_dir, corpus):
    """The honest world, the outside tree and the fork server, each command run once on the honest world."""
    root = tmp_path_factory.mktemp("hostile")
    outside = build_outside(root / "outside")
    world = build_world(root / "world", shards, corpus, outside)
    lanes = int(os.environ.get("HOSTILE_LANES", "1"))  # fork servers side by side (make test-hostile: 2)
    harness = Harness(root, world, outside, watched=[world, shards, tokenizer_dir, corpus], lanes=lanes)
    harness.baseline(COMMANDS)
    yield harness
    harness.close()


def test_every_command_works_on_the_honest_world(harness):
    """The variants are only worth what their commands do on honest input: each runs (or refuses, the one asked to
    open a source only a record names), and holds every invariant."""
    failed = [f"{kind} / {name}: status {r.status}, {r.violations}, {r.stderr}"
              for (kind, name), r in harness.honest.items() if (r.status != 0) != r.command.refuses or r.violations]
    assert not failed, "\n".join(failed)


def test_a_sample_of_the_hostile_variants(harness):
    report = harness.sweep(sample(pairs(harness.world), SAMPLE_PER_KIND))
    print(report.counts())
    bad = [f"{r.command.kind} / {r.command.name} on {r.variant.label}: {'; '.join(r.violations)}"
           for r in report.violations()]
    assert not bad, "\n".join(bad)


@pytest.mark.hostile
def test_every_hostile_variant(harness):
    report = harness.sweep(pairs(harness.world), progress=True)
    print(report.counts())
    bad = [f"{r.command.kind} / {r.command.name} on {r.variant.label}: {'; '.join(r.violations)}"
           for r in report.violations()]
    assert not bad, f"{len(bad)} runs broke the boundary:\n" + "\n".join(bad[:200])
