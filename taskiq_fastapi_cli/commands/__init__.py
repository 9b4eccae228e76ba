"""The command layer: `worker`, `check` and `health`, parsing and reporting.

Imports the runtime and health layers below it; nothing below imports it.
"""
