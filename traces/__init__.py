"""servesim.traces: workloads for the simulator and the GPU backend.

Kept light on purpose (nothing is imported here). Modules:

- ``schema``      the workload table (one row a request) and ``validate_workload``
- ``readers``     Azure LLM traces, Mooncake JSONL, our CSV/Parquet table; bundled traces
- ``writers``     ``write_table`` (our CSV/Parquet table)
- ``synthetic``   arrival processes and length distributions (numpy Generator)
- ``transforms``  rate scaling, first N, time windows, offline, length caps, SLO defaults
- ``spec``        the ``workload:`` config section (pydantic) and ``build_workload``
- ``fingerprint`` ``workload_fingerprint`` (sha256 of the table, for replay checks)

Bundled traces and their licenses live in ``traces/data/`` (see its README.md).
"""
