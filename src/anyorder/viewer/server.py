"""``anyorder serve RUN_DIR``: a local page where you type a puzzle (or pick a held-out example),
choose a decoder and its options, and watch the decode step by step as it runs.

Standard library only (``http.server`` + threads + Server-Sent Events): the page needs two
routes and one one-way stream, so a web framework would add a dependency and nothing else.

- Binds to 127.0.0.1 by default; requests whose ``Host`` is not this loopback address and port
  are refused (a page elsewhere cannot reach the server through DNS rebinding).
- The page sends only option values. They are turned into the exact arguments of
  ``anyorder sample RUN_DIR --decoder NAME --k ... --opt key=value`` and parsed by the CLI's own
  parser and decoder registry, so every option is validated as the CLI does; no field is a
  file path (the run is the server's), and no other CLI flag can be reached.
- ``GET /`` is the page; ``GET /decode?...`` streams ``start``, ``step`` (new events),
  ``done`` (tokens, metrics) or ``failure`` (a one-line message, shown in the page).
- One decode at a time; Ctrl-C or SIGTERM stops the server cleanly (exit status 0).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

import torch

from ..decoding import DECODERS, build_decoder
from ..decoding.trace import afp, kendall_tau_b
from ..evaluation.saved import decoder_label
from ..experiment import load_run, run_decoder
from .data import answer_index, flat_events, row_summary
from .page import embed_json, finite, render_page

# page field -> the `anyorder sample` flag it becomes (values are passed as --flag=value)
FLAGS = {"decoder": "--decoder", "k": "--k", "steps": "--steps", "window": "--window",
         "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"}
OTHER_FIELDS = ("opt", "cache", "puzzle", "example")
ALTERNATIVES = 3
USER_ERRORS = (ValueError, FileNotFoundError)


def sample_argv(query: Dict[str, List[str]], run_dir: str) -> List[str]:
    """The ``anyorder sample`` arguments the page's fields stand for (ValueError on unknown fields)."""
    unknown = sorted(set(query) - set(FLAGS) - set(OTHER_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(list(FLAGS) + list(OTHER_FIELDS))}")
    one = {k: v[-1].strip() for k, v in query.items()}
    if not one.get("decoder"):
        raise ValueError(f"choose a decoder: one of {', '.join(DECODERS.names())}")
    argv = ["sample", run_dir]
    argv += [f"{flag}={one[key]}" for key, flag in FLAGS.items() if one.get(key)]
    for line in one.get("opt", "").splitlines():
        if line.strip():
            argv.append(f"--opt={line.strip()}")
    if one.get("cache", "") in ("on", "true", "1"):
        argv.append("--opt=cache=true")
    return argv


def parse_request(query: Dict[str, List[str]], run_dir: str) -> Dict[str, Any]:
    """The decoder spec, checked exactly as ``anyorder sample`` checks it."""
    from .. import cli  # lazy: cli imports this module to register `serve`
    args = cli.build_parser().parse_args(sample_argv(query, run_dir))
    spec = cli._decoder_spec(args)
    build_decoder(spec)  # every option of the decoder validated by its constructor
    return spec


class Session:
    """The loaded run and the lock that lets one decode run at a time."""

    def __init__(self, run_dir: str, alternatives: int = ALTERNATIVES):
        self.run_dir, self.alternatives = str(run_dir), alternatives
        self.exp = load_run(run_dir)
        self.lock = threading.Lock()
        self.takes_puzzles = hasattr(self.exp.task, "parse")

    def page(self) -> str:
        task = self.exp.task
        return render_page({"mode": "live", "title": f"anyorder serve: {self.run_dir}", "panels": [], "examples": 0,
                            "vocab": {str(task.mask_id): task.token_str(int(task.mask_id))},
                            "decoders": DECODERS.names(), "input": "puzzle" if self.takes_puzzles else "example",
                            "default_decoder": decoder_label(self.exp.cfg["decode"][0]).split("(")[0]})

    def rows(self, query: Dict[str, List[str]]):
        """(x0, answer, first_row, warning) for the page's puzzle or example index."""
        task = self.exp.task
        puzzle = query.get("puzzle", [""])[-1].strip()
        example = query.get("example", [""])[-1].strip()
        if puzzle:
            if not self.takes_puzzles:
                raise ValueError(f"task {task.name!r} does not take puzzle strings; give an example index")
            try:
                x = task.parse(puzzle)[None]
            except ValueError as exc:
                raise ValueError(f"puzzle {puzzle!r}: {exc}") from None
            warning = task.check_puzzle(puzzle) if hasattr(task, "check_puzzle") else None
            return x.clone(), x == task.mask_id, 0, warning
        if not example.isdigit():
            raise ValueError(f"example must be a held-out row index >= 0, got {example!r}"
                             if example else "give a puzzle or an example index")
        i = int(example)
        x0, answer = task.eval_set(i + 1)
        if i >= len(x0):
            raise ValueError(f"example {i} is out of range: the held-out set has {len(x0)} rows")
        return x0[i:i + 1], answer[i:i + 1], i, None

    def decode(self, query: Dict[str, List[str]], send) -> None:
        """Validate, decode and stream (``send(event, data)``)."""
        spec = parse_request(query, self.run_dir)
        x0, answer, first_row, warning = self.rows(query)
        task, mask_id = self.exp.task, int(self.exp.task.mask_id)
        aidx = answer_index(answer[0])
        sent = {mask_id}

        def vocab_of(ids) -> Dict[str, str]:
            new = {int(i) for i in ids if int(i) >= 0} - sent
            sent.update(new)
            return {str(i): task.token_str(i) for i in new}

        x = torch.where(answer, mask_id, x0)[0]
        send("start", {"panel": {"label": f"{self.exp.order.label()} / {decoder_label(spec)}", "grid": task.grid_shape,
                                 "k_alt": self.alternatives, "metrics": {}},
                       "row": {"x": x.tolist(), "ans": answer[0].nonzero().flatten().tolist(), "ev": [], "alt": [],
                               "steps": 0},
                       "vocab": vocab_of(x.tolist()), "warning": warning, "spec": spec})

        def on_step(state) -> None:
            ev = state.events.drain()
            flat, alt, steps = flat_events(ev, 0, len(ev.row), aidx)
            send("step", {"ev": flat, "alt": alt, "steps": int(state.row_step[0]),
                          "vocab": vocab_of(flat[3::5] + alt[0::2])})

        with torch.no_grad():
            metrics, res = run_decoder(self.exp.model, self.exp, spec, x0, answer, return_results=True,
                                       alternatives=self.alternatives, on_step=on_step, first_row=first_row)
        tr = res.trace
        ok = bool(task.row_correct(res.tokens, x0, answer)[0])
        summary = row_summary(tr, 0, float(afp(tr.finalize_step, tr.answer)[0]),
                              float(kendall_tau_b(tr.finalize_step, tr.answer)[0]), ok)
        ans_tok = res.tokens[0][answer[0]].tolist()
        send("done", {"tokens": res.tokens[0].tolist(), "tok": ans_tok, "metrics": finite(metrics),
                      "vocab": vocab_of(ans_tok), **summary})


class Handler(BaseHTTPRequestHandler):
    session: Session
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # quiet: one line per decode is printed instead
        pass

    def handle(self):
        try:
            super().handle()
        except ConnectionError:  # the client went away mid-reply: nothing to answer, nothing to log
            pass

    def _host_ok(self) -> bool:
        host, port = self.server.server_address[:2]
        allowed = {f"{h}:{port}" for h in (host, "localhost", "127.0.0.1")}
        return self.headers.get("Host", "") in allowed

    def _reply(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if not self._host_ok():
            return self._reply(403, "forbidden: this server answers loopback requests only\n")
        url = urlsplit(self.path)
        if url.path == "/":
            return self._reply(200, self.session.page(), "text/html; charset=utf-8")
        if url.path == "/favicon.ico":
            return self._reply(204, "")
        if url.path == "/decode":
            return self._stream(parse_qs(url.query, keep_blank_values=True))
        return self._reply(404, "not found\n")

    def do_POST(self):
        self._reply(405, "method not allowed\n")

    def _stream(self, query) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

        def send(event: str, data: Dict[str, Any]) -> None:
            self.wfile.write(f"event: {event}\ndata: {embed_json(data)}\n\n".encode("utf-8"))
            self.wfile.flush()

        if not self.session.lock.acquire(blocking=False):
            return send("failure", {"message": "another decode is running; try again when it has finished"})
        try:
            self.session.decode(query, send)
            print(f"decoded: {query.get('decoder', ['?'])[-1]}", file=sys.stderr, flush=True)
        except ConnectionError:
            pass  # the page went away mid-decode
        except USER_ERRORS as exc:
            send("failure", {"message": " ".join(str(exc).split())})
        except Exception as exc:  # a bug: keep serving, show it, log the traceback
            traceback.print_exc()
            send("failure", {"message": f"internal error ({type(exc).__name__}: {exc}); see the server's log"})
        finally:
            self.session.lock.release()


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"session": Session(run_dir)})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket and return."""
    httpd = make_server(run_dir, host, port)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving {run_dir} on http://{httpd.server_address[0]}:{httpd.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        signal.signal(signal.SIGTERM, previous)
        print("server stopped", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def add_arguments(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port; the URL is printed)")


def run_from_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    serve(args.run_dir, args.host, args.port)
