"""tasks: `tty`, whether the agent runs in a pseudo-terminal (null: its agent's default)

Revision ID: 8c1d0e5a7b3f
Revises: 3f7a2c9e41d8
Create Date: 2026-12-07 23:10:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '8c1d0e5a7b3f'
down_revision = '3f7a2c9e41d8'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tty', sa.Boolean(), nullable=True))


def downgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('tty')
