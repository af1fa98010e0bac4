"""What the benchmark scripts in ``benchmarks/`` share, installed as ``medssl.bench`` (pyproject's
package-dir), so that a script and a test import it the same way, with no ``sys.path`` edits.

* :mod:`medssl.bench.machine`: the machine a report ran on, alternated timings, process-tree
  memory, the JSON + Markdown report writer;
* :mod:`medssl.bench.data`: benchmark data made by code and kept between runs;
* :mod:`medssl.bench.runs`: resuming an interrupted training run, and its training time;
* :mod:`medssl.bench.seg_bench`: the segmentation benchmarks' run protocol and aggregation
  (it runs ``medssl.training``: the ``[train]`` extra).
"""
