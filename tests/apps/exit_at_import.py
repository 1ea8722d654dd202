"""A script app that calls sys.exit() in its module body, on every session."""

import sys

sys.exit(3)
