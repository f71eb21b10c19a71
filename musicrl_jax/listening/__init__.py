"""Listening sessions: collect real pairwise preferences and 1-5 ratings from people.

batch.py (the pairs on disk), store.py (SQLite: listeners, sessions, issued pairs, votes,
security events), server.py (the FastAPI page), summary.py (agreement, win rates),
export.py (votes -> musicrl_preferences / musicrl_ratings shards), __main__.py (the CLI).
See README.md beside this file for a session from start to finish.
"""
