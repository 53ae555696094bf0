"""Zeus's batch-size optimizer across recurring training runs (You, Chung, Chowdhury, NSDI'23).

``python -m lit.batch_size run|history|simulate``; the policy is in :mod:`lit.batch_size.policy`
(pure functions), the run history in :mod:`lit.batch_size.history` (SQLite), the stopping
callback in :mod:`callbacks.batch_size_target`. See docs/batch_size.md.
"""
