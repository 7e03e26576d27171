"""runs and tasks: partial indexes of the runs an executor holds (a machine's busy slots, its
leases) and of the machines' queue

Revision ID: 3f7a2c9e41d8
Revises: 64131941bb3a
Create Date: 2026-12-07 18:10:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '3f7a2c9e41d8'
down_revision = '64131941bb3a'
branch_labels = None
depends_on = None

HELD = "status IN ('assigned', 'running', 'waiting')"
MACHINE_QUEUE = "status = 'queued' AND (target LIKE 'machine:%' OR target LIKE 'labels:%')"


def upgrade():
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(
            'ix_runs_executor_held',
            ['executor'],
            unique=False,
            postgresql_where=sa.text(HELD),
            sqlite_where=sa.text(HELD),
        )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index(
            'ix_tasks_machine_queue',
            ['priority_rank', 'id'],
            unique=False,
            postgresql_where=sa.text(MACHINE_QUEUE),
            sqlite_where=sa.text(MACHINE_QUEUE),
        )


def downgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_machine_queue')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_executor_held')
