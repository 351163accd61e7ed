"""The viewer page: ``page.html`` with its CSS, scripts and data inlined -- one self-contained file
that loads nothing from the network (no CDN, no fonts, no images)."""
from __future__ import annotations

import html
import json
import math
from importlib import resources
from typing import Any, Dict

STATIC = ("page.html", "viewer.css", "viewer.js", "live.js")


def _static(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def finite(v):
    """``v`` with every NaN / infinity replaced by None (JSON has neither)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def embed_json(data: Dict[str, Any]) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can end it)."""
    text = json.dumps(finite(data), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data: Dict[str, Any]) -> str:
    """The page for ``data`` (``data["mode"]``: ``static`` for a saved run, ``live`` for the server)."""
    js = _static("viewer.js") + ("\n" + _static("live.js") if data.get("mode") == "live" else "")
    out = _static("page.html")
    # the data last: nothing in it is ever read as a placeholder
    for key, value in (("__CSS__", _static("viewer.css")), ("__JS__", js.replace("</script", "<\\/script")),
                       ("__TITLE__", html.escape(str(data.get("title", "anyorder viewer"))))):
        out = out.replace(key, value)
    return out.replace("__DATA__", embed_json(data))
