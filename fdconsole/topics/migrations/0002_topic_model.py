# The model each topic serves (issue 12). Topics that existed before served the seeded byte-level
# model, so they keep it; new topics get FD_MODEL.

import fdconsole.topics.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('topics', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='topic',
            name='model',
            field=models.CharField(default='tiny', max_length=1024),
            preserve_default=False,
        ),
        migrations.AlterField(
            model_name='topic',
            name='model',
            field=models.CharField(default=fdconsole.topics.models.default_model, help_text="tiny, smollm2, or an absolute path to a Hugging Face checkpoint directory or a .gguf file on the nodes' hosts. Every node of the topic serves it; it cannot change while the topic has unfinished requests or running nodes.", max_length=1024),
        ),
    ]
