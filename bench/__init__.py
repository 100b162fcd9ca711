"""Benchmarks of pd2bw-ray: pipeline throughput and memory against a single process, the other
schedules and ``torch.distributed.pipelining`` (run ``python -m bench.pipeline_bench --help``)."""
