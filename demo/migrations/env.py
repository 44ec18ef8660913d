"""Alembic environment: the engine comes from the server (config.attributes) or from the settings."""

from __future__ import annotations

from alembic import context

from demo.common.infra.db import engine_for
from demo.common.infra.migrate import include_name
from demo.conf import settings as demo_settings
from demo.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # the alembic CLI: same resolution as the server (env, defaults)
    settings = demo_settings.load(argv=[])
    engine = engine_for(settings, pool_size=1, long_work=True)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite can only ALTER via table copies
        compare_type=True,
        include_name=include_name,  # the migration lock's table is made outside Alembic, not a model
    )
    with context.begin_transaction():
        context.run_migrations()
