"""task queue counts, kept by a trigger on PostgreSQL

Revision ID: 7c1e5a9b3d20
Revises: 442b02a907ab
Create Date: 2026-11-26 15:40:00

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '7c1e5a9b3d20'
down_revision = '442b02a907ab'
branch_labels = None
depends_on = None

# +1 when a task enters `queued` (or moves to another project or priority while queued), -1 when
# it leaves; each server process writes its own row, so concurrent transactions never collide.
TRIGGER_FUNCTION = """
CREATE FUNCTION sb_task_queue_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_queued boolean := false;
  is_queued boolean := false;
  moved boolean := false;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    was_queued := OLD.status = 'queued';
  END IF;
  IF TG_OP <> 'DELETE' THEN
    is_queued := NEW.status = 'queued';
  END IF;
  IF TG_OP = 'UPDATE' THEN
    moved := NEW.project_id <> OLD.project_id OR NEW.priority_rank <> OLD.priority_rank;
  END IF;
  IF was_queued AND (NOT is_queued OR moved) THEN
    INSERT INTO task_queue_counts (project_id, priority_rank, shard, queued)
    VALUES (OLD.project_id, OLD.priority_rank, pg_backend_pid(), -1)
    ON CONFLICT (project_id, priority_rank, shard)
    DO UPDATE SET queued = task_queue_counts.queued - 1;
  END IF;
  IF is_queued AND (NOT was_queued OR moved) THEN
    INSERT INTO task_queue_counts (project_id, priority_rank, shard, queued)
    VALUES (NEW.project_id, NEW.priority_rank, pg_backend_pid(), 1)
    ON CONFLICT (project_id, priority_rank, shard)
    DO UPDATE SET queued = task_queue_counts.queued + 1;
  END IF;
  RETURN NULL;
END
$$
"""


def upgrade():
    op.create_table('task_queue_counts',
    sa.Column('project_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('priority_rank', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('queued', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('project_id', 'priority_rank', 'shard', name=op.f('pk_task_queue_counts'))
    )
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(TRIGGER_FUNCTION)
        op.execute(
            "CREATE TRIGGER tasks_queue_count AFTER INSERT OR DELETE"
            " OR UPDATE OF status, priority_rank, project_id ON tasks"
            " FOR EACH ROW EXECUTE FUNCTION sb_task_queue_count()"
        )
        # the tasks already queued
        op.execute(
            "INSERT INTO task_queue_counts (project_id, priority_rank, shard, queued)"
            " SELECT project_id, priority_rank, 0, count(*) FROM tasks"
            " WHERE status = 'queued' GROUP BY project_id, priority_rank"
        )


def downgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS tasks_queue_count ON tasks")
        op.execute("DROP FUNCTION IF EXISTS sb_task_queue_count()")
    op.drop_table('task_queue_counts')
