"""Analysis of decodes and runs: tables and plots (trace metrics live in decoding.trace)."""
from .table import format_table
