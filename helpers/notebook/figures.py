"""Figures shown inline and saved as static images next to the notebook: the saver (``Figures``) and the export.

Static export uses kaleido, which needs a Chrome/Chromium (``make`` installs Debian's ``chromium``; on Colab
run ``plotly_get_chrome``). Without one, figures still show inline and a single clear warning says that
the PNGs are skipped. One browser is started per process and kept for every later figure (kaleido's sync
server): about 0.35 s a figure instead of about 5 s for a browser started per figure.

Under the batch runner (``DEFER_ENV`` set to ``"defer"``) a notebook only leaves each figure as plotly JSON
(``<name>.<fmt>.pending.json``) and the runner renders them after the notebook ran (``render_pending``), through
one browser per runner process: a notebook's kernel no longer starts a Chromium that competes with its torch
threads for the cores, and a batch starts one browser instead of one per notebook.

Nothing here imports torch: the runner renders every run's figures through it. The figure builders are in
``helpers.notebook.plotting``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plotly is imported where a figure is rendered: the batch runner plans runs without it
    import plotly.graph_objects as go


def in_colab() -> bool:
    """Whether this runs in a Google Colab kernel."""
    return "google.colab" in sys.modules


def choose_renderer() -> str:
    """Set plotly's renderer for where the notebook runs, and return it: ``"colab"`` in Colab (the renderer Colab
    displays, as plotly's documentation advises: its output frames do not run the notebook renderer's shared
    plotly.js); elsewhere ``"notebook"``, which embeds plotly.js once, so executed notebooks and their HTML work
    offline. (circuitsvis views load their JavaScript from a CDN: Colab shows them; an offline HTML copy does not.)"""
    import plotly.io as pio

    pio.renderers.default = "colab" if in_colab() else "notebook"
    return pio.renderers.default


_IMAGE_SERVER: dict[str, bool] = {}
SERVER_TIMEOUT_S = 120  # one export through the shared browser; past it, exports go back to a browser each
DEFER_ENV = "CIRCUIT_LAB_IMAGES"  # "defer": leave figures as pending JSON for the runner to render (module docstring)
PENDING_SUFFIX = ".pending.json"
_RENDER_LOCK = threading.Lock()  # one rendering at a time per process (runs in threads share one browser)


def browser_found() -> bool:
    """A Chrome/Chromium at ``$BROWSER_PATH`` or on the PATH (what kaleido needs)."""
    named = os.environ.get("BROWSER_PATH")
    return Path(named).is_file() if named else any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def warm_up_images() -> None:
    """Start kaleido's persistent browser in the background (once per process) when a Chrome/Chromium is on
    the PATH (or at ``$BROWSER_PATH``), so it is ready by the first figure; otherwise do nothing (the first
    export then starts its own browser, or fails with kaleido's message)."""
    if "started" in _IMAGE_SERVER:
        return
    if browser_found():
        _IMAGE_SERVER["started"] = _start_image_server()


def write_image(fig: go.Figure, path: Path, scale: float = 1.5) -> None:
    """``fig.write_image`` through the shared browser when it runs (``warm_up_images``; else the first export
    that works starts it). Raises what ``write_image`` raises (no Chromium, a browser error), or TimeoutError."""
    if not _IMAGE_SERVER.get("started"):
        fig.write_image(path, scale=scale)
        if "started" not in _IMAGE_SERVER:  # a browser exists and works: share one from now on
            _IMAGE_SERVER["started"] = _start_image_server()
        return
    pool = ThreadPoolExecutor(1)  # a browser that died at start would leave the call waiting for ever: bounded here
    try:
        pool.submit(_server_write, fig, path, scale).result(timeout=SERVER_TIMEOUT_S)
    except FuturesTimeout:
        _IMAGE_SERVER["started"] = False
        raise TimeoutError(f"kaleido's shared browser did not answer in {SERVER_TIMEOUT_S} s") from None
    finally:
        pool.shutdown(wait=False)


def _server_write(fig: go.Figure, path: Path, scale: float) -> None:
    with warnings.catch_warnings():  # with a server, plotly notes that per-call browser options are ignored: expected
        warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
        fig.write_image(path, scale=scale)


def _start_image_server() -> bool:
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)  # a background thread; stopped by kaleido at exit
    except Exception:  # noqa: BLE001 - an old kaleido without a server: every export starts its own browser (slower)
        return False
    return True


