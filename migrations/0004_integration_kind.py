from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0003_tenancy_hardening')]

    initial = False

    operations = [
        ops.AddField(
            model_name='IntegrationToken',
            name='kind',
            field=fields.CharField(default='generic', description='what connects with it, one of INTEGRATION_KINDS', db_default='generic', max_length=16),
        ),
    ]
