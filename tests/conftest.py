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
    (pickled by reference) import on the actors. They inherit it from the environment the
    cluster starts in (set only while it starts: the jobs the tests run as subprocesses must find
    their modules on their own); a runtime environment would start every worker through Ray's
    setup process, about half a second of CPU per actor."""
    import ray

    if not ray.is_initialized():
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + ([saved] if saved else []))
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
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
