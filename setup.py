"""Packaging for flask-docsync.

The top-level ``templates/`` and ``static/`` folders ship inside the
package as ``flask_docsync/templates`` and ``flask_docsync/static``.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _files_under(folder):
    out = []
    for root, _dirs, files in os.walk(os.path.join(HERE, folder)):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), os.path.join(HERE, folder)))
    return out


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="flask-docsync",
    version="0.1.0",
    description="The Bokeh Server as a Flask extension on gevent",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    packages=["flask_docsync", "flask_docsync.templates", "flask_docsync.static"],
    package_dir={
        "flask_docsync": "flask_docsync",
        "flask_docsync.templates": "templates",
        "flask_docsync.static": "static",
    },
    package_data={
        "flask_docsync.templates": _files_under("templates"),
        "flask_docsync.static": _files_under("static"),
    },
    include_package_data=True,
    install_requires=[
        "bokeh>=3.4,<4",
        "flask>=3",
        "gevent>=23.9",
        "gunicorn>=21",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "websocket-client>=1.6",
            "playwright>=1.40",
            "hypothesis>=6",
            "psutil>=5",
            "numpy>=1.24",
            "gevent-websocket>=0.10",
            # .ipynb apps (tests/apps/panel/notebook_app.ipynb), as bokeh and panel serve need.
            "nbconvert>=7",
            "redis>=5",
            # The pairs the suite runs: Panel 1.9 on bokeh 3.9, Panel 1.10 on bokeh 3.10.
            'panel>=1.9.4,<1.10; python_version < "3.12"',
            'panel>=1.10,<1.11; python_version >= "3.12"',
        ],
        # Panel apps (flask_docsync.panel); Panel chooses the bokeh it needs.
        "panel": ["panel>=1.9.4,<1.11"],
        # DOCSYNC_REDIS_URL: broadcasts across workers and hosts (flask_docsync.pubsub).
        "redis": ["redis>=5"],
    },
    entry_points={"console_scripts": ["flask-docsync = flask_docsync.cli:main"]},
    classifiers=[
        "Framework :: Flask",
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: BSD License",
    ],
    zip_safe=False,
)
