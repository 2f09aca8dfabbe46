"""Plug-ins for the trainers people already use: ``ckptstore.integrations.lightning``
(a Lightning ``CheckpointIO``) and ``ckptstore.integrations.transformers`` (an HF ``Trainer``
callback). Each needs its extra (``pip install 'ckptstore[lightning]'`` / ``[transformers]``);
nothing else in ckptstore imports these modules or the trainers."""
