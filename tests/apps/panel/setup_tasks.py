"""``--setup`` script: schedules the task of docsync_tasks.py once per server process."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docsync_tasks  # noqa: E402

docsync_tasks.schedule()
