"""Shared fixtures: one local Ray cluster for the whole test session (started lazily)."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# Tests run on 2-core machines: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one; shut down at session end.

    Workers get the repo root and tests/ on their path, so modules defined in test helpers
    (pickled by reference) import on the actors."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                           "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The bundled corpus prepared into shards of 32 tokens (by the preparation CLI, in its own
    process and Ray)."""
    from job_helpers import ROOT, run

    out = tmp_path_factory.mktemp("shards")
    run(["-m", "data.prepare_pretraining", "--input", ROOT / "data/sample/corpus.txt",
         "--output_dir", out, "--vocab_path", ROOT / "data/sample/vocab.txt", "--do_lower_case",
         "--max_seq_length", "32", "--dupe_factor", "1", "--seed", "3",
         "--documents_per_shard", "100", "--quiet"])
    return out
