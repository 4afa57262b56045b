"""The results database: schema, engine, migrations, idempotent writes, progress and read-only SQL.

Imports nothing else of this project.
"""
