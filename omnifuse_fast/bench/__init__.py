"""Benchmark support: roofline floors (:mod:`.floors`) and the results report (:mod:`.report`).

``python -m omnifuse_fast.bench report results.json [--png out.png]`` summarizes a
``pytest benchmarks --benchmark-only --benchmark-json results.json`` run.
"""
