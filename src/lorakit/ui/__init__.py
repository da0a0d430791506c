"""`lorakit ui`: the web dashboard for runs, registry adapters and the live server (app.py)."""
