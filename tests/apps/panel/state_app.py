"""A `.servable()` Panel app that shows what ``pn.state`` knows of its session."""

import panel as pn

pn.extension()


def describe() -> str:
    args = pn.state.session_args.get("name", [b"-"])[0].decode()
    info = pn.state.user_info or {}
    location = pn.state.location
    return "\n\n".join([
        f"user {pn.state.user}",
        f"email {info.get('email', '-')}",
        f"args {args}",
        f"path {location.pathname if location else '-'}",
        f"search {location.search if location else '-'}",
        f"ticks {pn.state.cache.get('docsync_ticks', 0)}",
    ])


facts = pn.pane.Markdown(describe(), css_classes=["facts"])


def refresh() -> None:
    facts.object = describe()


pn.state.add_periodic_callback(refresh, period=200)
pn.Column(facts).servable()
