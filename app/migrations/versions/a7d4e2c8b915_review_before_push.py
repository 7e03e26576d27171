"""review before push: projects' review settings, runs' review state, run_changes

Revision ID: a7d4e2c8b915
Revises: 5e2b7c9d1a04
Create Date: 2026-12-07 23:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'a7d4e2c8b915'
down_revision = '5e2b7c9d1a04'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('review', sa.String(length=8), nullable=True))
        batch_op.add_column(
            sa.Column('review_role', sa.String(length=16), nullable=False,
                      server_default='maintainer')
        )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('review', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('review_error', sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column('pull_request_url', sa.String(length=500), nullable=True))
    op.create_table(
        'run_changes',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('branch', sa.String(length=300), nullable=False),
        sa.Column('base_commit', sa.String(length=64), nullable=False),
        sa.Column('head_commit', sa.String(length=64), nullable=False),
        sa.Column('diff', sa.Text(), nullable=False),
        sa.Column('truncated', sa.Boolean(), nullable=False),
        sa.Column('files', sa.JSON(), nullable=False),
        sa.Column('bundle', sa.LargeBinary(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id'),
    )


def downgrade():
    op.drop_table('run_changes')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('pull_request_url')
        batch_op.drop_column('review_error')
        batch_op.drop_column('review')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('review_role')
        batch_op.drop_column('review')
