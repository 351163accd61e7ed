"""See the order: a self-contained HTML trace viewer (``anyorder view``) and a local live
decoding page (``anyorder serve``). Files: ``data.py`` (saved decodes -> page JSON), ``page.py``
(inlines ``page.html``, ``viewer.css``, ``viewer.js``, ``live.js``), ``view.py`` (the view
command), ``server.py`` (the serve command)."""
from .page import render_page
from .view import decode_run, write_view

__all__ = ["render_page", "decode_run", "write_view"]
