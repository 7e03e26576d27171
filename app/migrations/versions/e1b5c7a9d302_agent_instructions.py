"""projects: agent_instructions, what a project's agents are told of Switchboard

Revision ID: e1b5c7a9d302
Revises: c3f9a1d6e827
Create Date: 2026-12-08 00:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e1b5c7a9d302'
down_revision = 'c3f9a1d6e827'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_instructions', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('agent_instructions')
