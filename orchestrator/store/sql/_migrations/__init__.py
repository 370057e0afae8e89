"""The saga store's migrations: an Alembic script directory shipped inside the package.

`orchestrator.store.sql._migrate.upgrade` runs them on the store's engine at
start; nothing here reads an `alembic.ini`. Each revision under `versions/`
spells out its tables as plain Alembic operations and never imports the live
`_schema` (which follows the newest revision, not theirs).

A new revision: write `versions/NNNN_what_it_does.py` by hand (copy the
latest), or let Alembic lay one out from `script.py.mako`::

    .venv/bin/python -c "from alembic import command; \\
        from orchestrator.store.sql._migrate import alembic_config; \\
        command.revision(alembic_config(), message='what it does', rev_id='0003')"

then change `_schema.py` to match; `tests/test_migrations.py` checks that
the migrations produce exactly `_schema.metadata`.
"""
