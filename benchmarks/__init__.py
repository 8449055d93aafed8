"""edgefl's benchmarks, installed as the package ``edgefl_benchmarks``.

Each public module ``NAME`` defines ``run(quick: bool) -> dict[str, Any]``
and is run by ``edgefl bench NAME --json FILE``; modules starting with ``_``
are shared helpers.
"""
