"""Turning what users register into Bokeh ``Application`` objects.

The handlers are Bokeh's own, chosen the way ``bokeh serve`` chooses them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Union

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.command.util import build_single_handler_application

from . import panel
from .errors import ConfigurationError

AppTarget = Union[Callable[..., Any], Application, str, "os.PathLike[str]"]


def normalize_route(route: str) -> str:
    """``"sliders/"`` → ``"/sliders"``; the root app is ``"/"``."""
    if not isinstance(route, str):
        raise ConfigurationError(f"An app route must be a string such as '/sliders', got {route!r}.")
    stripped = route.strip().strip("/")
    if any(part in ("", ".", "..") for part in stripped.split("/")) and stripped:
        raise ConfigurationError(f"App route {route!r} has an empty or relative segment.")
    if stripped.split("/")[0] in ("components", "favicon.ico"):
        raise ConfigurationError(
            f"App route {route!r} starts with {stripped.split('/')[0]!r}, where the server serves"
            " Panel's component assets and its icon; choose another name."
        )
    for reserved in ("static", "ws", "autoload.js", "metadata"):
        if stripped.split("/")[-1] == reserved:
            raise ConfigurationError(
                f"App route {route!r} ends in {reserved!r}, which names one of every app's own URLs."
            )
    return "/" + stripped if stripped else "/"


def route_for_path(path: str) -> str:
    """The route ``bokeh serve`` gives a script or directory: its base name."""
    base = os.path.basename(os.path.normpath(str(path)))
    name, ext = os.path.splitext(base)
    return "/" + (name if ext in (".py", ".ipynb", ".md") else base)


def _raise_if_failed(app: Application, target: str | os.PathLike[str]) -> None:
    # A script that does not even compile fails at start-up, as with
    # bokeh serve, rather than on every page view.
    for handler in app.handlers:
        if getattr(handler, "failed", False):
            raise ConfigurationError(
                f"The app at {os.fspath(target)!r} failed to load: {handler.error}\n{handler.error_detail}"
            )


def build_application(target: AppTarget, argv: Sequence[str] = ()) -> Application:
    """Make a Bokeh ``Application`` from a registered target.

    :param target: A ``modify_doc(doc)`` function, an ``Application``, or the
        path of a ``.py`` script, ``.ipynb`` notebook or app directory; with
        Panel installed also a Panel object, a function without arguments
        that returns one, or a ``.md`` file (as ``pn.serve`` takes them).
    :param argv: ``sys.argv[1:]`` seen by a script or directory app
        (``bokeh serve --args``).
    """
    if isinstance(target, Application):
        app = target
    elif panel.is_panel_target(target):
        if isinstance(target, (str, os.PathLike)) and not os.path.isfile(os.fspath(target)):
            raise ConfigurationError(f"App path {os.fspath(target)!r} does not exist.")
        if isinstance(target, (str, os.PathLike)):
            try:
                app = panel.build_application(target)
            except ConfigurationError:
                raise
            except Exception as exc:  # e.g. nbconvert missing for a notebook
                raise ConfigurationError(f"Could not load the app at {os.fspath(target)!r}: {exc}") from exc
            _raise_if_failed(app, target)
        else:
            app = panel.build_application(target)
    elif isinstance(target, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(target))
        if not os.path.exists(path):
            raise ConfigurationError(f"App path {os.fspath(target)!r} does not exist.")
        if os.path.isfile(path) and not path.endswith((".py", ".ipynb")):
            raise ConfigurationError(
                f"App file {os.fspath(target)!r} must be a .py script, a .ipynb notebook or a directory."
            )
        try:
            app = build_single_handler_application(path, list(argv))
        except Exception as exc:
            raise ConfigurationError(f"Could not load the app at {os.fspath(target)!r}: {exc}") from exc
        _raise_if_failed(app, target)
    elif callable(target):
        app = Application(FunctionHandler(target))
    else:
        raise ConfigurationError(
            f"Cannot serve {target!r}: pass a modify_doc(doc) function, a bokeh Application,"
            " or the path of a script or app directory."
        )
    return app
