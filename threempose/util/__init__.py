"""The ground floor: what every other part may use and which imports nothing above it.

* :mod:`~threempose.util.errors` — :class:`UserError`, the base of every error a user can fix;
* :mod:`~threempose.util.cli` — ``entry_point`` (one line and exit 2 for a user's error), output
  path checks before work, size arguments;
* :mod:`~threempose.util.files` — atomic writes and the one JSON reader;
* :mod:`~threempose.util.threads` — the thread policy (intra-op threads, loader workers);
* :mod:`~threempose.util.flops` — GFLOPs as multiply-adds (the papers' convention).
"""
