"""Found first on PYTHONPATH: uvloop is not importable (see __init__.py)."""

raise ImportError("uvloop is hidden here (tools/without_uvloop)")
