"""Library diagnostics of decodes and runs: trace statistics, distance and Zipf bounds, the
factorisation gap, easy first, FLOPs, tables and plots (trace metrics live in
:mod:`anyorder.decoding.trace`; the papers' study reproductions in :mod:`anyorder.studies`)."""
from .table import format_table
