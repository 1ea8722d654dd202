import sys

from flask_docsync.cli import main

sys.exit(main())
