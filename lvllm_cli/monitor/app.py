"""The live dashboard (Textual). Thin: the Poller computes, view.py formats, this lays out.

Standalone:      MonitorApp(url).run()
From serve:      run_attached(url, supervisor)  (or a Popen + its log path; see docs/notes/monitor.md)
                 → SERVER_STOPPED, SERVER_KEPT or SERVER_EXITED
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label, RichLog, Sparkline, Static

from lvllm_cli.monitor import view
from lvllm_cli.monitor.poller import Frame, Poller
from lvllm_cli.monitor.server import LogTail, ServerHandle

QUIT = "quit"  # no server attached
SERVER_STOPPED = "server-stopped"  # user chose to stop it; it has exited
SERVER_KEPT = "server-kept"  # user chose to leave it running
SERVER_EXITED = "server-exited"  # it had already exited when the user quit

LATENCY_WINDOWS = (10.0, 30.0, 60.0, 300.0)


class ConfirmStop(ModalScreen[str]):
    """Asked on quit when a server is attached: stop it, leave it running, or stay."""

    BINDINGS = [
        Binding("y", "choose('stop')", "stop it"),
        Binding("n", "choose('keep')", "leave it running"),
        Binding("escape", "choose('cancel')", "cancel"),
    ]
    DEFAULT_CSS = """
    ConfirmStop { align: center middle; }
    ConfirmStop > Vertical { width: 64; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    ConfirmStop Horizontal { height: auto; margin-top: 1; }
    ConfirmStop Button { margin-right: 2; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Stop the server too?\n[y] stop it   [n] leave it running   [esc] back", id="question")
            with Horizontal():
                yield Button("Stop server", id="stop", variant="error")
                yield Button("Leave running", id="keep", variant="primary")
                yield Button("Cancel", id="cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")


class Panel(Static):
    DEFAULT_CSS = "Panel { border: round $primary 60%; padding: 0 1; height: auto; }"

    def __init__(self, title: str, **kw) -> None:
        super().__init__("", **kw)
        self.border_title = title


class MonitorApp(App[str]):
    TITLE = "lvllm monitor"
    CSS = """
    Screen { layout: vertical; }
    #status { height: auto; padding: 0 1; background: $boost; }
    #panels { height: auto; grid-size: 2; grid-columns: 1fr 1fr; grid-rows: auto; grid-gutter: 0 1; }
    #throughput { border: round $primary 60%; padding: 0 1; height: auto; }
    #throughput Sparkline { height: 2; }
    #log { border: round $secondary 60%; height: 1fr; min-height: 5; }
    .narrow #panels { grid-size: 1; grid-columns: 1fr; }
    .hidden { display: none; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("m", "next_model", "Model"),
        Binding("e", "next_engine", "Engine"),
        Binding("w", "next_window", "Latency window"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("l", "toggle_log", "Log", show=False),
    ]
    NARROW_BELOW = 110  # columns; below this the panels stack

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        interval: float = 1.0,
        filters: dict[str, str] | None = None,
        latency_window_s: float = 30.0,
        server: ServerHandle | None = None,
        poller: Poller | None = None,
        metrics_dirs: list | None = None,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.server = server
        self.poller = poller or Poller(
            url or "", api_key=api_key, filters=filters, latency_window_s=latency_window_s,
            server_pid=server.pid if server is not None else None, metrics_dirs=metrics_dirs,
        )
        self.frame: Frame | None = None
        self.paused = False
        self._polling = False
        self._pending_filters: dict[str, str] | None = None
        self._log_tail = LogTail(server.log_path) if server is not None and server.log_path else None
        self._stopping = False
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._exit_pending: str | None = None

    # ---------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        yield Static(view.status_line(None, self.interval), id="status")
        with Grid(id="panels"):
            with Vertical(id="throughput"):
                yield Static("", id="prefill-line")
                yield Sparkline([], id="prefill-spark")
                yield Static("", id="decode-line")
                yield Sparkline([], id="decode-spark")
            yield Panel("Requests", id="requests")
            yield Panel("Latency", id="latency")
            yield Panel("CPU experts", id="experts")
            yield Panel("CPU", id="cpu")
            yield Panel("GPU", id="gpu")
        log = RichLog(id="log", max_lines=5000, markup=False, wrap=True, min_width=20, auto_scroll=True)
        log.border_title = "Server log"
        if self._log_tail is None:
            log.add_class("hidden")
        yield log
        yield Footer()

    def on_mount(self) -> None:
        self._running_loop = asyncio.get_running_loop()
        if self._exit_pending is not None:
            self.exit(self._exit_pending)
            return
        self._q("#throughput").border_title = "Throughput"
        self._apply_width(self.size.width)
        self.set_interval(self.interval, self.poll_now)
        if self._log_tail is not None:
            self.set_interval(0.25, self.pump_log)
        self.call_later(self.poll_now)

    def on_resize(self, event) -> None:
        self._apply_width(event.size.width)

    def _q(self, selector: str, expect_type=None):
        # Widgets live on the base screen; App.query_one would search a modal on top of it.
        base = self.screen_stack[0]
        return base.query_one(selector, expect_type) if expect_type else base.query_one(selector)

    def _apply_width(self, width: int) -> None:
        self.screen_stack[0].set_class(width < self.NARROW_BELOW, "narrow")

    # ---------------------------------------------------------------- data

    async def poll_now(self) -> None:
        """One poll in a thread (the HTTP request must not freeze the UI), then redraw."""
        if self._polling or self.paused:
            return
        self._polling = True
        try:
            try:
                frame = await asyncio.to_thread(self.poller.poll)
            except Exception as exc:  # a bug of ours must not take the dashboard (or the server) down
                self.notify(f"monitor error: {type(exc).__name__}: {exc}", severity="error", timeout=5)
                return
            if self._pending_filters is not None:
                frame = self.poller.refilter(self._pending_filters) or frame
                self._pending_filters = None
            self.frame = frame
            self.show(frame)
        finally:
            self._polling = False

    def pump_log(self) -> None:
        if self._log_tail is None:
            return
        lines = self._log_tail.read_new()
        if lines:
            log = self._q("#log", RichLog)
            # RichLog measures text against the console width; wrap at the pane's own width instead.
            width = log.scrollable_content_region.width or None
            for line in lines:
                log.write(Text.from_ansi(line), width=width)

    def server_note(self) -> str:
        if self.server is None:
            return ""
        if self._stopping:
            return "stopping the server…"
        code = self.server.exit_code()
        if code is not None:
            return f"server process exited with code {code}; its log is below"
        return ""

    def show(self, frame: Frame) -> None:
        self._q("#status", Static).update(view.status_line(frame, self.interval, self.server_note(), self.paused))
        v = frame.vllm
        self._q("#prefill-line", Static).update(view.throughput_line("prefill", v.prompt_tokens_per_s, v.rate_window_s))
        self._q("#decode-line", Static).update(view.throughput_line("decode", v.generation_tokens_per_s, v.rate_window_s))
        self._q("#prefill-spark", Sparkline).data = frame.prompt_spark or [0.0]
        self._q("#decode-spark", Sparkline).data = frame.generation_spark or [0.0]
        self._q("#requests", Panel).update(view.requests_panel(frame))
        lat = self._q("#latency", Panel)
        lat.border_title = f"Latency, last {self.poller.latency_window_s:.0f} s"
        lat.update(view.latency_panel(frame))
        self._q("#cpu", Panel).update(view.cpu_panel(frame))
        self._q("#gpu", Panel).update(view.gpu_panel(frame))
        self._q("#experts", Panel).update(view.engine_panel(frame))

    def _set_filters(self, filters: dict[str, str]) -> None:
        if self._polling:
            self._pending_filters = filters  # applied when the poll in flight lands
            self.poller.filters = dict(filters)
            return
        frame = self.poller.refilter(filters)
        if frame is not None:
            self.show(frame)

    def _cycle(self, label: str, choices: list[str]) -> None:
        current = self.poller.filters.get(label)
        options: list[str | None] = [None, *choices]
        nxt = options[(options.index(current) + 1) % len(options)] if current in options else None
        filters = {k: v for k, v in self.poller.filters.items() if k != label}
        if nxt is not None:
            filters[label] = nxt
        self._set_filters(filters)

    # ---------------------------------------------------------------- keys

    def action_next_model(self) -> None:
        self._cycle("model_name", self.frame.models if self.frame else [])

    def action_next_engine(self) -> None:
        self._cycle("engine", self.frame.engines if self.frame else [])

    def action_next_window(self) -> None:
        cur = self.poller.latency_window_s
        later = [w for w in LATENCY_WINDOWS if w > cur]
        self.poller.latency_window_s = later[0] if later else LATENCY_WINDOWS[0]
        self._set_filters(dict(self.poller.filters))

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self.frame is not None:
            self.show(self.frame)

    def action_toggle_log(self) -> None:
        if self._log_tail is not None:
            self._q("#log").toggle_class("hidden")

    async def action_quit(self) -> None:
        if self._stopping:
            return
        if self.server is None:
            self.exit(QUIT)
            return
        if not self.server.is_running():
            self.exit(SERVER_EXITED)
            return
        self.push_screen(ConfirmStop(), self._after_confirm)

    async def _after_confirm(self, choice: str | None) -> None:
        if choice == "keep":
            self.exit(SERVER_KEPT)
        elif choice == "stop" and self.server is not None:
            self._stopping = True
            if self.frame is not None:
                self.show(self.frame)
            await asyncio.to_thread(self.server.stop)
            self.exit(SERVER_STOPPED)

    def request_exit(self, result: str = SERVER_STOPPED) -> None:
        """Leave the app soon; safe from a signal handler or another thread (the server is being
        stopped by someone else, e.g. SIGTERM to `lvllm serve`)."""
        loop = self._running_loop
        if loop is None:  # not mounted yet: on_mount leaves at once
            self._exit_pending = result
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self.exit, result)

    def on_unmount(self) -> None:
        self.poller.close()


def run_attached(
    url: str,
    server,
    log_path=None,
    *,
    api_key: str | None = None,
    interval: float = 1.0,
    metrics_dirs: list | None = None,
    on_app: Callable[[MonitorApp], None] | None = None,
    **run_kwargs,
) -> str:
    """`lvllm serve --monitor`: the dashboard on a server lvllm started.

    `server` is a ServerHandle (serve passes its Supervisor) or a Popen started
    with start_new_session=True whose stdout+stderr go to `log_path`.
    `metrics_dirs`: where the server's CPU-expert figures are (default: found from the URL).
    `on_app(app)` is called before the app runs (serve connects its signal
    handling to `app.request_exit`). Returns SERVER_STOPPED, SERVER_KEPT (user
    left it running) or SERVER_EXITED (it died on its own).
    """
    from lvllm_cli.monitor.server import PopenServer

    handle: ServerHandle = server if isinstance(server, ServerHandle) else PopenServer(server, log_path)
    app = MonitorApp(url, api_key=api_key, interval=interval, server=handle, metrics_dirs=metrics_dirs)
    if on_app is not None:
        on_app(app)
    result = app.run(**run_kwargs)
    if result is None:  # the dashboard ended some other way (it failed): that must not take the server down
        return SERVER_EXITED if not handle.is_running() else SERVER_KEPT
    return result
