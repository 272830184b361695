"""The tuneqdm HTTP service and the modules it shares with the worker.

Kept import-light on purpose: the worker imports `app.models`, `app.settings` and `app.storage`
without pulling in FastAPI, and nothing here may import torch (docs/design.md, layering).
"""
