# The model a request was submitted to (issue 12): its token ids are that model's. Requests that
# existed before were all the seeded byte-level model's.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('inference', '0002_handoff'),
    ]

    operations = [
        migrations.AddField(
            model_name='request',
            name='model',
            field=models.CharField(default='tiny', help_text="The topic's model when it was submitted: its token ids are that model's.", max_length=1024),
            preserve_default=False,
        ),
    ]
