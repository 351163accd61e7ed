"""Plain-text / Markdown tables of evaluation rows."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1e7:  # FLOPs and the like: digits beyond the third are noise to a reader
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        name = v.get("name", "?")
        opts = ",".join(f"{k}={x}" for k, x in v.items() if k != "name")
        return f"{name}({opts})" if opts else name
    return str(v)


def format_table(rows: Sequence[Dict], headline: str = "", columns: Sequence[str] = ()) -> str:
    """A Markdown table; ``columns`` default: order/decoder first, then the headline metric."""
    if not rows:
        return ""
    if not columns:
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        first = [k for k in ("order", "decoder") if k in keys]
        lead = [headline] if headline in keys else []
        columns = first + lead + [k for k in keys if k not in first + lead]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
