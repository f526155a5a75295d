"""Network algorithms and their attachment to a model.

* ``registry.py``: the algorithm names and registry, torch-free (the config reads it).
* ``base.py``: ``NetworkModule``, what every algorithm's module shares.
* ``lora.py``: LoRA/LoCon (kohya's ``networks.lora``); one module per further algorithm.
* ``hooks.py``: forward hooks and the fused-attention forward that add a module's delta.
* ``network.py``: ``LoRANetwork``, the container, and ``network_from_weights``.

Nothing is imported here, so ``lora_trainer.networks.registry`` loads without torch.
"""
