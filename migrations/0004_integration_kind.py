from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0003_tenancy_hardening')]

    initial = False

    operations = [
        # Reverting AddField on SQLite rebuilds the table without the (org_id, name) unique
        # index of 0003; this step, undone after the column is gone, puts it back (on
        # PostgreSQL the constraint's index still exists and nothing happens).
        ops.RunSQL(
            "SELECT 1",
            reverse_sql='CREATE UNIQUE INDEX IF NOT EXISTS "uid_integration_org_id_e63326" '
            'ON "integration_tokens" ("org_id", "name")',
        ),
        ops.AddField(
            model_name='IntegrationToken',
            name='kind',
            field=fields.CharField(default='generic', description='what connects with it, one of INTEGRATION_KINDS', db_default='generic', max_length=16),
        ),
    ]
