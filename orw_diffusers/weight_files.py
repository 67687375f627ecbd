"""The names of the weight files a run writes (into ``output_dir`` and into each checkpoint), in one place.

Imports nothing, so any module can name them.
"""

#: a pipeline's LoRA in diffusers' format: diffusers' own file name, so ``pipe.load_lora_weights(dir)`` finds it
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: a plain velocity model's LoRA: one safetensors file with peft's key names, its config in the metadata
VELOCITY_LORA_NAME = "lora_adapter.safetensors"
#: every weight of the denoiser or velocity model (``policy: full``): a state dict for ``load_state_dict``
FULL_WEIGHTS_NAME = "model.safetensors"
#: a finished run's weights are one of these
WEIGHT_FILES = (LORA_WEIGHTS_NAME, VELOCITY_LORA_NAME, FULL_WEIGHTS_NAME)
