"""An OpenAI-compatible HTTP server over the recurrent state (`t2r serve`, extra `[serve]`).

engine.py runs the scheduler's decode loop in one thread; app.py is the FastAPI application;
prefix_cache.py and sessions.py keep states (prompt prefixes, conversations) at constant size.
"""
