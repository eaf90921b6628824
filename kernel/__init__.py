"""The ground floor every stage stands on: config, errors, exit codes, atomic I/O, hashing, tracking, task map.

Imports no stage package (checked by import-linter, see pyproject.toml).
"""
