from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.fields.base import OnDelete
from uuid import uuid4
from tortoise import fields
from tortoise.indexes import Index
from tortoise.migrations.constraints import UniqueConstraint

class Migration(migrations.Migration):
    dependencies = [('models', '0002_schedules_automations')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Invitation',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('org', fields.ForeignKeyField('models.Organization', source_field='org_id', db_constraint=True, to_field='id', related_name='invitations', on_delete=OnDelete.CASCADE)),
                ('email', fields.CharField(max_length=254)),
                ('role', fields.CharField(max_length=16)),
                ('status', fields.CharField(default='pending', db_default='pending', max_length=16)),
                ('expires_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('invited_by', fields.ForeignKeyField('models.User', source_field='invited_by_id', null=True, db_constraint=True, to_field='id', related_name='invitations_sent', on_delete=OnDelete.SET_NULL)),
                ('responded_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'invitations', 'app': 'models', 'indexes': [Index(fields=['email', 'status']), Index(fields=['org_id', 'status'])], 'pk_attr': 'id', 'table_description': 'A role offered to whoever proves the (normalized) email address by signing in.'},
            bases=['TimestampedModel'],
        ),
        ops.AlterField(
            model_name='IntegrationToken',
            name='name',
            field=fields.CharField(max_length=100),
        ),
        ops.AddConstraint(
            model_name='IntegrationToken',
            constraint=UniqueConstraint(fields=('org', 'name'), name=None),
        ),
    ]