class Figures:
    """Shows figures and saves each as ``<out_dir>/<folder>/<name>.png``; records the paths it saved."""

    def __init__(self, out_dir: Path | str, folder: str = "figures", static: bool = True):
        self.folder = folder
        self.dir = Path(out_dir) / folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.static = static
        self.saved: list[str] = []
        self.key: list[str] = []  # the saved images the batch report shows as thumbnails
        self.missing: list[str] = []  # of ``saved``: figures not written, kept as plotly JSON (``render_pending``)
        self.skipped_reason: str | None = None
        self.note: str | None = None  # a warning printed under every figure's title (e.g. the task check failed)
        # Under the runner, with a browser it can use: leave the rendering to the runner (module docstring).
        self.deferred = static and os.environ.get(DEFER_ENV) == "defer" and browser_found()
        if static and not self.deferred:
            warm_up_images()

    def show(self, fig: go.Figure, name: str, formats: tuple[str, ...] = ("png",), key: bool = False) -> None:
        """Display ``fig`` (once: returns nothing, so a cell ending in ``figs.show(...)`` does not display it again)
        and write it as PNG (and any other ``formats``, e.g. svg). A failed export is retried once (kaleido's
        browser sometimes drops a message); after a second failure this and every later figure of the notebook is
        kept as plotly JSON next to where its image belongs (``missing``, with one warning), which the runner or
        ``make report`` renders later (``render_pending``): a figure is never silently absent. ``key`` figures are
        the report's thumbnails (``key_figures``). Under the runner the files are written after the notebook ran."""
        if self.note:
            fig.update_layout(
                title_text=f"{fig.layout.title.text or ''}<br><sup><span style='color:#c62828'>&#9888; {self.note}</span></sup>",
                margin_t=max(fig.layout.margin.t or 0, 110),
            )
        fig.show()
        if not self.static:
            return
        for fmt in formats:
            if self.deferred or self.skipped_reason is not None:
                fig.write_json(self.dir / f"{name}.{fmt}{PENDING_SUFFIX}")
                if not self.deferred:
                    self.missing.append(f"{self.folder}/{name}.{fmt}")
            else:
                try:
                    write_image_retried(fig, self.dir / f"{name}.{fmt}")
                except Exception as err:  # kaleido without Chromium, no kaleido, or a browser error twice
                    self.skipped_reason = failure_line(err)
                    warnings.warn(
                        f"static images could not be written from {name} on (figures still show inline): "
                        f"{self.skipped_reason}. Each is kept as plotly JSON (<name>.png{PENDING_SUFFIX}); "
                        "`make report` renders them once a browser works (apt-get install chromium, or "
                        "plotly_get_chrome).",
                        stacklevel=2,
                    )
                    fig.write_json(self.dir / f"{name}.{fmt}{PENDING_SUFFIX}")
                    self.missing.append(f"{self.folder}/{name}.{fmt}")
            self.saved.append(f"{self.folder}/{name}.{fmt}")
            if key and fmt == "png":
                self.key.append(self.saved[-1])


def failure_line(err: Exception) -> str:
    """``"<Error>: <first non-empty line>"`` of an export failure."""
    return f"{type(err).__name__}: {next((ln for ln in str(err).splitlines() if ln.strip()), '')}"


def write_image_retried(fig: go.Figure, path: Path) -> None:
    """``write_image``, retried once: kaleido's browser sometimes drops a message."""
    try:
        write_image(fig, path)
    except Exception:  # noqa: BLE001 - the second attempt raises what is wrong
        write_image(fig, path)


def render_pending(folder: Path) -> tuple[int, list[str], str | None]:
    """Render every figure left under ``folder`` as ``<name>.<fmt>.pending.json`` into ``<name>.<fmt>`` (through this
    process's shared browser) and remove its JSON. A figure that fails is tried once more with a browser of its own
    (the shared one reset); if that fails too, it and the figures after it stay pending for a later call (``make
    report``, the next run) instead of waiting on a browser that does not answer. Returns (figures written, the
    figures still pending as paths relative to ``folder``, the first failure as one line or None)."""
    import plotly.io as pio

    written, failure, left = 0, None, []
    with _RENDER_LOCK:
        for path, target in _pending(folder):
            if failure is None:
                try:
                    _render_twice(pio.read_json(path), target)
                    written += 1
                    path.unlink()
                    continue
                except Exception as err:  # noqa: BLE001 - reported as one line by the runner
                    failure = f"{target.name}: {failure_line(err)}"
            left.append(target.relative_to(folder).as_posix())
    return written, left, failure


def _render_twice(fig: go.Figure, target: Path) -> None:
    """``write_image_retried``; on failure once more after resetting the shared browser (a fresh one for this call)."""
    try:
        write_image_retried(fig, target)
    except Exception:  # noqa: BLE001 - the last attempt raises what is wrong
        _IMAGE_SERVER["started"] = False
        write_image(fig, target)


def _pending(folder: Path) -> list[tuple[Path, Path]]:
    """Each figure left under ``folder`` as plotly JSON: (its ``.pending.json`` file, the image it stands for), sorted."""
    return [(p, p.with_name(p.name.removesuffix(PENDING_SUFFIX))) for p in sorted(Path(folder).rglob(f"*{PENDING_SUFFIX}"))]


def pending_figures(folder: Path) -> list[str]:
    """The figures under ``folder`` still waiting to be rendered (``render_pending``), relative to it."""
    return sorted(target.relative_to(folder).as_posix() for _, target in _pending(folder))
