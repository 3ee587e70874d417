"""Research code: measurements on the shared data, not part of the retrieval API.

What is here serves the benchmarks (``benchmarks/``), ``docs/retrieval.md`` and the
``lungcbir evaluate-retrieval`` command only. It knows the shared data sets by name (their
folders, label files and known duplicate slices) and may change with them; applications
should use :class:`lungcbir.Retriever` and the modules it is built from instead.

* :mod:`lungcbir.research.retrieval_benchmark`: retrieval quality (anatomical level,
  infection, diagnosis, contrast) against chance levels and baselines.
"""
