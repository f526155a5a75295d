"""Single-file SD1/SD2/SDXL checkpoints (the files the WebUI loads) as the trainer's model, without the WebUI.

The only package that imports diffusers and accelerate (the ``train`` extra of the package). The
denoiser and VAE are diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, the text encoders
transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``; the checkpoint's ldm/sgm tensors
are renamed into them. Importing this package imports nothing.

* :mod:`~lora_trainer.backends.checkpoint.configs`: the model configurations of the three families
  (part of the package: nothing is downloaded).
* :mod:`~lora_trainer.backends.checkpoint.loader`: ``load_checkpoint``: reads the file, tells the
  family and the prediction type, builds the modules (``CheckpointError`` / ``IncompatibleModelError``).
* :mod:`~lora_trainer.backends.checkpoint.unet`: the ldm/sgm denoiser as diffusers' ``UNet2DConditionModel``.
* :mod:`~lora_trainer.backends.checkpoint.vae`: the ldm VAE as diffusers' ``AutoencoderKL``.
* :mod:`~lora_trainer.backends.checkpoint.text_encoders`: the checkpoint's CLIP-L / OpenCLIP text
  encoders as transformers' CLIP text models.
* :mod:`~lora_trainer.backends.checkpoint.tokenizer`: the CLIP tokenizer, from open_clip's BPE file.
* :mod:`~lora_trainer.backends.checkpoint.adapter`: ``CheckpointAdapter``, the loaded modules as the
  trainer's ``ModelAdapter`` (text encoded the WebUI's way).
* :mod:`~lora_trainer.backends.checkpoint.command`: ``python -m lora_trainer train`` (config, overrides,
  one or several processes, the files written).
* :mod:`~lora_trainer.backends.checkpoint.progress`: the command's progress bar, log file and Ctrl-C.
"""
