"""Reproductions and reports of the papers' studies: not library API.

Each module here reproduces one study or writes one report on top of the library (orders,
objectives, decoders, tasks, :mod:`anyorder.analysis`'s diagnostics): the sweep's
training-stability report (:mod:`.sweep_report`), the GPU-cost estimate of a sweep
(:mod:`.estimate`), the text comparison of orders (:mod:`.text_compare`, with what a LoMDM run
learned: :mod:`.lomdm_velocity`), the Sudoku decoding lab (:mod:`.decoding_lab`) and the A/B toy
of "Why mask diffusion does not work" (:mod:`.toy`). They are importable and reachable from the
command line (``anyorder report | estimate | text-compare | toy``, ``python -m
anyorder.studies.decoding_lab``), but their functions and outputs change with the studies: they
are not a stable API. Nothing in the library imports them.
"""
